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
Re-running a study skips its finished runs, so an interrupted one goes on where it stopped. Jobs run side by side
with Hydra's joblib launcher (`pip install -e ".[sweeps]"`), the cores divided between them.

The metaworld study (`pip install -e ".[metaworld]"`) generates the demonstrations first, rolls each run's policy
out after every epoch, rolls out the reference policies (the scripted expert, the mean action chunk, random actions)
from the first run's folder, and prints the success rates side by side (also in <out>/success.md). The fixed recipe
takes twice the optimiser steps of the original in an epoch (batch 8 against 16), so the study also trains it for
the epochs that give it the original's number of updates (into <out>_equal_updates) and compares both ways.

The screen study varies every difference between two configs A and B (each a quoted list of overrides or a run
folder; `python -m vla_exp.attribution.diff A B` lists them) in a two-level design (vla_exp/attribution/screen.py), then confirms the
smallest set of changes that recovers B: A plus the factors in order of their effect, one at a time, each step run
with the same seeds, until one reaches B's value; then that set minus each of its factors. It prints the outcome
in one sentence (also in <out>/confirmation.md) and the report holds the effects, their aliases and the steps.
"""
import argparse
import importlib.util
import json
import math
import subprocess
import sys
import tempfile
import time
from contextlib import ExitStack
from pathlib import Path

import pandas as pd

from vla_exp import UsageError
from vla_exp.attribution.analysis import markdown
from vla_exp.config import GROUPS, compose, recipe_levels
from vla_exp.files import exclusive, write_json, write_text
from vla_exp.attribution.report import main as report

# Sized for the 48-run factorial to fit in 30 minutes on 2 CPU cores (README: how long it takes on which machine);
# the recipes' own default is 4 epochs of 200.
# The studies read the last epoch's figures (all 256 held-out samples); the epochs before it use the first 64.
BUDGET = ["epochs=3", "data.episodes=100", "eval.epoch_samples=64"]
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


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("study", choices=("factorial", "leave_one_out", "add_one", "metaworld", "budget", "screen"))
    p.add_argument("--seeds", default="0,1,2", help="comma-separated seeds (default 0,1,2)")
    p.add_argument("--jobs", type=int, default=2, help="runs side by side (default 2; 1 needs no launcher plugin)")
    p.add_argument("--out", help="sweep folder (default results/<study>)")
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
    s.add_argument("--threshold", type=float, help="a step recovers B when its mean is this close to B's (default: "
                   "within the 95%% interval of the difference, from the screen's seed noise)")
    p.add_argument("overrides", nargs="*", help="Hydra overrides for every run, after the budget: epochs=4 (they "
                   "beat a debug= preset's values, so shrink a study with epochs= and data.episodes=)")
    args = p.parse_intermixed_args(argv)
    if args.jobs < 1:
        p.error(f"--jobs must be 1 or more, got {args.jobs}")
    if args.jobs > 1 and not importlib.util.find_spec("hydra_plugins.hydra_joblib_launcher"):
        p.error('--jobs above 1 needs the joblib launcher: pip install -e ".[sweeps]" (or use --jobs 1)')
    out = args.out or f"results/{args.study}"
    launcher = ["hydra/launcher=joblib", f"hydra.launcher.n_jobs={args.jobs}"] if args.jobs > 1 else []
    if args.study == "screen":
        return screen(args, p, Path(out), launcher)
    budget = {"metaworld": METAWORLD_BUDGET, "budget": CURVE_BUDGET}.get(args.study, BUDGET)
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
    if args.study == "metaworld":
        prepare(*budget, *args.overrides)
    code = 0
    for overrides, folder in sweeps:
        code |= subprocess.run([sys.executable, "-m", "vla_exp.training.main", "-m", *overrides, *launcher,
                                f"hydra.sweep.dir={folder}", "progress=false"]).returncode
    if code and nothing_ran([folder for _, folder in sweeps]):
        return code
    if args.study == "metaworld":
        references(Path(out))
    report([out])
    if args.study == "metaworld":
        success_table(Path(out))
    if args.study == "budget":
        budget_curve(Path(out))
    return code  # non-zero when a run failed: the report marks its cell


def nothing_ran(folders):
    """No run in these sweep folders has a summary: the sweep refused its configs (and said why) or none started."""
    return not any(next(Path(f).glob("*/summary.json"), None) for f in folders)


def screen(args, parser, out, launcher):
    """The screen: design, its multirun, the confirmation's multiruns one step at a time, the report."""
    from vla_exp.attribution import screen as sc
    from vla_exp.attribution.diff import Side
    if not (args.a and args.b):
        parser.error("screen needs --a and --b: each a quoted list of overrides or a run folder")
    start = time.time()
    try:
        a, b = Side(args.a, "--a"), Side(args.b, "--b")
        facs, _ = sc.factors(a, b, args.split)
        matrix, desc = sc.design(len(facs), args.max_runs, args.resolution, args.foldover)
        sc.budget_conflicts([*BUDGET, *args.overrides], facs)
    except UsageError as e:
        sys.exit(f"error: {e}")
    names = [f["name"] for f in facs]
    seeds = args.seeds.split(",")
    if len(seeds) < 2 and args.threshold is None:
        parser.error("screen with one seed has no seed noise to say when a step reaches B: give --seeds with two "
                     "or more, or --threshold")
    print(f"{len(facs)} factors: " + "; ".join(f"{f['name']} ({sc.level_text(f['a'])} -> {sc.level_text(f['b'])})"
                                               for f in facs))
    print(f"design: {desc['kind']}, {desc['runs']} configurations x {len(seeds)} seeds = {desc['runs'] * len(seeds)} "
          f"runs" + (f", resolution {desc['resolution']}, I = {' = '.join(desc['defining_relation'][:6])}"
                     + (" ..." if len(desc["defining_relation"]) > 6 else "") if desc["resolution"] else ""))
    configs = out / "design"
    # each configuration's file spells out its whole config (screen.target): A's own overrides are not repeated here
    base = [f"seed={args.seeds}", *BUDGET, f"hydra.searchpath=[file://{configs.resolve()}]",
            f"hydra.sweep.dir={out}", "hydra.sweep.subdir=${design.name}-s${seed}", "progress=false"]

    def sweep(levels_list, part, folder=configs):
        try:
            names_run = sc.write_configs(folder, [(lv, part) for lv in levels_list], facs, a, b)
        except UsageError as e:
            sys.exit(f"error: {e}")
        return [*base, "+screen=" + ",".join(dict.fromkeys(names_run)), *args.overrides]

    if args.dry_run:
        from vla_exp.training.sweep import sweep_jobs
        with tempfile.TemporaryDirectory(prefix="vla_screen_") as scratch:  # every configuration checked, none kept
            jobs = sweep_jobs(sweep(list(matrix), "design", Path(scratch)))
        print("\n".join(" ".join(job) for job in jobs))
        print(f"{len(jobs)} runs into {out}, then A, B and the confirmation's steps where the design lacks them "
              f"({len(seeds)} runs each, at most {2 * len(facs) - 1}); nothing launched")
        return 0
    with ExitStack() as hold:  # the study holds its folder before writing anything; a refused one writes nothing
        try:
            if (out / ".lock").exists():
                with exclusive(out, "a run or sweep"):
                    pass
            hold.enter_context(exclusive(configs, "another screen"))
        except UsageError as e:
            sys.exit(f"error: {e}")
        return run_screen(args, out, launcher, sweep, matrix, facs, start)


def run_screen(args, out, launcher, sweep, matrix, facs, start):
    """The screen's design, its confirmation one step at a time, and the report, in a folder the study holds."""
    from vla_exp.attribution import screen as sc
    from vla_exp.config import reference_levels
    from vla_exp.attribution.report import find_run_dirs, load_runs
    names = [f["name"] for f in facs]
    launched = subprocess.run([sys.executable, "-m", "vla_exp.training.main", "-m", *sweep(list(matrix), "design"),
                               *launcher]).returncode
    if launched and nothing_ran([out]):
        return launched

    def runs():
        found = load_runs(find_run_dirs([out]), reference_levels())
        return found[found.design_name.notna()] if "design_name" in found else found.iloc[:0]

    plan, done = None, runs()
    result = sc.analyse(done[done.design_part == "design"], args.metric, names)  # the design's runs are all in
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
        launched |= subprocess.run([sys.executable, "-m", "vla_exp.training.main", "-m", *sweep([plan["next"]], "confirm"),
                                    *launcher]).returncode
        done = runs()
        if not (done.design_name == sc.config_name(plan["next"])).any():
            print(f"no confirmation: the runs of {sc.label(plan['next'], names)} did not finish")
            plan = None
            break
    if plan:  # before the report, which shows it
        write_json(out / "confirmation.json", plan)
        write_text(out / "confirmation.md", sc.sentence(plan) + "\n")
    report([str(out)])
    if plan:
        print(sc.sentence(plan))
    print(f"{len(runs())} runs, {time.time() - start:.0f} s in all")
    return launched


def prepare(*overrides):
    """Generate the demonstrations once, before parallel jobs would each start on them."""
    from vla_exp.data.sources import episodes_dir
    from vla_exp.data.sources import validate
    cfg = compose(*overrides)
    validate(cfg)  # MetaWorld missing, or a bad override: one line before anything runs
    print(f"demonstrations: {episodes_dir(cfg)}")


def equal_updates(budget, overrides):
    """Overrides of the fixed recipe at the original's optimiser updates: its epochs scaled by the two recipes'
    batch sizes (the last, partial batch of an epoch aside, steps per epoch go as 1 / batch size)."""
    original, fixed = (compose(f"recipe={r}", *budget, *overrides) for r in ("original", "fixed"))
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


def success_table(out):
    """Success rate (mean over seeds) per recipe and epoch, per task at the end, and the reference policies."""
    rows, refs = [], {}
    for path in sorted(out.glob("*/summary.json")):
        s = json.loads(path.read_text())
        refs.update({k.removeprefix("closed_loop_"): v for k, v in s.items() if k.startswith("closed_loop_")})
        for line in (path.parent / "metrics.jsonl").read_text().splitlines():
            r = json.loads(line)
            if r["kind"] == "epoch" and "success_rate" in r:
                rows.append({"recipe": s["choices"]["recipe"], "seed": s["seed"], "epoch": r["epoch"],
                             **{k.removeprefix("success_"): v for k, v in r.items() if k.startswith("success_")}})
    if not rows:
        print(f"{out}: no run measured closed-loop success")
        return
    df = pd.DataFrame(rows).rename(columns={"rate": "all tasks"})
    table = df.drop(columns="seed").groupby(["recipe", "epoch"]).mean().round(2)
    table["seeds"] = df.groupby(["recipe", "epoch"]).seed.count()
    ref = pd.DataFrame({name: {"all tasks": r["success_rate"], **{t: v["success_rate"] for t, v in r["tasks"].items()}}
                        for name, r in refs.items()}).T.round(2)
    episodes = next(iter(refs.values()), {}).get("episodes_per_task", "?")
    text = (f"# Closed-loop success rate, {out}\n\nMean over seeds, by recipe and epoch ({episodes} episodes per "
            f"task):\n\n{markdown(table.reset_index())}\n\nReference policies:\n\n"
            f"{markdown(ref.reset_index(names='policy'))}\n")
    text += updates_table(out, Path(f"{out}_equal_updates"))
    write_text(out / "success.md", text)
    print(text)


def updates_table(out, equal):
    """Final closed-loop success of each arm (recipe x epochs) of the study and of its equal-updates sweep, with
    the optimiser updates each made, a 95% interval over seeds and the pooled episodes' Wilson interval; then the
    fixed recipe against the original at equal epochs and at equal updates."""
    from statsmodels.stats.weightstats import DescrStatsW

    from vla_exp.attribution.analysis import num, welch
    from vla_exp.evaluation.closed_loop import wilson
    runs = [json.loads(p.read_text()) for d in (out, equal) for p in sorted(d.glob("*/summary.json"))]
    runs = pd.DataFrame([{"recipe": s["choices"]["recipe"], "epochs": s["epochs"], "seed": s["seed"],
                          "updates": s["updates"], "rate": s["closed_loop"]["success_rate"],
                          "episodes": s["closed_loop"]["episodes_per_task"] * len(s["closed_loop"]["tasks"])}
                         for s in runs if s.get("status") == "completed" and "closed_loop" in s])
    if runs.empty or runs.recipe.nunique() < 2:
        return ""
    rows, arms = [], {}
    for (recipe, epochs), arm in runs.groupby(["recipe", "epochs"]):
        arms[recipe, epochs] = arm
        low, high = DescrStatsW(arm.rate).tconfint_mean() if len(arm) > 1 else (float("nan"),) * 2
        k, n = int(round((arm.rate * arm.episodes).sum())), int(arm.episodes.sum())
        rows.append({"recipe": recipe, "epochs": epochs, "updates": f"{arm.updates.mean():.0f}",
                     "success (mean over seeds)": f"{num(arm.rate.mean())} [{num(max(low, 0))}, {num(min(high, 1))}]",
                     "seeds": " / ".join(num(r) for r in arm.rate),
                     "pooled episodes": f"{k}/{n} [{', '.join(num(x) for x in wilson(k, n))}]"})
    original = max((a for a in arms if a[0] == "original"), key=lambda a: a[1], default=None)
    lines = []
    if original:
        updates = arms[original].updates.mean()
        for (recipe, epochs), arm in arms.items():
            if recipe == "fixed":
                same = "equal epochs" if epochs == original[1] else "equal updates"  # the two arms the study runs
                lines.append(f"- fixed ({epochs} epochs, {arm.updates.mean():.0f} updates) minus original "
                             f"({original[1]} epochs, {updates:.0f} updates), {same}: "
                             f"{welch(arm.rate, arms[original].rate)} (Welch 95% interval over seeds)")
    return (f"\nFinal closed-loop success per arm: the fixed recipe at the original's epochs and at its optimiser "
            f"updates (95% t interval over seeds; pooled episodes with a Wilson interval):\n\n"
            f"{markdown(pd.DataFrame(rows))}\n\n" + "\n".join(lines) + "\n")


def budget_curve(out):
    """The budget study's figure (budget.png) and its table (budget.md): held-out action error per recipe and epoch
    with updates and wall time, and the recipes compared at equal epochs and at equal optimiser updates."""
    from vla_exp.attribution import dashboard
    from vla_exp.config import reference_levels
    from vla_exp.attribution.report import find_run_dirs, load_curves, load_runs
    runs = load_runs(find_run_dirs([out]), reference_levels())
    curves = load_curves(runs)
    fig = dashboard.budget_figure(curves, runs)
    fig.savefig(out / "budget.png", dpi=100, bbox_inches="tight")
    epochs = curves[curves.kind == "epoch"].merge(runs[["run_dir", "wall_time_s", "epochs"]], on="run_dir")
    epochs = epochs.assign(minutes=epochs.wall_time_s * epochs.epoch / epochs.epochs / 60)
    agg = epochs.groupby(["cell", "epoch"]).agg(
        error=("val_action_error", "mean"), std=("val_action_error", "std"), seeds=("seed", "nunique"),
        updates=("step", "mean"), minutes=("minutes", "mean")).reset_index()
    shown = agg.assign(error=[f"{m:.3g} ± {s:.2g}" for m, s in zip(agg.error, agg["std"])],
                       minutes=agg.minutes.round(1)).drop(columns="std")
    cells = list(agg.cell.unique())
    same = agg[agg.cell == cells[0]].merge(agg[agg.cell == cells[-1]], on="updates", suffixes=("_a", "_b"))
    equal = [f"{r.updates:.0f} updates: {cells[0]} (epoch {r.epoch_a}) {r.error_a:.3g} ± {r.std_a:.2g}, "
             f"{cells[-1]} (epoch {r.epoch_b}) {r.error_b:.3g} ± {r.std_b:.2g}" for r in same.itertuples()]
    baselines = ", ".join(f"{c.removeprefix('baseline_')} {runs[c].astype(float).mean():.3g}" for c in runs
                          if c.startswith("baseline_"))
    text = (f"# Budget curve, {out}\n\nHeld-out action error (mean ± std over seeds) per recipe and epoch; updates are "
            f"optimiser steps, minutes the run's wall time spread evenly over its epochs.\n\n"
            f"{markdown(shown)}\n\nBaselines: {baselines}\n\nAt equal optimiser updates:\n\n"
            + ("\n".join(f"- {line}" for line in equal) or "- no epoch where both recipes made the same updates")
            + "\n\n![budget](budget.png)\n")
    write_text(out / "budget.md", text)
    print(text)


if __name__ == "__main__":
    sys.exit(main())
