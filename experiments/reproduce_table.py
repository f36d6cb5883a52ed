"""Reproduce the reported broken-vs-fixed table on the embedded default, measured, beside the reported figures.

    python experiments/reproduce_table.py                 # 4 runs: original/fixed x today's/legacy loader
    python experiments/reproduce_table.py --out DIR seed=1 # any Hydra override applies to every run

Each run writes its own folder (summary.json, metrics.jsonl, W&B offline files) under --out; the table goes to
<out>/table.md. Nothing here is scaled or tuned towards the reported figures: the measured columns are the runs'
summaries.
"""
import argparse
import json
import math
from pathlib import Path

from tqdm import tqdm

from vla_exp.config import compose
from vla_exp.runs import read_summary
from vla_exp.training.loop import train

RECIPES = ("original", "fixed")
LOADERS = {"current": "today's loader", "legacy_stale": "legacy loader, stale memory",
           "legacy_zeros": "legacy loader, zeroed memory"}

REPORTED = json.loads((Path(__file__).parent / "reported.json").read_text())  # quoted, never computed


def fmt(x, digits=3):
    if x is None:
        return "n/a"
    if isinstance(x, float):
        return "NaN" if math.isnan(x) else f"{x:.{digits}g}"
    return str(x)


def measured(s):
    """The report's five rows, in words, from one run's summary."""
    if s["status"] == "failed":
        return {k: f"failed: {s.get('error', '')}" for k in ("loss", "training", "time", "scale", "grad")}
    conv = s["epochs_to_converge"]
    return {
        "loss": f"{fmt(s['final_loss'])} (val {fmt(s['final_val_loss'])})",
        "training": f"never updated: all {s['skipped_batches']} batches skipped" if s["updates"] == 0 else
        "diverged (NaN)" if s["status"] == "diverged" else
        f"converged: val loss <= {s['converge_loss']} at epoch {conv}" if conv else
        f"val loss stayed above {s['converge_loss']}",
        "time": f"{conv} epochs ({s['time_to_converge_s'] / 60:.1f} min)" if conv else "never",
        "scale": f"std={fmt(s['final_output_std'])} (at init {fmt(s['initial_output_std'])})",
        "grad": "no gradient (no update)" if s["updates"] == 0 else
        f"median norm {fmt(s['grad_norm_median'])} before clipping, {s['nonfinite_grad_steps']}/{s['updates']} non-finite",
    }


ROWS = [("Loss (final epoch, train)", "loss"), ("Training", "training"), ("Time to converge", "time"),
        ("Model output scale", "scale"), ("Gradient flow", "grad")]


def table(summaries, loaders):
    head = ["metric"] + [c for r in RECIPES for c in
                         (f"{r}: reported", *(f"{r}: measured, {LOADERS[h]}" for h in loaders))]
    lines = [head]

    def extra(label, get, reported=lambda recipe: "not reported"):
        lines.append([label] + [c for r in RECIPES for c in (reported(r), *(get(summaries[(r, h)]) for h in loaders))])

    for label, key in ROWS:
        extra(label, lambda s, k=key: measured(s)[k], lambda r, k=key: REPORTED[r][k])

    extra("Initial output std", lambda s: fmt(s.get("initial_output_std")))
    extra("Initial loss", lambda s: fmt(s.get("initial_loss")))
    extra("Skipped / scaled batches", lambda s: f"{s.get('skipped_batches')} / {s.get('scaled_loss_steps')}")
    extra("Held-out sampled action error", lambda s: fmt(s.get("val_action_error")))
    for name in next(iter(summaries.values())).get("baseline_action_errors", {}):
        extra(f"  baseline: {name.replace('_', ' ')}", lambda s, n=name: fmt(s.get("baseline_action_errors", {}).get(n)))
    extra("Policy beats every baseline", lambda s: "yes" if s.get("beats_baselines") else "no")
    return "\n".join("| " + " | ".join(row) + " |" for row in [lines[0], ["---"] * len(head), *lines[1:]])


def notes(summaries):
    fixed, original = summaries.get(("fixed", "current"), {}), summaries.get(("original", "current"), {})
    stale = {h: s for (r, h), s in summaries.items() if r == "original" and h != "current"}
    return [
        f"Loss: the reported {REPORTED['original']['loss']} cannot be a per-element MSE against unit noise, which is "
        f"about 1 for a near-zero prediction (measured at init with today's loader: {fmt(original.get('initial_loss'))})."
        " It fits a loss summed over an ALOHA-style chunk of 100 x 14 actions (about 1460-1620 for such a prediction).",
        f"Output scale: the reported {REPORTED['original']['scale']} fits the per-sample L2 norm of unit noise over a "
        "100 x 14 chunk (about 37), not the per-element std logged here.",
        "Init: the reported 'fixed' init is mis-scaled. Kaiming fan_out on the final 1x1 conv (fan_out = action dim) "
        f"raises the output std at init to {fmt(fixed.get('initial_output_std'))} (today's loader; "
        f"{fmt(original.get('initial_output_std'))} without it), and it never touches ConvTranspose1d or GroupNorm.",
        "Loader: the reported run used transformers 4.52, which left the head's Conv1d/ConvTranspose1d/GroupNorm weights as "
        "uninitialised memory (transformers issues #28298, #35437). Today's transformers initialises them, so the "
        "original recipe no longer starts broken. The legacy columns redo the old behaviour (model.head_loading): "
        + "; ".join(f"{h}: {s.get('nonfinite_head_params')} non-finite head weights and output std "
                    f"{fmt(s.get('initial_output_std'))} at start" for h, s in stale.items()) + ".",
        f"Time: the reported {REPORTED['fixed']['time']} was TinyVLA on the reported run's hardware; here a tiny model on "
        f"{fixed.get('device', 'this machine')} ({fixed.get('precision', 'fp32')}), so only the epoch counts compare, "
        "and the convergence threshold (converge_loss) is this project's.",
        "Action error: mean squared error of DDIM-sampled action chunks on held-out episodes (normalised to [-1, 1]); "
        "a loss that falls is no proof the policy uses its inputs, the baselines are.",
    ]


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="results/reproduce", help="folder for the runs and table.md")
    parser.add_argument("--loaders", default="current,legacy_stale",
                        help=f"comma-separated model.head_loading modes, from {','.join(LOADERS)}")
    parser.add_argument("overrides", nargs="*", help="Hydra overrides applied to every run, e.g. seed=1")
    args = parser.parse_args()
    loaders = args.loaders.split(",")
    if unknown := set(loaders) - set(LOADERS):
        parser.error(f"--loaders: unknown {sorted(unknown)}; choose from {', '.join(LOADERS)}")
    out = Path(args.out)
    summaries = {}
    cells = [(r, h) for h in loaders for r in RECIPES]
    for recipe, loading in tqdm(cells, desc="reproduce_table runs"):
        cfg = compose(f"recipe={recipe}", f"model.head_loading={loading}", *args.overrides)
        run_dir = out / f"{recipe}-{loading}"
        try:
            summaries[(recipe, loading)] = train(cfg, run_dir)
        except Exception as e:  # one failed run must not lose the others: its cell says why
            tqdm.write(f"{recipe}/{loading} failed: {type(e).__name__}: {e}")
            summaries[(recipe, loading)] = read_summary(run_dir)
    text = "\n".join(["# Broken vs fixed: reported, and measured here", "", table(summaries, loaders), "",
                      "Notes:", *(f"- {n}" for n in notes(summaries)), ""])
    (out / "table.md").write_text(text)
    print(text)
    print(f"Table written to {out / 'table.md'}; runs in {out}/<recipe>-<loader>/")


if __name__ == "__main__":
    main()
