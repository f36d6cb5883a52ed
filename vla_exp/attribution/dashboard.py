"""The report's pictures and its one-page dashboard.

Figures: train loss and output std per cell against the step, the held-out action error per epoch beside the
baselines, and the effect of each fix with its 95% CI, one panel per key metric. Curves are the mean over seeds with a
band of ± one std. The page embeds every image as a base64 data URI and carries its own CSS, so it opens from disk,
with no server and no network.
"""
import base64
import html
import textwrap

import matplotlib

matplotlib.use("Agg")  # reports are made on servers and in tests: never look for a display
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib.patches import Patch  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402

from vla_exp.attribution.numbers import ALPHA  # noqa: E402

BASELINE_STYLES = ("--", ":", "-.", (0, (5, 1, 1, 1)), (0, (1, 3)))


def style(i):
    """A colour and line style per cell, the same in every figure (cells come in the results table's order)."""
    return plt.get_cmap("tab10")(i % 10), ("-", "--", ":")[(i // 10) % 3]  # tab20's pairs of shades read as one


def empty(ax, text):
    ax.axis("off")
    ax.text(0.5, 0.5, textwrap.fill(text, 60), ha="center", va="center", transform=ax.transAxes, fontsize=10)


def legend_outside(ax):
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1), fontsize=8, frameon=False)


def scale(ax, values):
    """Log when the values are positive and span decades (losses, output std), linear otherwise."""
    v = values[np.isfinite(values)]
    if len(v) and v.min() > 0 and v.max() / v.min() > 20:
        ax.set_yscale("log")


def curves_figure(curves, column, cells, ylabel, title):
    """`column` of the step rows against the epoch (cells with other batch sizes take other numbers of steps): per
    cell, the mean over seeds of each seed's running mean (a twentieth of its steps), with a band of ± one std kept
    within the seeds' range (a band below zero would run off a log axis)."""
    fig, ax = plt.subplots(figsize=(12, 4.8))
    steps = curves[curves.kind == "step"] if "kind" in curves else curves
    if column not in steps or steps[column].notna().sum() == 0:
        empty(ax, f"no {column} in the runs' metrics.jsonl")
        return fig
    steps = steps.assign(**{column: steps[column].astype(float).replace([np.inf, -np.inf], np.nan)})
    for i, cell in enumerate(cells):
        g = steps[steps.cell == cell]
        color, ls = style(i)
        if g[column].notna().sum() == 0:  # a diverged cell stays in the legend rather than vanish
            ax.plot([], [], color=color, ls=ls, label=f"{cell}: no finite {column}")
            continue
        window = max(1, len(g) // g.run_dir.nunique() // 20)
        smooth = g.groupby("run_dir")[column].transform(lambda v: v.rolling(window, min_periods=1).mean())
        agg = g.assign(**{column: smooth}).groupby("step")[column].agg(["mean", "std", "min", "max"])
        per_epoch = g.step.max() / (g.epoch.max() + 1)
        x, std = agg.index / per_epoch, agg["std"].fillna(0)
        ax.plot(x, agg["mean"], color=color, ls=ls, lw=1.4, label=f"{cell} (n={g.run_dir.nunique()})")
        ax.fill_between(x, np.maximum(agg["mean"] - std, agg["min"]), np.minimum(agg["mean"] + std, agg["max"]),
                        color=color, alpha=0.18, lw=0)
    scale(ax, steps[column].to_numpy())
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set(xlabel="epoch", ylabel=ylabel, title=title)
    ax.grid(alpha=0.3)
    legend_outside(ax)
    return fig


def epoch_figure(curves, cells, column, references, ylabel, title, what):
    """`column` of the epoch rows per epoch (mean ± std over seeds), with `references` ({label: value}) as grey
    lines."""
    fig, ax = plt.subplots(figsize=(12, 4.8))
    epochs = curves[curves.kind == "epoch"] if "kind" in curves else curves
    if column not in epochs or epochs[column].notna().sum() == 0:
        empty(ax, f"no {what} in the runs' metrics.jsonl")
        return fig
    for i, cell in enumerate(cells):
        g = epochs[epochs.cell == cell]
        agg = g.groupby("epoch")[column].agg(["mean", "std"]).dropna(subset=["mean"])  # epochs that measured it
        color, ls = style(i)
        if agg["mean"].notna().sum() == 0:
            ax.plot([], [], color=color, ls=ls, marker="o", label=f"{cell}: no finite {what}")
            continue
        offset = (i - (len(cells) - 1) / 2) * 0.015  # side by side, so the error bars of one epoch do not overlap
        ax.errorbar(agg.index + offset, agg["mean"], yerr=agg["std"].fillna(0), color=color, ls=ls, marker="o",
                    ms=4, capsize=3, label=f"{cell} (n={g.run_dir.nunique()})")
    for j, (label, value) in enumerate(references.items()):
        ax.axhline(value, color="0.45", ls=BASELINE_STYLES[j % len(BASELINE_STYLES)], lw=1,
                   label=f"{label} ({value:.3g})")
    ticks = sorted(epochs.epoch.dropna().unique())
    ax.set_xlim(ticks[0] - 0.5, ticks[-1] + 0.5)  # a one-epoch run still gets a readable axis
    if len(ticks) <= 20:
        ax.set_xticks(ticks)
    else:
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_ylim(bottom=0)  # neither an error nor a rate is negative; the lowest reference stays off the frame
    ax.set(xlabel="epoch", ylabel=ylabel, title=title)
    ax.grid(alpha=0.3)
    legend_outside(ax)
    return fig


def budget_figure(curves, runs):
    """Held-out action error per epoch against the epoch, the optimiser updates and the wall time (each run's, spread
    evenly over its epochs), mean over seeds with a band of ± one std, beside the baselines."""
    epochs = curves[curves.kind == "epoch"].merge(runs[["run_dir", "wall_time_s", "epochs"]], on="run_dir")
    epochs = epochs.assign(minutes=epochs.wall_time_s * epochs.epoch / epochs.epochs / 60)
    fig, axes = plt.subplots(1, 3, figsize=(16, 4.6), sharey=True)
    axes_x = (("epoch", "epoch"), ("step", "optimiser updates"), ("minutes", "wall time (min, the run's, per epoch)"))
    for i, (cell, g) in enumerate(epochs.groupby("cell", sort=False)):
        agg = g.groupby("epoch").agg(mean=("val_action_error", "mean"), std=("val_action_error", "std"),
                                     step=("step", "mean"), minutes=("minutes", "mean"), epoch=("epoch", "first"))
        color, ls = style(i)
        for ax, (x, _) in zip(axes, axes_x):
            ax.plot(agg[x], agg["mean"], color=color, ls=ls, marker="o", ms=3,
                    label=f"{cell} (n={g.run_dir.nunique()})")
            ax.fill_between(agg[x], agg["mean"] - agg["std"].fillna(0), agg["mean"] + agg["std"].fillna(0),
                            color=color, alpha=0.15)
    for j, c in enumerate(c for c in runs if c.startswith("baseline_")):
        for ax in axes:
            ax.axhline(runs[c].astype(float).mean(), color="0.45", ls=BASELINE_STYLES[j % len(BASELINE_STYLES)], lw=1,
                       label=f"{c.removeprefix('baseline_')} ({runs[c].astype(float).mean():.3g})")
    for ax, (_, label) in zip(axes, axes_x):
        ax.set_xlabel(label)
        ax.grid(alpha=0.3)
    axes[0].set(ylabel="held-out sampled-action error", ylim=(0, None))
    fig.suptitle("Held-out action error by epoch, by optimiser updates and by wall time: mean over seeds, band ± one "
                 "std; grey: baselines")
    fig.tight_layout()
    legend_outside(axes[-1])
    return fig


def effects_figure(results):
    """One panel per metric: each fix's level minus the reference level, with its 95% CI (filled: p < 0.05)."""
    n = len(results)
    cols = 2 if n > 1 else 1
    rows = -(-n // cols)
    height = max([len(r["effects"]) for r in results.values()] + [2])
    fig, axes = plt.subplots(rows, cols, figsize=(13, rows * (1.4 + 0.42 * height)), squeeze=False)
    for ax in axes.flat[n:]:
        ax.axis("off")
    for ax, (metric, res) in zip(axes.flat, results.items()):
        e = res["effects"]
        if e.empty:
            empty(ax, f"{metric}: {res.get('error', 'no effect estimated')}")
            continue
        y = np.arange(len(e))[::-1]
        sig = (e.p < ALPHA).to_numpy()
        ax.errorbar(e["diff"], y, xerr=[e["diff"] - e.lo, e.hi - e["diff"]], fmt="none", ecolor="0.2", capsize=3)
        ax.scatter(e["diff"][sig], y[sig], color="C3", zorder=3, label=f"p < {ALPHA}")
        ax.scatter(e["diff"][~sig], y[~sig], facecolor="white", edgecolor="0.2", zorder=3, label="not detectable")
        ax.axvline(0, color="0.5", lw=0.8)
        ax.set_yticks(y, [f"{r.factor}: {r.level} vs {r.reference}" for r in e.itertuples()], fontsize=8)
        ax.set_ylim(-0.7, len(e) - 0.3)
        ax.set_title(f"{metric} (n={res['n']})", fontsize=10)
        ax.set_xlabel("difference of marginal means, 95% CI", fontsize=8)
        ax.grid(axis="x", alpha=0.3)
    handles = {h.get_label(): h for ax in axes.flat for h in ax.collections if not h.get_label().startswith("_")}
    fig.suptitle("Effect of each fix (level minus the original recipe's level)")
    fig.tight_layout()
    if handles:  # one legend for every panel, above them
        fig.legend(handles.values(), handles.keys(), loc="upper right", ncol=2, fontsize=8, frameon=False)
    return fig


def figures(curves, runs, results, cells):
    """{file stem: figure} for every plot of the report (closed-loop success only where runs measured it)."""
    baselines = {f"baseline: {c.removeprefix('baseline_')}": runs[c].astype(float).mean()
                 for c in runs.columns if c.startswith("baseline_")}
    figs = {
        "loss_curves": curves_figure(curves, "loss", cells, "train loss (per step)",
                                     "Training loss per cell: mean over seeds, band ± one std"),
        "output_std_curves": curves_figure(curves, "output_std", cells, "output std (per step)",
                                           "Model output std per cell: mean over seeds, band ± one std"),
        "action_error": epoch_figure(curves, cells, "val_action_error", baselines, "held-out sampled-action error",
                                     "Held-out action error per epoch, beside the trivial baselines (a policy must "
                                     "be below every grey line)", "held-out action error"),
    }
    if results is not None:  # the four-fix factorial's effects (a screen draws its own half-normal plot)
        figs["effects"] = effects_figure(results)
    if "success_rate" in curves and curves.success_rate.notna().any():
        references = {f"{c.removeprefix('success_rate_')} policy": runs[c].astype(float).mean()
                      for c in runs.columns if c.startswith("success_rate_")}
        figs["success_rate"] = epoch_figure(curves, cells, "success_rate", references, "closed-loop success rate",
                                            "Closed-loop success rate per epoch (MetaWorld), beside the reference "
                                            "policies", "success rate")
    return figs


# ------------------------------------------------------------------------------------------------ the page
CSS = """
body { font-family: system-ui, -apple-system, "Segoe UI", Helvetica, Arial, sans-serif; margin: 24px; color: #222;
       max-width: 1400px; }
h1 { font-size: 1.5em; } h2 { font-size: 1.2em; margin-top: 1.8em; border-bottom: 1px solid #ccc; }
h3 { font-size: 1em; margin: 1em 0 0.2em; }
.scroll { overflow-x: auto; }
table { border-collapse: collapse; font-size: 12px; margin: 8px 0; }
th, td { border: 1px solid #ddd; padding: 3px 6px; text-align: left; vertical-align: top; }
th { background: #f3f3f3; position: sticky; top: 0; }
tr:nth-child(even) td { background: #fafafa; }
li { margin: 3px 0; font-size: 14px; }
img { max-width: 100%; border: 1px solid #eee; margin: 8px 0; }
.note { color: #555; font-size: 13px; }
"""


def table_html(df):
    return f'<div class="scroll">{df.to_html(index=False, border=0, escape=True, na_rep="")}</div>'


def list_html(lines):
    return "<ul>" + "".join(f"<li>{html.escape(line)}</li>" for line in lines) + "</ul>" if lines else \
        '<p class="note">none</p>'


def note_html(text):
    return f'<p class="note">{html.escape(text)}</p>'


def image_html(path):
    data = base64.b64encode(path.read_bytes()).decode()
    return f'<img alt="{html.escape(path.stem)}" src="data:image/png;base64,{data}">'


def page(title, sections):
    """One self-contained HTML page; `sections` are (heading, html) pairs."""
    body = "".join(f"<h2>{html.escape(h)}</h2>\n{content}\n" for h, content in sections)
    return (f'<!DOCTYPE html>\n<html lang="en">\n<head>\n<meta charset="utf-8">\n<title>{html.escape(title)}</title>\n'
            f"<style>{CSS}</style>\n</head>\n<body>\n<h1>{html.escape(title)}</h1>\n{body}</body>\n</html>\n")


def half_normal_figure(results):
    """One panel per metric: the screen's absolute effects against half-normal quantiles (statsmodels' ProbPlot);
    effects off the line through the small ones are the active ones. Main effects filled, interaction columns open."""
    from scipy import stats
    from statsmodels.graphics.gofplots import ProbPlot
    n = len(results)
    cols = 2 if n > 1 else 1
    fig, axes = plt.subplots(-(-n // cols), cols, figsize=(7 * cols, 5 * -(-n // cols)), squeeze=False)
    for ax in axes.flat[n:]:
        ax.axis("off")
    for ax, (metric, res) in zip(axes.flat, results.items()):
        e = res.get("effects")
        if e is None or e.empty:
            empty(ax, f"{metric}: {res.get('error', 'no effect estimated')}")
            continue
        e = e.assign(size=e.effect.abs()).sort_values("size")
        pp = ProbPlot(e["size"].to_numpy(), dist=stats.halfnorm, fit=False)
        q, v = pp.theoretical_quantiles, pp.sorted_data
        main = (e.order == 1).to_numpy()
        ax.scatter(q[main], v[main], color="C3", zorder=3, label="main effect")
        ax.scatter(q[~main], v[~main], facecolor="white", edgecolor="0.3", zorder=3, label="interaction column")
        for x, y, term, is_main in zip(q, v, e.term, main):  # the large ones, named
            if y > 0.25 * v.max() and (is_main or y >= np.quantile(v, 0.8)):
                ax.annotate(textwrap.shorten(term, 28), (x, y), fontsize=7, xytext=(4, 0), textcoords="offset points")
        ax.set(xlabel="half-normal quantile", ylabel=f"|effect| on {metric}", title=f"{metric} (n={res['n']})")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8, frameon=False, loc="upper left")
    fig.suptitle("Half-normal plot of the screen's effects")
    fig.tight_layout()
    return fig


def bisection_figure(plan):
    """The bifurcation tree: each group test a bar over its factors, one row per depth (the whole set on top),
    coloured by its decision, its mean estimate (toward B's value) written on it."""
    colours = {"important": "C3", "unimportant": "0.75", "cannot tell": "C1"}
    tests, k = plan["tests"], len(plan["factors"])
    depth = [sum(o["lo"] <= t["lo"] and t["hi"] <= o["hi"] and (o["lo"], o["hi"]) != (t["lo"], t["hi"])
                 for o in tests) for t in tests]
    fig, ax = plt.subplots(figsize=(max(6.0, 0.45 * k + 2), 0.6 * (max(depth, default=0) + 1) + 2))
    for t, d in zip(tests, depth):
        ax.barh(-d, t["hi"] - t["lo"] - 0.1, left=t["lo"] + 0.05, color=colours[t["decision"]], edgecolor="0.3")
        if t["estimates"]:
            ax.text((t["lo"] + t["hi"]) / 2, -d, f"{np.mean(t['estimates']):+.3g}", ha="center", va="center", fontsize=7)
    ax.set_xticks(np.arange(k) + 0.5, [textwrap.shorten(n, 18) for n in plan["factors"]], rotation=60, ha="right",
                  fontsize=7)
    ax.set_yticks([])
    ax.set_xlim(0, k)
    ax.legend(handles=[Patch(color=c, label=d) for d, c in colours.items()], fontsize=8,
              frameon=False, loc="lower right", bbox_to_anchor=(1, 1), ncol=3)
    ax.set_title(f"Bisection on {plan['metric']}: each bar a group test, its mean effect toward B", fontsize=9,
                 loc="left")
    fig.tight_layout()
    return fig
