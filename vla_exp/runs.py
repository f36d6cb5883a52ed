"""The run folder: what a run writes and everything else reads, in one place.

A run folder (vla-exp-train writes it; the W&B files beside it are the logger's):

    .hydra/config.yaml      the composed config (Hydra); .hydra/overrides.yaml the command line
    summary.json            the run's status and figures (SUMMARY_KEYS); vla-exp-evaluate adds closed_loop_<policy>
    metrics.jsonl           one row per logged step ("kind": "step") and per epoch ("kind": "epoch")
    init_report.json        the head's weights and first outputs before training
    checkpoint.pt           the state a stopped run goes on from (vla_exp.training.checkpoint)
    policy.pt               the trained policy's weights; normalization.json its action and state scaling

A study folder holds run folders, study.json (which study made it, so the report rebuilds that study's tables) and,
for a screen, design/ (one config file per configuration) and confirmation.json / confirmation.md, or
bisect.json / bisect.md for one run with --method bisect.

A run that a screen launched carries its configuration's `design` node (`Design`) in its config and its summary.
Reading goes through here, so a renamed key is an error naming the key and the file, never a column of NaN.
"""
import json
import os
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import numpy as np
import pandas as pd
from omegaconf import OmegaConf
from tqdm import tqdm

from vla_exp import UsageError
from vla_exp.config import GROUPS, NOT_RESULTS, dig, leaves
from vla_exp.files import write_json
from vla_exp.schema import SEED

SUMMARY, METRICS, CONFIG, INIT_REPORT = "summary.json", "metrics.jsonl", ".hydra/config.yaml", "init_report.json"
POLICY, NORMALIZATION, STUDY, CHECKPOINT = "policy.pt", "normalization.json", "study.json", "checkpoint.pt"
CONFIRMATION_JSON, CONFIRMATION_MD = "confirmation.json", "confirmation.md"
BISECT_JSON, BISECT_MD = "bisect.json", "bisect.md"
FINISHED = ("completed", "diverged")  # a run with one of these is done: a rerun of its config skips it
# What every finished run's summary holds (vla_exp.training.loop writes them) and the analysis reads: the report
# refuses a finished run that lacks one, rather than read it as a missing figure
SUMMARY_KEYS = ("choices", "seed", "status", "final_loss", "final_output_std", "initial_output_std",
                "val_action_error", "baseline_action_errors")
CELL = (*GROUPS, "head_loading")  # a cell: one combination of the choices
METRICS_READ = ("val_action_error", "final_loss", "final_output_std", "initial_output_std")  # the factorial's
TABLE_METRICS = ("final_loss", "final_output_std", "initial_output_std", "epochs_to_converge", "time_to_converge_s",
                 "skipped_batches", "scaled_loss_steps", "val_action_error", "success_rate")
# Every figure a finished run's summary holds at its top level (what a screen's --metric may name)
FIGURES = ("initial_output_std", "initial_loss", "missing_head_params", "nonfinite_head_params", "final_loss",
           "final_val_loss", "final_output_std", "epochs_to_converge", "time_to_converge_s", "skipped_batches",
           "scaled_loss_steps", "steps", "stopped_early_at_epoch", "diverged_at_step", "updates", "grad_norm_median",
           "nonfinite_grad_steps", "val_action_error", "wall_time_s", "peak_rss_mb", "peak_gpu_mb")
MANY = 20  # a progress bar from this many runs on


@dataclass(frozen=True)
class Design:
    """What one configuration of a screen is: its name ('A', 'B', 'x0101'), its label in words ('A + init'), the
    part of the study that ran it ('design' or 'confirm'), the factors and its level of each (1: B's), the sides."""
    name: str
    label: str
    part: str
    factors: list
    levels: list
    a: str
    b: str

    @classmethod
    def of(cls, node, where):
        missing = [f.name for f in fields(cls) if f.name not in node]
        if missing:
            raise UsageError(f"{where}: its design node lacks {', '.join(missing)} (written by another version?)")
        d = cls(**{f.name: node[f.name] for f in fields(cls)})
        texts = all(isinstance(getattr(d, k), str) for k in ("name", "label", "part", "a", "b"))
        if not (texts and isinstance(d.factors, list) and all(isinstance(f, str) for f in d.factors)
                and isinstance(d.levels, list) and len(d.levels) == len(d.factors)
                and all(x in (0, 1) and not isinstance(x, float) for x in d.levels)):
            raise UsageError(f"{where}: its design node is malformed (texts for name, label, part, a and b; a list "
                             "of factor names and a list of as many 0/1 levels)")
        return d

    def node(self):
        return asdict(self)


# ------------------------------------------------------------------------------------------------ one run
def check_folder(path, what):
    """A folder Hydra is about to make (a run's, its .hydra, a sweep's): one line if a file is in its place."""
    for p in (Path(path), *Path(path).parents):
        if p.exists() and not p.is_dir():
            raise UsageError(f"{p} is a file, not a folder: the {what} {path} cannot be made there; remove it or "
                             "give another folder")


def check_run_folder(run_dir):
    """Before a run trains: each file it will write is a file where it exists (a folder in its place would be found
    only when the run ends)."""
    for name in (SUMMARY, METRICS, INIT_REPORT, POLICY, NORMALIZATION, CHECKPOINT):
        if (path := Path(run_dir) / name).exists() and not path.is_file():
            raise UsageError(f"{path} is a folder, not the file a run writes there: remove it or give another "
                             "run folder")


def unreadable(path, why):
    """Name a file, or a part of one, that a reader goes on without: one warning line."""
    print(f"warning: {path}: {why}; read without it")


def parse_json(text):
    """JSON as Python reads it, but an integer longer than 18 digits (a 400-digit one) reads as a float (inf where
    too long for one), so that no figure stops a reader with OverflowError."""
    return json.loads(text, parse_int=lambda s: int(s) if len(s) < 19 else float(s))


def read_json(path):
    return parse_json(Path(path).read_text())


def read_summary(run_dir):
    """The run's summary as a dict, or None where there is none; an unreadable one reads as a failed run."""
    path = Path(run_dir) / SUMMARY
    try:
        s = read_json(path)
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as e:  # a summary half written by an older, non-atomic writer
        return {"status": "failed", "error": f"unreadable {SUMMARY}: {e}"}
    if not isinstance(s, dict):
        return {"status": "failed", "error": f"{SUMMARY} holds {type(s).__name__}, not a summary"}
    return s


def write_summary(run_dir, summary):
    write_json(Path(run_dir) / SUMMARY, summary)


def add_to_summary(run_dir, **figures):
    """Figures added to a run's summary after the run (closed-loop evaluation), the run's own left as they are."""
    write_summary(run_dir, {**(read_summary(run_dir) or {}), **figures})


def status_of(run_dir):
    """The status in a run's summary, or 'unreadable' (none there, not JSON, not a summary)."""
    try:
        s = json.loads((Path(run_dir) / SUMMARY).read_text())
    except (OSError, ValueError):
        return "unreadable"
    return s.get("status", "unreadable") if isinstance(s, dict) else "unreadable"


def finished(run_dir, digest):
    """The summary of a run that already finished in `run_dir` with the config of fingerprint `digest`, else None."""
    s = read_summary(run_dir)
    return s if s and s.get("status") in FINISHED and s.get("config_hash") == digest else None


def read_metrics(run_dir):
    """The rows of a run's metrics.jsonl; the last line of a run killed while writing it is left out, and any other
    line that is no row (not JSON, no "kind") is named."""
    path, rows, bad = Path(run_dir) / METRICS, [], []
    lines = path.read_text(errors="replace").splitlines() if path.is_file() else []
    for num, line in enumerate(lines, 1):
        try:
            row = parse_json(line)
        except ValueError:
            row = None
        if isinstance(row, dict) and row.get("kind") in ("step", "epoch"):
            rows.append(row)
        elif num < len(lines) or row is not None:  # a last line cut short is a killed writer's: not worth a word
            bad.append(num)
    if bad:
        unreadable(path, f"line{'s' if len(bad) > 1 else ''} {', '.join(map(str, bad[:5]))}"
                         f"{' ...' if len(bad) > 5 else ''} hold{'s' if len(bad) == 1 else ''} no metrics row")
    return rows


def read_normalization(run_dir):
    """The run's normalization.json (the Normalizer's arguments), or None where it has none or it is not JSON."""
    try:
        return json.loads((Path(run_dir) / NORMALIZATION).read_text())
    except (OSError, ValueError):
        return None


# ------------------------------------------------------------------------------------------------ many runs
def find_run_dirs(dirs):
    """Every folder holding a summary.json under the given ones (each counted once)."""
    found = {}
    for d in map(Path, dirs):
        if not d.is_dir():
            raise UsageError(f"{d} is not a directory")
        runs = sorted(p.parent.resolve() for p in d.rglob(SUMMARY))
        if not runs:
            raise UsageError(f"{d} holds no {SUMMARY}: not a run or sweep folder")
        found.update(dict.fromkeys(runs))
    return list(found)


def summaries(folder):
    """{run folder name: summary} of the runs directly under a sweep folder."""
    return {p.parent.name: read_summary(p.parent) for p in sorted(Path(folder).glob(f"*/{SUMMARY}"))}


def nothing_ran(folders):
    """No run in these sweep folders has a summary: the sweep refused its configs (and said why) or none started."""
    return not any(next(Path(f).glob(f"*/{SUMMARY}"), None) for f in folders)


def cell_key(row):
    """'xavier/skip_nonfinite/fixed/grad_norm/current': a string, so a column of keys compares with ==."""
    return "/".join(str(row[c]) for c in CELL)


def cell_label(cell, levels):
    """'original', 'fixed', or the recipe the cell differs least from and how: 'fixed with init=none'."""
    cell = dict(zip(CELL, cell)) if not isinstance(cell, dict) else cell
    if "?" in cell.values():
        return "unknown choices"
    diffs = {r: [c for c in CELL if cell[c] != levels[r][c]] for r in ("original", "fixed")}
    recipe = min(diffs, key=lambda r: len(diffs[r]))  # ties go to "original": the cell reads as fixes added
    return recipe + (" with " + ", ".join(f"{c}={cell[c]}" for c in diffs[recipe]) if diffs[recipe] else "")


def readable(path, s):
    """A summary with each part the report reads in the shape it reads it: a part in another shape (choices that are
    no mapping, a seed that is no seed, a malformed design node) is named and left out, and the run read without it."""
    s = dict(s)
    for key in ("choices", "baseline_action_errors", "design"):
        if key in s and not isinstance(s[key], dict):
            unreadable(path, f"{key} is a {type(s[key]).__name__}, not a mapping")
            s.pop(key)
    bad = [k for k, v in (s.get("baseline_action_errors") or {}).items() if not isinstance(v, (int, float, type(None)))]
    if bad:
        unreadable(path, f"baseline_action_errors: {bad[0]} is no number")
        s["baseline_action_errors"] = {k: v for k, v in s["baseline_action_errors"].items() if k not in bad}
    seed, (is_seed, allowed) = s.get("seed"), SEED
    if seed is not None and not is_seed(seed):
        unreadable(path, f"seed={str(seed)[:30]} is no seed (it {allowed})")
        s.pop("seed")
    if "design" in s:
        try:
            Design.of(s["design"], path)
        except UsageError as e:
            unreadable(path, str(e).removeprefix(f"{path}: "))
            s.pop("design")
    return s


def check_keys(run_dir, s):
    if s.get("status") in FINISHED and (missing := [k for k in SUMMARY_KEYS if k not in s]):
        raise UsageError(f"{Path(run_dir) / SUMMARY}: a finished run's summary without {', '.join(missing)} "
                         f"(written by another version of vla-exp?)")


def load_runs(run_dirs, levels):
    """One row per run: run_dir, cell (in words), the choices, seed, status and every scalar of summary.json, with
    baseline_<name> columns for the baselines, design_<key> and level:<factor> columns for a screen's runs, and
    success_rate columns for closed-loop results. A run without choices goes to the cell '?' rather than vanish."""
    rows = []
    for d in tqdm(run_dirs, desc="reading summaries", disable=len(run_dirs) < MANY):
        s = read_summary(d) or {"status": "failed", "error": f"no {SUMMARY}"}
        check_keys(d, s)
        s = readable(Path(d) / SUMMARY, s)
        choices = s.get("choices") or {}
        row = {"run_dir": str(d), **{c: str(choices.get(c) or "?") for c in CELL}, "recipe": choices.get("recipe")}
        row.update({k: v for k, v in s.items() if isinstance(v, (str, int, float, bool, type(None))) and k not in row})
        row.update({f"baseline_{k}": v for k, v in (s.get("baseline_action_errors") or {}).items()})
        if "design" in s:  # a screen's configuration
            design = Design.of(s["design"], Path(d) / SUMMARY)
            row.update({f"design_{k}": getattr(design, k) for k in ("name", "label", "part")})
            row.update({f"level:{f}": x for f, x in zip(design.factors, design.levels)})
        for name, cl in s.items():  # closed-loop success (data=metaworld): the run's policy, and reference policies
            if name.startswith("closed_loop") and isinstance(cl, dict):
                suffix = name.removeprefix("closed_loop")  # "" or "_expert", "_mean_chunk", "_random"
                row[f"success_rate{suffix}"] = cl.get("success_rate")
                row.update({f"success{suffix}_{t}": r.get("success_rate") for t, r in cl.get("tasks", {}).items()})
        rows.append(row)
    runs = pd.DataFrame(rows)
    runs.insert(1, "cell", [r.get("design_label") or cell_label(r, levels) for r in rows])
    runs["status"] = runs["status"].fillna("unknown") if "status" in runs else "unknown"
    runs["seed"] = pd.to_numeric(runs["seed"], errors="coerce").astype("Int64") if "seed" in runs else pd.NA
    numeric = [*TABLE_METRICS, *METRICS_READ, *(c for c in runs if c.startswith("baseline_"))]
    bad = []
    for m in dict.fromkeys(numeric):  # a failed run may lack every metric; null becomes NaN
        if m not in runs:
            runs[m] = np.nan
            continue
        figures = pd.to_numeric(runs[m], errors="coerce").astype(float)
        bad += [f"{d}: {m}={v!r}" for d, v, x in zip(runs.run_dir, runs[m], figures)
                if v is not None and not isinstance(v, bool) and not (isinstance(v, float) and np.isnan(v)) and np.isnan(x)]
        runs[m] = figures
    if bad:  # a figure that is text reads as missing, and says so
        print(f"warning: {len(bad)} figure{'s' if len(bad) > 1 else ''} of summary.json not a number, read as "
              f"missing: {'; '.join(bad[:5])}" + (" ..." if len(bad) > 5 else ""))
    check_replicates(runs)
    return runs


def check_replicates(runs):
    """A cell's runs are its seed replicates only if they ran one config: refuse to pool the results of different
    configs (naming the keys that differ), and flag a seed that a cell holds twice. A failed run adds no figure."""
    if "replicate_hash" not in runs:  # runs of a version before it was recorded
        return
    for cell, g in runs[runs.status != "failed"].groupby("cell"):
        if (hashes := g.replicate_hash.dropna().unique()).size > 1:
            raise UsageError(f"cell '{cell}': its {len(g)} runs ran {len(hashes)} different configs (differing in "
                             f"{differing_keys(g.run_dir)}), not seed replicates of one; report each config apart")
        seeds = g.seed.dropna()
        if twice := sorted(seeds[seeds.duplicated()].unique()):
            print(f"warning: cell '{cell}' holds seed {', '.join(str(int(s)) for s in twice)} more than once "
                  f"({', '.join(g.run_dir[g.seed.isin(twice)])}): a copied or rerun folder counts as a replicate")


def differing_keys(run_dirs):
    """The config keys that decide results and differ between the runs' saved configs (.hydra/config.yaml)."""
    configs = [leaves(c) for d in run_dirs if isinstance(c := read_yaml(Path(d) / CONFIG), dict)]
    if len(configs) < 2:
        return "replicate_hash: the runs' saved configs are not there to say which keys"
    flat = pd.DataFrame(configs).astype(str)
    keys = [k for k in flat if flat[k].nunique() > 1 and k.split(".")[0] not in (*NOT_RESULTS, "seed")]
    return ", ".join(f"{k} ({'/'.join(sorted(flat[k].unique()))})" for k in keys) or "replicate_hash"


def load_curves(runs):
    """Every row of every run's metrics.jsonl, tagged with run_dir, cell and seed."""
    frames = []
    for r in tqdm(runs.itertuples(), total=len(runs), desc="reading metrics", disable=len(runs) < MANY):
        if rows := read_metrics(r.run_dir):
            frames.append(pd.DataFrame(rows).assign(run_dir=r.run_dir, cell=r.cell, seed=r.seed))
    first = ["run_dir", "cell", "seed", "kind", "step", "epoch"]
    if not frames:
        return pd.DataFrame(columns=first)
    curves = pd.concat(frames, ignore_index=True)
    return curves[first + [c for c in curves.columns if c not in first]]


def sweep_group(run_dirs):
    """The W&B group of the runs' sweep: its hydra.sweep.dir (what vla-exp-train groups a multirun by) when the
    sweep's multirun.yaml holds it literally, else the name of the runs' common parent folder."""
    parent = Path(os.path.commonpath([str(Path(d).parent) for d in run_dirs]))
    sweep_dir = dig(read_yaml(parent / "multirun.yaml"), "hydra", "sweep", "dir")
    return str(sweep_dir) if sweep_dir is not None and "${" not in str(sweep_dir) else parent.name


def read_yaml(path):
    """A YAML file a run or sweep wrote, as plain containers with every interpolation kept as text (a folder's files
    are data), or None where there is none, and, named, where it is not YAML."""
    import yaml
    from omegaconf.errors import OmegaConfBaseException
    if not Path(path).is_file():
        return None
    try:
        return OmegaConf.to_container(OmegaConf.load(path), resolve=False)
    except (OSError, yaml.YAMLError, OmegaConfBaseException, UnicodeDecodeError) as e:
        return unreadable(path, f"not YAML ({' '.join(str(e).split())[:100]})")


# ------------------------------------------------------------------------------------------------ a study
def write_study(folder, study, **settings):
    """Say which study a folder holds (before its runs start), so `vla-exp-report` on it rebuilds that study's
    tables."""
    write_json(Path(folder) / STUDY, {"study": study, **settings})


def read_study(folder):
    """{"study": name, ...} of a study folder, or None for a plain sweep or a study.json that holds no such record."""
    try:
        study = json.loads((Path(folder) / STUDY).read_text())
    except (OSError, ValueError):
        return None
    return study if isinstance(study, dict) else None
