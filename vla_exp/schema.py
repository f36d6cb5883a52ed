"""The rules a composed config must meet, checked before a run builds or writes anything.

A broken rule is one line naming the key, its value and what is allowed: `optim.lr=-1: must be a number > 0`.
Group options (`init=xaviar`) are Hydra's to check: it lists the valid ones before the config even exists. Each data
source brings its own rules (vla_exp.data.sources.check); a run checks both (vla_exp.data.sources.validate).
"""
import math

from omegaconf import OmegaConf

from vla_exp import UsageError
from vla_exp.config import conf_leaves, leaves

ABSENT = object()
# The classes a config may name for instantiation: those the project's own config files name. A run folder or a
# command line is data, so `init._target_=numpy.savetxt` must not reach hydra.utils.instantiate.
OWN_TARGETS = frozenset(v for k, v in conf_leaves() if k.rsplit(".", 1)[-1] == "_target_" and not k.startswith("hydra."))


def number(v):
    # YAML's true/false load as bool, a subclass of int: a flag set by mistake must not pass as 1 or 0
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def integer(v):
    return isinstance(v, int) and not isinstance(v, bool)


def integer_from(low):
    return lambda v: integer(v) and v >= low, f"must be an integer >= {low}"


def one_of(options):
    return lambda v: isinstance(v, str) and v in options, f"must be one of {', '.join(options)}"


POSITIVE = (lambda v: number(v) and v > 0, "must be a number > 0")
NULL_OR_COUNT = (lambda v: v is None or integer(v) and v >= 1, "must be null or an integer >= 1")
# numpy's seeds are 32-bit, and the data order of epoch e is seeded with seed * 1000 + e
SEED = (lambda v: integer(v) and 0 <= v < 2 ** 32, f"must be an integer from 0 to {2 ** 32 - 1}")
RULES = [  # key, (test, what is allowed)
    ("seed", SEED),
    ("epochs", integer_from(1)),
    ("log_every", integer_from(1)),
    ("converge_loss", (number, "must be a number")),
    ("device", one_of(("auto", "cpu", "cuda"))),
    ("precision", one_of(("auto", "fp32", "bf16"))),
    ("threads", NULL_OR_COUNT),
    ("optim.lr", POSITIVE),
    ("optim.batch_size", integer_from(1)),
    ("eval.samples", integer_from(1)),
    ("eval.epoch_samples", NULL_OR_COUNT),
    ("eval.rollouts", integer_from(0)),
    ("eval.rollout_every", integer_from(1)),
    ("diffusion.train_steps", integer_from(1)),
    ("data.episodes", (lambda v: v is None or integer(v) and v >= 2,  # one for training, one for validation
                       "must be an integer >= 2, or null (data=lerobot: every episode)")),
    ("data.action_norm", one_of(("minmax", "meanstd"))),
    ("data.val_fraction", (lambda v: number(v) and 0 < v < 1, "must be a number in (0, 1)")),
    ("model.head_loading", one_of(("current", "legacy_zeros", "legacy_stale", "legacy_empty"))),  # see model.py
    ("model.stale_fraction", (lambda v: number(v) and 0 <= v <= 1, "must be a number in [0, 1]")),
    ("model.train", one_of(("full", "head", "lora"))),  # see model.trainable
    ("logger.kind", one_of(("wandb", "none"))),
    ("diverge_after", NULL_OR_COUNT),
    ("early_stop.patience", NULL_OR_COUNT),
    ("early_stop.min_delta", (lambda v: number(v) and v >= 0, "must be a number >= 0")),
    ("checkpoint.every", integer_from(0)),
    ("checkpoint.keep", (lambda v: isinstance(v, bool), "must be true or false")),
    ("skip_finished", (lambda v: isinstance(v, bool), "must be true or false")),
]
OPTIONAL = [  # keys that only some options of a group have
    ("data.steps", integer_from(1)),
    ("clipping.max_norm", POSITIVE),
    ("clipping.every_step", (lambda v: isinstance(v, bool), "must be true or false")),
    ("loss_handling.threshold", POSITIVE),
    ("loss_handling.factor", (lambda v: number(v) and 0 < v <= 1, "must be a number in (0, 1]")),
    ("model.lora.r", integer_from(1)),
    ("model.lora.alpha", POSITIVE),
    ("model.lora.dropout", (lambda v: number(v) and 0 <= v < 1, "must be a number in [0, 1)")),
    ("model.lora.lr", POSITIVE),
    ("model.lora.targets", (lambda v: OmegaConf.is_list(v) and len(v) > 0 and set(v) <= {"llm", "vit"},
                            "must be a non-empty list of llm, vit")),
]


def shown(v):
    """A value as it is typed on the command line; a string quoted, so `optim.lr='0.001'` shows it is no number."""
    if isinstance(v, bool) or v is None:
        return {True: "true", False: "false", None: "null"}[v]
    if OmegaConf.is_config(v):
        v = OmegaConf.to_container(v)
    return repr(v) if isinstance(v, str) else str(v)


def check(cfg, key, rule, optional=False):
    test, allowed = rule
    v = OmegaConf.select(cfg, key, default=ABSENT)
    if v is ABSENT:
        if optional:
            return
        raise UsageError(f"{key} is not set: it {allowed}")
    if not test(v):
        raise UsageError(f"{key}={shown(v)}: {allowed}")


def validate(cfg):
    """Raise UsageError for the first key of `cfg` that breaks a rule."""
    job = OmegaConf.to_container(OmegaConf.masked_copy(cfg, [k for k in cfg if k != "hydra"]), resolve=False)
    for key, v in leaves(job).items():
        if key.rsplit(".", 1)[-1] == "_target_" and v not in OWN_TARGETS:
            raise UsageError(f"{key}={shown(v)}: must be one of the project's own classes "
                             f"({', '.join(sorted(t.rsplit('.', 1)[-1] for t in OWN_TARGETS))} in vla_exp)")
    for key, rule in RULES:
        check(cfg, key, rule)
    for key, rule in OPTIONAL:
        check(cfg, key, rule, optional=True)
    steps = cfg.diffusion.train_steps
    check(cfg, "diffusion.inference_steps",
          (lambda v: integer(v) and 1 <= v <= steps, f"must be an integer from 1 to diffusion.train_steps={steps}"))
    if cfg.logger.kind == "wandb":
        check(cfg, "logger.mode", one_of(("offline", "online", "disabled")))
    if cfg.eval.rollouts and cfg.data.task != "metaworld":
        raise UsageError(f"eval.rollouts={cfg.eval.rollouts}: closed-loop rollouts need a simulator, data=metaworld "
                         f"(here data.task={cfg.data.task}); set eval.rollouts=0")
