"""Nothing lost: checkpoints, exact resume after a hard kill, runs that diverge, and W&B that cannot start."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from vla_exp import UsageError
from vla_exp.recorder import Recorder
from vla_exp.train import train

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parent.parent
# 27 steps an epoch, 2 epochs: long enough to be killed mid-epoch, short enough for CI
RUN = ("recipe=fixed", "progress=false", "epochs=2", "data.episodes=30", "data.steps=8", "eval.samples=8",
       "log_every=1", "checkpoint.every=4", "threads=1")


def command(run_dir, *extra):
    return [sys.executable, "-m", "vla_exp.train", *RUN, *extra, f"hydra.run.dir={run_dir}"]


def rows(run_dir):
    """metrics.jsonl without the timing column, which no two runs share."""
    return [{k: v for k, v in json.loads(line).items() if k != "samples_per_s"}
            for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_a_killed_run_resumes_bit_for_bit(tmp_path):
    full, cut = tmp_path / "full", tmp_path / "cut"
    subprocess.run(command(full, "logger=none"), cwd=ROOT, check=True, capture_output=True)

    proc = subprocess.Popen(command(cut), cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while time.time() < deadline and not ((cut / "metrics.jsonl").is_file() and len(rows(cut)) >= 40):
        time.sleep(0.02)  # row 40 is step 39, mid-way through the second epoch, past the checkpoint at step 36
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not (cut / "summary.json").exists(), "the run finished before it could be killed"
    written = len(rows(cut))

    out = subprocess.run(command(cut), cwd=ROOT, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-3000:]
    summary = json.loads((cut / "summary.json").read_text())
    assert summary["status"] == "completed" and 36 <= summary["resumed_at_step"] < written - 1 < 54
    assert rows(cut) == rows(full)  # every row once, the same values
    a, b = torch.load(full / "policy.pt"), torch.load(cut / "policy.pt")
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert summary["val_action_error"] == json.loads((full / "summary.json").read_text())["val_action_error"]
    # the resumed run goes on in the same W&B run
    ids = {p.name.rsplit("-", 1)[1] for p in (cut / "wandb").glob("offline-run-*")}
    assert len(list((cut / "wandb").glob("offline-run-*"))) == 2 and len(ids) == 1
    assert not (cut / "checkpoint.pt").exists()  # removed once finished (checkpoint.keep=false)


def test_checkpoints_are_written_on_schedule(make_cfg, tmp_path):
    s = train(make_cfg(*RUN, "logger=none", "epochs=1", "checkpoint.keep=true"), tmp_path)
    ckpt = torch.load(tmp_path / "checkpoint.pt", weights_only=False)
    assert ckpt["progress"]["step"] == s["steps"] and ckpt["progress"]["epoch"] == 1
    assert ckpt["metrics_rows"] == len(rows(tmp_path)) and ckpt["config_hash"] == s["config_hash"]
    assert set(ckpt["rng"]) == {"python", "numpy", "torch", "noise"}
    assert ckpt["optimizer"]["state"]  # Adam's moments travel with the model


def test_resume_from_an_explicit_checkpoint_and_refuse_another_config(make_cfg, tmp_path):
    train(make_cfg(*RUN, "logger=none", "checkpoint.keep=true"), tmp_path / "a")
    with pytest.raises(UsageError, match="written by another config"):
        train(make_cfg(*RUN, "logger=none", "seed=1", f"resume={tmp_path / 'a'}"), tmp_path / "b")
    with pytest.raises(UsageError, match="no checkpoint there"):
        train(make_cfg(*RUN, "logger=none", f"resume={tmp_path / 'nothing'}"), tmp_path / "c")
    s = train(make_cfg(*RUN, "logger=none", f"resume={tmp_path / 'a' / 'checkpoint.pt'}"), tmp_path / "d")
    assert s["resumed_at_step"] == s["steps"]  # it was finished: nothing left to train


def test_a_diverging_run_ends_as_diverged(make_cfg, tmp_path):
    s = train(make_cfg("debug=smoke", "progress=false", "logger=none", "recipe=original",
                       "model.head_loading=legacy_stale", "diverge_after=3", "data.episodes=20"), tmp_path)
    assert s["status"] == "diverged" and s["steps"] == s["diverged_at_step"] == 3


def test_a_diverging_job_does_not_stop_the_sweep(tmp_path):
    out = subprocess.run([sys.executable, "-m", "vla_exp.train", "-m", "model.head_loading=legacy_stale,current",
                          "recipe=original", "debug=smoke", "diverge_after=2", "logger=none", "progress=false",
                          f"hydra.sweep.dir={tmp_path}"], cwd=ROOT, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-3000:]
    status = [json.loads(p.read_text())["status"] for p in sorted(tmp_path.glob("*/summary.json"))]
    assert status == ["diverged", "completed"]


def test_wandb_that_cannot_start_costs_nothing_but_a_warning(make_cfg, tmp_path):
    (tmp_path / "wandb").write_text("a file where W&B wants its folder")
    with pytest.warns(UserWarning, match="W&B did not start"):
        s = train(make_cfg("debug=smoke", "progress=false", "recipe=fixed"), tmp_path)
    assert s["status"] == "completed" and len(rows(tmp_path)) == s["steps"] + 1


def test_wandb_that_fails_mid_run_costs_nothing_but_one_warning(make_cfg, tmp_path, recwarn):
    rec = Recorder(tmp_path, make_cfg().logger, {"seed": 0}, "w")
    rec.tracker.run.finish()  # W&B refuses rows for a finished run: a real failure, from W&B itself
    for step in (1, 2, 3):
        rec.log({"kind": "step", "step": step, "loss": 1.0})
    rec.summary({"status": "completed"})
    rec.finish()
    failures = [w for w in recwarn.list if "W&B failed" in str(w.message)]
    assert len(failures) == 1  # said once, then the run goes on without W&B
    assert len(rows(tmp_path)) == 3 and json.loads((tmp_path / "summary.json").read_text())["status"] == "completed"
