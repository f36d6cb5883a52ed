"""The real command line, in subprocesses: single runs, multirun, --help, --cfg, and the results table."""
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parent.parent


def run(*args, cwd=ROOT):
    out = subprocess.run([sys.executable, *args], cwd=cwd, capture_output=True, text=True, env=os.environ)
    assert out.returncode == 0, out.stderr[-3000:]
    return out.stdout


def test_help_lists_groups_and_options():
    out = run("-m", "vla_exp.training.main", "--help")
    for group, option in [("init", "xavier_all"), ("loss_handling", "skip_nonfinite"), ("optim", "fixed"),
                          ("clipping", "grad_norm"), ("recipe", "original"), ("debug", "smoke"), ("model", "tiny")]:
        line = next(l for l in out.splitlines() if l.startswith(f"{group}:"))
        assert option in line


def test_cfg_job_prints_the_composed_config():
    out = run("-m", "vla_exp.training.main", "recipe=fixed", "init=none", "--cfg", "job")
    assert "recipe: fixed" in out and "_target_: vla_exp.fixes.NoInit" in out and "lr: 0.0001" in out


def test_single_run_writes_into_the_hydra_run_dir(tmp_path):
    run("-m", "vla_exp.training.main", "recipe=fixed", "init=none", "debug=smoke", f"hydra.run.dir={tmp_path}")
    s = json.loads((tmp_path / "summary.json").read_text())
    assert s["status"] == "completed" and s["choices"]["init"] == "none" and s["choices"]["optim"] == "fixed"
    steps = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in steps if r["kind"] == "step"] == list(range(1, s["steps"] + 1))
    saved = (tmp_path / ".hydra" / "config.yaml").read_text()
    assert "_target_: vla_exp.fixes.NoInit" in saved and "name: skip_nonfinite" in saved


def test_multirun_one_job_per_choice(tmp_path):
    run("-m", "vla_exp.training.main", "-m", "init=xavier,none", "debug=smoke", "logger=none", f"hydra.sweep.dir={tmp_path}")
    summaries = [json.loads(p.read_text()) for p in sorted(tmp_path.glob("*/summary.json"))]
    assert sorted(s["choices"]["init"] for s in summaries) == ["none", "xavier"]
    assert all(s["status"] == "completed" for s in summaries)


def test_reproduce_table_prints_measured_beside_reported(tmp_path):
    out = run("experiments/reproduce_table.py", "--out", str(tmp_path), "debug=smoke", "logger=none")
    table = (tmp_path / "table.md").read_text()
    assert table in out and f"Table written to {tmp_path / 'table.md'}" in out
    header = next(l for l in table.splitlines() if l.startswith("| metric"))
    assert "original: reported" in header and "fixed: measured, legacy loader, stale memory" in header
    cells = {}
    for recipe in ("original", "fixed"):
        for loading in ("current", "legacy_stale"):
            cells[recipe, loading] = json.loads((tmp_path / f"{recipe}-{loading}" / "summary.json").read_text())
    row = next(l for l in table.splitlines() if l.startswith("| Initial output std"))
    assert f"{cells['fixed', 'current']['initial_output_std']:.3g}" in row
    assert "1400+" in next(l for l in table.splitlines() if l.startswith("| Loss"))  # the reported column


def test_installed_package_finds_its_configs(tmp_path):
    """Not only a checkout: a plain (non-editable) install carries conf/ inside the package."""
    target, elsewhere, source = tmp_path / "site", tmp_path / "cwd", tmp_path / "src"
    elsewhere.mkdir()
    # build from a copy: setuptools writes build/ and *.egg-info next to the sources
    shutil.copytree(ROOT, source, ignore=shutil.ignore_patterns(".*", "build", "*.egg-info", "results", "outputs",
                                                                  "multirun", "__pycache__"))
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation", "--target",
                    str(target), str(source)], check=True, capture_output=True, cwd=tmp_path)
    env = {**os.environ, "PYTHONPATH": str(target)}
    out = subprocess.run([sys.executable, "-m", "vla_exp.training.main", "recipe=fixed", "--cfg", "job"], cwd=elsewhere,
                         env=env, capture_output=True, text=True, check=True).stdout
    assert "name: skip_nonfinite" in out
    probe = "import vla_exp.config as c; print(c.CONF_DIR)"
    conf = subprocess.run([sys.executable, "-c", probe], cwd=elsewhere, env=env, capture_output=True, text=True).stdout
    assert conf.strip() == str(target / "vla_exp" / "conf")


def test_reproduce_table_rejects_an_unknown_loader():
    out = subprocess.run([sys.executable, "experiments/reproduce_table.py", "--loaders", "current,legacy"], cwd=ROOT,
                         capture_output=True, text=True)
    assert out.returncode == 2 and "unknown ['legacy']" in out.stderr and "legacy_zeros" in out.stderr


def test_bad_input_is_one_line_without_traceback(tmp_path):
    out = subprocess.run([sys.executable, "-m", "vla_exp.training.main", "logger=none", f"data.dir={tmp_path}",
                          f"hydra.run.dir={tmp_path / 'run'}"], cwd=ROOT, capture_output=True, text=True)
    assert out.returncode == 1
    assert out.stderr.strip() == f"error: data.dir={tmp_path}: no *.hdf5 episode files there"
