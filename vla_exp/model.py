"""The TinyVLA policy, built from transformers parts and loaded through transformers' real `from_pretrained` path.

`TinyVLAForCausalLM` is the vision-language backbone (CLIP vision tower -> projector -> GPTNeoX with its usual
vocabulary head `embed_out`). `TinyVLAPolicy` is the same model with `embed_out` replaced by the diffusion action head,
as TinyVLA's `LlavaPythiaForCausalLM` does. Loading a policy from a backbone checkpoint therefore leaves the head's
weights missing, and what the loader does with them is what the `model.head_loading` option studies.
"""
import json
from pathlib import Path

import torch
from omegaconf import OmegaConf
from safetensors import SafetensorError
from torch import nn
from transformers import (AutoTokenizer, ByT5Tokenizer, CLIPVisionConfig, CLIPVisionModel, GPTNeoXConfig,
                          GPTNeoXModel, PretrainedConfig, PreTrainedModel, logging)

from vla_exp import UsageError
from vla_exp.files import cache_entry, cache_path, check_cache_entry
from vla_exp.head import ConditionalUnet1D

logging.set_verbosity_error()  # the loader's report of missing head weights is expected; the init report covers it
logging.disable_progress_bar()


class VLAConfig(PretrainedConfig):
    model_type = "vla_exp_tinyvla"
    sub_configs = {"vision_config": CLIPVisionConfig, "text_config": GPTNeoXConfig}

    def __init__(self, vision_config=None, text_config=None, action_dim=2, state_dim=2, horizon=16,
                 down_dims=(64, 128, 256), step_embed_dim=128, kernel_size=5, n_groups=8, pooling="last", **kwargs):
        if not isinstance(vision_config, PretrainedConfig):
            vision_config = CLIPVisionConfig(**(vision_config or {}))
        if not isinstance(text_config, PretrainedConfig):
            text_config = GPTNeoXConfig(**(text_config or {}))
        self.vision_config, self.text_config = vision_config, text_config
        self.action_dim, self.state_dim, self.horizon = action_dim, state_dim, horizon
        self.down_dims, self.step_embed_dim = list(down_dims), step_embed_dim
        self.kernel_size, self.n_groups, self.pooling = kernel_size, n_groups, pooling
        super().__init__(**kwargs)


class TinyVLAForCausalLM(PreTrainedModel):
    """The VLM backbone: image patches and instruction tokens go through one GPTNeoX."""
    config_class = VLAConfig
    base_model_prefix = "vla"
    LORA_SCOPES = {"llm": "gpt_neox.layers.", "vit": "vision_tower."}  # where model.lora.targets put adapters
    PROJECTOR = "mm_projector"

    def __init__(self, config):
        super().__init__(config)
        self.vision_tower = CLIPVisionModel(config.vision_config)
        self.mm_projector = nn.Linear(config.vision_config.hidden_size, config.text_config.hidden_size)
        self.gpt_neox = GPTNeoXModel(config.text_config)
        self.embed_out = self.make_head(config)
        self.post_init()

    def make_head(self, config):
        return nn.Linear(config.text_config.hidden_size, config.text_config.vocab_size, bias=False)

    @property
    def image_size(self):
        return self.config.vision_config.image_size

    def pixels(self, images):
        """uint8 images (B, 3, H, W) as the vision tower takes them."""
        return images.float() / 127.5 - 1

    def encode(self, images, input_ids, attention_mask):
        """Pooled last hidden state (already after GPTNeoX's final layer norm) of [image tokens, text tokens]."""
        image_tokens = self.mm_projector(self.vision_tower(pixel_values=self.pixels(images)).last_hidden_state)
        return encode_tokens(self.gpt_neox, image_tokens, input_ids, attention_mask, self.config.pooling)


def encode_tokens(lm, image_tokens, input_ids, attention_mask, pooling):
    """The language model `lm` over [image tokens, text tokens], pooled: `mean` over tokens (TinyVLA's), or `last`."""
    embeds = torch.cat([image_tokens, lm.get_input_embeddings()(input_ids)], dim=1)
    mask = torch.cat([attention_mask.new_ones(image_tokens.shape[:2]), attention_mask], dim=1)
    hidden = lm(inputs_embeds=embeds, attention_mask=mask).last_hidden_state
    if pooling == "mean":  # TinyVLA's choice; dilutes a one-word instruction (see README)
        return (hidden * mask[..., None]).sum(1) / mask.sum(1, keepdim=True)
    last = mask.sum(1) - 1  # right padding: the last real token sees the image and the whole instruction
    return hidden[torch.arange(len(hidden)), last]


class DiffusionPolicy:
    """A backbone whose `embed_out` is the diffusion action head, as TinyVLA's LlavaPythiaForCausalLM has it."""

    def make_head(self, config):
        return ConditionalUnet1D(config.action_dim, config.state_dim, config.get_text_config().hidden_size,
                                 config.down_dims, config.step_embed_dim, config.kernel_size, config.n_groups)

    def forward(self, images, input_ids, attention_mask, state, noisy_actions, timesteps):
        """Predicted noise for `noisy_actions` (B, horizon, action_dim)."""
        cond = self.encode(images, input_ids, attention_mask)
        return self.embed_out(noisy_actions, timesteps, cond, state)


class TinyVLAPolicy(DiffusionPolicy, TinyVLAForCausalLM):
    pass


def trainable(policy, cfg, lr):
    """Set what trains (`cfg.train`) and return the optimizer's parameter groups, each with its `base_lr` (the
    schedule scales it per epoch): `full` every weight at `lr`; `head` the head alone (the seed's scripts froze the
    backbone); `lora` TinyVLA's recipe: peft's LoRA adapters on every nn.Linear of the scopes in `cfg.lora.targets`
    (`llm`: the language model's layers, `vit`: the vision tower) at `cfg.lora.lr`, the projector and the head fully
    at `lr`, every other weight frozen. Returns (the policy, under LoRA a peft PeftModel around it; the groups)."""
    if cfg.train == "full":
        return policy, [{"params": [p for p in policy.parameters() if p.requires_grad], "base_lr": lr, "lr": lr}]
    policy.requires_grad_(False)
    groups = [{"params": list(policy.embed_out.parameters()), "base_lr": lr}]
    if cfg.train == "lora":
        from peft import LoraConfig, get_peft_model
        scopes = tuple(policy.LORA_SCOPES[t] for t in cfg.lora.targets)
        targets = [n for n, m in policy.named_modules() if isinstance(m, nn.Linear) and n.startswith(scopes)]
        groups[0]["params"] += list(policy.get_submodule(policy.PROJECTOR).parameters())
        policy = get_peft_model(policy, LoraConfig(r=cfg.lora.r, lora_alpha=cfg.lora.alpha,
                                                   lora_dropout=cfg.lora.dropout, bias="none", target_modules=targets))
        groups.append({"params": [p for n, p in policy.named_parameters() if "lora_" in n], "base_lr": cfg.lora.lr})
    for group in groups:
        group["lr"] = group["base_lr"]
        for p in group["params"]:
            p.requires_grad_(True)
    return policy, groups


# ---------------------------------------------------------------------------------------------------------------
# Checkpoints


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
    # the backbone comes from the checkpoint's config; the head's shape and the pooling from ours (they fit the data)
    head = {k: v for k, v in OmegaConf.to_container(cfg.config, resolve=True).items() if k not in VLAConfig.sub_configs}
    policy_class, weights = TinyVLAPolicy, path
    raw = json.loads((path / "config.json").read_text())
    if raw.get("model_type") == "llava_pythia":
        from vla_exp import llava_pythia
        llava_pythia.check_config(path, raw)
        llava_pythia.check_head(path, raw, head)
        policy_class, weights = llava_pythia.LlavaPythiaPolicy, llava_pythia.adapter_base(path) or path
    torch.manual_seed(seed)  # what the loader draws for the missing head depends on the run's seed
    try:  # ignore_mismatched_sizes: instead of raising with "see the log", list them for check_compatible to name
        policy, info = policy_class.from_pretrained(weights, output_loading_info=True, ignore_mismatched_sizes=True,
                                                    **head)
    except (OSError, ValueError, RuntimeError, SafetensorError) as e:
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
    tokenizer = AutoTokenizer.from_pretrained(path)
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
