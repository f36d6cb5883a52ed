"""Distributed training: two CPU processes under torchrun (gloo) train the model one process trains on the same
global batch; only rank 0 writes and logs; a killed distributed run resumes from its checkpoint."""
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from test_resume import RUN, rows

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parent.parent
TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]


def command(launcher, run_dir, *extra):
    return [*launcher, "-m", "vla_exp.training.main", *RUN, *extra, f"hydra.run.dir={run_dir}"]


def assert_same_training(one, two, rel=1e-4):
    """Every logged figure of two runs equal within `rel`: the sums of a split batch round differently."""
    a, b = rows(one), rows(two)
    assert [r["step"] for r in a] == [r["step"] for r in b]  # rank 0 alone wrote: no row twice
    for x, y in zip(a, b):
        assert x.keys() == y.keys()
        for k in x.keys() - {"kind", "step", "epoch", "lr"}:
            assert y[k] == pytest.approx(x[k], rel=rel, abs=1e-6), (x["step"], k)
    p, q = torch.load(one / "policy.pt"), torch.load(two / "policy.pt")
    assert max((p[k] - q[k]).abs().max().item() for k in p) < 1e-4


def drift(one, two):
    """How far two runs of the same steps part, as a share of what the docs allow (1e-4 relative, or 1e-6 absolute
    for a figure or weight near zero: a key bias in attention gets no gradient and stays at rounding noise): the
    largest over every logged figure, and over every final weight."""
    a, b = rows(one), rows(two)
    assert [r["step"] for r in a] == [r["step"] for r in b]  # rank 0 alone wrote: no row twice
    figures = max(abs(x[k] - y[k]) / (1e-4 * abs(x[k]) + 1e-6) for x, y in zip(a, b)
                  for k in x.keys() - {"kind", "step", "epoch", "lr"} if isinstance(x[k], float))
    p, q = torch.load(one / "policy.pt"), torch.load(two / "policy.pt")
    weights = max(((p[k] - q[k]).abs() / (1e-4 * p[k].abs() + 1e-6)).max().item() for k in p if p[k].is_floating_point())
    return figures, weights


def test_two_processes_train_the_model_one_process_trains_within_the_stated_bound(tmp_path):
    """The fixed recipe for 216 steps, in one process and in two: the two sum a split batch in another order, and
    the difference grows with the steps until about step 200 (measured to step 540:
    docs/results/2026-12-06-two-processes.md). The docs state 1e-4 relative (1e-6 absolute near zero) for every
    logged figure and final weight."""
    one, two = tmp_path / "one", tmp_path / "two"
    # an empty cache: the two processes must not race to write the data and the backbone
    env = {**os.environ, "VLA_EXP_CACHE": str(tmp_path / "cache")}
    for launcher, run_dir in (([sys.executable], one), (TORCHRUN, two)):
        out = subprocess.run(command(launcher, run_dir, "epochs=8", "checkpoint.every=0"), cwd=ROOT,
                             capture_output=True, text=True, env=env)
        assert out.returncode == 0, out.stderr[-3000:]
    figures, weights = drift(one, two)
    assert figures < 1 and weights < 1, (figures, weights)
    summary = json.loads((two / "summary.json").read_text())
    assert summary["status"] == "completed" and summary["processes"] == 2 and summary["steps"] == 216
    assert len(list((two / "wandb").glob("offline-run-*"))) == 1  # only rank 0 logged to W&B
    assert not (two / "checkpoint.pt").exists()  # removed when the run finished, as with one process


def test_a_killed_distributed_run_resumes_from_its_checkpoint(uninterrupted, tmp_path):
    run_dir = tmp_path / "cut"
    proc = subprocess.Popen(command(TORCHRUN, run_dir), cwd=ROOT, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    deadline = time.time() + 180
    while time.time() < deadline and not ((run_dir / "metrics.jsonl").is_file() and len(rows(run_dir)) >= 40):
        time.sleep(0.02)  # row 40 is step 39, past the checkpoint at step 36
    # torchrun and both workers (each in a session of its own), with no chance to clean up
    subprocess.run(["pkill", "-9", "-f", f"hydra.run.dir={run_dir}"])
    proc.wait()
    assert (run_dir / "checkpoint.pt").is_file() and not (run_dir / "summary.json").exists()
    written = len(rows(run_dir))

    out = subprocess.run(command(TORCHRUN, run_dir), cwd=ROOT, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-3000:]
    summary = json.loads((run_dir / "summary.json").read_text())
    # resumed from the last checkpoint written before the kill (every 4 steps): step 36, or 40 where the kill landed
    # after that one; never past what was logged
    assert summary["status"] == "completed" and 36 <= summary["resumed_at_step"] <= written - 1 < 54
    assert_same_training(uninterrupted, run_dir)
    ids = {p.name.rsplit("-", 1)[1] for p in (run_dir / "wandb").glob("offline-run-*")}
    assert len(list((run_dir / "wandb").glob("offline-run-*"))) == 2 and len(ids) == 1  # on in rank 0's W&B run


def test_submitit_tasks_train_as_one_distributed_run(uninterrupted, tmp_path):
    """The cluster path: the submitit launcher's tasks_per_node=2 (here submitit_local; submitit_slurm on a cluster)
    starts 2 tasks of one job, which join one process group as torchrun's processes do."""
    out = subprocess.run([sys.executable, "-m", "vla_exp.training.main", "-m", *RUN, "logger=none",
                          "hydra/launcher=submitit_local", "hydra.launcher.tasks_per_node=2",
                          f"hydra.sweep.dir={tmp_path}"], cwd=ROOT, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-3000:]
    (run_dir,) = [p.parent for p in tmp_path.glob("*/summary.json")]
    assert json.loads((run_dir / "summary.json").read_text())["processes"] == 2
    assert_same_training(uninterrupted, run_dir)
    logs = {p.name.split("_")[1]: p.read_text() for p in tmp_path.glob(".submitit/*/*_log.out")}
    assert sorted(logs) == ["0", "1"]  # each task's own output
    assert ": completed, action error" in logs["0"] and ": completed" not in logs["1"]  # rank 0 speaks for the run
    # one train.log, written by rank 0 alone (each task's submitit logger would add its own lines to it)
    assert (run_dir / "train.log").read_text().count("Job completed successfully") == 1
