"""Sweeps through the real CLI: launchers, job names, failure isolation, skipping finished runs, and the studies."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
from omegaconf import OmegaConf

from vla_exp.config import config_hash
from vla_exp.training.loop import train
from vla_exp.training.sweep import REFUSED

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parent.parent
SMOKE = ("debug=smoke", "progress=false")


def cli(*args, timeout=None):
    return subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True, env=os.environ,
                          timeout=timeout)


def summaries(sweep_dir):
    return {p.parent.name: json.loads(p.read_text()) for p in sorted(Path(sweep_dir).glob("*/summary.json"))}


def pid_of(*words, parent=None):
    """The pid of a running process whose command line holds every one of `words` (bytes), and whose parent is
    `parent` where given."""
    for p in Path("/proc").glob("[0-9]*"):
        try:
            cmd, stat = (p / "cmdline").read_bytes(), (p / "stat").read_text()
        except OSError:  # a process that ended meanwhile
            continue
        if all(w in cmd for w in words) and parent in (None, int(stat.rsplit(")", 1)[1].split()[1])):
            return int(p.name)
    raise AssertionError(f"no process with {words}" + (f" under {parent}" if parent else ""))


def wait_for(ready, proc, timeout=300):
    """Until `ready()` is true, while `proc` runs."""
    deadline = time.time() + timeout
    while not ready():
        assert proc.poll() is None, proc.communicate()[1][-3000:]
        assert time.time() < deadline, "timed out"
        time.sleep(0.05)


def test_joblib_sweep_divides_the_cores_groups_runs_and_reports(tmp_path, wandb_records):
    out = cli("-m", "vla_exp.training.main", "-m", "init=xavier,none", *SMOKE, "hydra/launcher=joblib",
              "hydra.launcher.n_jobs=2", f"hydra.sweep.dir={tmp_path}")
    assert out.returncode == 0, out.stderr[-3000:]
    runs = summaries(tmp_path)
    # each job is named by its choices and seed
    assert sorted(runs) == ["0_xavier-scale_down-original-none-s0", "1_none-scale_down-original-none-s0"]
    assert all(s["status"] == "completed" and s["threads"] == max(1, os.cpu_count() // 2) for s in runs.values())
    for name in runs:  # one W&B group per sweep (the sweep folder); the config says every choice and the seed
        run = next(r for r in wandb_records(tmp_path / name) if r["type"] == "run")["run"]
        config = run["config"]["update"]
        assert run["run_group"] == str(tmp_path) and run["job_type"] == "train"
        assert config["seed"] == 0 and config["choices"]["init"] == runs[name]["choices"]["init"]
        saved = OmegaConf.load(tmp_path / name / ".hydra" / "config.yaml")  # what the job ran with, as Hydra keeps it
        assert saved.threads == runs[name]["threads"] and saved.logger.group == str(tmp_path)
    assert f"{tmp_path}: 2 runs, 0 failed" in out.stdout

    report = cli("-m", "vla_exp.attribution.report", str(tmp_path))
    assert report.returncode == 0, report.stderr[-3000:]
    table = pd.read_csv(tmp_path / "report" / "runs.csv")
    assert sorted(table["init"]) == ["none", "xavier"] and len(table) == 2


def test_a_sweep_of_bad_values_names_every_job_in_one_line_each_and_launches_none(tmp_path):
    out = cli("-m", "vla_exp.training.main", "-m", "optim.lr=-1,0", *SMOKE, "logger=none", f"hydra.sweep.dir={tmp_path}")
    assert out.returncode == REFUSED and "Traceback" not in out.stderr
    assert out.stderr.strip().splitlines()[-2:] == ["job 0 (optim.lr=-1): optim.lr=-1: must be a number > 0",
                                                    "job 1 (optim.lr=0): optim.lr=0: must be a number > 0"]
    assert summaries(tmp_path) == {}


@pytest.mark.parametrize("launcher", [[], ["hydra/launcher=joblib", "hydra.launcher.n_jobs=2"]])
def test_a_failed_job_neither_stops_the_sweep_nor_hides(tmp_path, launcher):
    args = ("-m", "vla_exp.training.main", "-m", "diffusion.beta_schedule=no_such_schedule,squaredcos_cap_v2", *SMOKE,
            "logger=none", f"hydra.sweep.dir={tmp_path}", *launcher)  # diffusers refuses the schedule after it began
    out = cli(*args)
    assert out.returncode == 1 and f"{tmp_path}: 2 runs, 1 failed" in out.stdout
    assert "job 0 failed; the sweep goes on" in out.stderr and "Callback" not in out.stderr  # Hydra warns, no more
    status = [s["status"] for s in summaries(tmp_path).values()]
    assert status == ["failed", "completed"]
    if launcher:  # what follows is the launchers' common part
        return

    report = cli("-m", "vla_exp.attribution.report", str(tmp_path))
    assert report.returncode == 0, report.stderr[-3000:]
    assert "failed" in (tmp_path / "report" / "table.md").read_text()

    # re-running the sweep skips the finished job and retries the failed one
    finished = tmp_path / "1_none-scale_down-original-none-s0" / "metrics.jsonl"
    before = finished.stat().st_mtime_ns
    again = cli(*args)
    assert "1_none-scale_down-original-none-s0: finished before with the same config; skipped" in again.stdout
    assert "job 0 failed" in again.stderr and finished.stat().st_mtime_ns == before


def test_a_job_that_runs_out_of_memory_fails_alone_in_one_line_saying_what_it_asked_for(tmp_path):
    """The CPU allocator's own refusal (a head whose step embedding asks for 64 TB); on a GPU the same path takes
    torch.OutOfMemoryError."""
    out = cli("-m", "vla_exp.training.main", "-m", "model.config.step_embed_dim=2000000,128", *SMOKE, "logger=none",
              f"hydra.sweep.dir={tmp_path}")
    assert out.returncode == 1 and f"{tmp_path}: 2 runs, 1 failed" in out.stdout
    assert "Traceback" not in out.stderr
    line = next(x for x in out.stderr.splitlines() if x.startswith("job 0 failed"))
    assert line.startswith("job 0 failed: out of memory on cpu: the job asked for 59,604.64 GiB more with ")
    assert line.endswith("a smaller model would fit")
    runs = list(summaries(tmp_path).values())
    assert [r["status"] for r in runs] == ["failed", "completed"]
    assert runs[0]["error"] == line.removeprefix("job 0 failed: ")


def test_a_probe_measures_one_jobs_peak_and_k_above_what_fits_is_refused(capsys):
    """The check --jobs-per-gpu makes on a GPU before a study starts, run here on the CPU (peak resident memory of
    the machine's RAM, where on a GPU it reads the allocator's peak and the CUDA context of the GPU's memory)."""
    from vla_exp import UsageError
    from vla_exp.attribution.studies import check_jobs_per_gpu, jobs_that_fit
    fits, need, total = jobs_that_fit(["recipe=fixed", *SMOKE], "cpu")
    assert 100 < need < 4000 and fits == int(total // need) > 1  # torch, the model and a batch; not the machine
    check_jobs_per_gpu(fits, fits, need, total, "cpu")
    assert capsys.readouterr().out.startswith(f"--jobs-per-gpu {fits}: one job of this study needs ")
    with pytest.raises(UsageError, match=rf"^--jobs-per-gpu {fits + 1}: one job of this study needs [\d.]+ GiB at its "
                       rf"peak \(a one-epoch probe of its run with the largest batch\), of the [\d.,]+ GiB cpu "
                       rf"holds: at most {fits} fit side by side; give --jobs-per-gpu {fits}$"):
        check_jobs_per_gpu(fits + 1, fits, need, total, "cpu")
    with pytest.raises(UsageError, match="^a probe of one job alone on cpu did not finish: out of memory on cpu: the "
                                         "job asked for 59,604.64 GiB more"):
        jobs_that_fit(["model.config.step_embed_dim=2000000", *SMOKE], "cpu")


def test_submitit_local_launcher_runs_the_jobs(tmp_path):
    out = cli("-m", "vla_exp.training.main", "-m", "init=xavier,none", *SMOKE, "logger=none", "hydra/launcher=submitit_local",
              f"hydra.sweep.dir={tmp_path}")
    assert out.returncode == 0, out.stderr[-3000:]
    runs = summaries(tmp_path)
    assert sorted(s["choices"]["init"] for s in runs.values()) == ["none", "xavier"]
    assert all(s["status"] == "completed" for s in runs.values())
    logs = sorted(tmp_path.glob(".submitit/*/*_log.out"))  # submitit ran them as its own jobs
    assert len(logs) == 2 and all("completed" in log.read_text() for log in logs)


def test_ray_places_k_jobs_on_each_gpu_each_seeing_its_own(tmp_path):
    """Hydra's Ray launcher on a machine Ray is told has 2 GPUs (a GPU count Ray believes; nothing of torch is
    faked: with no GPU there, each job trains on the CPU): 5 jobs at 2 a GPU. Each job sees one GPU, never more than
    2 run on one at once, both GPUs are used, and all 4 places fill before the first job ends."""
    from vla_exp.attribution.studies import job_launcher
    launcher = job_launcher(None, 2, gpus=2)
    out = cli("-m", "vla_exp.training.main", "-m", "seed=range(5)", *SMOKE, "logger=none", *launcher,
              "+hydra.launcher.ray.init.num_gpus=2", f"hydra.sweep.dir={tmp_path}")
    assert out.returncode == 0, out.stderr[-3000:]
    runs = list(summaries(tmp_path).values())
    assert sorted(r["seed"] for r in runs) == list(range(5)) and {r["status"] for r in runs} == {"completed"}
    assert sorted({r["cuda_visible_devices"] for r in runs}) == ["0", "1"]
    assert {r["threads"] for r in runs} == {max(1, int(os.cpu_count() / 4))}  # the cores shared by 4 places
    spans = [(r["started_at"], r["started_at"] + r["wall_time_s"], r["cuda_visible_devices"]) for r in runs]
    for begin, _, gpu in spans:  # at each job's start, how many run on its GPU (itself included)
        assert sum(b <= begin < e for b, e, g in spans if g == gpu) <= 2
    first_end = min(e for _, e, _ in spans)
    assert sum(b < first_end for b, _, _ in spans) == 4


def test_add_one_study_killed_from_outside_reports_nothing_then_resumes_and_writes_its_report(tmp_path):
    """First a joblib worker gets SIGKILL (what the kernel's out-of-memory killer sends) once a run has finished:
    loky ends the multirun, and the study says how many runs it lacks instead of reporting part of them. The same
    command then runs the rest and skips the finished runs."""
    args = ["-m", "vla_exp.attribution.studies", "add_one", "--seeds", "0", "--jobs", "2", "--out", str(tmp_path),
            *SMOKE, "logger=none", "epochs=1", "data.episodes=6"]  # the study's own budget beats debug=smoke's
    study = subprocess.Popen([sys.executable, *args], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                             text=True)
    wait_for(lambda: list(tmp_path.glob("*/summary.json")), study)
    multirun = pid_of(b"vla_exp.training.main", str(tmp_path).encode())
    os.kill(pid_of(b"popen_loky_posix", parent=multirun), signal.SIGKILL)  # a worker, not the resource tracker
    _, err = study.communicate(timeout=300)
    kept = summaries(tmp_path)
    assert study.returncode == 1 and 1 <= len(kept) < 5 and "TerminatedWorkerError" in err
    assert err.strip().splitlines()[-1] == (
        f"error: {5 - len(kept)} of the 5 runs ended without a summary: their multirun was stopped from outside "
        "(SIGKILL, as the kernel's out-of-memory killer sends; the joblib launcher then ends the jobs beside the killed "
        "one); the finished runs are kept, and the same command resumes the others")
    assert not (tmp_path / "report").exists() and not (tmp_path / "study.json").exists()
    out = cli(*args)
    assert out.returncode == 0, out.stderr[-3000:]
    now = summaries(tmp_path)
    assert {name: now[name]["started_at"] for name in kept} == {n: s["started_at"] for n, s in kept.items()}
    recipes = sorted(s["choices"]["recipe"] for s in summaries(tmp_path).values())
    assert recipes == ["original", "original_with_clipping", "original_with_init", "original_with_loss_handling",
                       "original_with_optim"]
    html = (tmp_path / "report" / "dashboard.html").read_text()
    assert all(f"original with {fix}" in html for fix in ("init=xavier", "loss_handling=skip_nonfinite",
                                                          "optim=fixed", "clipping=grad_norm"))
    analysis = (tmp_path / "report" / "analysis.md").read_text()
    assert "## Add-one: the original recipe plus each fix" in analysis and "init: none → xavier" in analysis


def test_study_rejects_bad_arguments():
    out = cli("-m", "vla_exp.attribution.studies", "factorial", "--jobs", "0")
    assert out.returncode == 2 and "--jobs must be 1 or more, got 0" in out.stderr
    out = cli("-m", "vla_exp.attribution.studies", "everything")
    assert out.returncode == 2 and "factorial" in out.stderr


@pytest.mark.parametrize("study", [["add_one"], ["screen", "--a", "recipe=original", "--b", "recipe=fixed"]])
def test_a_study_whose_configs_are_refused_says_so_and_stops(tmp_path, study):
    """The sweep names each refused job in one line; the study stops there, with no report and no traceback."""
    out = cli("-m", "vla_exp.attribution.studies", *study, "--seeds", "0,1", "--jobs", "1", "--out", str(tmp_path / "s"),
              "eval.samples=0", "logger=none")
    assert out.returncode == 1 and "Traceback" not in out.stderr
    lines = out.stderr.strip().splitlines()
    if study == ["add_one"]:  # its multirun refuses the jobs, and the study says so
        assert lines.pop() == ("error: the study's multirun launched nothing (the line above says why); the study "
                               "stops there")
    assert lines[-1].endswith("eval.samples=0: must be an integer >= 1")  # the screen refuses them itself
    assert not (tmp_path / "s" / "report").exists()


def test_a_finished_run_is_skipped_and_a_changed_config_reruns(make_cfg, tmp_path):
    first = train(make_cfg(*SMOKE, "logger=none", "recipe=fixed"), tmp_path)
    mtime = (tmp_path / "metrics.jsonl").stat().st_mtime_ns
    # logging and progress settings do not change results: still the same run
    again = train(make_cfg("debug=smoke", "progress=true", "logger=none", "recipe=fixed", "threads=1"), tmp_path)
    assert again == first and (tmp_path / "metrics.jsonl").stat().st_mtime_ns == mtime
    other = train(make_cfg(*SMOKE, "logger=none", "recipe=fixed", "seed=1"), tmp_path)
    assert other["seed"] == 1 and (tmp_path / "metrics.jsonl").stat().st_mtime_ns != mtime
    rerun = train(make_cfg(*SMOKE, "logger=none", "recipe=fixed", "seed=1", "skip_finished=false"), tmp_path)
    assert rerun["wall_time_s"] != other["wall_time_s"]


def test_config_hash_follows_results_not_logging(make_cfg):
    base = config_hash(make_cfg("recipe=fixed"))
    assert base == config_hash(make_cfg("recipe=fixed", "logger=none", "progress=false", "threads=1"))
    assert base != config_hash(make_cfg("recipe=fixed", "seed=1"))
    assert base != config_hash(make_cfg("recipe=fixed", "optim.lr=0.001"))


def test_a_study_joins_a_running_ray_cluster_and_places_its_jobs_on_the_clusters_gpus(tmp_path):
    """A real Ray cluster on this machine (`ray start --head`), told it has 2 GPUs; the driver's torch sees none, so
    the jobs can only run where the cluster gives them a GPU. 4 jobs at 2 a GPU, each seeing one, on both GPUs."""
    from vla_exp import UsageError
    from vla_exp.attribution.studies import job_launcher
    with pytest.raises(UsageError, match=r"^--ray-address auto: Could not find any running Ray instance\..*"
                                         r"\(`ray start --head` starts one\)$"):
        job_launcher(None, 2, address="auto")
    ray = [sys.executable, "-m", "ray.scripts.scripts"]
    start = subprocess.run([*ray, "start", "--head", "--num-gpus=2", "--num-cpus=2", "--disable-usage-stats",
                            "--include-dashboard=false"], capture_output=True, text=True)
    assert start.returncode == 0, start.stderr[-3000:]
    try:
        launcher = job_launcher(None, 2, address="auto")
        assert launcher[1:3] == ["hydra.launcher.ray.remote.num_gpus=0.5", "hydra.launcher.ray.remote.num_cpus=0.5"]
        # a Ray of its own would have no GPU and hold the jobs forever: the time limit makes that a failure
        out = cli("-m", "vla_exp.training.main", "-m", "seed=range(4)", *SMOKE, "logger=none", *launcher,
                  f"hydra.sweep.dir={tmp_path}", timeout=600)
    finally:
        subprocess.run([*ray, "stop"], capture_output=True)
    assert out.returncode == 0, out.stderr[-3000:]
    runs = list(summaries(tmp_path).values())
    assert sorted(r["seed"] for r in runs) == list(range(4)) and {r["status"] for r in runs} == {"completed"}
    assert sorted(r["cuda_visible_devices"] for r in runs) == ["0", "0", "1", "1"]
