"""The cluster path on a real SLURM: the one-node cluster that ../shared/slurm/setup_slurm.sh starts on this machine
(slurmctld, slurmd, slurmdbd for sacct, munge). Sweeps go through Hydra's submitit launcher as a user's would; the
cluster's own tools (scontrol, scancel, sacct) requeue, signal and account for the jobs. Where the cluster cannot be
started these tests are skipped with the reason."""
import json
import subprocess
import sys
import time

import pytest

from test_resume import ROOT, RUN, same_run, wait_for_rows

from vla_exp.training.sweep import REFUSED

pytestmark = [pytest.mark.slow, pytest.mark.slurm]
SETUP = ROOT.parent / "shared" / "slurm" / "setup_slurm.sh"
SLURM = ("hydra/launcher=submitit_slurm", "hydra.launcher.partition=debug")


@pytest.fixture(scope="module", autouse=True)
def cluster():
    if not SETUP.is_file():
        pytest.skip(f"no SLURM on this machine: {SETUP} is missing")
    out = subprocess.run(["bash", str(SETUP)], capture_output=True, text=True, timeout=900)
    if out.returncode:
        pytest.skip(f"the local SLURM did not start: {(out.stderr or out.stdout).strip().splitlines()[-1:]}")


def sweep(folder, *overrides):
    """Start a multirun on the cluster; the process that submits and waits for its jobs."""
    return subprocess.Popen([sys.executable, "-m", "vla_exp.training.main", "-m", *overrides, "logger=none",
                             f"hydra.sweep.dir={folder}"], cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def job_ids(folder):
    """The SLURM ids of a sweep's jobs: submitit names each job's folder after it (`12`, or `12_3` in an array)."""
    return sorted(p.parent.name for p in (folder / ".submitit").glob("*/*_log.out"))


def running(folder, rows, proc):
    """The id of the sweep's one job, once it has logged `rows` rows."""
    wait_for_rows(next_run(folder, proc), rows, proc)
    (job,) = job_ids(folder)
    return job


def next_run(folder, proc):
    deadline = time.time() + 180
    while time.time() < deadline and proc.poll() is None and not list(folder.glob("0_*/metrics.jsonl")):
        time.sleep(0.1)
    (run_dir,) = folder.glob("0_*")
    return run_dir


def start_when_requeued(job, proc):
    """A requeued job waits for a begin time SLURM sets some seconds ahead; the test starts it at once instead."""
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None:
        state = subprocess.run(["squeue", "-h", "-j", job, "-o", "%T %r"], capture_output=True, text=True).stdout
        if state.split() == ["PENDING", "BeginTime"]:
            subprocess.run(["scontrol", "update", f"jobid={job}", "StartTime=now"], check=True)
            return
        time.sleep(0.2)


def accounting(job):
    """sacct's State of a job (the allocation, not its steps), once slurmdbd has recorded its end."""
    deadline = time.time() + 60
    while True:
        out = subprocess.run(["sacct", "-j", job, "-X", "-n", "-P", "--format=State"], capture_output=True, text=True)
        state = out.stdout.split()
        if time.time() > deadline or state and state[0] not in ("PENDING", "RUNNING", "COMPLETING"):
            return state
        time.sleep(1)


def test_a_sweep_runs_as_one_job_array_on_the_cluster(tmp_path):
    proc = sweep(tmp_path, "init=xavier,none", "seed=0,1", "debug=smoke", "progress=false", *SLURM)
    out, err = proc.communicate(timeout=600)
    assert proc.returncode == 0, err[-3000:]
    assert f"{tmp_path}: 4 runs, 0 failed, 0 interrupted" in out
    runs = sorted(p.parent.name for p in tmp_path.glob("*/summary.json"))
    assert [r.split("_")[0] for r in runs] == ["0", "1", "2", "3"]
    assert all(json.loads((tmp_path / r / "summary.json").read_text())["status"] == "completed" for r in runs)
    jobs = job_ids(tmp_path)
    assert len({j.split("_")[0] for j in jobs}) == 1 and len(jobs) == 4  # one array of four tasks
    assert all(accounting(j) == ["COMPLETED"] for j in jobs)


def test_a_partition_the_cluster_lacks_is_one_line_before_anything_is_submitted(tmp_path):
    proc = sweep(tmp_path, "seed=0,1", "debug=smoke", "hydra/launcher=submitit_slurm", "hydra.launcher.partition=gpu")
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == REFUSED and err.strip().splitlines() == [
        "error: hydra.launcher.partition=gpu: the cluster has no such partition (it has: debug)"]
    assert not (tmp_path / ".submitit").exists()


def test_a_requeued_job_resumes_bit_for_bit(uninterrupted, tmp_path):
    """`scontrol requeue` stops a running job (SIGTERM: the run checkpoints at the next step) and queues it again;
    the job that starts again resumes from the checkpoint and ends as if it had never stopped."""
    proc = sweep(tmp_path, *RUN, *SLURM)
    job = running(tmp_path, 10, proc)
    subprocess.run(["scontrol", "requeue", job], check=True)
    start_when_requeued(job, proc)
    out, err = proc.communicate(timeout=600)
    assert proc.returncode == 0, err[-3000:]
    (run_dir,) = tmp_path.glob("0_*")
    s = json.loads((run_dir / "summary.json").read_text())
    assert s["status"] == "completed" and s["resumed_at_step"] >= 8
    same_run(run_dir, uninterrupted)
    log = (tmp_path / ".submitit" / job / f"{job}_0_log.err").read_text()
    assert "interrupted by SIGTERM" in log and "DUE TO JOB REQUEUE" in log


def test_a_time_limit_ends_the_sweep_with_its_count_then_is_requeued_with_the_slurm_preset(uninterrupted, tmp_path):
    """SLURM warns a job before its time limit with USR2, sent here by scancel; with a 1-minute limit submitit counts
    any USR2 as a time-out. Hydra's submitit_slurm never requeues a time-out (max_num_timeout 0): the sweep ends with
    its count line and the resume hint, not a traceback. vla-exp's hydra/launcher=slurm requeues it, and the job
    resumes to the end as if it had never stopped."""
    limit = ("hydra.launcher.timeout_min=1", "hydra.launcher.signal_delay_s=5")
    proc = sweep(tmp_path, *RUN, *SLURM, *limit)
    job = running(tmp_path, 10, proc)
    subprocess.run(["scancel", "--signal=USR2", job], check=True)
    out, err = proc.communicate(timeout=600)
    assert proc.returncode == 1 and "Traceback" not in err, err[-3000:]
    assert f"{tmp_path}: 1 runs, 0 failed, 1 interrupted" in out
    assert "the same command resumes the interrupted runs" in out
    log = (tmp_path / ".submitit" / job / f"{job}_0_log.err").read_text()
    assert "job 0: not requeued: timed-out too many times (hydra.launcher.max_num_timeout)" in log

    proc = sweep(tmp_path, *RUN, "hydra/launcher=slurm", "hydra.launcher.partition=debug", *limit)
    (again,) = resumed_job(tmp_path, job, proc)
    subprocess.run(["scancel", "--signal=USR2", again], check=True)
    start_when_requeued(again, proc)  # submitit requeued it
    out, err = proc.communicate(timeout=600)
    assert proc.returncode == 0, err[-3000:]
    (run_dir,) = tmp_path.glob("0_*")
    s = json.loads((run_dir / "summary.json").read_text())
    assert s["status"] == "completed"
    same_run(run_dir, uninterrupted)
    log = (tmp_path / ".submitit" / again / f"{again}_0_log.err").read_text()
    assert "this job is timed-out" in log and "DUE TO JOB REQUEUE" in log


def resumed_job(folder, first, proc):
    """The job that resumes the run, once it trains: it has written more rows than the first job left."""
    rows = next_run(folder, proc) / "metrics.jsonl"
    left = len(rows.read_text().splitlines())
    deadline = time.time() + 180
    while time.time() < deadline and proc.poll() is None and len(rows.read_text().splitlines()) <= left:
        time.sleep(0.1)
    return set(job_ids(folder)) - {first}
