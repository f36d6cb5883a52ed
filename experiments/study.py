"""The ablation studies, one command each: a Hydra multirun of the cells x seeds, then its report.

    python experiments/study.py factorial          # all 16 mixes of the four fixes x 3 seeds
    python experiments/study.py leave_one_out      # the fixed recipe, and the fixed recipe minus each fix
    python experiments/study.py add_one            # the original recipe, and the original recipe plus each fix
    python experiments/study.py factorial --seeds 0,1 --jobs 1 --out DIR epochs=4   # trailing Hydra overrides

Runs go to --out (default results/<study>), the report to <out>/report (dashboard.html, table.md, analysis.md).
Re-running a study skips its finished runs, so an interrupted one goes on where it stopped. Jobs run side by side
with Hydra's joblib launcher (`pip install -e ".[sweeps]"`), the cores divided between them.
"""
import argparse
import importlib.util
import subprocess
import sys

from vla_exp.analysis import recipe_levels
from vla_exp.report import main as report
from vla_exp.train import GROUPS

# Sized so that the 48-run factorial fits in 30 minutes on 2 CPU cores; the recipes' own default is 4 epochs of 200.
BUDGET = ["epochs=3", "data.episodes=100"]


def cells(study):
    original, fixed = recipe_levels("original"), recipe_levels("fixed")
    if study == "factorial":
        return [f"{g}={original[g]},{fixed[g]}" for g in GROUPS]
    if study == "leave_one_out":
        return ["recipe=fixed," + ",".join(f"fixed_without_{g}" for g in GROUPS)]
    return ["recipe=original," + ",".join(f"original_with_{g}" for g in GROUPS)]


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("study", choices=("factorial", "leave_one_out", "add_one"))
    p.add_argument("--seeds", default="0,1,2", help="comma-separated seeds (default 0,1,2)")
    p.add_argument("--jobs", type=int, default=2, help="runs side by side (default 2; 1 needs no launcher plugin)")
    p.add_argument("--out", help="sweep folder (default results/<study>)")
    p.add_argument("overrides", nargs="*", help="Hydra overrides for every run, after the budget: epochs=4")
    args = p.parse_intermixed_args(argv)
    if args.jobs < 1:
        p.error(f"--jobs must be 1 or more, got {args.jobs}")
    if args.jobs > 1 and not importlib.util.find_spec("hydra_plugins.hydra_joblib_launcher"):
        p.error('--jobs above 1 needs the joblib launcher: pip install -e ".[sweeps]" (or use --jobs 1)')
    out = args.out or f"results/{args.study}"
    launcher = ["hydra/launcher=joblib", f"hydra.launcher.n_jobs={args.jobs}"] if args.jobs > 1 else []
    sweep = subprocess.run([sys.executable, "-m", "vla_exp.train", "-m", *cells(args.study), f"seed={args.seeds}",
                            *BUDGET, *launcher, f"hydra.sweep.dir={out}", "progress=false", *args.overrides])
    report([out])
    return sweep.returncode  # non-zero when a run failed: the report marks its cell


if __name__ == "__main__":
    sys.exit(main())
