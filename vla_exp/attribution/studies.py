"""The ablation studies, one command each: a Hydra multirun of the cells x seeds, then its report.

    vla-exp-study factorial          # all 16 mixes of the four fixes x 3 seeds
    vla-exp-study leave_one_out      # the fixed recipe, and the fixed recipe minus each fix
    vla-exp-study add_one            # the original recipe, and the original recipe plus each fix
    vla-exp-study metaworld          # original vs fixed on MetaWorld: closed-loop success per epoch,
                                                   # and at equal optimiser updates
    vla-exp-study budget             # original vs fixed for 16 epochs: action error by epoch, updates, time
    vla-exp-study factorial --seeds 0,1 --jobs 1 --out DIR epochs=4   # trailing Hydra overrides
    vla-exp-study factorial --dry-run   # print each run's overrides, one line a run; launch nothing
    vla-exp-study screen --a recipe=original --b recipe=reported_script --split optim --seeds 0,1

Runs go to --out (default results/<study>), the report to <out>/report (dashboard.html, table.md, analysis.md).
The factorial, leave-one-out, add-one and screen studies run at the working budget (3 epochs of 180 training
episodes: the smallest at which the fixed recipe's policies beat every baseline) unless `--budget quick` (100
episodes; about half the time, and no policy works yet, which every table drawn from it says).
Re-running a study skips its finished runs, so an interrupted one goes on where it stopped. Jobs run side by side
with Hydra's joblib launcher (`pip install -e ".[sweeps]"`), the cores divided between them.

The metaworld study (`pip install -e ".[metaworld]"`) generates the demonstrations first, rolls each run's policy
out after every epoch, rolls out the reference policies (the scripted expert, the mean action chunk, random actions)
from the first run's folder, and prints the success rates side by side (also in <out>/success.md). The fixed recipe
takes twice the optimiser steps of the original in an epoch (batch 8 against 16), so the study also trains it for
the epochs that give it the original's number of updates (into <out>_equal_updates) and compares both ways.

The screen study varies every difference between two configs A and B (each a quoted list of overrides or a run
folder; `vla-exp-diff A B` lists them) in a two-level design (vla_exp/attribution/screen.py), then confirms the
smallest set of changes that recovers B: A plus the factors in order of their effect, one at a time, each step run
with the same seeds, until one reaches B's value; then that set minus each of its factors. It prints the outcome
in one sentence (also in <out>/confirmation.md) and the report holds the effects, their aliases and the steps.
Where the study's budget is not --confirm-budget (default: the working budget), A, B, A plus that set and the set
without each factor run again at that budget into <out>_confirm, and the sentence says whether the verdict holds
where the policies work, where the budgets disagree, and whether B's own policies beat every baseline there.
"""
import argparse
import importlib.util
import json
import math
import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
import time
from contextlib import ExitStack, contextmanager
from pathlib import Path

from vla_exp import UsageError, one_line
from vla_exp.config import GROUPS, compose, recipe_levels
from vla_exp.files import STUDY_LOCK, exclusive, write_json, write_text
from vla_exp.runs import CONFIRMATION_JSON, CONFIRMATION_MD, FIGURES, SUMMARY, check_folder, nothing_ran, write_study
from vla_exp.schema import SEED
from vla_exp.signals import SIGNALS, Interrupted
from vla_exp.attribution.report import main as report

# working: the smallest budget at which the fixed recipe beats every baseline in all seeds (3 epochs of the default
# data's 180 training episodes; docs/results/2026-12-06-working-budget.md); quick: a cheaper one at which no policy
# works yet, for a first look. The studies read the last epoch's figures (all 256 held-out samples); the epochs
# before it use the first 64.
BUDGETS = {"working": ["epochs=3", "eval.epoch_samples=64"],
           "quick": ["epochs=3", "data.episodes=100", "eval.epoch_samples=64"]}
METAWORLD_BUDGET = ["data=metaworld", "epochs=12", "eval.rollouts=20", "eval.rollout_every=4"]
CURVE_BUDGET = ["epochs=16"]  # the default data (180 training episodes), four times the recipes' epochs
REFERENCES = ("expert", "mean_chunk", "random")


def cells(study):
    if study in ("metaworld", "budget"):
        return ["recipe=original,fixed"]
    original, fixed = recipe_levels("original"), recipe_levels("fixed")
    if study == "factorial":
        return [f"{g}={original[g]},{fixed[g]}" for g in GROUPS]
    if study == "leave_one_out":
        return ["recipe=fixed," + ",".join(f"fixed_without_{g}" for g in GROUPS)]
    return ["recipe=original," + ",".join(f"original_with_{g}" for g in GROUPS)]


def seed_list(text):
    """--seeds as the canonical text of distinct seeds ("0,1,2"), each a seed a run accepts; else one line. A seed
    given twice would be one run read as two replicates."""
    items = text.split(",")
    test, allowed = SEED
    for item in items:
        if not (re.fullmatch(r"\d+", item.strip()) and test(int(item))):
            raise argparse.ArgumentTypeError(f"{text!r}: {item.strip()!r} is not a seed: each {allowed}")
    seeds = [int(item) for item in items]
    if (twice := next((x for x in seeds if seeds.count(x) > 1), None)) is not None:
        raise argparse.ArgumentTypeError(f"{text!r}: seed {twice} is given {seeds.count(twice)} times; each seed is "
                                         "one replicate, so give distinct seeds")
    return ",".join(map(str, seeds))


def number(low, above=False):
    """An argparse type: a finite number >= `low` (> `low` where `above`)."""
    def parse(text):
        try:
            x = float(text)
        except ValueError:
            x = math.nan
        if not (math.isfinite(x) and (x > low if above else x >= low)):
            raise argparse.ArgumentTypeError(f"{text!r}: must be a finite number {'>' if above else '>='} {low:g}")
        return x
    return parse


class Refused(UsageError):
    """A study's multirun launched nothing: its folder was held, or a job's config was refused (it said which)."""


@contextmanager
def holding(folders):
    """The study holds its folders from before it writes anything until it ends (STUDY_LOCK: a second study into one
    stops in one line), and refuses a folder that a run or sweep holds now (its .lock, which the study's own multiruns
    take while they run) or that a file is in the place of. A refused study writes nothing there."""
    with ExitStack() as hold:
        for folder in map(Path, folders):
            check_folder(folder, "study folder")
            if (folder / ".lock").exists():
                with exclusive(folder, "a run or sweep"):
                    pass
            hold.enter_context(exclusive(folder, "another study", lock=STUDY_LOCK))
        yield


def launch(overrides, launcher):
    """One multirun of a study's runs (vla-exp-train -m) with `overrides` on the `launcher`, and its exit code. It
    runs in a process group of its own, and a signal to the study (Ctrl-C, SIGTERM, SIGUSR1/2) goes on to the
    whole group: each running job saves a checkpoint and stops at its step boundary, the study waits for them, then
    raises Interrupted (the same command resumes). A multirun that launched nothing raises Refused."""
    from vla_exp.training.sweep import REFUSED
    proc = subprocess.Popen([sys.executable, "-m", "vla_exp.training.main", "-m", *overrides, *launcher],
                            start_new_session=True)
    got = []

    def forward(signum, frame):
        got.append(signum)
        try:
            os.killpg(proc.pid, signum)
        except ProcessLookupError:  # the multirun ended meanwhile
            pass
    previous = {s: signal.signal(s, forward) for s in SIGNALS}
    try:
        code = proc.wait()
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
    if got:
        raise Interrupted(got[0], f"interrupted by {signal.Signals(got[0]).name}: the running jobs saved a checkpoint "
                          "and no report was written; the same command resumes the study and skips its finished runs")
    if code == REFUSED:
        raise Refused("the study's multirun launched nothing (the line above says why); the study stops there")
    return code


def main(argv=None):
    """The command line: one line for bad input, an interrupted study or a refused multirun, before any report."""
    try:
        return study(argv)
    except Interrupted as e:
        print(e, file=sys.stderr)
        sys.exit(128 + e.signum)
    except UsageError as e:
        sys.exit(f"error: {e}")


def study(argv=None):
    p = argparse.ArgumentParser(prog="vla-exp-study", description=__doc__.split("\n")[0])
    p.add_argument("study", choices=("factorial", "leave_one_out", "add_one", "metaworld", "budget", "screen"))
    p.add_argument("--seeds", type=seed_list, default="0,1,2", help="comma-separated distinct seeds (default 0,1,2)")
    p.add_argument("--jobs", type=int, help="runs side by side on the CPUs (default 2; 1 needs no launcher plugin)")
    p.add_argument("--jobs-per-gpu", type=int, metavar="K", help="K runs side by side on each of this machine's GPUs, "
                   "each seeing only its own, K first checked against the GPU's memory by a one-epoch probe run "
                   "(Hydra's Ray launcher: pip install -e \".[gpus]\")")
    p.add_argument("--ray-address", metavar="ADDRESS", help="with --jobs-per-gpu: place the jobs on the GPUs of the "
                   "Ray cluster running there (auto: the one `ray start --head` started on this machine)")
    p.add_argument("--out", help="sweep folder (default results/<study>)")
    p.add_argument("--budget", choices=tuple(BUDGETS), default="working",
                   help="of the factorial, leave-one-out, add-one and screen runs: working (default; the fixed "
                   "recipe's policies beat every baseline) or quick (about half the time; no policy works yet)")
    p.add_argument("--dry-run", action="store_true", help="print each run's overrides and launch nothing")
    s = p.add_argument_group("screen")
    s.add_argument("--a", help='the config that is broken: quoted overrides ("recipe=original") or a run folder')
    s.add_argument("--b", help="the config that works, the same way")
    s.add_argument("--split", action="append", default=[], metavar="GROUP",
                   help="make each differing key of this config group a factor of its own (repeatable)")
    s.add_argument("--max-runs", type=int, default=32, help="most configurations in the design (default 32)")
    s.add_argument("--resolution", type=int, choices=(3, 4), default=4,
                   help="of a fractional design: 4 (default; main effects clear of two-factor interactions) or 3")
    s.add_argument("--foldover", action="store_true", help="add the design's mirror image (twice the runs)")
    s.add_argument("--metric", default="val_action_error", help="what the screen and the confirmation read "
                   "(a figure of summary.json; default val_action_error)")
    s.add_argument("--threshold", type=number(0, above=True), help="a step recovers B when its mean is this close "
                   "to B's (default: within the 95%% interval of the difference, from the screen's seed noise)")
    s.add_argument("--method", choices=("design", "bisect"), default="design", help="design (default): a two-level "
                   "design over every difference, then the confirmation; bisect: sequential bifurcation, groups of "
                   "differences tested and split (vla_exp/attribution/bisect.py)")
    s.add_argument("--confirm-budget", default="working", metavar="BUDGET",
                   help="the budget the smallest set is confirmed at again (A, B, A plus the set and the set without "
                        "each of its factors, the same seeds, into <out>_confirm): working (default: the smallest at "
                        "which the fixed recipe beats every baseline), quick, or quoted Hydra overrides applied after "
                        "all others ('epochs=5'); nothing runs twice where it composes to the study's own budget")
    s.add_argument("--delta0", type=number(0), default=0.02, help="bisect: the largest effect on --metric that "
                   "does not matter (default 0.02)")
    s.add_argument("--delta1", type=number(0, above=True), default=0.08, help="bisect: the smallest effect that "
                   "matters (default 0.08)")
    s.add_argument("--max-seeds", type=int, default=40, help="bisect: the most seeds one group test may run before "
                   "it says it cannot tell (default 40)")
    p.add_argument("overrides", nargs="*", help="Hydra overrides for every run, after the budget: epochs=4 (they "
                   "beat a debug= preset's values, so shrink a study with epochs= and data.episodes=)")
    args = p.parse_intermixed_args(argv)
    try:
        launcher = job_launcher(args.jobs, args.jobs_per_gpu, address=args.ray_address)
    except UsageError as e:
        p.error(str(e))
    out = args.out or f"results/{args.study}"
    if args.study == "screen":
        return screen(args, p, Path(out), launcher)
    budget = {"metaworld": METAWORLD_BUDGET, "budget": CURVE_BUDGET}.get(args.study, BUDGETS[args.budget])
    runs = [*cells(args.study), f"seed={args.seeds}", *budget]
    sweeps = [([*runs, *args.overrides], out)]  # each sweep's overrides and folder
    if args.study == "metaworld":
        try:
            fixed = equal_updates(budget, args.overrides)
        except UsageError as e:
            sys.exit(f"error: {e}")
        sweeps.append(([f"seed={args.seeds}", *budget, *args.overrides, *fixed], f"{out}_equal_updates"))
    if args.dry_run:
        from vla_exp.training.sweep import sweep_jobs
        for overrides, folder in sweeps:
            jobs = sweep_jobs(overrides)
            print("\n".join(" ".join(job) for job in jobs) + f"\n{len(jobs)} runs into {folder}")
        print("nothing launched")
        return 0
    if args.jobs_per_gpu and not args.ray_address:  # a cluster's GPUs are not this machine's to probe
        from vla_exp.training.sweep import sweep_jobs
        # the run with the largest batch (the first of them) needs the most memory of the study's runs
        jobs = [job for overrides, _ in sweeps for job in sweep_jobs(overrides)]
        probe_or_exit(args.jobs_per_gpu, max(jobs, key=lambda job: compose(*job).optim.batch_size))
    with holding([folder for _, folder in sweeps]):
        check_owner(out, args.study)
        return run_sweeps(args, sweeps, budget, launcher, out)


def run_sweeps(args, sweeps, budget, launcher, out):
    """A study of one or two multiruns in the folders it holds: the runs, then study.json and the report."""
    from vla_exp.training.sweep import sweep_jobs
    if args.study == "metaworld":
        prepare(*budget, *args.overrides)
    code = 0
    for overrides, folder in sweeps:
        code |= launch([*overrides, f"hydra.sweep.dir={folder}", "progress=false"], launcher)
    if code and nothing_ran([folder for _, folder in sweeps]):
        return code
    short = cut_short(code, sum(len(sweep_jobs(overrides)) for overrides, _ in sweeps),
                      sum(1 for _, folder in sweeps for _ in Path(folder).glob(f"*/{SUMMARY}")))
    if short:
        print(short, file=sys.stderr)
        return code
    if args.study == "metaworld":
        references(Path(out))
    write_study(out, args.study, seeds=args.seeds, overrides=args.overrides,
                **({} if args.study in ("metaworld", "budget") else {"budget": args.budget}))
    report([out])  # with the study's own tables (success.md, budget.md): study.json says which
    return code  # non-zero when a run failed: the report marks its cell


def check_owner(out, study, **sides):
    """Refuse in one line a folder whose study.json says another study made it (or a screen of other sides): its
    runs would be read as this one's and its files written over. A setting the record lacks (an older version's)
    is not held against it."""
    from vla_exp.runs import STUDY, read_study
    held = read_study(out)
    if held is None and (Path(out) / STUDY).exists():
        raise UsageError(f"{Path(out) / STUDY} is not a study's record: give --out a new folder, or delete the file")
    if held and any(held.get(k, v) != v for k, v in {"study": study, **sides}.items()):
        what = ", ".join(f"{k} {held.get(k)!r}" for k in {"study": study, **sides} if k in held)
        raise UsageError(f"{out} holds another study ({what}): give --out a new folder")


def job_launcher(jobs, per_gpu, gpus=None, address=None):
    """The Hydra launcher overrides that run a study's jobs: `jobs` side by side on the CPUs (joblib; default 2), or
    `per_gpu` side by side on each GPU with Ray, each job asking for 1/per_gpu of a GPU and an equal share of the
    cores: on this machine's `gpus` GPUs (default: as many as torch sees), or on those of the Ray cluster running at
    `address` (`auto`: the one `ray start --head` started here)."""
    if jobs is not None and per_gpu is not None:
        raise UsageError("give --jobs (runs side by side on the CPUs) or --jobs-per-gpu (on each GPU), not both")
    if address is not None and per_gpu is None:
        raise UsageError("--ray-address places --jobs-per-gpu K jobs on a Ray cluster's GPUs: give --jobs-per-gpu too")
    if per_gpu is None:
        jobs = 2 if jobs is None else jobs
        if jobs < 1:
            raise UsageError(f"--jobs must be 1 or more, got {jobs}")
        if jobs > 1 and not importlib.util.find_spec("hydra_plugins.hydra_joblib_launcher"):
            raise UsageError('--jobs above 1 needs the joblib launcher: pip install -e ".[sweeps]" (or use --jobs 1)')
        return ["hydra/launcher=joblib", f"hydra.launcher.n_jobs={jobs}"] if jobs > 1 else []
    if per_gpu < 1:
        raise UsageError(f"--jobs-per-gpu must be 1 or more, got {per_gpu}")
    if not importlib.util.find_spec("hydra_plugins.hydra_ray_launcher"):
        raise UsageError('--jobs-per-gpu needs Hydra\'s Ray launcher: pip install -e ".[gpus]"')
    where, cpus, cluster = "this machine", os.cpu_count() or 1, []
    if address is not None:
        where, (gpus, cpus) = f"the Ray cluster at {address}", ray_cluster(address)
        # the plugin sizes the object store of a Ray it starts; Ray refuses that size when joining a running one
        cluster = [f"hydra.launcher.ray.init.address={address}", "hydra.launcher.ray.init.object_store_memory=null"]
    elif gpus is None:
        import torch
        gpus = torch.cuda.device_count()
    if gpus == 0:
        raise UsageError(f"--jobs-per-gpu: {where} has no GPU that torch can use; --jobs N runs N jobs side by side "
                         "on the CPUs instead")
    # Ray counts GPU shares to 1e-4: rounding 1/K down lets K jobs fit on a GPU (1/3 would not, three times)
    share = math.floor(10000 / per_gpu) / 10000
    return ["hydra/launcher=ray_gpus", f"hydra.launcher.ray.remote.num_gpus={share}",
            f"hydra.launcher.ray.remote.num_cpus={cpus / (gpus * per_gpu):.4g}", *cluster]


def jobs_that_fit(job, device="cuda"):
    """How many jobs like `job` (one run's overrides) fit side by side on one `device`: (that number, what one job
    needs, what the device holds; MiB), from a probe: the job alone for one epoch with its whole held-out evaluation,
    in a folder that is not kept. On a GPU a job needs its allocator's peak and the CUDA context beside it (measured
    as what else is in use on the GPU: another process's memory counts too); on the CPU, its peak resident memory."""
    from vla_exp.runs import read_summary
    from vla_exp.training.loop import ram_mb
    with tempfile.TemporaryDirectory(prefix="vla_probe_") as folder:
        done = subprocess.run([sys.executable, "-m", "vla_exp.training.main", *job, "epochs=1", f"device={device}",
                               "logger=none", "progress=false", "checkpoint.every=0", f"hydra.run.dir={folder}"],
                              capture_output=True, text=True)
        summary = read_summary(folder) or {}
    if summary.get("status") != "completed":
        why = summary.get("error") or (done.stderr.strip().splitlines() or [f"exit code {done.returncode}"])[-1]
        raise UsageError(f"a probe of one job alone on {device} did not finish: {one_line(why)}")
    if device == "cuda":
        need, total = summary["peak_gpu_mb"] + summary["gpu_other_mb"], summary["gpu_total_mb"]
    else:
        need, total = summary["peak_rss_mb"], ram_mb()
    return int(total // need), need, total


def check_jobs_per_gpu(per_gpu, fits, need, total, device="cuda"):
    """Refuse `per_gpu` jobs side by side where the device's memory holds fewer (jobs_that_fit's figures)."""
    measured = (f"one job of this study needs {need / 1024:,.2f} GiB at its peak (a one-epoch probe of its run "
                f"with the largest batch), of the {total / 1024:,.1f} GiB {device} holds")
    if per_gpu > fits:
        raise UsageError(f"--jobs-per-gpu {per_gpu}: {measured}: at most {fits} fit side by side; give "
                         f"--jobs-per-gpu {fits}" if fits else f"--jobs-per-gpu: {measured}: not even one fits")
    print(f"--jobs-per-gpu {per_gpu}: {measured}: {fits} would fit")


def probe_or_exit(per_gpu, job):
    """check_jobs_per_gpu on a probe of `job` on GPU 0; a refusal stops the study in one line."""
    try:
        check_jobs_per_gpu(per_gpu, *jobs_that_fit(job))
    except UsageError as e:
        sys.exit(f"error: {e}")


def ray_cluster(address):
    """The GPUs and cores of the Ray cluster running at `address`, asked of the cluster itself."""
    import ray
    if address != "auto":
        check_ray_head(address)
    try:
        ray.init(address=address, logging_level="ERROR", log_to_driver=False)
    except ConnectionError as e:
        raise UsageError(f"--ray-address {address}: {str(e).splitlines()[0]} (`ray start --head` starts one)") from None
    try:
        resources = ray.cluster_resources()
    finally:
        ray.shutdown()
    return int(resources.get("GPU", 0)), resources.get("CPU", 1)


def check_ray_head(address, timeout=10):
    """One line unless a Ray cluster's head answers at `address` (host:port; ray://host:port, Ray Client's) within
    `timeout` seconds: Ray's own client retries an address for minutes, whatever answers there. The head's GCS is a
    gRPC server (grpcio comes with Ray): it must answer its cluster-id call; a Ray Client server must at least speak
    gRPC, which an HTTP server or anything else never does."""
    import grpc
    host, _, port = address.removeprefix("ray://").rpartition(":")
    if not (host and port.isdigit()):
        raise UsageError(f"--ray-address {address}: give the head's host:port, or auto for the cluster "
                         "`ray start --head` started on this machine")
    if not 0 < int(port) < 65536:
        raise UsageError(f"--ray-address {address}: port {port} is out of range (1 to 65535)")
    try:
        socket.create_connection((host, int(port)), timeout=timeout).close()
    except OSError as e:
        raise UsageError(f"--ray-address {address}: nothing answers there ({e.strerror or e})") from None
    with grpc.insecure_channel(f"{host}:{port}") as channel:
        try:
            if address.startswith("ray://"):
                grpc.channel_ready_future(channel).result(timeout=timeout)
            else:
                channel.unary_unary("/ray.rpc.NodeInfoGcsService/GetClusterId")(b"", timeout=timeout)
        except (grpc.RpcError, grpc.FutureTimeoutError) as e:
            why = e.code().name if isinstance(e, grpc.RpcError) else f"no gRPC answer in {timeout} s"
            raise UsageError(f"--ray-address {address}: something answers there, but not a Ray cluster's head "
                             f"({why}; `ray start --head` starts one and prints its address)") from None


def screen(args, parser, out, launcher):
    """The screen: design, its multirun, the confirmation's multiruns one step at a time, the report."""
    from vla_exp.attribution import bisect as bs
    from vla_exp.attribution import screen as sc
    from vla_exp.attribution.diff import Side, check_split
    if not (args.a and args.b):
        parser.error("screen needs --a and --b: each a quoted list of overrides or a run folder")
    start = time.time()
    seeds = args.seeds.split(",")
    if args.method == "bisect" and len(seeds) < 3:
        parser.error("--method bisect starts each group test with the seeds given and needs three or more for its "
                     "seed noise (--seeds 0,1,2)")
    if args.method == "bisect" and args.max_seeds < len(seeds):
        parser.error(f"--max-seeds {args.max_seeds}: must be at least the {len(seeds)} seeds each group test starts with")
    if args.metric not in FIGURES:
        parser.error(f"--metric {args.metric}: not a figure a run's summary holds; one of {', '.join(FIGURES)}")
    if len(seeds) < 2 and args.threshold is None:
        parser.error("screen with one seed has no seed noise to say when a step reaches B: give --seeds with two "
                     "or more, or --threshold")
    try:
        check_split(args.split)
        a, b = Side(args.a, "--a"), Side(args.b, "--b")
        facs, _ = sc.factors(a, b, args.split)
        if args.method == "bisect":
            bs.check(len(facs), args.delta0, args.delta1, len(seeds))
        else:
            matrix, desc = sc.design(len(facs), args.max_runs, args.resolution, args.foldover)
        sc.budget_conflicts([*BUDGETS[args.budget], *args.overrides], facs)
        second = second_budget(args.confirm_budget, args.budget, args.overrides)
        if second:
            sc.budget_conflicts(second[1], facs)
    except UsageError as e:
        sys.exit(f"error: {e}")
    print(f"{len(facs)} factors: " + "; ".join(f"{f.name} ({sc.level_text(f.a)} -> {sc.level_text(f.b)})"
                                               for f in facs))
    if args.method == "bisect":
        matrix = [bs.levels(0, len(facs)), bs.levels(len(facs), len(facs))]  # A and B come first
        print(f"bisection: A and B x {len(seeds)} seeds, then each important group split in two (two configurations "
              f"and their seeds a split), up to {args.max_seeds} seeds a group test")
    else:
        print(f"design: {desc['kind']}, {desc['runs']} configurations x {len(seeds)} seeds = "
              f"{desc['runs'] * len(seeds)} runs" + (
                  f", resolution {desc['resolution']}, I = {' = '.join(desc['defining_relation'][:6])}"
                  + (" ..." if len(desc["defining_relation"]) > 6 else "") if desc["resolution"] else ""))

    def stage(where, overrides):
        """sweep(configurations, part): the overrides of one multirun of them into `where` (their config files in
        where/design), the budget and every run's overrides in `overrides`."""
        # each configuration's file spells out its whole config (screen.target): A's own overrides are not repeated
        base = [f"hydra.searchpath=[file://{(where / 'design').resolve()}]", f"hydra.sweep.dir={where}",
                "hydra.sweep.subdir=${design.name}-s${seed}", "progress=false"]

        def sweep(levels_list, part, folder=where / "design", run_seeds=args.seeds):
            try:
                names_run = sc.write_configs(folder, [(lv, part) for lv in levels_list], facs, a, b)
            except UsageError as e:
                sys.exit(f"error: {e}")
            return [f"seed={run_seeds}", *base, "+screen=" + ",".join(dict.fromkeys(names_run)), *overrides]
        return sweep

    sweep = stage(out, [*BUDGETS[args.budget], *args.overrides])
    confirm = Path(f"{out}_confirm")
    at_second = second and (second[0], stage(confirm, second[1]), confirm)

    if args.dry_run:
        from vla_exp.training.sweep import sweep_jobs
        with tempfile.TemporaryDirectory(prefix="vla_screen_") as scratch:  # every configuration checked, none kept
            jobs = sweep_jobs(sweep(list(matrix), "design", Path(scratch)))
        print("\n".join(" ".join(job) for job in jobs))
        print(f"{len(jobs)} runs into {out}, then " + (
            "the group tests, as many as their decisions need" if args.method == "bisect" else
            f"A, B and the confirmation's steps where the design lacks them ({len(seeds)} runs each, at most "
            f"{2 * len(facs) - 1})") + (f"; then the set found again at {second[0]} into {confirm} (A, B, the set "
                                          f"and the set without each factor, {len(seeds)} runs each)" if second else
                                          "") + "; nothing launched")
        return 0
    if args.jobs_per_gpu and not args.ray_address:  # A or B, whichever has the larger batch, from a folder not kept
        from vla_exp.training.sweep import sweep_jobs
        k = len(facs)
        levels = bs.levels(0 if a.leaves["optim.batch_size"] >= b.leaves["optim.batch_size"] else k, k)
        with tempfile.TemporaryDirectory(prefix="vla_screen_") as scratch:
            job = [f"hydra.searchpath=[file://{scratch}]" if o.startswith("hydra.searchpath=") else o
                   for o in sweep_jobs(sweep([levels], "design", Path(scratch)))[0]]
            probe_or_exit(args.jobs_per_gpu, job)
    with holding([out, *([confirm] if at_second else [])]):  # before writing anything: a refused one writes nothing
        check_owner(out, "screen", a=args.a, b=args.b, method=args.method)
        if args.method == "bisect":
            return run_bisect(args, out, launcher, sweep, facs, start, at_second)
        return run_screen(args, out, launcher, sweep, matrix, facs, start, at_second)


def run_screen(args, out, launcher, sweep, matrix, facs, start, at_second=None):
    """The screen's design, its confirmation one step at a time, the confirmation again at the second budget
    (`at_second`: its label, sweep and folder; None: the study's own budget), and the report, in a folder the study
    holds."""
    from vla_exp.attribution import screen as sc
    from vla_exp.config import reference_levels
    from vla_exp.runs import find_run_dirs, load_runs
    names = [f.name for f in facs]
    launched = launch(sweep(list(matrix), "design"), launcher)
    if launched and nothing_ran([out]):
        return launched
    design_runs = [out / f"{sc.config_name(levels)}-s{seed}" for levels in matrix for seed in args.seeds.split(",")]
    short = cut_short(launched, len(design_runs), sum((d / SUMMARY).is_file() for d in design_runs))
    if short:
        print(short, file=sys.stderr)
        return launched

    def runs():
        found = load_runs(find_run_dirs([out]), reference_levels())
        return found[found.design_name.notna()] if "design_name" in found else found.iloc[:0]

    plan, done = None, runs()
    design = done[done.design_part == "design"]  # all in: a multirun cut short stopped the study above
    result = sc.estimate_effects(design, args.metric, names)
    changes = sc.held_out_changes(design, names)
    if changes:
        print(f"note: {changes}")
    if "error" in result:
        print(f"no confirmation: {result['error']}")
    while "error" not in result:  # the confirmation, one configuration (all its seeds side by side) at a time
        try:
            plan = sc.confirmation(done, args.metric, names, result, args.threshold)
        except UsageError as e:
            print(f"no confirmation: {e}")
            plan = None
            break
        if plan["next"] is None:
            break
        print(f"confirmation: {sc.label(plan['next'], names)}")
        launched |= launch(sweep([plan["next"]], "confirm"), launcher)
        done = runs()
        if not (done.design_name == sc.config_name(plan["next"])).any():
            print(f"no confirmation: the runs of {sc.label(plan['next'], names)} did not finish")
            plan = None
            break
    if plan:
        chosen = plan["steps"][plan["reached"] - 1]["set"] if plan["reached"] else []
        plan["at"] = study_budget(args)
        plan["budget"], code = second_part(args, launcher, at_second, names, chosen, out)
        launched |= code
    write_study(out, "screen", a=args.a, b=args.b, seeds=args.seeds, overrides=args.overrides, budget=args.budget)
    if plan:  # before the report, which shows it
        write_json(out / CONFIRMATION_JSON, plan)
        write_text(out / CONFIRMATION_MD, sc.sentence(plan) + "\n")
    report([str(out)])
    if plan:
        print(sc.sentence(plan))
    print(in_all(len(runs()), at_second, start))
    return launched


def cut_short(code, expected, found):
    """The line for a multirun that ended before each of its `expected` runs wrote a summary (`found` did): it was
    stopped from outside, and a study draws no figure from part of its runs. None where nothing is missing."""
    if code and found < expected:
        return (f"error: {expected - found} of the {expected} runs ended without a summary: their multirun was stopped "
                "from outside (SIGKILL, as the kernel's out-of-memory killer sends; the joblib launcher then ends the "
                "jobs beside the killed one); the finished runs are kept, and the same command resumes the others")
    return None


def in_all(runs, at_second, start):
    """The screen's last line: its runs, those at the second budget, and its wall time since `start`."""
    from vla_exp.runs import find_run_dirs
    folder = at_second and at_second[2]
    more = 0 if not folder or nothing_ran([folder]) else len(find_run_dirs([folder]))
    return f"{runs} runs" + (f" and {more} at {at_second[0]}" if more else "") + f", {time.time() - start:.0f} s in all"


def run_bisect(args, out, launcher, sweep, facs, start, at_second=None):
    """The bisection (vla_exp/attribution/bisect.py) in a folder the study holds: A and B first (which way is
    toward B), then each group test's configurations and seeds as it asks for them, one multirun per seed set; a run
    that failed or diverged is a missing value. Then bisect.json / bisect.md and the report."""
    import itertools
    from collections import defaultdict

    import numpy as np

    from vla_exp.attribution import bisect as bs
    from vla_exp.attribution import screen as sc
    from vla_exp.runs import BISECT_JSON, BISECT_MD, read_summary
    names, seeds = [f.name for f in facs], [int(s) for s in args.seeds.split(",")]
    more = itertools.count(max(seeds) + 1)

    def seed_of(rep):  # replicates past the seeds given take the next unused seeds
        while len(seeds) <= rep:
            seeds.append(next(more))
        return seeds[rep]

    def value(levels, seed):
        s = read_summary(out / f"{sc.config_name(levels)}-s{seed}")
        if s is None or s.get("status") not in ("completed", "diverged", "failed"):
            return None  # not run, or interrupted
        v = s.get(args.metric) if s.get("status") == "completed" else None
        return float(v) if isinstance(v, (int, float)) and np.isfinite(v) else float("nan")

    launched = 0

    def respond(requests):
        nonlocal launched
        wanted = defaultdict(set)
        for levels, rep in requests:
            if value(levels, seed_of(rep)) is None:
                wanted[levels].add(seed_of(rep))
        by_seeds = defaultdict(list)
        for levels, chosen in wanted.items():
            by_seeds[tuple(sorted(chosen))].append(levels)
        for chosen, configs in by_seeds.items():
            launched |= launch(sweep(configs, "bisect", run_seeds=",".join(map(str, chosen))), launcher)
        got = [value(levels, seed_of(rep)) for levels, rep in requests]
        if any(v is None for v in got):
            raise UsageError("the runs of a group test did not finish (interrupted?): run the same command again "
                             "to go on")
        return got

    k = len(names)
    try:
        corners = respond([(lv, r) for r in range(len(seeds)) for lv in (bs.levels(0, k), bs.levels(k, k))])
        a, b = np.array(corners[0::2]), np.array(corners[1::2])
        if not (np.isfinite(a).any() and np.isfinite(b).any()):
            raise UsageError(f"{'A' if not np.isfinite(a).any() else 'B'}'s runs have no finite {args.metric}: there is "
                             "nothing to bisect")
        toward = 1 if np.nanmean(b) >= np.nanmean(a) else -1
        found = bs.bisect(k, lambda reqs: [toward * v for v in respond(reqs)], args.delta0, args.delta1,
                          n0=len(seeds), max_replicates=args.max_seeds)
    except UsageError as e:
        print(f"no bisection: {e}")
        return launched or 1
    plan = bs.outcome(found, names, args.metric, toward, seed_of, args.delta0, args.delta1)
    plan["at"] = study_budget(args)
    plan["budget"], code = second_part(args, launcher, at_second, names, plan["important"], out)
    launched |= code
    write_study(out, "screen", a=args.a, b=args.b, seeds=args.seeds, overrides=args.overrides, budget=args.budget,
                method="bisect")
    write_json(out / BISECT_JSON, plan)
    write_text(out / BISECT_MD, bs.sentence(plan) + "\n")
    report([str(out)])
    print(bs.sentence(plan))
    print(in_all(plan["runs"], at_second, start))
    return launched


def second_part(args, launcher, at_second, names, chosen, out):
    """The plan's record of the second budget and the launch code: the `chosen` set confirmed there, or where the
    study's budget is that budget (or there is no set), whether B's policies beat every baseline at the study's."""
    from vla_exp.attribution.analysis import beats
    from vla_exp.config import reference_levels
    from vla_exp.runs import find_run_dirs, load_runs
    if at_second and chosen:
        return confirm_again(args, launcher, at_second, names, chosen)
    runs = load_runs(find_run_dirs([out]), reference_levels())
    b_runs = runs[runs.design_name == "B"]
    return {"label": study_budget(args), "same": True, "b_beats": [int(beats(b_runs).sum()), len(b_runs)]}, 0


def study_budget(args):
    return f"the study's budget ({' '.join([*BUDGETS[args.budget], *args.overrides])})"


def second_budget(text, budget, overrides):
    """--confirm-budget as (its label, the confirmation's overrides), or None where it composes to the study's own
    budget (the confirmation already ran there). A budget's name replaces the study's; quoted Hydra overrides come
    after every other override."""
    import shlex
    if text in BUDGETS:
        label, second = f"the {text} budget ({' '.join(BUDGETS[text])})", [*BUDGETS[text], *overrides]
    else:
        try:
            extra = shlex.split(text)
        except ValueError as e:
            raise UsageError(f"--confirm-budget {text!r}: {e}") from None
        if not extra or any("=" not in o for o in extra):
            raise UsageError(f"--confirm-budget {text!r}: give a budget ({', '.join(BUDGETS)}) or quoted Hydra "
                             "overrides (key=value ...)")
        label, second = f"the confirmation budget ({text})", [*BUDGETS[budget], *overrides, *extra]
    from vla_exp.data.sources import compose_checked
    own = compose_checked([*BUDGETS[budget], *overrides], f"the study's override list {' '.join(overrides)!r}")
    confirming = compose_checked(second, f"--confirm-budget {text!r}")
    same = confirming == own
    return None if same else (label, second)


def confirm_again(args, launcher, at_second, names, chosen):
    """The smallest set confirmed at the second budget into its own folder: A and B first (B must give a value), then
    the set and the set without each factor in one multirun. Returns (its record for the plan, the launch code)."""
    from vla_exp.attribution import screen as sc
    from vla_exp.config import reference_levels
    from vla_exp.runs import find_run_dirs, load_runs
    import pandas as pd
    label, sweep, folder = at_second
    print(f"confirmation at {label}: into {folder}")
    launched, asked = 0, None
    while True:
        found = load_runs(find_run_dirs([folder]), reference_levels()) if not nothing_ran([folder]) else None
        if found is None or "design_name" not in found:
            found = pd.DataFrame({"design_name": [], "seed": [], args.metric: []})
        check = sc.budget_check(found, args.metric, names, chosen, args.threshold)
        if check["next"] is None:
            return {**check, "label": label}, launched
        if check["next"] == asked:
            return {"label": label, "metric": args.metric, "set": list(chosen),
                    "error": f"the runs of {', '.join(sc.label(lv, names) for lv in asked)} did not finish there "
                             "(interrupted?): run the same command again to go on"}, launched or 1
        asked = check["next"]
        launched |= launch(sweep(asked, "confirm"), launcher)


def prepare(*overrides):
    """Generate the demonstrations once, before parallel jobs would each start on them."""
    from vla_exp.data.sources import compose_checked, episodes_dir
    cfg = compose_checked(overrides, "the study's runs")  # MetaWorld missing, or a bad override: one line
    print(f"demonstrations: {episodes_dir(cfg)}")


def equal_updates(budget, overrides):
    """Overrides of the fixed recipe at the original's optimiser updates: its epochs scaled by the two recipes'
    batch sizes (the last, partial batch of an epoch aside, steps per epoch go as 1 / batch size)."""
    from vla_exp.data.sources import compose_checked
    original, fixed = (compose_checked([f"recipe={r}", *budget, *overrides], "the study's runs")
                       for r in ("original", "fixed"))
    epochs = original.epochs * fixed.optim.batch_size / original.optim.batch_size
    if epochs != int(epochs) or epochs < 1:
        raise UsageError(f"epochs={original.epochs}: the fixed recipe cannot make the original's updates in whole "
                         f"epochs (it would need {epochs:g}); give epochs= a multiple of "
                         f"{original.optim.batch_size // math.gcd(original.optim.batch_size, fixed.optim.batch_size)}")
    return ["recipe=fixed", f"epochs={int(epochs)}"]


def references(out):
    """The reference policies' success, rolled out from the first finished run's folder (its tasks and data) with
    as many episodes per task as the runs had."""
    from vla_exp.evaluation.closed_loop import evaluate_run
    done = [(p.parent, s["closed_loop"]) for p in sorted(out.glob("*/summary.json"))
            if "closed_loop" in (s := json.loads(p.read_text()))]
    for name in REFERENCES if done else ():
        evaluate_run(done[0][0], episodes=done[0][1]["episodes_per_task"], policy=name)


if __name__ == "__main__":
    sys.exit(main())
