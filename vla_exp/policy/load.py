"""Loading a policy: the backbone from a local folder (or one written once into the cache for an embedded model),
the head set as `model.head_loading` says, LLaVA-Pythia folders and their LoRA adapters applied.

The loader's report of missing head weights is expected (the backbone has no diffusion head); the run's init
report covers it, so transformers' own warning is silenced.
"""
import json
import pickle
from pathlib import Path

import torch
from omegaconf import OmegaConf
from safetensors import SafetensorError
from torch import nn
from transformers import AutoTokenizer, ByT5Tokenizer, logging

from vla_exp import UsageError, one_line
from vla_exp.files import cache_entry, cache_path, check_cache_entry
from vla_exp.policy import llava_pythia
from vla_exp.policy.model import TinyVLAForCausalLM, TinyVLAPolicy, VLAConfig

logging.set_verbosity_error()
logging.disable_progress_bar()

def write_backbone(model_cfg, path, seed=0):
    """Build a randomly initialised backbone (seeded) and save it with its byte-level tokenizer, atomically."""
    torch.manual_seed(seed)
    backbone = TinyVLAForCausalLM(VLAConfig(**model_cfg))
    with cache_entry(path, "backbone") as tmp:
        backbone.save_pretrained(tmp)
        ByT5Tokenizer().save_pretrained(tmp)
    return Path(path)


def backbone_path(cfg, cache_dir):
    """The checkpoint to load: `cfg.path`, or for an embedded model one written once into the cache."""
    if OmegaConf.is_missing(cfg, "path"):
        raise UsageError(f"model={cfg.name} loads its weights from a local checkpoint: set model.path=<folder written "
                         f"by save_pretrained>")
    if cfg.path is not None:
        path = Path(cfg.path).expanduser()
        if not path.is_dir():
            raise UsageError(f"model.path={path}: {'not a folder' if path.exists() else 'no such folder'}")
        if not (path / "config.json").is_file():
            raise UsageError(f"model.path={path}: no checkpoint there (expected config.json and weights "
                             f"written by save_pretrained)")
        # before building anything: a config.json of another model type builds VLAConfig's defaults, a 20B GPTNeoX
        try:
            model_type = json.loads((path / "config.json").read_text()).get("model_type")
        except (ValueError, AttributeError) as e:
            raise UsageError(f"model.path={path}: config.json is not a JSON object ({e})") from None
        if model_type not in (VLAConfig.model_type, "llava_pythia"):
            raise UsageError(f"model.path={path}: config.json is a {model_type!r} checkpoint, neither vla-exp's "
                             f"TinyVLA ({VLAConfig.model_type!r}) nor TinyVLA's LLaVA-Pythia ('llava_pythia')")
        return path
    arch = OmegaConf.to_container(cfg.config, resolve=True)
    path = cache_path(cache_dir, "backbones", cfg.name, arch)
    if not path.is_dir():
        write_backbone(arch, path)
    check_cache_entry(path, "backbone")
    return path


def load_policy(cfg, cache_dir, seed):
    """Load the policy from the backbone checkpoint; the head is missing there and is set as `cfg.head_loading` says.

    Returns (policy, tokenizer, names of the head parameters the checkpoint did not hold).
    """
    path = backbone_path(cfg, cache_dir)
    try:  # before the model is built: a folder without its tokenizer would be found only after
        tokenizer = AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError, TypeError) as e:
        raise UsageError(f"model.path={path}: no tokenizer loads from it (tokenizer.json and tokenizer_config.json, "
                         f"as save_pretrained writes them; {type(e).__name__}: {one_line(e, 160)})"
                         ) from None
    # the backbone comes from the checkpoint's config; the head's shape and the pooling from ours (they fit the data)
    head = {k: v for k, v in OmegaConf.to_container(cfg.config, resolve=True).items() if k not in VLAConfig.sub_configs}
    policy_class, weights = TinyVLAPolicy, path
    raw = json.loads((path / "config.json").read_text())
    if raw.get("model_type") == "llava_pythia":
        llava_pythia.check_config(path, raw)
        llava_pythia.check_head(path, raw, head)
        policy_class, weights = llava_pythia.LlavaPythiaPolicy, llava_pythia.adapter_base(path) or path
    torch.manual_seed(seed)  # what the loader draws for the missing head depends on the run's seed
    try:  # ignore_mismatched_sizes: instead of raising with "see the log", list them for check_compatible to name
        policy, info = policy_class.from_pretrained(weights, output_loading_info=True, ignore_mismatched_sizes=True,
                                                    **head)
    except (OSError, ValueError, RuntimeError, SafetensorError, pickle.UnpicklingError) as e:
        if isinstance(e, pickle.UnpicklingError) or "Weights only load failed" in str(e):  # torch's advice is unsafe
            raise UsageError(f"model.path={path}: refused: {Path(weights) / 'pytorch_model.bin'} holds objects other "
                             "than tensors, which loading could run as code; save the weights as model.safetensors "
                             "where you trust their source") from None
        raise UsageError(f"model.path={path}: cannot load a TinyVLA backbone from it ({' '.join(str(e).split())})"
                         ) from None
    check_compatible(weights, policy, info, cfg)
    missing = info["missing_keys"]
    if policy_class is not TinyVLAPolicy:
        llava_pythia.set_preprocessing(policy, weights)
        if weights != path:  # a LoRA policy: its trained weights and adapters over the base
            policy, trained = llava_pythia.apply_adapters(policy, path)
            missing = [k for k in missing if k not in trained]
    if cfg.head_loading != "current":
        legacy_head_loading(policy, missing, cfg.head_loading.removeprefix("legacy_"), seed, cfg.stale_fraction)
    if tokenizer.pad_token is None:  # GPT-NeoX's tokenizer has none; padded positions are masked out anyway
        tokenizer.pad_token = tokenizer.eos_token
    return policy, tokenizer, sorted(missing)


def check_compatible(path, policy, info, cfg):
    """Raise UsageError if the checkpoint's weights do not fit its config, or its images are not the size that
    model.config (and so the data check) expects. Only the head may be missing: it is not in a backbone."""
    if info["mismatched_keys"]:
        key, theirs, ours = sorted(info["mismatched_keys"])[0]
        raise UsageError(f"model.path={path}: weights do not fit its config.json: {key} is {tuple(theirs)} there, "
                         f"{tuple(ours)} in the model ({len(info['mismatched_keys'])} tensors differ)")
    if lacking := sorted(k for k in info["missing_keys"] if not k.startswith("embed_out.")):
        raise UsageError(f"model.path={path}: {len(lacking)} backbone weights missing from the checkpoint "
                         f"(first: {lacking[0]})")
    size, ours = policy.image_size, OmegaConf.select(cfg, "config.vision_config.image_size")
    if ours is not None and size != ours:
        raise UsageError(f"model.path={path}: the checkpoint takes {size}x{size} images, "
                         f"model.config.vision_config.image_size={ours}")


def legacy_head_loading(model, missing_keys, memory, seed, stale_fraction=0.2):
    """Redo what transformers < 4.54 did to weights missing from a checkpoint (issues #28298, #35437).

    The model was built under `no_init_weights`, so every parameter started as `torch.empty`. Then only modules
    that GPTNeoX's `_init_weights` knows were initialised: Linear and Embedding normal(0, initializer_range), biases 0,
    LayerNorm 1/0. Conv1d, ConvTranspose1d and GroupNorm kept raw memory, here:
      zeros: what a fresh process returns (measured with transformers 4.37.1: output 0, a dead head);
      stale: a seeded model of recycled memory: `stale_fraction` of the elements hold arbitrary float32 bit patterns
             (magnitudes up to ~3e38, about 1 in 256 of them inf or NaN), the rest zero;
      empty: the real `torch.empty`, whatever the allocator hands back (not reproducible).
    """
    std = model.config.get_text_config().initializer_range
    gen = torch.Generator().manual_seed(seed)
    missing = set(missing_keys)
    with torch.no_grad():
        for prefix, module in model.named_modules():
            own = {n: p for n, p in module.named_parameters(recurse=False) if f"{prefix}.{n}".lstrip(".") in missing}
            if not own:
                continue
            if isinstance(module, (nn.Linear, nn.Embedding)):
                module.weight.normal_(0.0, std)
                if getattr(module, "bias", None) is not None:
                    module.bias.zero_()
            elif isinstance(module, nn.LayerNorm):
                module.weight.fill_(1.0)
                module.bias.zero_()
            else:
                for p in own.values():
                    p.copy_(raw_memory(p.shape, memory, gen, stale_fraction))


def raw_memory(shape, memory, gen, stale_fraction):
    if memory == "zeros":
        return torch.zeros(shape)
    if memory == "empty":
        return torch.empty(shape)
    bits = torch.randint(-2 ** 31, 2 ** 31 - 1, shape, generator=gen, dtype=torch.int64).to(torch.int32)
    keep = torch.rand(shape, generator=gen) < stale_fraction
    return torch.where(keep, bits.view(torch.float32), torch.zeros(()))
