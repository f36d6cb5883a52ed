"""Report on finished runs: what each fix did, with the seeds' uncertainty.

    vla-exp-report multirun/2026-01-01/12-00-00           # a sweep, searched recursively for runs
    vla-exp-report outputs/a outputs/b --out results/ab     # several folders, one report
    vla-exp-report multirun/... --wandb                     # also log the table and plots to W&B (offline)

Writes into --out (default <first dir>/report), every file atomically: runs.csv and runs.parquet (one row per run),
curves.csv (every metrics.jsonl row), table.md and table.csv (per cell: mean ± std and n over seeds), analysis.md
(verdicts, ANOVA tables, interactions, leave-one-out and add-one tables), PNG plots and dashboard.html (one
self-contained file). The recipes' levels come from conf/recipe/*.yaml; vla_exp/attribution/analysis.py says how effects are tested.
Runs of a screen (vla-exp-study screen) get the screen's analysis instead (vla_exp/attribution/screen.py): the design, each
difference's effect with its aliases, the confirmation, a half-normal plot.
"""
import argparse
import os
import sys
from pathlib import Path

import numpy as np
import pandas as pd
from omegaconf import OmegaConf

from vla_exp import UsageError, one_line
from vla_exp.attribution import analysis, bisect, dashboard, numbers, screen, study_tables
from vla_exp.config import CONF_DIR, dig, literal, reference_levels
from vla_exp.files import atomic, write_text
from vla_exp.recorder import Tracker
from vla_exp.runs import (BISECT_JSON, CONFIG, CONFIRMATION_JSON, METRICS_READ, STUDY, find_run_dirs, load_curves,
                          load_runs, read_json, read_study, read_yaml, sweep_group, unreadable)
METHOD = ("Effect = marginal mean of the level minus that of the reference level (the original recipe's), with a 95% "
          "CI, from an OLS over the seeds (with two-way interactions where the runs allow: see each metric's model); "
          f"detectable when p < {numbers.ALPHA}; size from partial eta² (small >= 0.01, medium >= 0.06, "
          "large >= 0.14). See vla_exp/attribution/analysis.py.")


# ------------------------------------------------------------------------------------------------ writing
def parquet_safe(df):
    """pyarrow wants one type per column: a user's summary key holding a number in one run and text in another
    becomes text."""
    mixed = [c for c in df if df[c].dtype == object and pd.api.types.infer_dtype(df[c], skipna=True) == "mixed"]
    return df.astype({c: str for c in mixed})


def analysis_markdown(results, loo, add):
    lines = ["## Verdicts", "", METHOD, ""]
    for metric, res in results.items():
        lines += [f"### {metric}", "", f"_{analysis.notes_line(res)}_", ""]
        lines += [f"- {v}" for v in analysis.verdicts(res)] + [""]
    inter = [line for res in results.values() for line in analysis.interactions(res)]
    lines += ["## Significant two-way interactions", ""] + ([f"- {i}" for i in inter] or ["none detected"]) + [""]
    lines += ["## ANOVA tables (type II)", ""]
    for metric, res in results.items():
        lines += [f"### {metric}", ""]
        lines += [numbers.markdown(analysis.anova_table(res)) if res["anova"] is not None else
                  f"no ANOVA: {res.get('error')}", ""]
    lines += ["## Leave-one-out: the fixed recipe minus each fix", "", numbers.markdown(loo), "",
              "## Add-one: the original recipe plus each fix", "", numbers.markdown(add), ""]
    return "\n".join(lines)


def screen_results(runs):
    """A screen's analysis (vla_exp.attribution.screen) of the runs of its design, per metric, and its factors."""
    names = [c.removeprefix("level:") for c in runs if c.startswith("level:")]
    design = runs[runs.design_part == "design"]
    return names, {m: screen.estimate_effects(design, m, names) for m in METRICS_READ if m in runs}


def screen_tables(runs, names, results, folder):
    """(markdown, [(heading, html)]) of a screen: its design, each metric's effects with their aliases, the
    confirmation where the study saved one (confirmation.json in its `folder`, beside the runs)."""
    design = runs[runs.design_part == "design"]
    coded = design[[f"level:{n}" for n in names]].drop_duplicates().to_numpy() * 2 - 1
    words = screen.defining_relation(coded)
    letters = ", ".join(f"{screen.letter(i)} = {n}" for i, n in enumerate(names))
    about = (f"{len(names)} factors ({letters}); {len(coded)} configurations of the design, {len(design)} runs" +
             (f"; resolution {min(map(len, words))}, defining relation I = " +
              " = ".join("".join(map(screen.letter, w)) for w in words[:30])
              + (f" = ... ({len(words)} words)" if len(words) > 30 else "") if words else
              "; full factorial") +
             ". Effect = mean at B's level minus mean at A's level (twice the OLS coefficient on -1/+1 coding); "
             "aliased terms cannot be told apart from it.")
    changes = screen.held_out_changes(design, names)
    about += f" Note: {changes}." if changes else ""
    md, html = ["## Screen", "", about, ""], [("Screen: the design", dashboard.note_html(about))]
    for metric, res in results.items():
        head = "; ".join([f"{res['n']} runs, {res['dropped']} without a finite value", *res["notes"],
                          *([res["error"]] if res.get("error") else [])])
        md += [f"### {metric}", "", f"_{head}_", ""]
        if "effects" in res:
            e = res["effects"]
            shown = e[(e.order == 1) | (e.lo > 0) | (e.hi < 0)]  # main effects, and interaction columns that show
            table = pd.DataFrame({
                "term": shown.term, "effect (B - A)": shown.effect.map(lambda x: numbers.num(x, True)),
                "95% interval": [f"[{numbers.num(lo)}, {numbers.num(hi)}]" for lo, hi in zip(shown.lo, shown.hi)],
                "p": shown.p.map(lambda p: "" if np.isnan(p) else numbers.p_value(p)),
                "aliased with": [a or ("no interaction of two or three factors" if o == 1 else
                                       "no other two-factor interaction") for a, o in zip(shown.aliases, shown.order)],
                "precision": shown.se_ratio.map(lambda r: f"SE x{r:.2f}" if r > 1.05 else "")})
            md += [numbers.markdown(table), ""]
            html.append((f"Screen: effects on {metric}", dashboard.note_html(head) + dashboard.table_html(table)))
    plan_path = folder / CONFIRMATION_JSON
    plan = read_plan(plan_path, ("metric", "a", "b", "steps", "without"))
    built = plan and from_file(plan_path, confirmation_tables, plan)
    if built:
        md += built[0]
        html.insert(0, built[1])  # the answer opens the dashboard
    return "\n".join(md), html


def confirmation_tables(plan):
    """(markdown lines, dashboard section) of a screen's confirmation (confirmation.json)."""
    rows = [{"step": f"A + {', '.join(s['set'])}", "configuration": s["name"],
             plan["metric"]: numbers.mean_pm(s["values"]), "reaches B": "yes" if s["reached"] else "no"}
            for s in plan["steps"]]
    rows += [{"step": f"the set without {w['left_out']}", "configuration": w["name"],
              plan["metric"]: numbers.mean_pm(w["values"]), "reaches B": "yes" if w["reached"] else "no"}
             for w in plan["without"]]
    table = pd.DataFrame([{"step": "A", "configuration": "A", plan["metric"]: numbers.mean_pm(plan["a"]),
                           "reaches B": ""}, *rows,
                          {"step": "B", "configuration": "B", plan["metric"]: numbers.mean_pm(plan["b"]),
                           "reaches B": ""}])
    text = screen.sentence(plan)
    second_md, second_html = budget_table(plan.get("budget", {}))
    return (["## Confirmation", "", text, "", numbers.markdown(table), "", *second_md],
            ("Confirmation: the smallest set of changes", dashboard.note_html(text) + second_html +
             dashboard.table_html(table)))


def read_plan(path, keys):
    """A study's record beside its runs (confirmation.json, bisect.json) as a mapping that holds `keys`: None where
    there is none, and, named, where it cannot be read."""
    if not path.is_file():
        return None
    try:
        plan = read_json(path)
    except (OSError, ValueError) as e:
        return unreadable(path, f"not JSON ({one_line(e, 100)})")
    if not isinstance(plan, dict):
        return unreadable(path, f"holds a {type(plan).__name__}, not the study's record")
    if missing := [k for k in keys if k not in plan]:
        return unreadable(path, f"lacks {', '.join(missing)} (cut short, or written by another version?)")
    return plan


def from_file(path, build, *args):
    """build(*args) from what the file at `path` holds, or None where its content is not in the shape vla-exp writes
    (a record edited by hand or by another version): the file is named and its part of the report left out."""
    try:
        return build(*args)
    except (KeyError, TypeError, ValueError, AttributeError, IndexError) as e:
        return unreadable(path, f"not in the shape this report reads ({type(e).__name__}: {one_line(e, 100)})")


def study_of(folder):
    """The study a folder holds (its study.json), or None: for a plain sweep, or, named, a study.json it cannot read."""
    study = read_study(folder)
    if study is None and (folder / STUDY).is_file():
        unreadable(folder / STUDY, "not the record of a study (a mapping with its name)")
    return study


def logger_config(run_dirs, mode, group):
    """The W&B project and entity of the runs' own logger config (the first run's that has one, else the default),
    with the report's mode and group."""
    loggers = (dig(read_yaml(Path(d) / CONFIG), "logger") for d in run_dirs)  # a folder's config is data: as text
    logger = next((literal(lg) for lg in loggers if isinstance(lg, dict) and lg.get("kind") == "wandb"),
                  OmegaConf.load(CONF_DIR / "logger" / "wandb.yaml"))
    return OmegaConf.merge(logger, {"mode": mode, "group": group})


def log_wandb(out, runs, table, pngs, logger):
    """Mirror the table and the plots to W&B (job_type=report). The local files are already written: a failure here
    only warns."""
    tracker = Tracker(logger, out, f"report-{logger.group}", {"runs": len(runs), "cells": len(table),
                                                               "run_dirs": list(runs.run_dir)}, job_type="report")
    tracker.log({}, images={f"plots/{p.stem}": p for p in pngs}, tables={"runs": runs, "table": table})
    tracker.finish()


def factorial_part(runs, levels):
    """The four-fix factorial's analysis: (analysis.md body, dashboard sections, what the effects plot reads,
    verdict lines)."""
    results = analysis.analyse(runs, levels)
    loo, add = analysis.leave_one_out(runs, levels), analysis.add_one(runs, levels)
    sections = [
        ("Verdicts", dashboard.note_html(METHOD) + "".join(
            f"<h3>{m}</h3>" + dashboard.note_html(analysis.notes_line(r)) +
            dashboard.list_html(analysis.verdicts(r) or [r.get("error", "")]) for m, r in results.items())),
        ("Significant two-way interactions",
         dashboard.list_html([i for r in results.values() for i in analysis.interactions(r)])),
        ("Leave-one-out: the fixed recipe minus each fix", dashboard.table_html(loo)),
        ("Add-one: the original recipe plus each fix", dashboard.table_html(add))]
    lines = [v for res in results.values() for v in analysis.verdicts(res) or [f"{res['metric']}: {res.get('error')}"]]
    printed = "Verdicts:\n" + "\n".join(f"- {v}" for v in lines)
    return analysis_markdown(results, loo, add), sections, {}, results, printed


def screen_part(runs):
    """A screen's analysis (it varies other keys than the four groups): the same five things as factorial_part. A
    screen run with --method bisect has no design to analyse: its bisect.json is the analysis. Runs that are no
    screen's, beside the screen's, are counted and left to a report of their own."""
    own = runs[runs.design_part.notna()]
    folder = Path(os.path.commonpath(list(own.run_dir)))
    if len(own) < len(runs):
        print(f"note: {len(runs) - len(own)} of the {len(runs)} runs are no screen's: the screen's analysis reads its "
              f"{len(own)} runs in {folder} alone; report the others apart")
    if not (own.design_part == "design").any():
        plan_path = folder / BISECT_JSON
        plan = read_plan(plan_path, ("metric", "tests", "important", "factors"))
        part = plan and from_file(plan_path, bisect_part, plan)
        if part:
            return part
        text = (f"The screen's {len(own)} runs in {folder} hold no run of a design, and no readable {BISECT_JSON} "
                "is beside them: there is nothing to analyse as a screen.")
        return f"## Screen\n\n{text}", [("Screen", dashboard.note_html(text))], {}, None, text
    names, results = screen_results(own)
    md, sections = screen_tables(own, names, results, folder)
    return md, sections, {"half_normal": dashboard.half_normal_figure(results)}, None, md


def budget_table(check):
    """(markdown lines, html) of the set confirmed at the second budget: A, the set, the set without each factor, B,
    with their values and whether each reaches B; nothing where it did not run."""
    if "with_set" not in check:
        return [], ""
    rows = [("A", "A", check["a"], None), (f"A + {', '.join(check['set'])}", check["with_set"]["name"],
                                           check["with_set"]["values"], check["with_set"]["reached"])]
    rows += [(f"the set without {w['left_out']}", w["name"], w["values"], w["reached"]) for w in check["without"]]
    rows.append(("B", "B", check["b"], None))
    table = pd.DataFrame([{"step": step, "configuration": name, check["metric"]: numbers.mean_pm(values),
                           "reaches B": "" if ok is None else "yes" if ok else "no"} for step, name, values, ok in rows])
    head = f"At {check['label']}:"
    return [f"### {head}", "", numbers.markdown(table), ""], dashboard.note_html(head) + dashboard.table_html(table)


def bisect_part(plan):
    """The bisection's outcome, every group test with its decision and estimate, and the tree."""
    text = bisect.sentence(plan)
    table = pd.DataFrame([{
        "group tested": ", ".join(t["factors"]) if len(t["factors"]) <= 3 else
        f"{t['factors'][0]} ... {t['factors'][-1]} ({len(t['factors'])} factors)",
        "decision": t["decision"], f"effect toward B on {plan['metric']}": numbers.mean_pm(t["estimates"]),
        "seeds": len(t["seeds"])} for t in plan["tests"]])
    second_md, second_html = budget_table(plan.get("budget", {}))
    md = "\n".join(["## Bisection", "", text, "", numbers.markdown(table), "", *second_md])
    sections = [("Bisection: which differences carry B",
                 dashboard.note_html(text) + second_html + dashboard.table_html(table))]
    return md, sections, {"bisection": dashboard.bisection_figure(plan)}, None, md


def report(dirs, out=None, use_wandb=False, wandb_mode="offline", group=None):
    """Read the runs under `dirs`, write every report file into `out` and return `out`. A study folder (one that
    holds study.json) also gets its study's own tables (study_tables)."""
    run_dirs = find_run_dirs(dirs)
    out = Path(out) if out else Path(dirs[0]) / "report"
    out.mkdir(parents=True, exist_ok=True)
    levels = reference_levels()
    runs = load_runs(run_dirs, levels)
    curves = load_curves(runs)
    table = analysis.results_table(runs, levels)
    shown = analysis.format_table(table, runs)
    screened = "design_part" in runs and runs.design_part.notna().any()
    body, sections, figs, effects, printed = screen_part(runs) if screened else factorial_part(runs, levels)
    title = f"Report: {len(runs)} runs in {len(table)} cells ({', '.join(str(d) for d in dirs)})"

    # ---------------------------------------------------------------------------- data and tables
    for name, df in (("runs.csv", runs), ("curves.csv", curves), ("table.csv", table)):
        with atomic(out / name) as tmp:
            df.to_csv(tmp, index=False)
    with atomic(out / "runs.parquet") as tmp:
        parquet_safe(runs).to_parquet(tmp, index=False)
    baselines = ", ".join(f"{c[len('baseline_'):]} {numbers.num(runs[c].mean())}" for c in runs
                          if c.startswith("baseline_"))
    working = analysis.working_note(table)
    table_md = (f"# {title}\n\n{working}\n\n{numbers.markdown(shown)}\n\n"
                f"Baselines (mean over runs): {baselines or 'none'}\n")
    write_text(out / "table.md", table_md)
    write_text(out / "analysis.md", f"# {title}\n\n{working}\n\n{body}")
    study = [part for d in dirs if (s := study_of(Path(d))) and
             (part := from_file(Path(d) / STUDY, study_tables.write, Path(d), s))]

    # ---------------------------------------------------------------------------- plots and dashboard
    pngs = []
    for stem, fig in {**dashboard.figures(curves, runs, effects, list(table.cell)), **figs}.items():
        with atomic(out / f"{stem}.png") as tmp:
            fig.savefig(tmp, format="png", dpi=100, bbox_inches="tight")
        dashboard.plt.close(fig)
        pngs.append(out / f"{stem}.png")
    images = [(p.stem.replace("_", " ").capitalize(), dashboard.image_html(p)) for p in pngs]
    # an attribution study opens with its answer and the picture of its effects; the tables follow
    lead = [*sections, *(im for im, p in zip(images, pngs) if p.stem in figs)] if screened else []
    sections = [
        *lead,
        ("Results per cell (mean ± std (n) over seeds)", dashboard.note_html(working) + dashboard.table_html(shown) +
         dashboard.note_html(f"Baselines (mean over runs): {baselines or 'none'}. A cell beats the baselines only "
                             "if every seed's held-out action error is below every baseline's.")),
        *([] if screened else sections), *(s for part in study for s in part),
        *(im for im in images if im not in lead),
    ]
    write_text(out / "dashboard.html", dashboard.page(title, sections))

    print(table_md)
    print(printed)
    print(f"\nReport written to {out}/ (table.md, analysis.md, dashboard.html, runs.csv, runs.parquet, curves.csv, "
          "table.csv, *.png)")
    if use_wandb:  # after the local files, so a W&B failure never costs them
        log_wandb(out, runs, table, pngs, logger_config(run_dirs, wandb_mode, group or sweep_group(run_dirs)))
    return out


def main(argv=None):
    parser = argparse.ArgumentParser(prog="vla-exp-report", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("dirs", nargs="+", help="run or sweep folders, searched recursively for summary.json")
    parser.add_argument("--out", help="output folder (default: <first dir>/report)")
    parser.add_argument("--wandb", action="store_true", help="also log the table and plots to W&B (job_type=report)")
    parser.add_argument("--wandb-mode", default="offline", choices=("offline", "online", "disabled"),
                        help="W&B mode (default offline: no network)")
    parser.add_argument("--group", help="W&B group (default: the sweep's, from its multirun.yaml, else the name of "
                        "the runs' common parent folder)")
    args = parser.parse_args(argv)
    try:
        report(args.dirs, args.out, args.wandb, args.wandb_mode, args.group)
    except UsageError as e:  # bad input: one line, no traceback (bugs keep theirs)
        sys.exit(f"error: {e}")


if __name__ == "__main__":
    main()
