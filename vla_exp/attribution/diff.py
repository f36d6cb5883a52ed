"""vla-exp-diff A B: every difference between two recipes or runs, grouped into the factors a screen
would vary.

Each side is a run folder (the config Hydra saved in its .hydra folder) or a quoted list of overrides
("recipe=original init=none"). Every resolved config leaf that differs is listed. A config group whose choice differs
is one factor, its leaves under it (`--split optim` makes each of a group's leaves a factor of its own); a leaf
outside such a group is a factor by itself; keys that decide nothing about results (logging, paths, threads: what
config_hash ignores) are listed apart and never become factors. For run folders, what differs outside the config
too: library versions, the data's fingerprint and the normalisation statistics.

    vla-exp-diff "recipe=original" "recipe=fixed"
    vla-exp-diff outputs/run_a outputs/run_b --split optim --json
"""
import argparse
import functools
import json
import shlex
import sys
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from vla_exp import UsageError, one_line
from vla_exp.config import CONF_DIR, NOT_RESULTS, dig, foreign_keys, settled
from vla_exp.runs import read_normalization, read_summary

LABELS = ("name", "recipe")  # say which option a group or preset is; they decide nothing by themselves
HEAD_LOADING_CHANGED = "4.54"  # transformers: how from_pretrained fills weights a checkpoint lacks (model.head_loading)


@functools.cache
def groups():
    """The config groups that are a node of the config (conf/<group>/*.yaml without @package _global_; Hydra's own
    conf/hydra aside)."""
    return sorted(p.name for p in CONF_DIR.iterdir() if p.is_dir() and p.name != "hydra" and not any(
        "@package _global_" in f.read_text() for f in p.glob("*.yaml")))


class Side:
    """One side of the diff: its label, resolved leaves, group choices and, for a run folder, the folder."""

    def __init__(self, text, which):
        path = Path(text).expanduser()
        try:
            folder = path.is_dir()
        except OSError:  # a list of overrides longer than a file name can be (ENAMETOOLONG) names no folder
            folder = False
        self.label, self.folder = text, path if folder else None
        if self.folder:
            saved = path / ".hydra"
            if not (saved / "config.yaml").is_file():
                raise UsageError(f"{which}: {path} is a folder without .hydra/config.yaml (the config a run of "
                                 "vla-exp-train saves): give a run folder or a list of overrides")
            cfg = saved_yaml(saved / "config.yaml", which, "a config")
            self.choices = saved_choices(saved / "hydra.yaml", which) if (saved / "hydra.yaml").is_file() else {}
            where = f"{which}: {saved / 'config.yaml'}"
        else:
            from hydra import compose, initialize_config_dir
            from hydra.errors import HydraException
            from omegaconf.errors import OmegaConfBaseException
            try:
                with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
                    cfg = compose("train", shlex.split(text), return_hydra_config=True)
            except (HydraException, OmegaConfBaseException, ValueError) as e:
                raise UsageError(f"{which}: {text!r} is neither a run folder nor valid overrides "
                                 f"({' '.join(str(e).split()).split(' Config search path')[0][:300]})") from None
            self.choices = dict(cfg.hydra.runtime.choices)
            cfg = OmegaConf.masked_copy(cfg, [k for k in cfg if k != "hydra"])
            where = f"{which}: {text!r}"
        self.leaves = settled(OmegaConf.to_container(cfg, resolve=False), where)
        if foreign := foreign_keys(self.leaves):  # a config is data: it may set the project's keys, no others
            raise UsageError(f"{which}: {self.label} sets {foreign[0]}, which is no key of the project's config"
                             + (f" ({len(foreign) - 1} more)" if len(foreign) > 1 else ""))


def saved_choices(path, which):
    """The group choices Hydra recorded for a run (hydra.runtime.choices in its hydra.yaml), read as data: each of
    the project's groups must name one of its options."""
    hydra = OmegaConf.to_container(saved_yaml(path, which, "Hydra's record of the run"), resolve=False)
    choices = dig(hydra, "hydra", "runtime", "choices")
    if not isinstance(choices, dict):
        raise UsageError(f"{which}: {path} has no hydra.runtime.choices mapping (not written by Hydra?)")
    for group in groups():
        option = choices.get(group)
        if option is not None and not (isinstance(option, str) and (CONF_DIR / group / f"{option}.yaml").is_file()):
            options = sorted(p.stem for p in (CONF_DIR / group).glob("*.yaml"))
            raise UsageError(f"{which}: {path} names {group}={option}, which is no option of {group} (the options: "
                             f"{', '.join(options)})")
    return choices


def saved_yaml(path, which, what):
    """A run folder's saved YAML as a config mapping, or one line saying why it is none."""
    import yaml
    from omegaconf.errors import OmegaConfBaseException
    try:
        node = OmegaConf.load(path)
    except (yaml.YAMLError, OmegaConfBaseException, UnicodeDecodeError) as e:
        raise UsageError(f"{which}: {path} is not valid YAML ({one_line(e)})") from None
    if not isinstance(node, DictConfig):
        raise UsageError(f"{which}: {path} holds a YAML {type(OmegaConf.to_container(node)).__name__}, not {what} "
                         "(a mapping of keys)")
    return node


def check_split(split):
    """--split names config groups only (a misspelt group must not leave the group unsplit without a word)."""
    if bad := [g for g in split if g not in groups()]:
        raise UsageError(f"--split {bad[0]}: not a config group; the groups are {', '.join(groups())}")


def diff(a, b, split=()):
    """The differences between Sides a and b, as a dict (what --json prints)."""
    keys = sorted(set(a.leaves) | set(b.leaves))
    differ = {k: [a.leaves.get(k, "(absent)"), b.leaves.get(k, "(absent)")] for k in keys
              if a.leaves.get(k, object) != b.leaves.get(k, object)}
    top = lambda k: k.split(".")[0]
    not_results = {k: v for k, v in differ.items() if top(k) in NOT_RESULTS}
    labels = {k: v for k, v in differ.items() if k.split(".")[-1] in LABELS and k not in not_results}
    factors, rest = [], {k: v for k, v in differ.items() if k not in not_results and k not in labels}
    for group in (g for g in groups() if g not in NOT_RESULTS and g not in split):
        ca, cb = a.choices.get(group), b.choices.get(group)
        mine = {k: v for k, v in rest.items() if top(k) == group}
        if ca != cb and mine:
            factors.append({"factor": group, "kind": "group", "a": ca, "b": cb, "leaves": mine, "composable": True})
            rest = {k: v for k, v in rest.items() if k not in mine}
    for k, (va, vb) in rest.items():
        one_side = "(absent)" in (va, vb)
        factors.append({"factor": k, "kind": "key", "a": va, "b": vb, "leaves": {k: [va, vb]},
                        "composable": not one_side, **({"note": (
                            f"{k} exists on {'B' if va == '(absent)' else 'A'} only: it cannot be changed alone; "
                            f"leave {top(k)} unsplit, or give both sides the key")} if one_side else {})})
    out = {"a": a.label, "b": b.label, "factors": factors, "labels": labels, "not_results": not_results}
    if a.folder and b.folder:
        out["outside_config"] = outside(a, b)
    return out


def outside(a, b):
    """What differs between two run folders beyond their configs."""
    sa, sb = (read_summary(s.folder) or {} if s.folder else {} for s in (a, b))
    va, vb = sa.get("versions") or {}, sb.get("versions") or {}
    out = {"versions": {k: [va.get(k), vb.get(k)] for k in sorted(set(va) | set(vb)) if va.get(k) != vb.get(k)}}
    ta, tb = va.get("transformers"), vb.get("transformers")
    if ta and tb and (older(ta) != older(tb)):
        out["note"] = (f"transformers {ta} against {tb}: from {HEAD_LOADING_CHANGED} on, from_pretrained initialises "
                       "the weights a checkpoint lacks (the new head); before, they held raw memory. "
                       "model.head_loading reproduces the old behaviour")
    data = [fingerprint(s.get("data_dir")) for s in (sa, sb)]
    if data[0] != data[1]:
        out["data"] = data
    na, nb = (read_normalization(s.folder) if s.folder else None for s in (a, b))
    if na != nb:
        out["normalization"] = {k: [(na or {}).get(k), (nb or {}).get(k)] for k in sorted(set(na or {}) | set(nb or {}))
                                if (na or {}).get(k) != (nb or {}).get(k)}
    return out


def older(version):
    from packaging.version import Version
    return Version(version) < Version(HEAD_LOADING_CHANGED)


def fingerprint(data_dir):
    """A data folder's fingerprint: its path and, where it has one, its cache manifest's hash."""
    import hashlib
    if not data_dir:
        return None
    manifest = Path(data_dir) / "manifest.json"
    digest = hashlib.sha256(manifest.read_bytes()).hexdigest()[:12] if manifest.is_file() else "no manifest"
    return f"{data_dir} ({digest})"


def text(d):
    """The diff for people."""
    lines = [f"A: {d['a']}", f"B: {d['b']}"]
    if not (d["factors"] or d["not_results"] or d.get("outside_config", {}) and any(d["outside_config"].values())):
        return "\n".join(lines + ["A and B are the same config: nothing differs"])
    shown = lambda v: json.dumps(v) if not isinstance(v, str) else v
    lines.append(f"{len(d['factors'])} factors (differences that decide results):")
    for f in d["factors"]:
        lines.append(f"  {f['factor']}: {shown(f['a'])} -> {shown(f['b'])}" +
                     ("" if f["composable"] else f"   [not composable: {f['note']}]"))
        if f["kind"] == "group":
            lines += [f"      {k}: {shown(va)} -> {shown(vb)}" for k, (va, vb) in f["leaves"].items()]
    for title, part in (("labels (name the options; not factors)", d["labels"]),
                        ("not results (never factors)", d["not_results"])):
        if part:
            lines.append(f"{title}:")
            lines += [f"  {k}: {shown(va)} -> {shown(vb)}" for k, (va, vb) in part.items()]
    o = d.get("outside_config")
    if o:
        lines.append("outside the config:")
        lines += [f"  {k} {va} -> {vb}" for k, (va, vb) in o["versions"].items()] or ["  library versions: the same"]
        if "note" in o:
            lines.append(f"  note: {o['note']}")
        if "data" in o:
            lines.append(f"  data: {o['data'][0]} -> {o['data'][1]}")
        for k, (va, vb) in (o.get("normalization") or {}).items():
            lines.append(f"  normalization {k}: {shown(va)} -> {shown(vb)}")
    return "\n".join(lines)


def main(argv=None):
    p = argparse.ArgumentParser(prog="vla-exp-diff", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("a", help="a run folder or a quoted list of overrides")
    p.add_argument("b", help="the same, for the other side")
    p.add_argument("--split", action="append", default=[], metavar="GROUP",
                   help=f"make each leaf of this config group a factor (one of {', '.join(groups())}; repeatable)")
    p.add_argument("--json", action="store_true", help="print the diff as JSON")
    args = p.parse_args(argv)
    try:
        check_split(args.split)
        d = diff(Side(args.a, "A"), Side(args.b, "B"), args.split)
    except UsageError as e:
        sys.exit(f"error: {e}")
    print(json.dumps(d, indent=2, default=str) if args.json else text(d))


if __name__ == "__main__":
    main()
