"""Where a run's episodes come from: a folder of episode files (`data.dir`), or a source that writes them into the
cache on first use (same parameters and source version, same folder).

A source is a module with `version()`, `params(cfg)` (everything that decides the files; with the version it names
the cache folder), `generate(out_dir, **params)` and, where it has rules of its own, `check(cfg)`. Modules are
imported on use: MetaWorld is an optional extra.
"""
import importlib

from vla_exp import UsageError, one_line
from vla_exp.data.chunks import PAST_END, load_split
from vla_exp.data.episodes import camera_name
from vla_exp.files import cache_path, check_cache_entry
from vla_exp.schema import check as check_key, integer_from, one_of
from vla_exp.schema import validate as validate_schema

SOURCES = {"tint": "vla_exp.data.tasks", "blocks": "vla_exp.data.tasks", "metaworld": "vla_exp.data.metaworld",
           "lerobot": "vla_exp.data.lerobot"}  # data.task -> its module; lerobot reads a dataset from data.root


def check(cfg):
    """The data rules: those of every source, then the chosen source's own."""
    check_key(cfg, "data.past_end", one_of(PAST_END))
    if cfg.data.dir is not None:  # episodes read from a folder: no source
        return
    check_key(cfg, "data.task", one_of(tuple(SOURCES)))
    if cfg.data.task != "lerobot":
        check_key(cfg, "data.episodes", integer_from(2))
    own = getattr(importlib.import_module(SOURCES[cfg.data.task]), "check", None)
    if own:
        own(cfg)


def validate(cfg):
    """Every rule a run's config must meet: the schema's and its data source's (UsageError for the first broken)."""
    validate_schema(cfg)
    check(cfg)


def compose_checked(overrides, what):
    """compose() and every rule a run's config must meet (validate); a config that does not compose or breaks a
    rule is one line naming `what` (UsageError)."""
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException
    from vla_exp.config import compose
    try:
        cfg = compose(*overrides)
        validate(cfg)
    except (HydraException, OmegaConfBaseException) as e:
        raise UsageError(f"{what} does not compose: {one_line(e, 300).split(' Config search path')[0]}") from None
    except UsageError as e:
        raise UsageError(f"{what}: {e}") from None
    return cfg


def episodes_dir(cfg):
    """The folder of episodes a run trains on: `data.dir`, or `data.task` generated into the cache on first use."""
    d = cfg.data
    if d.dir:
        return d.dir
    source = importlib.import_module(SOURCES[d.task])
    params = source.params(cfg)
    out_dir = cache_path(cfg.paths.cache_dir, "data", d.task, {**params, "version": source.version()})
    if not out_dir.is_dir():
        source.generate(out_dir, **params)
    check_cache_entry(out_dir, "data")
    return out_dir


def datasets(cfg):
    """The (train, validation) sets a run of `cfg` trains and evaluates on, checked against the model's sizes."""
    d, m = cfg.data, cfg.model.config
    return load_split(episodes_dir(cfg), camera_name(d.camera), d.val_fraction, d.split_seed, m.horizon,
                      m.vision_config.image_size, m.action_dim, m.state_dim, d.action_norm, d.past_end)
