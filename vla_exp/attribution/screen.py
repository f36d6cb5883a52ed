"""Screening every difference between two recipes or runs: the factors, a two-level design over them, its
analysis, and the confirmation of the smallest set of changes that recovers B.

- Factors come from `vla_exp.attribution.diff`: a config group whose option differs is one factor, any other differing key is one
  (a key that exists on one side only joins the factor of its parent node, so the two change together).
- The design is pyDOE3's: the full 2^k factorial when it fits the run budget, else a regular 2^(k-p) fraction of
  resolution IV (main effects aliased with three-factor interactions at worst), or III on request; level -1 is A's
  value, +1 is B's. Each configuration is a config file (`+screen=<name>`), so the design runs as one Hydra multirun.
- The analysis is an OLS (statsmodels) of the metric on every estimable effect column of the design: with replicate
  seeds the residual is pure seed noise and each effect (B's level minus A's, twice the coefficient) gets a t
  interval; without replicates, Lenth's pseudo standard error. A failed or diverged run is a missing value: the
  effects whose standard error grows for it are named.
"""
import functools
import itertools
import math
import operator
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
from omegaconf import OmegaConf
from scipy import stats

from vla_exp import UsageError
from vla_exp.attribution.numbers import ALPHA, finite, mean_pm, num
from vla_exp.config import NOT_RESULTS, leaves, literal
from vla_exp.runs import Design

LETTERS = "abcdefghijklmnopqrstuvwxyz"  # pyDOE3 names factors by letters


def letter(i):
    """Factor i's letter in a word: a to z, then a1 to z1, ..."""
    return LETTERS[i % 26] + (str(i // 26) if i >= 26 else "")


# ------------------------------------------------------------------------------------------------ factors
@dataclass
class Factor:
    """One difference between A and B that the screen varies: a config group (`group` names it; its option and every
    value under it change together) or keys (`values`: {key: B's value}); `a` and `b` are its levels for people."""
    name: str
    group: str | None
    a: object
    b: object
    values: dict = field(default_factory=dict)


def factors(a, b, split=()):
    """The screen's factors (a list of Factor) between two diff Sides, and the diff. A key that exists on B only joins
    the factor of a differing key under the same parent node (optim.schedule._target_ and optim.schedule.eta_min_ratio
    become one factor, optim.schedule); one that exists on A only is refused in one line: a config file can add a
    key, not remove one. The seed is never a factor: the screen replicates over seeds."""
    from vla_exp.attribution.diff import diff
    d = diff(a, b, split)
    out = []
    for found in sorted((x for x in d["factors"] if x["factor"] != "seed"), key=lambda x: not x["composable"]):
        if found["kind"] == "group":
            out.append(Factor(found["factor"], found["factor"], found["a"], found["b"]))
            continue
        (key, (va, vb)), = found["leaves"].items()
        if vb == "(absent)":
            raise UsageError(f"{key} exists on A only: a screen can add keys, not remove them; leave "
                             f"{key.split('.')[0]} unsplit (no --split {key.split('.')[0]})")
        parent = key.rsplit(".", 1)[0]
        sibling = next((g for g in out if not g.group and any(k.startswith(parent + ".") for k in g.values)),
                       None) if va == "(absent)" else None
        if sibling:
            if not isinstance(sibling.a, dict):  # the levels become the node's keys: {key: value}
                sibling.a, sibling.b = {sibling.name: sibling.a}, {sibling.name: sibling.b}
            sibling.name = parent
            sibling.values[key] = vb
            sibling.a[key], sibling.b[key] = va, vb
        else:
            out.append(Factor(key, None, va, vb, {key: vb}))
    return out, d


def level_text(level):
    """A factor's level for people: an option, a value, or a node's keys (`_target_=...CosineLR, eta_min_ratio=0.1`)."""
    if isinstance(level, dict):
        return ", ".join(f"{k.rsplit('.', 1)[-1]}={v}" for k, v in level.items() if v != "(absent)") or "(absent)"
    return str(level)


# ------------------------------------------------------------------------------------------------ the design
def min_runs(k, resolution):
    """Runs of the smallest regular two-level fraction of this resolution for k factors."""
    if resolution == 3:
        return 2 ** math.ceil(math.log2(k + 1))
    return 2 ** (math.ceil(math.log2(k)) + 1)  # resolution IV: the foldover of a III, 2k runs rounded up


def generators(k, runs, resolution=4):
    """A generator string for k factors in `runs` runs of at least this resolution, where pyDOE3's fracfact_by_res
    refuses one or returns a lower resolution: base factors, then words over them, of odd length >= 3 for resolution
    IV (every word of the defining relation then has even length >= 4), of length >= 2 for III."""
    m = int(math.log2(runs))
    lengths = range(3, m + 1, 2) if resolution == 4 else range(2, m + 1)
    words = [w for n in lengths for w in itertools.combinations(LETTERS[:m], n)]
    return " ".join([*LETTERS[:m], *("".join(w) for w in words[:k - m])])


def enough_factors(k):
    """Refuse in one line a screen of fewer than two factors, saying what to run instead."""
    if k < 2:
        raise UsageError(f"{k} factor{'s' if k != 1 else ''} differ{'s' if k == 1 else ''} between A and B: nothing "
                         "to screen; " + ("run A and B over seeds (vla-exp-train -m ... seed=0,1,2) and "
                                          "compare them with vla-exp-report" if k == 1 else
                                          "A and B are the same config"))


def design(k, max_runs=32, resolution=4, foldover=False):
    """(matrix of -1/+1 rows, description dict). The full factorial when 2^k runs fit max_runs, else a regular
    fraction: the smallest of the resolution asked for (pyDOE3's fracfact_by_res), or where max_runs leaves room for
    a larger one and k <= 10, the minimum-aberration fraction that fills it (fracfact_opt), checked to have at least
    that resolution. Refused in one line when none fits."""
    from pyDOE3 import fold, fracfact, fracfact_by_res, fracfact_opt
    enough_factors(k)
    per_row = 2 if foldover else 1
    roman = {3: "III", 4: "IV"}[resolution]
    if 2 ** k * per_row <= max_runs:
        matrix, kind = fracfact(" ".join(LETTERS[:k])), f"full 2^{k} factorial"
    else:
        need = min_runs(k, resolution)
        if need * per_row > max_runs:
            hint = (f", or --resolution 3 ({min_runs(k, 3) * per_row} runs; main effects are then aliased with "
                    "two-factor interactions, which the report says beside each)"
                    if resolution == 4 and min_runs(k, 3) * per_row <= max_runs else "")
            raise UsageError(f"{k} factors need {need * per_row} runs for a resolution {roman} design"
                             f"{' with its foldover' if foldover else ''}, above --max-runs {max_runs}: raise "
                             f"--max-runs to {need * per_row}{hint}")
        runs = 2 ** int(math.log2(max_runs // per_row))
        matrix = None
        if runs > need and k <= 10:  # room for more than the smallest fraction: the best one that fits
            matrix = fracfact(fracfact_opt(k, k - int(math.log2(runs)), max_attempts=200)[0])
        if matrix is None or stated_resolution(matrix) < resolution:
            try:
                matrix = fracfact_by_res(k, resolution)
            except ValueError:  # it refuses some valid cases (4 factors in 8 runs)
                matrix = None
            if matrix is None or stated_resolution(matrix) < resolution:  # and gives III for others (16 in 32)
                matrix = fracfact(generators(k, need, resolution))
        kind = f"2^({k}-{k - int(math.log2(len(matrix)))}) fraction"
    if foldover:
        matrix = fold(matrix)
        kind += " and its foldover"
    matrix = np.asarray(matrix, dtype=int)
    words = defining_relation(matrix)
    return matrix, {"kind": kind, "runs": len(matrix), "resolution": min((len(w) for w in words), default=None),
                    "defining_relation": ["".join(map(letter, w)) for w in words]}


def defining_relation(matrix, longest=5):
    """The words (tuples of factor indices) whose product column is constant (+1 or -1) over the design, shortest
    first: I = ABCE... A word is a set of columns whose sum over GF(2) is constant, so the words are the null space of
    the columns: all of them where it has at most 2^12 (a 2^(k-p) fraction has 2^p - 1), else those of up to
    `longest` letters (2^(32-26) has 67 million words; the short ones decide the resolution)."""
    matrix = np.asarray(matrix)
    k = matrix.shape[1]
    # each column as the rows where it differs from its first row: a word is constant where these XOR to zero
    cols = [int("".join("1" if x != matrix[0, c] else "0" for x in matrix[:, c]) or "0", 2) for c in range(k)]
    basis, null = {}, []  # leading bit -> (vector, the columns it sums); null: sums of columns that vanish
    for c, v in enumerate(cols):
        mask = 1 << c
        while v:
            top = v.bit_length() - 1
            if top not in basis:
                basis[top] = (v, mask)
                break
            v, mask = v ^ basis[top][0], mask ^ basis[top][1]
        else:
            null.append(mask)
    if len(null) <= 12:
        masks = {functools.reduce(operator.xor, (m for j, m in enumerate(null) if i >> j & 1))
                 for i in range(1, 2 ** len(null))}
        words = [tuple(c for c in range(k) if m >> c & 1) for m in masks]
    else:
        words = [w for n in range(1, longest + 1) for w in itertools.combinations(range(k), n)
                 if not functools.reduce(operator.xor, (cols[c] for c in w))]
    return sorted(words, key=lambda w: (len(w), w))


def stated_resolution(matrix):
    """The length of the shortest word of the defining relation (a full factorial has none: its number of factors
    plus one)."""
    return min((len(w) for w in defining_relation(matrix)), default=matrix.shape[1] + 1)


# ------------------------------------------------------------------------------------------------ configurations
def config_name(levels):
    """A configuration's name: which factors sit at B's level, as a bit string ('A' and 'B' at the corners)."""
    bits = "".join(str(int(x > 0)) for x in levels)
    return "A" if "1" not in bits else "B" if "0" not in bits else f"x{bits}"


def label(levels, names):
    """'A', 'B', 'A + lr, clipping' or 'B - init' (whichever lists fewer)."""
    at_b = [n for n, x in zip(names, levels) if x > 0]
    at_a = [n for n, x in zip(names, levels) if x <= 0]
    if not at_b or not at_a:
        return "B" if not at_a else "A"
    return f"A + {', '.join(at_b)}" if len(at_b) <= len(at_a) else f"B - {', '.join(at_a)}"


def owned(f, side):
    """The keys of `side`'s resolved config that factor `f` decides: a group's every leaf, or a factor's keys."""
    if f.group:
        return [k for k in side.leaves if k.split(".")[0] == f.group]
    return [k for k in f.values if k in side.leaves]


def target(levels, facs, a, b):
    """({group: option}, {key: value}) of one configuration: A's resolved config with the factors at +1 taken from
    B, every result-deciding leaf spelled out (what logs, where files go and the labels are left to the command
    line), so nothing given on A's or B's command line or inside a preset can override or drop a value."""
    from vla_exp.attribution.diff import LABELS, groups
    at_b = [f for x, f in zip(levels, facs) if x > 0]
    by_group = {f.group: f for f in facs if f.group}
    options = {g: (b if g in by_group and by_group[g] in at_b else a).choices[g]
               for g in groups() if g not in NOT_RESULTS and g in a.choices}
    values = {k: v for k, v in a.leaves.items() if k.split(".")[0] not in (*NOT_RESULTS, "seed")}
    for f in facs:
        values = {k: v for k, v in values.items() if k not in owned(f, a)}
        side = b if f in at_b else a
        values.update({k: side.leaves[k] for k in owned(f, side)})
    return options, {k: v for k, v in values.items() if k.split(".")[-1] not in LABELS}


def config_yaml(levels, facs, part, a, b):
    """The config file of one configuration (`target`); the `design` node says what it is (a label, never part of
    the results' fingerprint)."""
    options, values = target(levels, facs, a, b)
    body = OmegaConf.create({"defaults": [{f"override /{g}": o} for g, o in options.items()]})
    for key, v in values.items():
        OmegaConf.update(body, key, literal(v), force_add=True)
    names = [f.name for f in facs]
    body.design = Design(name=config_name(levels), label=label(levels, names), part=part, factors=names,
                         levels=[int(x > 0) for x in levels], a=a.label, b=b.label).node()
    return "# @package _global_\n" + OmegaConf.to_yaml(body)


def write_configs(folder, configs, facs, a, b):
    """Write each (levels, part) configuration as <folder>/screen/<name>.yaml, each checked first in a scratch folder
    (`check_config`), so a refused one writes nothing; returns their names."""
    from vla_exp.files import write_text
    texts = {}
    for levels, part in configs:
        name = config_name(levels)
        if not (part == "confirm" and (Path(folder) / "screen" / f"{name}.yaml").exists()):
            texts[name] = config_yaml(levels, facs, part, a, b)  # else one of the design's: its runs count for both
    with tempfile.TemporaryDirectory(prefix="vla_screen_") as scratch:
        (Path(scratch) / "screen").mkdir()
        for levels, _ in configs:
            if (name := config_name(levels)) in texts:
                (Path(scratch) / "screen" / f"{name}.yaml").write_text(texts[name])
                check_config(scratch, levels, facs, a, b)
    (Path(folder) / "screen").mkdir(parents=True, exist_ok=True)
    for name, text in texts.items():
        write_text(Path(folder) / "screen" / f"{name}.yaml", text)
    return [config_name(levels) for levels, _ in configs]


def check_config(folder, levels, facs, a, b):
    """Compose a written configuration as its runs will (without the study's budget) and refuse in one line unless
    every result-deciding leaf is A's, or B's for the factors at +1."""
    from vla_exp.config import compose
    from vla_exp.attribution.diff import LABELS
    from vla_exp.data.sources import validate
    name = config_name(levels)
    cfg = compose(f"hydra.searchpath=[file://{Path(folder).resolve()}]", f"+screen={name}")
    try:
        validate(cfg)  # a side's classes are the project's own, whatever its folder says
    except UsageError as e:
        raise UsageError(f"configuration {name} ({label(levels, [f.name for f in facs])}): {e}") from None
    got = leaves(OmegaConf.to_container(cfg, resolve=True))
    got = {k: v for k, v in got.items() if k.split(".")[0] not in (*NOT_RESULTS, "seed")
           and k.split(".")[-1] not in LABELS}
    _, want = target(levels, facs, a, b)
    for key in sorted(set(got) | set(want)):
        if got.get(key, "(absent)") != want.get(key, "(absent)"):
            owner = next((f for f in facs if key in owned(f, a) + owned(f, b)), None)
            side = "B" if owner and levels[facs.index(owner)] > 0 else "A"
            raise UsageError(f"configuration {name} ({label(levels, [f.name for f in facs])}) composes {key}="
                             f"{got.get(key, '(absent)')}, not {side}'s {want.get(key, '(absent)')}: the screen "
                             "cannot run it as A and B were given")


def budget_conflicts(overrides, facs):
    """Refuse in one line an override for every run (the study's budget, trailing overrides) that sets a factor's
    key: the factor would not vary."""
    for o in overrides:
        key = o.split("=", 1)[0].lstrip("+~").split("@")[0]
        for f in facs:
            keys = [f.group] if f.group else list(f.values)
            if any(key == k or key.startswith(k + ".") or k.startswith(key + ".") for k in keys):
                raise UsageError(f"{o} is set for every run of the study, but {f.name} differs between A and B "
                                 f"({level_text(f.a)} -> {level_text(f.b)}): it would not vary; give A and B "
                                 "the same value, or leave the override out")


# ------------------------------------------------------------------------------------------------ analysis
def effect_columns(matrix):
    """`columns_of` for a design matrix (memoised: the report asks for each metric, a simulation for every case)."""
    matrix = np.asarray(matrix, dtype=int)
    return columns_of(matrix.shape, matrix.tobytes())


@functools.lru_cache(maxsize=16)
def columns_of(shape, data):
    """The estimable effect columns of a design: for each alias class (columns equal up to sign over the design's
    distinct rows), its lowest-order word, main effects first, up to one column per distinct row but one. Returns
    [(word, [the words aliased with it, with the sign of their column: up to three factors for a main effect, two
    for an interaction])]."""
    matrix = np.frombuffer(data, dtype=int).reshape(shape)
    rows, k = np.unique(matrix, axis=0), matrix.shape[1]
    classes, seen = [], {}
    for n in range(1, k + 1):
        if n > 3 and len(classes) >= len(rows) - 1:  # longer words add no class and are no alias listed: 2^k of them
            break
        for w in itertools.combinations(range(k), n):
            col = rows[:, list(w)].prod(axis=1)
            key, sign = (tuple(col), 1) if col[0] > 0 else (tuple(-col), -1)
            if key in seen:
                i, s0 = seen[key]
                if n <= (3 if len(classes[i][0]) == 1 else 2):
                    classes[i][1].append((w, sign * s0))
                continue
            if len(classes) >= len(rows) - 1:
                continue
            seen[key] = (len(classes), sign)
            classes.append((w, []))
    return classes


def word_name(word, names):
    return " x ".join(names[i] for i in word)


def estimate_effects(runs, metric, names):
    """Effects of the screen's factors on `metric`. `runs`: one row per run with columns `level:<name>` (0/1) and
    the metric. Returns a dict: n, dropped, method ('replicates' or 'lenth'), df, effects (DataFrame: term, order,
    effect, lo, hi, p, aliases, se_ratio), sigma (the seed noise's std, with replicates), notes."""
    import statsmodels.api as sm
    coded = runs[[f"level:{n}" for n in names]].to_numpy(dtype=float) * 2 - 1
    y = pd.to_numeric(runs[metric], errors="coerce").to_numpy(dtype=float)
    ok = np.isfinite(y)
    full_rows = np.unique(coded, axis=0)
    out = {"metric": metric, "n": int(ok.sum()), "dropped": int((~ok).sum()), "notes": [], "sigma": None}
    if ok.sum() < 2:
        return {**out, "error": f"{int(ok.sum())} runs with a finite {metric}: nothing to analyse"}
    classes = effect_columns(coded)  # from every run of the design, finite or not: the design's own structure
    X_all = np.column_stack([np.ones(len(coded))] + [coded[:, list(w)].prod(axis=1) for w, _ in classes])
    X, y = X_all[ok], y[ok]
    kept = []  # runs missing from whole rows: a column the kept ones already span goes, main effects kept first
    for i in range(len(classes)):
        if np.linalg.matrix_rank(X[:, [0, *(k + 1 for k in kept), i + 1]]) == len(kept) + 2:
            kept.append(i)
    lost = [word_name(classes[i][0], names) for i in range(len(classes)) if i not in kept]
    if any(len(classes[i][0]) == 1 for i in range(len(classes)) if i not in kept):
        out["notes"].append("runs missing from whole rows leave main effects inestimable: "
                            + ", ".join(n for n in lost if " x " not in n))
    elif lost:
        out["notes"].append(f"runs missing from whole rows: {len(lost)} interaction columns dropped from the model")
    cols = [0, *(i + 1 for i in kept)]
    fit = sm.OLS(y, X[:, cols]).fit()
    # each column's standard error against the complete design's (every row with as many runs): precision lost
    per_row = len(coded) / len(full_rows)
    complete = np.linalg.inv(X_all[:, cols].T @ X_all[:, cols])
    actual = np.linalg.pinv(X[:, cols].T @ X[:, cols])
    se_ratio = np.sqrt(np.diag(actual) / np.diag(complete))[1:]
    rows = []
    for j, i in enumerate(kept):
        word, aliases = classes[i]
        rows.append({"term": word_name(word, names), "order": len(word), "effect": 2 * fit.params[j + 1],
                     "aliases": " = ".join(("-" if s < 0 else "") + word_name(w, names) for w, s in aliases),
                     "se_ratio": se_ratio[j]})
    eff = pd.DataFrame(rows)
    if fit.df_resid >= 1 and fit.ssr > 1e-12 * max(fit.centered_tss, 1e-300):
        t = stats.t.ppf(1 - ALPHA / 2, fit.df_resid)
        se = 2 * fit.bse[1:]
        eff = eff.assign(lo=eff.effect - t * se, hi=eff.effect + t * se, p=fit.pvalues[1:])
        out.update(method="replicates", df=float(fit.df_resid), sigma=float(np.sqrt(fit.scale)))
    else:
        me, pse = lenth(eff.effect.to_numpy())
        eff = eff.assign(lo=eff.effect - me, hi=eff.effect + me, p=np.nan)
        out.update(method="lenth", df=len(eff) / 3, pse=pse)
        out["notes"].append(f"no replicate degrees of freedom: Lenth's pseudo standard error {pse:.3g}, margin "
                            f"{me:.3g} (t at {len(eff) / 3:.3g} df)")
    if per_row > 1 and (eff.se_ratio > 1.05).any():
        worse = eff[(eff.se_ratio > 1.05) & (eff.order == 1)]
        if len(worse):
            out["notes"].append("missing runs widen the intervals of " + ", ".join(
                f"{r.term} (standard error x{r.se_ratio:.2f})" for r in worse.itertuples()))
    out["effects"] = eff
    return out


def held_out_changes(runs, names):
    """A sentence naming the factors that change the held-out samples, seen in the runs, else None. A run's baselines
    (`baseline_<name>` columns: trivial predictors scored on its held-out samples) are the same for every run scored
    on the same samples; a factor whose two levels share no set of baselines changes those samples, so its effect on a
    figure read on them is partly a change of what the figure is read on (`data.split_seed`, `data.episodes`)."""
    cols = sorted(c for c in runs.columns if c.startswith("baseline_"))
    if not cols:
        return None
    runs = runs.dropna(subset=cols)  # a run that failed before its evaluation has none
    if len(runs) < 2:
        return None
    key = runs[cols].astype(float).round(6).astype(str).agg("/".join, axis=1)
    if key.nunique() < 2:
        return None
    levels = {n: [set(key[runs[f"level:{n}"] == lv]) for lv in (0, 1)] for n in names}
    flagged = [n for n, (a, b) in levels.items() if a and b and not a & b]
    if not flagged:
        return None
    col = "baseline_hold_state" if "baseline_hold_state" in cols else cols[0]

    def at(n, level):
        return "/".join(num(v) for v in sorted(set(runs.loc[runs[f"level:{n}"] == level, col].astype(float).round(6))))
    shown = "; ".join((f"{n}: " if len(flagged) > 1 else "") + f"{col.removeprefix('baseline_')} {at(n, 0)} at A's "
                      f"value, {at(n, 1)} at B's" for n in flagged)
    return (f"{', '.join(flagged)} {'changes' if len(flagged) == 1 else 'change'} the held-out samples, the baselines "
            f"differing between {'its' if len(flagged) == 1 else 'their'} levels ({shown}): an effect on a figure "
            "read on those samples (val_action_error) is partly a change of the samples it is read on")


def lenth(effects):
    """Lenth's (1989) margin of error and pseudo standard error for unreplicated effects."""
    a = np.abs(effects)
    s0 = 1.5 * np.median(a)
    pse = 1.5 * np.median(a[a < 2.5 * s0]) if (a < 2.5 * s0).any() else s0
    return stats.t.ppf(1 - ALPHA / 2, len(a) / 3) * pse, pse


def order_for_confirmation(result, names, toward):
    """The factors by how far their main effect moves the metric toward B's value (`toward`: +1 when B's value is
    above A's, -1 when below), the most helpful first."""
    eff = result["effects"].set_index("term").effect
    return sorted(names, key=lambda n: -toward * eff.get(n, 0.0))


def reached(step_values, b_values, sigma, df, threshold=None):
    """(whether a step's mean is within reach of B's, the margin used). With a threshold: |difference| <= it; else
    the 95% interval of the difference, from the screen's seed noise, covers zero."""
    diff = float(np.mean(step_values) - np.mean(b_values))
    margin = threshold if threshold is not None else \
        float(stats.t.ppf(1 - ALPHA / 2, df) * sigma * math.sqrt(1 / len(step_values) + 1 / len(b_values)))
    return bool(abs(diff) <= margin), margin  # plain bool: the plan is saved as JSON


# ------------------------------------------------------------------------------------------------ confirmation
def confirmation(runs, metric, names, result, threshold=None):
    """Where the confirmation stands, from the runs so far: A's and B's values, the factors in order of effect, each
    step (A plus the first j factors) run so far with its values and whether it reaches B, and the next configuration
    to run (None when done). Steps are the configurations A + order[:j]; once step j reaches B, each factor of that
    set is left out in turn (A + the set minus it) to show it is needed."""
    by_name = {n: finite(g[metric]).to_numpy() for n, g in runs.groupby("design_name")}  # no value: empty
    a, b = by_name.get("A"), by_name.get("B")
    plan = {"metric": metric, "factors": names, "steps": [], "without": [], "next": None, "reached": None}
    for corner, values in (("A", a), ("B", b)):
        if values is None:
            plan["next"] = [0 if corner == "A" else 1] * len(names)
            return plan
        if not len(values):
            raise UsageError(f"{corner}'s runs have no finite {metric}: there is no value to recover")
    plan.update(a=a.tolist(), b=b.tolist())
    toward = 1 if np.mean(b) >= np.mean(a) else -1
    plan["order"] = order = order_for_confirmation(result, names, toward)
    sigma, df = result.get("sigma"), result.get("df")
    if threshold is None and not sigma:
        raise UsageError("the screen has no replicate seeds to say what is within reach of B: give --threshold "
                         f"(the largest |difference| in {metric} that counts as B's value) or two seeds or more")
    for j in range(1, len(order)):  # all of them is B itself
        levels = [int(n in order[:j]) for n in names]
        values = by_name.get(config_name(levels))
        if values is None:
            plan["next"] = levels
            return plan
        ok, margin = reached(values, b, sigma, df, threshold) if len(values) else (False, None)
        plan["steps"].append({"added": order[j - 1], "set": order[:j], "name": config_name(levels),
                              "values": values.tolist(), "reached": ok, "margin": margin})
        if ok:
            plan["reached"] = j
            break
    chosen = order[:plan["reached"]] if plan["reached"] else []
    for left_out in chosen[:-1]:  # the set minus its last factor is the step before
        levels = [int(n in chosen and n != left_out) for n in names]
        values = by_name.get(config_name(levels))
        if values is None:
            plan["next"] = levels
            return plan
        ok = reached(values, b, sigma, df, threshold)[0] if len(values) else False
        plan["without"].append({"left_out": left_out, "name": config_name(levels), "values": values.tolist(),
                                "reached": ok})
    return plan


def sentence(plan):
    """The confirmation's outcome, every figure from the runs, and where the study checked it at a second budget
    (or whether B's policies work at its own), that outcome."""
    return at_budget(plan, first_sentence(plan))


def at_budget(plan, text):
    """An attribution's sentence with the budget it was drawn at, and the second budget's outcome after it."""
    text = f"At {plan['at']}, {text}" if "at" in plan else text
    return text + (f". {budget_sentence(plan['budget'])}" if "budget" in plan else "")


def first_sentence(plan):
    k, metric = len(plan["factors"]), plan["metric"].replace("_", " ")
    b = f"B's {mean_pm(plan['b'])}"
    if plan["reached"] is None:
        last = plan["steps"][-1] if plan["steps"] else None
        return (f"no subset short of all {k} differences recovers B's {metric}"
                + (f": with all but {plan['order'][-1]} it is {mean_pm(last['values'])} against {b}" if last else ""))
    step = plan["steps"][plan["reached"] - 1]
    chosen = step["set"]
    text = (f"{len(chosen)} of the {k} differences ({', '.join(chosen)}) recover{'s' if len(chosen) == 1 else ''} "
            f"B's {metric}: "
            f"{mean_pm(step['values'])} against {b}")
    before = plan["steps"][plan["reached"] - 2]["values"] if plan["reached"] > 1 else plan["a"]
    gone = [(w["left_out"], w["values"], w["reached"]) for w in plan["without"]]
    gone.append((chosen[-1], before, False))
    for name, values, ok in gone:
        text += f"; without {name} they {'still do' if ok else 'do not'} ({mean_pm(values)})"
    return text


# ------------------------------------------------------------------------------------------------ a second budget
def budget_check(runs, metric, names, chosen, threshold=None):
    """The confirmation again at a second budget (the working one, where policies work), from its runs so far: A
    and B first, then A plus the `chosen` set and the set without each of its factors, with the same seeds. Returns
    the figures, whether each configuration reaches B (seed noise pooled over this budget's configurations, or
    `threshold`), whether the verdict holds, the factors this budget does not need, how many of B's runs beat every
    baseline, and 'next': the configurations still to run (None when done). B without a finite value stops it."""
    import statsmodels.formula.api as smf
    from vla_exp.attribution.analysis import beats
    check = {"metric": metric, "factors": names, "set": list(chosen), "next": None}
    groups = dict(tuple(runs.groupby("design_name"))) if len(runs) else {}
    if not {"A", "B"} <= groups.keys():
        check["next"] = [[0] * len(names), [1] * len(names)]
        return check
    a, b = (finite(groups[n][metric]).to_numpy() for n in "AB")
    check.update(a=a.tolist(), b=b.tolist(), b_beats=[int(beats(groups["B"]).sum()), len(groups["B"])])
    if not len(b):
        check["error"] = f"B's runs have no finite {metric} at this budget: nothing can be confirmed there"
        return check
    steps = [(None, [int(n in chosen) for n in names])]
    steps += [(f, [int(n in chosen and n != f) for n in names]) for f in chosen]
    missing = [lv for _, lv in steps if config_name(lv) not in groups]
    if missing:
        check["next"] = missing
        return check
    ran = runs[runs.design_name.isin([config_name(lv) for _, lv in steps] + ["A", "B"])]
    ran = ran.assign(y=pd.to_numeric(ran[metric], errors="coerce"))
    ran = ran[np.isfinite(ran.y)]
    fit = smf.ols("y ~ C(design_name)", ran).fit()  # the seed noise: pooled within configurations
    sigma, df = (float(np.sqrt(fit.scale)), float(fit.df_resid)) if fit.df_resid >= 1 else (None, None)
    if threshold is None and not sigma:
        check["error"] = f"no two runs of a configuration at this budget agree on a finite {metric}: no seed noise " \
                         "to say what reaches B (give --threshold)"
        return check
    rows = []
    for left_out, lv in steps:
        values = finite(groups[config_name(lv)][metric]).to_numpy()
        ok = reached(values, b, sigma, df, threshold)[0] if len(values) else False
        rows.append({"left_out": left_out, "name": config_name(lv), "values": values.tolist(), "reached": ok})
    check["with_set"], check["without"] = rows[0], rows[1:]
    check["not_needed"] = [w["left_out"] for w in rows[1:] if w["reached"]]
    check["holds"] = rows[0]["reached"] and not check["not_needed"]
    return check


def budget_sentence(check):
    """The second budget's outcome in one sentence, every figure from its runs; where the study's confirmation ran
    at that budget already ('same'), whether B's policies work there."""
    budget, beat, n = check["label"], *check.get("b_beats", (0, 0))
    works = (f"B's policies beat every baseline there in {beat} of {n} seeds" if beat == n else
             f"B's policies do not beat every baseline there ({beat} of {n} seeds): this verdict is about policies "
             "that do not work yet")
    if check.get("same"):
        return works
    if "error" in check:
        return f"At {budget}: {check['error']}" + (f"; {works}" if n else "")
    chosen = ", ".join(check["set"])
    got, b = mean_pm(check["with_set"]["values"]), mean_pm(check["b"])
    if not check["with_set"]["reached"] and check["not_needed"]:  # a smaller set reaches B: one of the set hurts
        rest = [f for f in check["set"] if f not in check["not_needed"]]
        text = (f"At {budget} the verdict does not hold: A plus {chosen} gives {got} against B's {b}, but "
                + "; ".join(f"without {w['left_out']} it reaches B ({mean_pm(w['values'])})"
                            for w in check["without"] if w["reached"])
                + f": the budgets disagree about {', '.join(check['not_needed'])}, which keeps the set from B there "
                  f"(this budget's verdict stands; whether {', '.join(rest) or 'the rest'} "
                  f"{'is' if len(rest) == 1 else 'are each'} needed without it was not run there)")
    elif not check["with_set"]["reached"]:
        text = (f"At {budget} the verdict does not hold: A plus {chosen} gives {got} against B's {b}, so more "
                f"changes matter there (this budget's verdict stands; screen at it to find them)")
    elif check["not_needed"]:
        needed = [f for f in check["set"] if f not in check["not_needed"]]
        text = (f"At {budget} A plus {chosen} gives {got} against B's {b}, but the budgets disagree: "
                + "; ".join(f"without {w['left_out']} it still reaches B ({mean_pm(w['values'])})"
                            for w in check["without"] if w["reached"])
                + f"; this budget's verdict stands: {', '.join(needed) or 'none of them'} "
                  f"{'is' if len(needed) == 1 else 'are'} needed there")
    else:
        text = (f"At {budget} the verdict holds: A plus {chosen} gives {got} against B's {b}, and without "
                + ", ".join(f"{w['left_out']} {mean_pm(w['values'])}" for w in check["without"])
                + " it does not")
    return f"{text}; {works}"
