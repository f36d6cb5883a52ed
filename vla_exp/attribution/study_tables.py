"""The tables a study adds to its report (`vla-exp-report` on a study folder rebuilds them, reading its study.json):
the MetaWorld study's closed-loop success per recipe and epoch (success.md), with the fixed recipe at equal epochs
and at equal optimiser updates, and the budget study's action error per epoch (budget.md, budget.png).
"""
import html
from pathlib import Path

import pandas as pd
from statsmodels.stats.weightstats import DescrStatsW

from vla_exp.attribution import dashboard
from vla_exp.attribution.numbers import markdown, num, welch
from vla_exp.config import reference_levels
from vla_exp.files import write_text
from vla_exp.runs import SUMMARY, find_run_dirs, load_curves, load_runs, read_metrics, read_summary


def write(folder, study):
    """Write the tables of the study a folder holds (its study.json's dict) into it; return its dashboard sections."""
    kind = study.get("study")
    text = success_table(folder) if kind == "metaworld" else budget_curve(folder) if kind == "budget" else None
    return [(f"The {kind} study", f"<pre>{html.escape(text)}</pre>")] if text else []


def success_table(out):
    """Success rate (mean over seeds) per recipe and epoch, per task at the end, and the reference policies."""
    rows, refs = [], {}
    for path in sorted(out.glob(f"*/{SUMMARY}")):
        s = read_summary(path.parent)
        refs.update({k.removeprefix("closed_loop_"): v for k, v in s.items() if k.startswith("closed_loop_")})
        for r in read_metrics(path.parent):
            if r["kind"] == "epoch" and "success_rate" in r:
                rows.append({"recipe": s["choices"]["recipe"], "seed": s["seed"], "epoch": r["epoch"],
                             **{k.removeprefix("success_"): v for k, v in r.items() if k.startswith("success_")}})
    if not rows:
        print(f"{out}: no run measured closed-loop success")
        return None
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
    return text


def updates_table(out, equal):
    """Final closed-loop success of each arm (recipe x epochs) of the study and of its equal-updates sweep, with
    the optimiser updates each made, a 95% interval over seeds and the pooled episodes' Wilson interval; then the
    fixed recipe against the original at equal epochs and at equal updates."""
    from vla_exp.evaluation.closed_loop import wilson  # here: the report itself never loads torch
    runs = [read_summary(p.parent) for d in (out, equal) for p in sorted(d.glob(f"*/{SUMMARY}"))]
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
    return text
