"""Hostile files, shared folders, full disks and damaged caches: vla-exp refuses in one line, before any work, and
never trusts what it cannot check. (Signals and resume: tests/test_resume.py.)"""
import json
import os
import re
import resource
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
import torch

from vla_exp import UsageError, tensors
from vla_exp.training import checkpoint
from vla_exp.data.sources import episodes_dir
from vla_exp.files import Busy, atomic, exclusive
from vla_exp.policy.load import backbone_path
from vla_exp.training.loop import train
from vla_exp.runs import status_of
from vla_exp.training.sweep import REFUSED

ROOT = Path(__file__).resolve().parent.parent
FAST = ("logger=none", "progress=false", "debug=smoke", "recipe=fixed")


def one_line(excinfo):
    message = str(excinfo.value)
    assert "\n" not in message
    return message


def cli(*args, env=None, **kwargs):
    return subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True, env=env or os.environ,
                          **kwargs)


class Plant:
    """What a hostile checkpoint.pt holds: an object whose unpickling creates a file (it could run anything)."""
    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return Path.touch, (self.path,)


# ------------------------------------------------------------------------------------------------ safe loading
@pytest.mark.parametrize("where", ["run folder", "resume="])
def test_a_hostile_checkpoint_is_refused_in_one_line_and_never_runs(make_cfg, tmp_path, where):
    planted, shared = tmp_path / "planted", tmp_path / "shared"
    shared.mkdir()
    torch.save({"format": checkpoint.FORMAT, "policy": Plant(planted)}, shared / "checkpoint.pt")
    run_dir = shared if where == "run folder" else tmp_path / "run"
    with pytest.raises(UsageError) as e:
        train(make_cfg(*FAST, *([f"resume={shared}"] if where == "resume=" else [])), run_dir)
    assert not planted.exists()
    assert one_line(e).startswith(f"{shared / 'checkpoint.pt'}: refused: this checkpoint holds objects other than "
                                  "tensors and plain values")
    assert not (run_dir / "metrics.jsonl").exists()  # refused before any training


def test_a_hostile_policy_file_is_refused_in_one_line(tmp_path):
    """vla-exp-evaluate reads a run's policy.pt through tensors.read."""
    torch.save({"embed_out.weight": Plant(tmp_path / "planted")}, tmp_path / "policy.pt")
    with pytest.raises(UsageError) as e:
        tensors.read(tmp_path / "policy.pt", "policy")
    assert not (tmp_path / "planted").exists() and one_line(e).startswith(f"{tmp_path / 'policy.pt'}: refused: this "
                                                                          "policy holds objects other than tensors")


def test_a_checkpoint_of_another_format_is_refused_before_training(make_cfg, tmp_path):
    cfg = make_cfg(*FAST, "checkpoint.keep=true")
    train(cfg, tmp_path / "done")
    old = tensors.read(tmp_path / "done" / "checkpoint.pt", "checkpoint")
    del old["format"]  # as the code wrote it before checkpoints had a format (which also pickled numpy RNG states)
    (tmp_path / "run").mkdir()
    torch.save(old, tmp_path / "run" / "checkpoint.pt")
    with pytest.raises(UsageError) as e:
        train(make_cfg(*FAST, "checkpoint.keep=true", "seed=1"), tmp_path / "run")
    assert one_line(e) == (f"{tmp_path / 'run' / 'checkpoint.pt'}: a checkpoint of format 1; this version of vla-exp "
                           f"reads format {checkpoint.FORMAT}. Delete it (the run then starts afresh) or finish the "
                           "run with the version that wrote it")
    assert not (tmp_path / "run" / "metrics.jsonl").exists()


@pytest.mark.parametrize("damage", ["shape", "progress"])
def test_a_same_config_checkpoint_that_cannot_be_restored_is_one_line(make_cfg, tmp_path, damage):
    cfg = make_cfg(*FAST, "checkpoint.keep=true")
    train(cfg, tmp_path / "done")
    ckpt = tensors.read(tmp_path / "done" / "checkpoint.pt", "checkpoint")
    key = next(k for k in ckpt["policy"] if k.startswith("embed_out.") and k.endswith(".weight"))
    shape = tuple(ckpt["policy"][key].shape)
    if damage == "shape":
        ckpt["policy"][key] = ckpt["policy"][key][..., :1].clone()
    else:
        ckpt["progress"] = "{not json"
    (tmp_path / "run").mkdir()
    torch.save(ckpt, tmp_path / "run" / "checkpoint.pt")
    with pytest.raises(UsageError) as e:
        train(cfg, tmp_path / "run")
    path = tmp_path / "run" / "checkpoint.pt"
    assert one_line(e) == (f"{path}: {key} is {(*shape[:-1], 1)} there, {shape} in this run's model: delete it (the "
                           "run then starts afresh)" if damage == "shape" else
                           f"{path}: its progress record is not readable JSON: delete it (the run then starts afresh)")


@pytest.mark.parametrize("name", ["checkpoint.pt", "metrics.jsonl", "summary.json"])
def test_a_folder_where_a_run_writes_a_file_is_refused_before_training(make_cfg, tmp_path, name):
    (tmp_path / "run" / name).mkdir(parents=True)
    with pytest.raises(UsageError) as e:
        train(make_cfg(*FAST), tmp_path / "run")
    assert one_line(e) == (f"{tmp_path / 'run' / name} is a folder, not the file a run writes there: remove it or "
                           "give another run folder")


@pytest.mark.slow  # a subprocess each
@pytest.mark.parametrize("where", ["run", "run/.hydra"])
def test_a_run_folder_that_is_a_file_is_one_line(tmp_path, where):
    (tmp_path / where).parent.mkdir(parents=True, exist_ok=True)
    (tmp_path / where).write_text("")
    out = cli("-m", "vla_exp.training.main", *FAST, f"hydra.run.dir={tmp_path / 'run'}")
    assert out.returncode == 1
    what = "run folder" if where == "run" else "config folder"
    assert out.stderr.strip() == (f"error: {tmp_path / where} is a file, not a folder: the {what} "
                                  f"{tmp_path / where} cannot be made there; remove it or give another folder")


# ------------------------------------------------------------------------------------------------ shared folders
def test_a_run_into_a_held_folder_stops_naming_the_holder_and_touches_nothing(make_cfg, tmp_path):
    train(make_cfg(*FAST), tmp_path)
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir() if p.is_file()}
    with exclusive(tmp_path, "another run"), pytest.raises(Busy) as e:  # the kernel's lock: held as by a process
        train(make_cfg(*FAST, "seed=1"), tmp_path)
    assert one_line(e) == (f"{tmp_path} is in use by another run (pid {os.getpid()}): wait for it to end, or give "
                           "this one another folder")
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir() if p.is_file()} == before


def test_two_writers_of_one_file_never_share_a_temporary_name(tmp_path):
    with atomic(tmp_path / "summary.json") as a, atomic(tmp_path / "summary.json") as b:
        a.write_text("first")
        b.write_text("second")
        assert a != b
    assert (tmp_path / "summary.json").read_text() == "first"  # the last to finish wins, whole
    assert [p.name for p in tmp_path.iterdir()] == ["summary.json"]


@pytest.mark.slow
def test_a_second_run_process_into_a_running_folder_stops_and_the_first_finishes(tmp_path):
    args = ("-m", "vla_exp.training.main", *FAST, "epochs=2", "data.episodes=12", "threads=1", f"hydra.run.dir={tmp_path}")
    first = subprocess.Popen([sys.executable, *args], cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                             text=True)
    deadline = time.time() + 120
    while time.time() < deadline and not (tmp_path / "metrics.jsonl").is_file():
        time.sleep(0.05)
    second = cli(*args)
    assert second.returncode == 1 and second.stderr.strip().splitlines()[-1] == (
        f"error: {tmp_path} is in use by another run (pid {first.pid}): wait for it to end, or give this one another "
        "folder")
    assert first.wait(timeout=300) == 0, first.stderr.read()[-3000:]
    s = json.loads((tmp_path / "summary.json").read_text())
    steps = [r["step"] for r in map(json.loads, open(tmp_path / "metrics.jsonl")) if r["kind"] == "step"]
    assert s["status"] == "completed" and steps == list(range(1, s["steps"] + 1))  # its rows, whole


@pytest.mark.slow
def test_a_second_sweep_into_a_held_sweep_folder_launches_nothing(tmp_path):
    with exclusive(tmp_path, "another sweep"):
        out = cli("-m", "vla_exp.training.main", "-m", "init=xavier,none", *FAST, f"hydra.sweep.dir={tmp_path}")
    assert out.returncode == REFUSED == 2 and out.stderr.strip().splitlines()[-1] == (
        f"error: {tmp_path} is in use by another sweep (pid {os.getpid()}): wait for it to end, or give this one "
        "another folder")
    assert not list(tmp_path.glob("*/summary.json")) and not list(tmp_path.glob("*/metrics.jsonl"))


@pytest.mark.slow
def test_a_multirun_with_bad_jobs_names_each_and_launches_nothing(tmp_path):
    out = cli("-m", "vla_exp.training.main", "-m", "optim.lr=0.001,-1", "epochs=1,0", *FAST, f"hydra.sweep.dir={tmp_path}")
    assert out.returncode == REFUSED and "Traceback" not in out.stderr
    assert out.stderr.strip().splitlines()[-4:] == [
        "error: nothing launched; these jobs' configs are not valid:",
        "job 1 (optim.lr=0.001 epochs=0): epochs=0: must be an integer >= 1",
        "job 2 (optim.lr=-1 epochs=1): optim.lr=-1: must be a number > 0",
        "job 3 (optim.lr=-1 epochs=0): epochs=0: must be an integer >= 1"]  # each job by what sets it apart
    assert not [p for p in tmp_path.iterdir() if p.is_dir()]  # not one job folder


def test_a_sweep_counts_a_summary_it_cannot_read_as_failed(tmp_path):
    for text, status in (("[]", "unreadable"), ("null", "unreadable"), ('{"status": "interrupted"}', "interrupted"),
                         ('{"status": "comp', "unreadable"), ("{}", "unreadable")):
        (tmp_path / "summary.json").write_text(text)
        assert status_of(tmp_path) == status


# ------------------------------------------------------------------------------------------------ disk and cache
def file_size_limit(mb):
    """For a child process: files may grow to `mb` MB, the next write fails (EFBIG, as ENOSPC on a full disk)."""
    def limit():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (mb * 2 ** 20, mb * 2 ** 20))
    return limit


@pytest.mark.slow
def test_a_full_disk_at_the_checkpoint_is_one_line_and_the_summary_says_so(tmp_path):
    # 30 MB: the data, the backbone (4 MB), the policy (23 MB) and every log fit; the checkpoint (70 MB) does not
    out = cli("-m", "vla_exp.training.main", *FAST, f"hydra.run.dir={tmp_path}", preexec_fn=file_size_limit(30))
    assert out.returncode == 1 and "Traceback" not in out.stderr
    line = out.stderr.strip().splitlines()[-1]
    assert re.fullmatch(rf"error: no space left on {tmp_path} \(File too large\): the checkpoint needs about (\d+) MB",
                        line) and 60 < int(line.split()[-2]) < 80
    s = json.loads((tmp_path / "summary.json").read_text())
    assert s["status"] == "failed" and s["error"] == f"UsageError: {line[len('error: '):]}"
    assert not list(tmp_path.glob(".*.tmp")) and not (tmp_path / "checkpoint.pt").exists()


@pytest.mark.slow
def test_a_full_cache_names_vla_exp_cache(tmp_path):
    env = {**os.environ, "VLA_EXP_CACHE": str(tmp_path / "cache")}
    out = cli("-m", "vla_exp.training.main", *FAST, f"hydra.run.dir={tmp_path / 'run'}", preexec_fn=file_size_limit(1), env=env)
    assert out.returncode == 1 and "Traceback" not in out.stderr
    assert out.stderr.strip().splitlines()[-1] == (
        f"error: cannot write the cached backbone in {tmp_path / 'cache' / 'backbones'} (File too large (os error "
        "27)): set "
        "VLA_EXP_CACHE to a writable folder with space")
    assert not list((tmp_path / "cache" / "backbones").iterdir())  # no half-written entry a later run would trust


def test_a_cache_that_cannot_be_written_names_vla_exp_cache(make_cfg, tmp_path, monkeypatch):
    (tmp_path / "a_file").write_text("")
    monkeypatch.setenv("VLA_EXP_CACHE", str(tmp_path / "a_file" / "cache"))
    with pytest.raises(UsageError) as e:
        train(make_cfg(*FAST), tmp_path / "run")
    assert one_line(e) == (f"cannot write the cache folder {tmp_path / 'a_file' / 'cache' / 'data'} (Not a "
                           "directory): set VLA_EXP_CACHE to a writable folder with space")


def test_a_damaged_cache_entry_is_named_and_never_trained_on(make_cfg, tmp_path, monkeypatch):
    monkeypatch.setenv("VLA_EXP_CACHE", str(tmp_path / "cache"))
    cfg = make_cfg(*FAST)
    data, backbone = episodes_dir(cfg), backbone_path(cfg.model, cfg.paths.cache_dir)
    hint = "delete the folder and it will be regenerated"

    def refused():
        with pytest.raises(UsageError) as e:
            train(make_cfg(*FAST), tmp_path / "run")
        s = json.loads((tmp_path / "run" / "summary.json").read_text())
        assert s["status"] == "failed" and s["error"] == f"UsageError: {e.value}" and "steps" not in s
        return one_line(e)

    (data / "episode_00003.hdf5").unlink()
    assert refused() == f"the cached data in {data} is incomplete (episode_00003.hdf5 is missing): {hint}"
    shutil.rmtree(data)
    assert episodes_dir(cfg) == data and len(list(data.glob("*.hdf5"))) == 6  # regenerated whole

    size = (data / "episode_00001.hdf5").stat().st_size
    os.truncate(data / "episode_00001.hdf5", size // 2)
    assert refused() == f"the cached data in {data} is incomplete (episode_00001.hdf5 is {size // 2} bytes, not " \
                        f"{size}): {hint}"
    shutil.rmtree(data)

    size = (backbone / "model.safetensors").stat().st_size
    os.truncate(backbone / "model.safetensors", 1000)
    assert refused() == f"the cached backbone in {backbone} is incomplete (model.safetensors is 1000 bytes, not " \
                        f"{size}): {hint}"


# ------------------------------------------------------------------------------------------------ the report
@pytest.mark.slow
def test_the_report_never_pools_different_configs_and_reads_any_summary(tmp_path):
    sweep = tmp_path / "sweep"
    out = cli("-m", "vla_exp.training.main", "-m", "data.episodes=6,7", *FAST, f"hydra.sweep.dir={sweep}")
    assert out.returncode == 0, out.stderr[-3000:]
    report = cli("-m", "vla_exp.attribution.report", str(sweep))
    assert report.returncode == 1 and report.stderr.strip() == (
        "error: cell 'fixed': its 2 runs ran 2 different configs (differing in data.episodes (6/7)), not seed "
        "replicates of one; report each config apart")

    (six,) = sweep.glob("0_*")
    for copy, text in (("copy", None), ("empty", "[]"), ("null", "null")):
        shutil.copytree(six, tmp_path / "one" / copy)
        if text:
            (tmp_path / "one" / copy / "summary.json").write_text(text)
    shutil.copytree(six, tmp_path / "one" / "six")
    report = cli("-m", "vla_exp.attribution.report", str(tmp_path / "one"))
    assert report.returncode == 0, report.stderr[-3000:]
    assert f"warning: cell 'fixed' holds seed 0 more than once ({tmp_path / 'one' / 'copy'}, " \
           f"{tmp_path / 'one' / 'six'})" in report.stdout
    table = pd.read_csv(tmp_path / "one" / "report" / "runs.csv").set_index("run_dir")
    assert table.loc[str(tmp_path / "one" / "empty"), "status"] == "failed"
    assert table.loc[str(tmp_path / "one" / "null"), "error"] == "summary.json holds NoneType, not a summary"
    assert (table.loc[[str(tmp_path / "one" / c) for c in ("copy", "six")], "status"] == "completed").all()


@pytest.mark.parametrize("key, value", [("data.task", "${oc.env:VLA_TEST_SECRET}"),
                                        ("data.camera", "${ oc.env:VLA_TEST_SECRET}"),
                                        ("paths.cache_dir", "${oc.env:VLA_TEST_SECRET}")])
def test_a_run_folder_to_evaluate_cannot_choose_which_variable_is_read(tmp_path, monkeypatch, key, value):
    """vla-exp-evaluate resolves a run's config to run it: an interpolation the project does not write at that key
    is refused before anything resolves it, so no message can carry the variable's value."""
    from omegaconf import OmegaConf
    from vla_exp.config import compose
    from vla_exp.evaluation.closed_loop import load_run
    monkeypatch.setenv("VLA_TEST_SECRET", "hunter2")
    cfg = compose("data=metaworld")
    (tmp_path / ".hydra").mkdir()
    OmegaConf.save(cfg, tmp_path / ".hydra" / "config.yaml")
    assert load_run(tmp_path).data.task == "metaworld"  # the project's own interpolations are kept and resolved
    OmegaConf.update(cfg, key, value)
    OmegaConf.save(cfg, tmp_path / ".hydra" / "config.yaml")
    with pytest.raises(UsageError) as e:
        load_run(tmp_path)
    assert str(e.value) == (f"{tmp_path / '.hydra' / 'config.yaml'}: {key}={value} is an interpolation the project's "
                            "config does not write there (a run folder is data: it is not resolved)")
