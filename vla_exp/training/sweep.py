"""Multiruns: the callback that holds a sweep's folder, checks every job before any starts and counts the failures
at the end; the jobs a sweep launches; a job's settings inside a sweep (its W&B group, its share of the cores)."""
import logging
import os
import signal
import subprocess
import sys
from contextlib import ExitStack
from pathlib import Path

from hydra.core.global_hydra import GlobalHydra
from hydra.experimental.callback import Callback
from omegaconf import OmegaConf

from vla_exp import UsageError
from vla_exp.files import exclusive, write_text
from vla_exp.runs import SUMMARY, check_folder, status_of
from vla_exp.signals import SIGNALS

REFUSED = 2  # a multirun's exit code where it launched nothing (its folder held, a job's config refused)
STOPPING = ".stopping"  # in a sweep folder while its multirun stops on a signal: the name of the signal


def sweep_settings(cfg, hc):
    """In a multirun: one W&B group per sweep, and the cores divided between parallel jobs so they do not fight.
    Hydra saved the job's config before the job began: it is saved again with these, so it says what ran (and
    `vla-exp-evaluate` of a sweep job logs into the sweep's group)."""
    if cfg.logger.get("group") is None and "group" in cfg.logger:
        cfg.logger.group = hc.sweep.dir
    n_jobs = hc.launcher.get("n_jobs")  # set by the joblib launcher; -1 means one job per core, as in joblib
    ray_cpus = OmegaConf.select(hc.launcher, "ray.remote.num_cpus")  # the Ray launcher: each job's share of cores
    if cfg.threads is None and ray_cpus:
        cfg.threads = max(1, int(ray_cpus))
    elif cfg.threads is None and n_jobs:
        cpus = os.cpu_count()
        cfg.threads = max(1, cpus // min(cpus, n_jobs if n_jobs > 0 else cpus + 1 + n_jobs))
    save_config(cfg, hc)


def save_config(cfg, hc):
    """The job's config, saved again over the one Hydra saved before the job began, so that it says what ran."""
    if hc.output_subdir is not None:
        write_text(Path(hc.runtime.output_dir) / hc.output_subdir / "config.yaml", OmegaConf.to_yaml(cfg))


class Sweep(Callback):
    """A multirun holds its sweep folder (a second sweep into it stops at once), checks every job's config before
    the launcher starts any (one line per bad job, nothing launched), and at its end counts the jobs that failed or
    were interrupted, with a non-zero exit if any were. A single run (or sweep) whose folder is a file in the way
    stops in one line before Hydra would make it."""

    def on_run_start(self, config, **kwargs):
        """A single run: its folder and .hydra must be folders where they exist (Hydra would stop in a traceback)."""
        try:
            check_folder(config.hydra.run.dir, "run folder")
            if config.hydra.output_subdir:
                check_folder(Path(config.hydra.run.dir) / config.hydra.output_subdir, "config folder")
        except UsageError as e:
            sys.exit(f"error: {e}")

    def on_job_start(self, config, **kwargs):
        """A job's tasks after the first (submitit's tasks_per_node > 1) leave train.log to the first: one log a run."""
        from vla_exp.training.ddp import rank
        if rank() > 0:
            root = logging.getLogger()
            for h in [h for h in root.handlers if isinstance(h, logging.FileHandler)]:
                root.removeHandler(h)
                h.close()

    def on_multirun_start(self, config, **kwargs):
        from vla_exp.data.sources import validate
        self.hold = ExitStack()
        try:
            check_partition(config.hydra.launcher)
            check_folder(config.hydra.sweep.dir, "sweep folder")
            self.hold.enter_context(exclusive(config.hydra.sweep.dir, "another sweep"))
        except UsageError as e:
            refuse(f"error: {e}")
        bad, jobs = [], job_overrides(config)
        common = set.intersection(*map(set, jobs)) if jobs else set()
        for num, overrides in enumerate(jobs):
            try:
                validate(GlobalHydra.instance().config_loader().load_sweep_config(config, overrides))
            except UsageError as e:
                bad.append(f"job {num} ({' '.join(o for o in overrides if o not in common)}): {e}")
        if bad:
            refuse("\n".join(["error: nothing launched; these jobs' configs are not valid:", *bad]))
        self.signum = None
        (Path(config.hydra.sweep.dir) / STOPPING).unlink(missing_ok=True)  # left by a sweep killed while stopping
        if jobs_apart(config.hydra.launcher):
            self.hold.callback(self.hold_signals(config.hydra.sweep.dir))

    def hold_signals(self, sweep_dir):
        """Where the jobs run in processes of their own (joblib), a signal to the sweep (Ctrl-C, SIGTERM, SIGUSR1/2)
        must not end it before they save: its jobs got the signal too (from the terminal, or from a study, through
        the process group) and stop at their next step boundary with a checkpoint, and a job that has not started
        does not start (STOPPING). A second Ctrl-C stops at once. Returns what restores the handlers."""
        def ask(signum, frame):
            if signum == signal.SIGINT and self.signum == signal.SIGINT:
                raise KeyboardInterrupt
            if self.signum is None:
                self.signum = signum
                write_text(Path(sweep_dir) / STOPPING, signal.Signals(signum).name)
        previous = {s: signal.signal(s, ask) for s in SIGNALS}
        return lambda: [signal.signal(s, h) for s, h in previous.items()]

    def __getstate__(self):  # submitit pickles the launcher with its callbacks: the lock stays with this process
        return {}

    def on_multirun_end(self, config, **kwargs):
        sweep_dir = Path(config.hydra.sweep.dir)
        status = [status_of(p.parent) for p in sorted(sweep_dir.glob(f"*/{SUMMARY}"))]
        failed = len(status) - sum(map(status.count, ("completed", "diverged", "interrupted")))
        interrupted = status.count("interrupted")
        print(f"{sweep_dir}: {len(status)} runs, {failed} failed, {interrupted} interrupted. "
              f"Report: vla-exp-report {sweep_dir}")
        if interrupted or self.signum:
            print("the same command resumes the interrupted runs and skips the finished ones")
        (sweep_dir / STOPPING).unlink(missing_ok=True)
        self.hold.close()
        if self.signum:
            sys.exit(128 + self.signum)
        if failed or interrupted:
            sys.exit(1)


def refuse(message):
    """A multirun that launches nothing: its line, and the exit code that says so to a study."""
    print(message, file=sys.stderr)
    sys.exit(REFUSED)


def jobs_apart(launcher):
    """Whether the launcher runs a sweep's jobs in processes of their own on this machine (joblib's loky workers)."""
    return str(launcher.get("_target_", "")).endswith("JoblibLauncher")


def stopping(sweep_dir):
    """The signal a multirun is stopping on ("SIGINT"), or None: a job that would start now does not."""
    try:
        return (Path(sweep_dir) / STOPPING).read_text().strip() or "a signal"
    except OSError:
        return None


def check_partition(launcher):
    """A SLURM sweep's partition must be one the cluster has: sbatch would refuse each job, and submitit would end
    the sweep in a traceback. Where sinfo cannot answer, sbatch decides."""
    if not str(launcher.get("_target_", "")).endswith("SlurmLauncher") or not launcher.get("partition"):
        return
    try:
        out = subprocess.run(["sinfo", "-h", "-o", "%R"], capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired):
        return
    names = sorted(set(out.stdout.split()))
    if out.returncode == 0 and names and launcher.partition not in names:
        raise UsageError(f"hydra.launcher.partition={launcher.partition}: the cluster has no such partition "
                         f"(it has: {', '.join(names)})")


def job_overrides(config):
    """Every job's overrides, as the basic sweeper will split them (other sweepers choose their jobs as they go:
    their jobs are checked as each one starts)."""
    if not config.hydra.sweeper._target_.endswith("BasicSweeper"):
        return []
    params = [f"{k}={v}" for k, v in (config.hydra.sweeper.get("params") or {}).items()]
    return sweep_jobs([*params, *config.hydra.overrides.task])


def sweep_jobs(overrides):
    """The jobs a multirun of `overrides` (`init=none,xavier seed=0,1`) launches, each its list of overrides, as
    Hydra's basic sweeper splits them."""
    from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
    from hydra.core.override_parser.overrides_parser import OverridesParser
    parsed = OverridesParser.create().parse_overrides(list(overrides))
    return [job for batch in BasicSweeper.split_arguments(parsed, None) for job in batch]
