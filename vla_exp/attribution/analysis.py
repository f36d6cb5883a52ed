"""The numbers of a report: the results table per cell, the factorial analysis, and the leave-one-out and add-one
tables. Pure functions of the runs DataFrame (one row per run, as vla_exp.runs.load_runs builds it) and of the
recipes' levels ({"original": {group: level}, "fixed": {...}}), so they can be tested on synthetic data.

How the factorial analysis decides (see `factorial` and `verdicts`):
- an OLS of the metric on every varying choice and all their two-way interactions (main effects only when the cells
  present cannot separate the interactions), with a type-II ANOVA (coding does not change type-II sums of squares);
  runs whose metric is not finite are dropped and counted; too few runs or confounded choices: no ANOVA, and why;
- the effect of a level is its estimated marginal mean minus the reference level's (the original recipe's level),
  averaged over an equal-weight grid of the other factors, with a 95% t interval from the model's covariance;
- "detectable" means p < 0.05 for that difference. Its size word comes from its partial eta squared
  (t² / (t² + residual df), equal to the ANOVA's for a two-level factor): Cohen's 0.01 / 0.06 / 0.14 for
  small / medium / large, below 0.01 negligible. Partial eta squared measures the effect against the seed noise, so a
  small absolute difference between very repeatable runs can be "large": read it beside the difference itself.
"""
import itertools
import math

import numpy as np
import pandas as pd
import statsmodels.formula.api as smf
from scipy import stats
from statsmodels.stats.anova import anova_lm

from vla_exp.config import GROUPS
from vla_exp.attribution.numbers import ALPHA, finite, mean_std, num, p_text, p_value, size_word, welch
from vla_exp.runs import CELL, METRICS_READ as METRICS, TABLE_METRICS, cell_key, cell_label


# ------------------------------------------------------------------------------------------------ cells
def beats(runs):
    """Per run: does its sampled-action error beat every baseline (as recorded, else from the baseline columns)?"""
    base = runs[[c for c in runs.columns if c.startswith("baseline_")]].astype(float)
    err = runs["val_action_error"].astype(float)
    computed = base.gt(err, axis=0).all(axis=1) & np.isfinite(err) & (base.shape[1] > 0)
    recorded = runs["beats_baselines"] if "beats_baselines" in runs else pd.Series(None, index=runs.index)
    return recorded.where(recorded.notna(), computed).astype(bool)


def results_table(runs, levels):
    """One row per cell: counts by status, mean/std/n over seeds of each TABLE_METRICS, the baselines' means, how
    many seeds beat every baseline. Failed runs stay in their cell's counts; an all-failed cell has status 'failed'."""
    baselines = [c for c in runs.columns if c.startswith("baseline_")]
    runs = runs.assign(run_beats=beats(runs))
    rows = []
    for (label, *cell), g in runs.groupby(["cell", *CELL], sort=False, dropna=False):  # a screen's label its own
        ran = g[g.status != "failed"]
        statuses = g.status.value_counts()
        row = {"cell": label, **dict(zip(CELL, cell)),
               "status": g.status.iloc[0] if len(statuses) == 1 else "mixed", "n_runs": len(g),
               **{f"n_{s}": int(statuses.get(s, 0)) for s in ("completed", "diverged", "failed", "running")},
               "seeds": " ".join(str(s) for s in sorted(g.seed.dropna().astype(int))) if "seed" in g else ""}
        for m in TABLE_METRICS:
            v = finite(ran[m]) if m in ran else finite([])
            row.update({f"{m}_mean": v.mean() if len(v) else np.nan, f"{m}_std": v.std() if len(v) > 1 else np.nan,
                        f"{m}_n": len(v)})
        row["n_never_converged"] = int(ran["epochs_to_converge"].isna().sum()) if "epochs_to_converge" in ran else 0
        row.update({f"{b}_mean": finite(ran[b]).mean() for b in baselines})
        row["n_beat_baselines"] = int(ran.run_beats.sum())
        row["beats_baselines"] = "n/a" if ran.empty else "yes" if ran.run_beats.all() else "no"
        rows.append(row)
    order = {"original": 0, "fixed": 1}
    return pd.DataFrame(rows).sort_values("cell", key=lambda s: s.map(lambda c: (order.get(c, 2), c))) \
        .reset_index(drop=True)


def format_table(table, runs):
    """The results table in words, for table.md and the dashboard: one row per cell."""
    varying = [c for c in CELL if table[c].nunique() > 1]
    baselines = [c for c in table.columns if c.startswith("baseline_")]
    out = []
    for _, t in table.iterrows():
        g = runs[(runs.cell == t.cell) & (runs.status != "failed")]
        failed = t.status == "failed"
        conv = "failed" if failed else f"never ({len(g)})" if t.n_never_converged == len(g) > 0 else \
            mean_std(g.epochs_to_converge.dropna()) + (f", {t.n_never_converged} never" if t.n_never_converged else "")
        conv_s = "failed" if failed else mean_std(g.time_to_converge_s.dropna())
        best = min((b for b in baselines if np.isfinite(t[b])), key=lambda b: t[b], default=None)
        n_ran = t.n_runs - t.n_failed
        out.append({
            "cell": t.cell, **{c: t[c] for c in varying}, "status": t.status,
            "runs": t.n_runs, "failed": t.n_failed,
            "final loss": mean_std(g.final_loss, failed), "final output std": mean_std(g.final_output_std, failed),
            "initial output std": mean_std(g.initial_output_std, failed),
            "epochs to converge": conv, "time to converge (s)": conv_s,
            "skipped / scaled batches": "failed" if failed else
            f"{mean_std(g.skipped_batches)} / {mean_std(g.scaled_loss_steps)}",
            "held-out action error": mean_std(g.val_action_error, failed),
            "best baseline": f"{best[len('baseline_'):-len('_mean')]} {num(t[best])}" if best else "n/a",
            "beats every baseline": "failed" if failed else f"{t.beats_baselines} ({t.n_beat_baselines}/{n_ran})",
            **({"closed-loop success": mean_std(g.success_rate, failed)} if table.success_rate_n.any() else {}),
        })
    return pd.DataFrame(out)


def working_note(table):
    """One sentence on whether the policies behind a table work: which cells beat every baseline in all their seeds.
    Verdicts drawn from policies that do not are about early training, and the sentence says so."""
    ran = table[table.beats_baselines != "n/a"]
    working = list(ran.cell[ran.beats_baselines == "yes"])
    if not working:
        return (f"No cell's policies beat every baseline in all their seeds (0 of {len(ran)} cells): these figures "
                "are about early training, not about policies that work.")
    return f"{len(working)} of {len(ran)} cells beat every baseline in all their seeds: {', '.join(working)}."


# ------------------------------------------------------------------------------------------------ factorial
def reference(levels, factor, present):
    """The level effects are measured against: the original recipe's, else the fixed recipe's, else the first."""
    return next((lv for lv in (levels["original"][factor], levels["fixed"][factor]) if lv in present),
                sorted(present)[0])


def factorial(runs, metric, levels):
    """Main effects and two-way interactions of every varying choice on one metric. Returns a dict: metric, n,
    dropped ({status: count} of runs without a finite value), factors, model ('two-way interactions' or 'main
    effects'), anova (DataFrame), effects (DataFrame: factor, level, reference, diff, lo, hi, p, partial_eta_sq),
    notes (list of str) and, when no ANOVA could be made, `error` (why)."""
    values = pd.to_numeric(runs[metric], errors="coerce") if metric in runs else pd.Series(np.nan, index=runs.index)
    ok = np.isfinite(values.astype(float))
    d = runs[ok].assign(**{metric: values[ok].astype(float)})
    res = {"metric": metric, "n": len(d), "dropped": runs.status[~ok].value_counts().to_dict(), "notes": [],
           "anova": None, "effects": pd.DataFrame(), "factors": [c for c in CELL if d[c].nunique() > 1]}
    factors = res["factors"]
    if not factors:
        return {**res, "error": f"no choice varies among the {len(d)} runs with a finite {metric}" if len(d) else
                f"no run has a finite {metric}"}
    refs = {f: reference(levels, f, set(d[f])) for f in factors}
    cats = {f: [refs[f]] + sorted(set(d[f]) - {refs[f]}) for f in factors}
    d = d.assign(**{f: pd.Categorical(d[f], categories=cats[f]) for f in factors})
    for model, rhs in (("two-way interactions", f"({' + '.join(factors)})**2"), ("main effects", " + ".join(factors))):
        if model.startswith("two") and len(factors) < 2:
            continue
        ols = smf.ols(f"{metric} ~ {rhs}", data=d)
        rank, p = np.linalg.matrix_rank(ols.exog), ols.exog.shape[1]
        if rank == p and len(d) > p:
            break
        res["notes"].append(f"{model}: not estimable from these runs ({len(d)} runs, {p} parameters"
                            + (", some confounded by the cells present)" if rank < p else ")"))
    else:
        one_to_one = lambda a, b: d.groupby(a, observed=True)[b].nunique().max() == 1
        tied = [f"{a} and {b}" for a, b in itertools.combinations(factors, 2) if one_to_one(a, b) and one_to_one(b, a)]
        why = (f"the cells present change {'; '.join(tied)} together, so their effects cannot be separated" if tied
               else f"{len(d)} runs with a finite value are too few for the choices that vary; run replicate seeds or "
                    "more cells")
        return {**res, "error": f"no ANOVA of {metric}: {why}"}
    fit = ols.fit()
    res["model"] = model
    if not d.groupby(factors, observed=True).size().gt(1).any():
        res["notes"].append("no cell has more than one run: the error term is the higher-order interactions, "
                            "not seed noise")
    if fit.ssr <= 1e-12 * max(fit.centered_tss, 1e-300):
        return {**res, "error": f"the choices fit every run's {metric} exactly (no seed noise left): no test"}
    anova = anova_lm(fit, typ=2)
    resid = anova.loc["Residual", "sum_sq"]
    anova["partial_eta_sq"] = (anova.sum_sq / (anova.sum_sq + resid)).where(anova.index != "Residual")
    res["anova"] = anova.rename(columns={"PR(>F)": "p"})

    # effects: differences of estimated marginal means over an equal-weight grid of every factor combination
    grid = pd.DataFrame(list(itertools.product(*cats.values())), columns=factors)
    grid = grid.assign(**{f: pd.Categorical(grid[f], categories=cats[f]) for f in factors})
    grid_model = smf.ols(f"{metric} ~ {rhs}", data=grid.assign(**{metric: 0.0}))  # same formula: same columns
    assert grid_model.exog_names == ols.exog_names
    X, beta, cov, df = grid_model.exog, fit.params.values, fit.cov_params().values, fit.df_resid
    t_crit, rows = stats.t.ppf(1 - ALPHA / 2, df), []
    for f in factors:
        for level in cats[f][1:]:
            c = emm_row(X, grid, **{f: level}) - emm_row(X, grid, **{f: refs[f]})
            est, se = c @ beta, math.sqrt(max(c @ cov @ c, 0.0))
            t = est / se if se > 0 else math.inf
            rows.append({"factor": f, "level": level, "reference": refs[f], "diff": est, "lo": est - t_crit * se,
                         "hi": est + t_crit * se, "p": 2 * stats.t.sf(abs(t), df),
                         "partial_eta_sq": t * t / (t * t + df) if math.isfinite(t) else 1.0})
    res["effects"] = pd.DataFrame(rows)
    res["simple"] = {}  # how a's effect moves with b's level, for the interactions' sentences
    if model.startswith("two"):
        for a, b in itertools.combinations(factors, 2):
            res["simple"][(a, b)] = [f"{a} ({level} vs {refs[a]}): " + ", ".join(
                f"{num((emm_row(X, grid, **{a: level, b: lb}) - emm_row(X, grid, **{a: refs[a], b: lb})) @ beta, True)}"
                f" when {b}={lb}" for lb in cats[b]) for level in cats[a][1:]]
    return res


def emm_row(X, grid, **at):
    """The design row of the marginal mean at these levels: the mean over the grid's rows that hold them."""
    return X[np.logical_and.reduce([(grid[k] == v).to_numpy() for k, v in at.items()])].mean(axis=0)


def verdicts(res):
    """One plain sentence per varying level of each fix, e.g. 'init (xavier vs none): large effect on
    val_action_error, -0.17 [-0.2, -0.14], p < 0.001'."""
    metric, lines = res["metric"], []
    for e in res["effects"].itertuples():
        name, ci = f"{e.factor} ({e.level} vs {e.reference})", f"{num(e.diff, True)} [{num(e.lo)}, {num(e.hi)}]"
        if e.p < ALPHA:
            lines.append(f"{name}: {size_word(e.partial_eta_sq)} effect on {metric}, {ci}, {p_text(e.p)}")
        else:
            lines.append(f"{name}: no detectable effect on {metric} ({p_text(e.p)}; {ci})")
    return lines


def interactions(res):
    """The significant two-way interactions, with how one factor's effect changes across the other's levels."""
    if res["anova"] is None:
        return []
    lines = []
    for term, r in res["anova"].iterrows():
        if ":" in term and r.p < ALPHA:
            a, b = term.split(":")
            lines.append(f"{a} × {b} on {res['metric']}: F = {r.F:.3g}, {p_text(r.p)}, partial eta² "
                         f"{r.partial_eta_sq:.2f} ({size_word(r.partial_eta_sq)}). "
                         + "; ".join(res["simple"].get((a, b), [])))
    return lines


def anova_table(res):
    a = res["anova"].reset_index(names="term")
    return pd.DataFrame({"term": a.term, "sum sq": a.sum_sq.map(num), "df": a.df.map(lambda x: f"{x:g}"),
                         "F": a.F.map(lambda x: "" if math.isnan(x) else num(x)),
                         "p": a.p.map(p_value),
                         "partial eta²": a.partial_eta_sq.map(lambda x: "" if math.isnan(x) else f"{x:.2f}")})


def analyse(runs, levels, metrics=METRICS):
    return {m: factorial(runs, m, levels) for m in metrics}


def notes_line(res):
    dropped = sum(res["dropped"].values())
    parts = [f"{res['n']} runs"]
    if dropped:
        parts.append(f"{dropped} dropped without a finite value ("
                     + ", ".join(f"{n} {s}" for s, n in sorted(res["dropped"].items())) + ")")
    if res.get("model"):
        parts.append(f"model: {res['model']}")
    return "; ".join(parts + res["notes"] + ([res["error"]] if res.get("error") else []))


# ------------------------------------------------------------------------------------------------ was it needed?
def one_change_table(runs, levels, base, other, metrics=("val_action_error", "final_loss")):
    """The `base` recipe's cell, then that cell with one fix switched to `other`'s level (and to any further level
    the data hold), per head_loading in the data. Leave-one-out: base='fixed', other='original'; add-one: the
    reverse. Cells absent from the data read 'not run'."""
    runs = runs.assign(run_beats=beats(runs), run_key=runs.apply(cell_key, axis=1))
    rows = []
    heads = sorted(set(runs.head_loading) - {"?"} or {levels[base]["head_loading"]},
                   key=lambda h: (h != levels[base]["head_loading"], h))
    for head in heads:
        ref = {**{g: levels[base][g] for g in GROUPS}, "head_loading": head}
        ref_runs = runs[(runs.run_key == cell_key(ref)) & (runs.status != "failed")]
        extra = {g: sorted(set(runs[g]) - {levels[base][g], levels[other][g], "?"}) for g in GROUPS}
        changes = [(None, None)] + [(g, lv) for g in GROUPS for lv in [levels[other][g], *extra[g]]]
        for g, level in changes:
            cell = ref if g is None else {**ref, g: level}
            sub = runs[runs.run_key == cell_key(cell)]
            ran = sub[sub.status != "failed"]
            row = {"change": f"(the {base} recipe)" if g is None else f"{g}: {levels[base][g]} → {level}",
                   "cell": cell_label(cell, levels)}
            for m in metrics:
                row[m] = "not run" if sub.empty else mean_std(ran[m], failed=ran.empty)
                row[f"Δ {m} vs {base}"] = "" if g is None or ran.empty else welch(ran[m], ref_runs[m])
            row["beats every baseline"] = "not run" if sub.empty else "failed" if ran.empty else \
                f"{'yes' if ran.run_beats.all() else 'no'} ({int(ran.run_beats.sum())}/{len(ran)})"
            row["failed"] = int((sub.status == "failed").sum())
            rows.append(row)
    return pd.DataFrame(rows)


def leave_one_out(runs, levels):
    return one_change_table(runs, levels, "fixed", "original")


def add_one(runs, levels):
    return one_change_table(runs, levels, "original", "fixed")
