"""The configs: where they live, composing one from overrides, and what a composed one says about its run.

Torch-free, so the report and the analysis can read runs without loading the training stack.
"""
import functools
import hashlib
import json
import re
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from vla_exp import UsageError

CONF_DIR = next(p for p in (Path(__file__).parent / "conf", Path(__file__).parent.parent / "conf") if p.is_dir())
GROUPS = ("init", "loss_handling", "optim", "clipping")  # the four fixes, one config group each
RECIPES = ("original", "fixed")
# where a run goes and how it reports and restarts: none of it changes its results
# (`design`: a screen's label for the configuration a run is, vla_exp.attribution.screen)
NOT_RESULTS = ("logger", "progress", "threads", "paths", "skip_finished", "checkpoint", "resume", "design")


def compose(*overrides):
    """The config the CLI would run with these overrides (`"recipe=fixed", "init=none"`)."""
    from hydra import compose as hydra_compose, initialize_config_dir
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return hydra_compose("train", list(overrides))


def choices(cfg):
    return {**{g: cfg[g].name for g in GROUPS}, "recipe": cfg.recipe, "head_loading": cfg.model.head_loading}


def leaves(node, prefix=""):
    """{dotted key: value} of every leaf of a config as plain containers (a list is one leaf)."""
    if isinstance(node, dict):
        return {k: v for key, sub in node.items() for k, v in leaves(sub, f"{prefix}{key}.").items()} if node \
            else {prefix[:-1]: {}}
    return {prefix[:-1]: node}


@functools.cache
def conf_leaves():
    """(dotted key, value) of every leaf that the project's config files set, each file's keys under its package
    (its group's folder, or the top for `@package _global_`): what a composed config can hold. Hydra's own
    settings (conf/hydra: launcher presets) are not the config's."""
    found = []
    for path in sorted(p for p in CONF_DIR.rglob("*.yaml") if p.relative_to(CONF_DIR).parts[0] != "hydra"):
        node = OmegaConf.to_container(OmegaConf.load(path))
        group = path.parent.relative_to(CONF_DIR).as_posix().replace("/", ".")
        prefix = "" if group == "." or "@package _global_" in path.read_text() else f"{group}."
        found += [(prefix + k, v) for k, v in leaves({k: v for k, v in node.items() if k != "defaults"}).items()]
    return tuple(found)


def foreign_keys(cfg_leaves):
    """The keys of a config's leaves that no project config file sets (a key given with `+`, or a hand-edited run
    folder's), the screen's `design` label and Hydra's own node aside."""
    known = {k for k, _ in conf_leaves()}
    open_nodes = tuple(f"{k}." for k, v in conf_leaves() if v == {})
    return [k for k in cfg_leaves if k.split(".")[0] not in ("design", "hydra") and k not in known
            and not k.startswith(open_nodes) and not any(e.startswith(f"{k}.") for e in known)]


REFERENCE = re.compile(r"\$\{([A-Za-z_][\w-]*(?:\.[A-Za-z_][\w-]*)*)\}")  # ${data.action_dim}, nothing else


def settled(node, where):
    """{dotted key: value} of every leaf of a config read as data (a run folder's, or one composed here, as plain
    containers): a leaf that is exactly `${key}` naming another leaf (what the project's own files write:
    `${data.action_dim}`) takes that leaf's value; every other interpolation (a resolver, `${oc.env:...}`,
    `${hydra:...}`, text around one) stays the text it is, never resolved, since a folder's config could otherwise
    print an environment variable. A reference to no leaf, or a circle of them, is one line naming `where`."""
    flat = leaves(node)

    def value(key, seen):
        v = flat[key]
        if not (isinstance(v, str) and (ref := REFERENCE.fullmatch(v))):
            return v
        if ref[1] not in flat or ref[1] in seen:
            named = "no value of the config" if ref[1] not in flat else "a circle of references"
            raise UsageError(f"{where}: {key}={v} names {named} (a config read from a folder is data: its "
                             "interpolations are not resolved)")
        return value(ref[1], {*seen, ref[1]})
    return {k: value(k, {k}) for k in flat}


def own_interpolations(node, where):
    """Refuse in one line a config read from a folder (as plain containers) that is to be resolved, as a run
    resolves it, but holds an interpolation that is neither a `${key}` reference nor the very one the project's own
    files write at that key (`paths.cache_dir`'s `${oc.env:VLA_EXP_CACHE,...}`): a folder is data, and must not
    choose which environment variable is read."""
    own = {(k, v) for k, v in conf_leaves() if isinstance(v, str) and "${" in v}
    for key, v in leaves(node).items():
        if isinstance(v, str) and "${" in v and not REFERENCE.fullmatch(v) and (key, v) not in own:
            raise UsageError(f"{where}: {key}={v} is an interpolation the project's config does not write there (a "
                             "run folder is data: it is not resolved)")


def literal(value):
    """A value as a config must hold it to stay as it is: `${...}` in a string is text, not an interpolation."""
    if isinstance(value, str):
        return value.replace("${", "\\${")
    if isinstance(value, list):
        return [literal(v) for v in value]
    if isinstance(value, dict):
        return {k: literal(v) for k, v in value.items()}
    return value


def dig(node, *keys):
    """node[k1][k2]... of plain containers read from a file, or None where a level is missing or no mapping."""
    for key in keys:
        node = node.get(key) if isinstance(node, dict) else None
    return node


def run_name(cfg):
    c = choices(cfg)
    return f"{c['recipe'] or 'custom'}-" + "-".join(c[g] for g in GROUPS) + f"-{c['head_loading']}-s{cfg.seed}"


def config_hash(cfg, ignore=()):
    """Fingerprint of everything that decides a run's results (but the keys `ignore`: without the seed, runs that
    share it are seed replicates of one config)."""
    c = {k: v for k, v in OmegaConf.to_container(cfg, resolve=True).items() if k not in (*NOT_RESULTS, *ignore)}
    return hashlib.sha256(json.dumps(c, sort_keys=True).encode()).hexdigest()[:16]


def recipe_levels(recipe, conf_dir=CONF_DIR):
    """{group: level} that a preset in conf/recipe selects: the preset it builds on (`- fixed`), then its own
    `override /group: level` entries. Read from the configs, so a changed recipe changes the report with it."""
    levels = {}
    for entry in OmegaConf.load(Path(conf_dir) / "recipe" / f"{recipe}.yaml").get("defaults", []):
        if isinstance(entry, str) and entry != "_self_":
            levels.update(recipe_levels(entry, conf_dir))
        elif isinstance(entry, DictConfig):
            levels.update({key.split("/")[-1]: level for key, level in entry.items()})
    return levels


def reference_levels(conf_dir=CONF_DIR):
    """{"original": {group: level, "head_loading": ...}, "fixed": {...}} from the recipe presets; the head loading
    is the default model's for both (the recipes do not choose it)."""
    conf_dir = Path(conf_dir)
    model = next(e["model"] for e in OmegaConf.load(conf_dir / "train.yaml").defaults
                 if isinstance(e, DictConfig) and "model" in e)
    head = OmegaConf.load(conf_dir / "model" / f"{model}.yaml").head_loading
    return {recipe: {**{g: recipe_levels(recipe, conf_dir)[g] for g in GROUPS}, "head_loading": head}
            for recipe in RECIPES}
