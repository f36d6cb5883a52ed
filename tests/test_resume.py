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
from vla_exp.training import checkpoint
from vla_exp.recorder import Recorder
from vla_exp.training.loop import train

from test_sweep import pid_of

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parent.parent
# 27 steps an epoch, 2 epochs: long enough to be killed mid-epoch, short enough for CI
RUN = ("recipe=fixed", "progress=false", "epochs=2", "data.episodes=30", "data.steps=8", "eval.samples=8",
       "log_every=1", "checkpoint.every=4", "threads=1")


def command(run_dir, *extra):
    return [sys.executable, "-m", "vla_exp.training.main", *RUN, *extra, f"hydra.run.dir={run_dir}"]


def rows(run_dir):
    """metrics.jsonl without the timing column, which no two runs share."""
    return [{k: v for k, v in json.loads(line).items() if k != "samples_per_s"}
            for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def wait_for_rows(run_dir, n, proc):
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None and not (
            (run_dir / "metrics.jsonl").is_file() and len(rows(run_dir)) >= n):
        time.sleep(0.02)


def same_run(a, b):
    """The same rows, once each, the same weights and the same held-out error."""
    assert rows(a) == rows(b)
    wa, wb = torch.load(a / "policy.pt"), torch.load(b / "policy.pt")
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    assert json.loads((a / "summary.json").read_text())["val_action_error"] == \
        json.loads((b / "summary.json").read_text())["val_action_error"]


def test_a_killed_run_resumes_bit_for_bit(uninterrupted, tmp_path):
    cut = tmp_path / "cut"
    proc = subprocess.Popen(command(cut), cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wait_for_rows(cut, 40, proc)  # row 40 is step 39, mid-way through the second epoch, past the checkpoint at step 36
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not (cut / "summary.json").exists(), "the run finished before it could be killed"
    written = len(rows(cut))

    out = subprocess.run(command(cut), cwd=ROOT, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-3000:]
    summary = json.loads((cut / "summary.json").read_text())
    assert summary["status"] == "completed" and 36 <= summary["resumed_at_step"] < written - 1 < 54
    same_run(cut, uninterrupted)
    # the resumed run goes on in the same W&B run
    ids = {p.name.rsplit("-", 1)[1] for p in (cut / "wandb").glob("offline-run-*")}
    assert len(list((cut / "wandb").glob("offline-run-*"))) == 2 and len(ids) == 1
    assert not (cut / "checkpoint.pt").exists()  # removed once finished (checkpoint.keep=false)


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_a_signalled_run_saves_says_interrupted_in_one_line_and_resumes_bit_for_bit(uninterrupted, tmp_path, sig,
                                                                                     wandb_records):
    """Both signals take one path: SIGTERM's run is resumed and compared, SIGINT's stops there."""
    cut = tmp_path / "cut"
    # no checkpoint on schedule: the one there afterwards was written at the signal
    proc = subprocess.Popen(command(cut, "checkpoint.every=0"), cwd=ROOT, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)
    wait_for_rows(cut, 10, proc)
    proc.send_signal(sig)
    err = proc.communicate(timeout=120)[1]
    s = json.loads((cut / "summary.json").read_text())
    assert proc.returncode == 128 + sig and s["status"] == "interrupted" and s["signal"] == sig.name
    assert "Traceback" not in err and err.strip().splitlines()[-1] == (
        f"{cut}: interrupted by {sig.name} at step {s['steps']} of 54, checkpoint saved; run the same command again "
        "to resume")
    ckpt = checkpoint.load(cut / "checkpoint.pt")
    assert ckpt["progress"]["step"] == s["steps"] >= 10 and ckpt["metrics_rows"] == len(rows(cut))
    exit_record = next(r for r in wandb_records(cut) if r["type"] == "exit")  # W&B was finished, as failed
    assert exit_record["exit"].get("exit_code") == 1
    if sig == signal.SIGINT:
        return

    out = subprocess.run(command(cut), cwd=ROOT, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-3000:]
    resumed = json.loads((cut / "summary.json").read_text())
    assert resumed["status"] == "completed" and resumed["resumed_at_step"] == s["steps"]
    same_run(cut, uninterrupted)


def test_submitit_requeues_a_preempted_job_which_resumes_bit_for_bit(uninterrupted, tmp_path):
    """submitit_local, as on SLURM: the job gets submitit's preemption signal (USR2), checkpoints, and submitit's
    handler requeues it; the requeued job resumes. (On a cluster, SLURM also sends it before a time limit, and the
    requeued job may start on another node: what only a cluster can show.)"""
    sweep = tmp_path / "sweep"
    proc = subprocess.Popen([sys.executable, "-m", "vla_exp.training.main", "-m", *RUN, "logger=none",
                             "hydra/launcher=submitit_local", f"hydra.sweep.dir={sweep}"], cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while time.time() < deadline and not list(sweep.glob("0_*/metrics.jsonl")):
        time.sleep(0.05)
    (job_dir,) = sweep.glob("0_*")
    wait_for_rows(job_dir, 10, proc)
    # submitit's preemption signal, sent to the process that runs the job
    os.kill(pid_of(b"submitit.core._submit", str(sweep).encode()), signal.SIGUSR2)
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err[-3000:]
    s = json.loads((job_dir / "summary.json").read_text())
    assert s["status"] == "completed" and s["resumed_at_step"] >= 10
    same_run(job_dir, uninterrupted)
    log = "".join(p.read_text() for p in sweep.glob(".submitit/*/*_log.*"))
    assert "interrupted by SIGUSR2" in log and "Requeued job" in log


def test_checkpoints_are_written_on_schedule(make_cfg, tmp_path):
    s = train(make_cfg(*RUN, "logger=none", "epochs=1", "checkpoint.keep=true"), tmp_path)
    ckpt = checkpoint.load(tmp_path / "checkpoint.pt")
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
    out = subprocess.run([sys.executable, "-m", "vla_exp.training.main", "-m", "model.head_loading=legacy_stale,current",
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
