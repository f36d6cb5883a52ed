"""Under load: the 16-cell factorial, 2 jobs side by side, on a small budget; prints every job's peak memory.

    python experiments/load_test.py
    python experiments/load_test.py --out DIR epochs=2   # trailing Hydra overrides for every run

Checks that every one of the 16 runs leaves a summary.json, and prints the peak resident memory each job reached
(VmHWM, restarted at the start of each job, so a worker process that runs several jobs reports each one's own).
"""
import argparse
import subprocess
import sys

from vla_exp.attribution.studies import cells
from vla_exp.runs import summaries as run_summaries


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", default="results/load_test", help="sweep folder (default results/load_test)")
    p.add_argument("overrides", nargs="*", help="Hydra overrides for every run")
    args = p.parse_intermixed_args(argv)
    sweep = subprocess.run([sys.executable, "-m", "vla_exp.training.main", "-m", *cells("factorial"), "epochs=1",
                            "data.episodes=40", "hydra/launcher=joblib", "hydra.launcher.n_jobs=2",
                            f"hydra.sweep.dir={args.out}", "progress=false", "logger=none", *args.overrides])
    summaries = run_summaries(args.out)
    print(f"\n{'job':<48} {'status':<10} {'peak RSS (MB)':>14} {'wall (s)':>9}")
    for name, s in summaries.items():
        print(f"{name:<48} {s['status']:<10} {s.get('peak_rss_mb', float('nan')):>14.0f} "
              f"{s.get('wall_time_s', float('nan')):>9.1f}")
    peaks = [s["peak_rss_mb"] for s in summaries.values() if "peak_rss_mb" in s]
    print(f"\n{len(summaries)}/16 summaries, {sum(s['status'] == 'completed' for s in summaries.values())} completed; "
          f"peak RSS per job: max {max(peaks, default=float('nan')):.0f} MB")
    return 0 if sweep.returncode == 0 and len(summaries) == 16 else 1


if __name__ == "__main__":
    sys.exit(main())
