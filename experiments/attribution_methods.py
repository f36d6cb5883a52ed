"""How well the two attribution methods find the changes that matter, in simulation (no training).

A response over k two-level factors (A's level 0, B's 1) of which r matter: each that matters moves the response
toward B's value by a main effect drawn from --effects (default 0.08-0.17, the worked example's); with r >= 2 the
second of them helps only together with the first (a two-factor interaction, as init did with clipping), its main
effect still in that range. Each run adds seed noise (normal, --sigma, default 0.1 as measured) and fails now and
then (--fail). For each k and r, --cases simulated cases are run through
- the screen: its resolution IV design (the smallest, as `vla-exp-study screen` makes it) with --seeds replicates,
  analysed by its OLS; a factor is named when its effect toward B has p < 0.05;
- the bisection (`vla_exp.attribution.bisect`), starting each group test with --n0 replicates;
and the table gives the runs each used (mean and 95th percentile), the probability of naming every factor that
matters (power) and the fraction of the factors that do not matter named all the same (type I error, per factor).

    python experiments/attribution_methods.py                      # the table (1,000 cases each)
    python experiments/attribution_methods.py --cases 100 --k 9    # a quicker look
"""
import argparse
import time

import numpy as np
import pandas as pd
from tqdm import tqdm

from vla_exp.attribution import bisect as bs
from vla_exp.attribution import screen as sc
from vla_exp.attribution.numbers import markdown, num


class Response:
    """One simulated case: which factors matter and how, and the noisy runs."""

    def __init__(self, k, r, rng, sigma, fail, effects):
        self.rng, self.sigma, self.fail = rng, sigma, fail
        self.matter = sorted(rng.choice(k, r, replace=False).tolist())
        size = rng.uniform(*effects, r)
        self.beta, self.pair = np.zeros(k), None
        self.beta[self.matter] = size
        if r >= 2:  # b helps only with a (x_a x_b); a's main effect stays the larger of the two sizes, b's the smaller
            a, b = self.matter[:2]
            big, small = max(size[:2]), min(size[:2])
            self.beta[a], self.beta[b], self.pair = big - small, 0.0, (a, b, 2 * small)

    def mean(self, x):
        x = np.asarray(x, dtype=float)
        return float(self.beta @ x + (self.pair[2] * x[self.pair[0]] * x[self.pair[1]] if self.pair else 0.0))

    def run(self, x):
        if self.rng.random() < self.fail:
            return float("nan")
        return self.mean(x) + self.rng.normal(0, self.sigma)


def screen_case(resp, matrix, seeds):
    levels = (np.asarray(matrix) > 0).astype(int)
    names = [f"f{i}" for i in range(matrix.shape[1])]
    rows = [{**{f"level:{n}": v for n, v in zip(names, row)}, "y": resp.run(row)} for row in levels
            for _ in range(seeds)]
    out = sc.estimate_effects(pd.DataFrame(rows), "y", names)
    if "error" in out:
        return [], len(rows)
    eff = out["effects"].set_index("term")
    named = [i for i, n in enumerate(names) if n in eff.index and eff.effect[n] > 0 and eff.p[n] < 0.05]
    return named, len(rows)


def bisect_case(resp, k, seeds, delta0, delta1):
    found = bs.bisect(k, lambda reqs: [resp.run(c) for c, _ in reqs], delta0, delta1, n0=seeds)
    return found["important"], len(found["values"])


def summarise(method, k, r, cases):
    runs = np.array([c[1] for c in cases])
    power = np.mean([set(m) <= set(n) for n, _, m in cases])
    type1 = np.mean([len(set(n) - set(m)) / (k - len(m)) for n, _, m in cases])
    return {"method": method, "k": k, "r": r, "runs (mean)": round(runs.mean()),
            "runs (95th pct)": round(np.percentile(runs, 95)), "power": power, "type I per factor": type1}


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--cases", type=int, default=1000)
    p.add_argument("--k", default="9,16,32")
    p.add_argument("--r", default="1,2,3")
    p.add_argument("--seeds", type=int, default=2, help="the screen's replicates of each configuration (default 2, "
                                                        "as in the worked example)")
    p.add_argument("--n0", type=int, default=3, help="the replicates each of the bisection's group tests starts "
                                                     "with (default 3; it adds more as its test needs)")
    p.add_argument("--sigma", type=float, default=0.1)
    p.add_argument("--effects", type=float, nargs=2, default=(0.08, 0.17))
    p.add_argument("--fail", type=float, default=0.02)
    p.add_argument("--delta0", type=float, default=0.02)
    p.add_argument("--delta1", type=float, default=0.08)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    rng = np.random.default_rng(args.seed)
    ks, rs = [int(x) for x in args.k.split(",")], [int(x) for x in args.r.split(",")]
    rows, start = [], time.time()
    with tqdm(total=len(ks) * len(rs) * args.cases, desc="cases", unit="case") as bar:
        for k in ks:
            matrix, _ = sc.design(k, max_runs=sc.min_runs(k, 4))
            for r in rs:
                screened, bisected = [], []
                for _ in range(args.cases):
                    resp = Response(k, r, rng, args.sigma, args.fail, args.effects)
                    screened.append((*screen_case(resp, matrix, args.seeds), resp.matter))
                    bisected.append((*bisect_case(resp, k, args.n0, args.delta0, args.delta1), resp.matter))
                    bar.update()
                rows += [summarise("screen", k, r, screened), summarise("bisection", k, r, bisected)]
    table = pd.DataFrame(rows)
    print(f"{args.cases} cases each; seed noise {args.sigma} a run, effects {args.effects[0]}-{args.effects[1]}, "
          f"failed runs {args.fail:.0%}; screen: resolution IV, {args.seeds} seeds; bisection: {args.n0} seeds to start "
          f"each group test, delta0 {args.delta0}, delta1 {args.delta1}, alpha 0.05; {time.time() - start:.0f} s")
    print(markdown(table.map(lambda x: num(x) if isinstance(x, float) else x)))


if __name__ == "__main__":
    main()
