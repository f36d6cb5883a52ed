"""Sequential bifurcation over the differences between A and B: which few of many changes carry B's improvement, in
runs that grow with the number of changes that matter rather than with the number that differ.

The method is controlled sequential bifurcation (CSB: Wan, Ankenman and Nelson, Operations Research 54(4), 2006)
with the foldover of CSB-X (INFORMS Journal on Computing 22(3), 2010), which keeps a group's estimate free of its
two-factor interactions with the factors outside it:
- the factors, in a fixed order, are at A's level (0) or B's (1); configuration `m` has the first m at B's level,
  its mirror `-m` the first m at A's and the rest at B's, so A is 0 (and -k) and B is k (and -0);
- the group of factors (lo, hi] has, for replicate (seed) j, the estimate
  D_j = ((y_j(hi) - y_j(lo)) + (y_j(-lo) - y_j(-hi))) / 2, y oriented so that moving toward B's value is positive;
- each group is tested by Kim's fully sequential test, as CSB does: n0 replicates first, then one more at a time
  until the sum of the estimates leaves a triangular region. A group whose effect is at most delta0 is called
  important with probability at most about alpha, one of at least delta1 unimportant with probability at most
  about alpha (CSB's two guarantees; `kim_test` says how its region is centred to give both);
- an important group of one factor names it; an important larger group is split in two halves, each tested in
  turn (its two new configurations and their mirrors), an unimportant group is dropped with all its factors.
Departures, each named where it is made: groups split in halves (Bettonvil and Kleijnen split at powers of two);
a replicate whose runs failed is replaced by a fresh one, and a group one of whose configurations has failed
twice and more often than not is "cannot tell" (one that always fails is so once its replacement failed too);
and, as in the papers, every change is taken to help or do nothing: a change that hurts can hide one that helps
in the same group (the screen's design makes no such assumption).
"""
import math
from dataclasses import dataclass, field

import numpy as np

from vla_exp import UsageError


@dataclass
class GroupTest:
    """One group's test: factors lo+1..hi (positions in the order), its decision ('important', 'unimportant' or
    'cannot tell'), the estimates D_j it read, and the replicates (seeds) they came from."""
    lo: int
    hi: int
    decision: str = ""
    estimates: list = field(default_factory=list)
    replicates: list = field(default_factory=list)

    @property
    def size(self):
        return self.hi - self.lo


def levels(m, k, mirror=False):
    """Configuration m (its first m factors at B's level) or its mirror, as a tuple of 0/1."""
    return tuple(int((i < m) != mirror) for i in range(k))


def kim_test(d, n0, alpha, delta0, delta1):
    """Kim's fully sequential test (the triangular continuation region of Kim and Nelson's procedures, which CSB
    uses) on the estimates d so far (len(d) >= n0): 'important', 'unimportant', or None for one more replicate.
    The sum is of d_j - (delta0 + delta1) / 2 and the indifference zone is half the gap, so that a group of effect
    delta0 drifts down and one of delta1 up by the same amount: each is decided wrongly with probability at most
    about alpha (the simulation measures it). eta and h^2 come from alpha and n0; S^2 from the first n0."""
    eta = 0.5 * ((2 * alpha) ** (-2 / (n0 - 1)) - 1)
    h2 = 2 * eta * (n0 - 1)
    s2 = float(np.var(d[:n0], ddof=1))
    half = (delta1 - delta0) / 2
    total = float(np.sum(np.asarray(d) - (delta0 + delta1) / 2))
    if len(d) > math.floor(h2 * s2 / half ** 2):  # the region has closed: the sign decides
        return "important" if total > 0 else "unimportant"
    if total <= min(0.0, -h2 * s2 / (2 * half) + half * len(d) / 2):
        return "unimportant"
    if total >= max(0.0, h2 * s2 / (2 * half) - half * len(d) / 2):
        return "important"
    return None


def check(k, delta0, delta1, n0):
    """Refuse in one line what the bifurcation cannot run: too few factors, thresholds out of order, one replicate."""
    from vla_exp.attribution.screen import enough_factors
    enough_factors(k)
    if not 0 <= delta0 < delta1:
        raise UsageError(f"--delta0 {delta0} and --delta1 {delta1}: need 0 <= delta0 < delta1 (the largest effect "
                         "that does not matter, the smallest that does)")
    if n0 < 2:
        raise UsageError(f"{n0} replicate{'s' if n0 != 1 else ''} to start each group test: the test needs two or "
                         "more for its seed noise (give --seeds with two or more)")


def bisect(k, respond, delta0, delta1, alpha=0.05, n0=3, max_replicates=None):
    """Run the bifurcation over k factors. `respond(requests)` gets a list of (levels, replicate) not yet run and
    returns their values in the same order (toward B's value positive; NaN for a failed run); each configuration and
    replicate is asked for once. Returns {"important": [factor positions], "tests": [GroupTest], "values":
    {(levels, replicate): value}}."""
    check(k, delta0, delta1, n0)
    values = {}

    def run_all(configs, reps):  # one batch: the launcher runs them side by side
        missing = list(dict.fromkeys((c, r) for r in reps for c in configs if (c, r) not in values))
        if missing:
            values.update(zip(missing, respond(missing)))

    def corners(t):
        return [levels(t.hi, k), levels(t.lo, k), levels(t.lo, k, True), levels(t.hi, k, True)]

    def estimate(t, rep):
        run_all(corners(t), [rep])  # a new replicate's configurations in one batch
        hi, lo, mlo, mhi = (values[(c, rep)] for c in corners(t))
        return ((hi - lo) + (mlo - mhi)) / 2

    tests, important, stack = [], [], [GroupTest(0, k)]
    while stack:
        t = stack.pop()
        tests.append(t)
        next_rep = 0
        run_all(corners(t), range(n0))
        while t.decision == "":
            if max_replicates is not None and next_rep >= max_replicates:  # a cap the caller sets: no decision
                t.decision = "cannot tell"
                break
            d = estimate(t, next_rep)
            next_rep += 1
            if not np.isfinite(d):  # a failed run: a fresh replicate in its place, unless its configuration keeps failing
                tried = [[values[(c, r)] for r in range(next_rep)] for c in corners(t)]
                if any(np.isnan(v).sum() >= 2 and np.isnan(v).sum() > np.isfinite(v).sum() for v in tried):
                    t.decision = "cannot tell"
                continue
            t.estimates.append(float(d))
            t.replicates.append(next_rep - 1)
            if len(t.estimates) >= n0:
                t.decision = kim_test(t.estimates, n0, alpha, delta0, delta1) or ""
        if t.decision == "important":
            if t.size == 1:
                important.append(t.lo)
            else:
                mid = t.lo + math.ceil(t.size / 2)
                stack += [GroupTest(mid, t.hi), GroupTest(t.lo, mid)]  # the first half is tested first
    return {"important": sorted(important), "tests": tests, "values": values}


def outcome(found, names, metric, toward, seed_of, delta0, delta1):
    """The bisection's record (bisect.json): every group test with its factors, seeds, estimates (in the metric's
    units, toward B's value positive) and decision; the factors named; the runs and configurations used."""
    tests = [{"factors": names[t.lo:t.hi], "lo": t.lo, "hi": t.hi, "decision": t.decision,
              "estimates": t.estimates, "seeds": [seed_of(r) for r in t.replicates]} for t in found["tests"]]
    return {"metric": metric, "factors": names, "toward": toward, "delta0": delta0, "delta1": delta1,
            "important": [names[i] for i in found["important"]], "tests": tests, "runs": len(found["values"]),
            "configurations": len({c for c, _ in found["values"]})}


def sentence(plan):
    """The bisection's outcome in one sentence, every figure from the runs."""
    from vla_exp.attribution.numbers import mean_pm
    k, metric, named = len(plan["factors"]), plan["metric"].replace("_", " "), plan["important"]
    alone = {t["factors"][0]: t["estimates"] for t in plan["tests"] if len(t["factors"]) == 1}
    if named:
        text = (f"{len(named)} of the {k} differences ({', '.join(named)}) move{'s' if len(named) == 1 else ''} "
                f"{metric} toward B's by more than {plan['delta0']:g} (" +
                ", ".join(f"{n} {mean_pm(alone[n])}" for n in named) + ")")
    else:
        text = f"none of the {k} differences moves {metric} toward B's by more than {plan['delta0']:g} on its own"
    unsure = [", ".join(t["factors"]) for t in plan["tests"] if t["decision"] == "cannot tell"]
    if unsure:
        text += "; cannot tell for " + "; ".join(unsure) + " (runs that kept failing, or --max-seeds reached)"
    from vla_exp.attribution.screen import at_budget
    return at_budget(plan, text + f"; {plan['runs']} runs in {plan['configurations']} configurations")
