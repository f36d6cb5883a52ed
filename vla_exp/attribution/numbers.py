"""Numbers in words for the reports: figures to three digits, p-values, effect sizes, intervals, markdown tables."""
import math

import numpy as np
import pandas as pd
from scipy import stats

ALPHA = 0.05
SIZES = ((0.14, "large"), (0.06, "medium"), (0.01, "small"), (0.0, "negligible"))  # partial eta², Cohen (1988)


def num(x, signed=False):
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "NaN"
    x = 0.0 if abs(x) < 1e-12 else x  # rounding error of an effect that is exactly zero, not a measurement
    return f"{x:+.3g}" if signed else f"{x:.3g}"


def p_value(p):
    """'< 0.001', '0.61', and a third digit near the threshold ('0.0496', never a rounded '0.05')."""
    return "" if math.isnan(p) else "< 0.001" if p < 0.001 else f"{p:.2g}" if abs(p - ALPHA) > 0.005 else f"{p:.3g}"


def p_text(p):
    return f"p {p_value(p)}" if p < 0.001 else f"p = {p_value(p)}"


def size_word(eta):
    return next(word for bound, word in SIZES if eta >= bound)


def markdown(df):
    rows = [list(df.columns), ["---"] * len(df.columns), *df.astype(str).values.tolist()]
    return "\n".join("| " + " | ".join(str(c).replace("|", "\\|") for c in row) + " |" for row in rows)


def finite(values):
    values = pd.to_numeric(pd.Series(values, dtype=object), errors="coerce").astype(float)
    return values[np.isfinite(values)]


def mean_std(values, failed=False):
    """'0.245 ± 0.07 (3)' over the finite values ('2 (3)': three equal values); 'NaN' when runs gave only
    non-finite ones, 'failed' when none ran."""
    v = finite(values)
    if failed:
        return "failed"
    if v.empty:
        return "NaN" if len(values) else "n/a"
    return f"{num(v.mean())} ± {num(v.std())} ({len(v)})" if v.nunique() > 1 else f"{num(v.iloc[0])} ({len(v)})"


def mean_pm(values):
    """'0.02 ± 0.004' (mean ± std over seeds)."""
    v = np.asarray(values, dtype=float)
    if not len(v):
        return "no finite value"
    return f"{v.mean():.3g} ± {v.std(ddof=1):.2g}" if len(v) > 1 else f"{v.mean():.3g}"


def welch(a, b):
    """a - b with a Welch 95% interval: '+0.12 [0.05, 0.19]' (the interval needs two finite values on each side)."""
    a, b = finite(a), finite(b)
    if a.empty or b.empty:
        return "n/a"
    d = a.mean() - b.mean()
    if len(a) < 2 or len(b) < 2:
        return num(d, True)
    va, vb = a.var() / len(a), b.var() / len(b)
    if va + vb == 0:
        return f"{num(d, True)} [{num(d)}, {num(d)}]"
    df = (va + vb) ** 2 / (va ** 2 / (len(a) - 1) + vb ** 2 / (len(b) - 1))
    h = stats.t.ppf(1 - ALPHA / 2, df) * math.sqrt(va + vb)
    return f"{num(d, True)} [{num(d - h)}, {num(d + h)}]"
