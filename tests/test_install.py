"""vla-exp as an installed tool: the wheel's commands work in an empty folder with no checkout beside it."""
import json
import os
import shutil
import site
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
COMMANDS = ("vla-exp-train", "vla-exp-diff", "vla-exp-study", "vla-exp-report", "vla-exp-evaluate", "vla-exp-convert")


@pytest.fixture(scope="module")
def installed(tmp_path_factory):
    """A fresh venv holding the wheel of this checkout (its dependencies seen from the test's environment, so
    nothing is downloaded), and an empty folder to run its commands in."""
    tmp = tmp_path_factory.mktemp("wheel")
    source = tmp / "source"  # a copy, so no build folder of an earlier build (with files since removed) is reused
    for part in ("vla_exp", "conf"):
        shutil.copytree(ROOT / part, source / part, ignore=shutil.ignore_patterns("__pycache__"))
    for part in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / part, source)
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w", tmp / "dist",
                    source], check=True, capture_output=True)
    (wheel,) = (tmp / "dist").glob("vla_exp-*.whl")
    venv = tmp / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", venv], check=True)
    subprocess.run([sys.executable, "-m", "pip", "--python", venv / "bin" / "python", "install", "-q", "--no-deps",
                    wheel], check=True, capture_output=True)
    (own,) = (venv / "lib").glob("python*/site-packages")
    # a path entry, not a site folder: the test environment's .pth files (its editable vla_exp) are not run
    (own / "dependencies.pth").write_text("\n".join(site.getsitepackages()) + "\n")
    empty = tmp / "empty"
    empty.mkdir()
    env = {**os.environ, "PATH": f"{venv / 'bin'}:{os.environ['PATH']}"}
    env.pop("PYTHONPATH", None)
    return venv, empty, env


def run(installed, *args):
    venv, empty, env = installed
    return subprocess.run(args, cwd=empty, env=env, capture_output=True, text=True, timeout=600)


@pytest.mark.slow
def test_the_wheel_installs_every_command_and_its_configs(installed):
    venv, _, _ = installed
    probe = run(installed, "python", "-c", "import vla_exp, vla_exp.config as c; print(vla_exp.__file__, c.CONF_DIR)")
    module, conf = probe.stdout.split()
    assert module.startswith(str(venv)) and conf.startswith(str(venv)), probe.stderr  # not the checkout's
    for command in COMMANDS:
        out = run(installed, command, "--help")
        assert out.returncode == 0 and command in out.stdout, (command, out.stderr[-2000:])
    assert "init: none, torch_default, xavier, xavier_all, xavier_more" in run(installed, "vla-exp-train", "--help").stdout


@pytest.mark.slow
def test_an_installed_multirun_trains_and_reports_from_an_empty_folder(installed):
    _, empty, _ = installed
    sweep = empty / "sweep"
    out = run(installed, "vla-exp-train", "-m", "init=xavier,none", "debug=smoke", "logger=none", "progress=false",
              f"hydra.sweep.dir={sweep}")
    assert out.returncode == 0, out.stderr[-3000:]
    summaries = [json.loads(p.read_text()) for p in sorted(sweep.glob("*/summary.json"))]
    assert sorted(s["choices"]["init"] for s in summaries) == ["none", "xavier"]
    assert all(s["status"] == "completed" for s in summaries)
    out = run(installed, "vla-exp-report", str(sweep))
    assert out.returncode == 0, out.stderr[-3000:]
    assert "Report: 2 runs in 2 cells" in (sweep / "report" / "table.md").read_text()
    out = run(installed, "vla-exp-diff", "recipe=original", "recipe=fixed")
    assert out.returncode == 0 and "init" in out.stdout and "clipping" in out.stdout, out.stderr[-2000:]
    out = run(installed, "vla-exp-study", "factorial", "--dry-run", "--seeds", "0", "--out", str(empty / "study"))
    assert out.returncode == 0 and "16 runs into" in out.stdout, out.stderr[-2000:]
    assert not (empty / "study").exists()  # a dry run launches and writes nothing
