"""TinyVLA's own checkpoint format, LLaVA-Pythia, loaded through transformers' `from_pretrained` as it lies on disk.

The facts come from TinyVLA's llava-pythia code (configuration_llava_pythia.py, llava_arch.py, clip_encoder.py,
multimodal_projector/builder.py). `config.json` is a GPTNeoX config with `model_type: "llava_pythia"` and
`vision_config = {"vision_tower": {...}, "mm_projector": {...}}`; a TinyVLA policy also has `action_dim`, `state_dim`
and `chunk_size`. The weights are `gpt_neox.*` (the language model), `gpt_neox.vision_tower.vision_model.*` (CLIP or
SigLIP), `gpt_neox.mm_projector.*` and `embed_out.*`: the vocabulary head of a base VLM (the head the diffusion head
replaces: its weights are left out, never an error) or a trained diffusion head. The modules below are nested and
named as in those files, so the loader maps every key to itself: nothing is renamed by hand.

The image features are `hidden_states[mm_vision_select_layer]` of the tower ("patch" drops CLIP's CLS token,
"cls_patch" keeps it); images are normalised with the folder's `preprocessor_config.json`.
"""
import json
import re
from pathlib import Path

import torch
from huggingface_hub.dataclasses import strict
from safetensors import SafetensorError
from torch import nn
from transformers import (AutoImageProcessor, CLIPVisionConfig, CLIPVisionModel, GPTNeoXConfig, GPTNeoXModel,
                          PreTrainedModel, SiglipVisionConfig, SiglipVisionModel)

from vla_exp import UsageError, one_line
from vla_exp.tensors import read
from vla_exp.policy.model import DiffusionPolicy, encode_tokens

MODEL_TYPE = "llava_pythia"
TOWERS = {"siglip": (SiglipVisionConfig, SiglipVisionModel), "clip": (CLIPVisionConfig, CLIPVisionModel)}
PROJECTORS = "linear, identity or mlp<N>x_gelu"
TOWER_KEYS = ("model_type", "mm_vision_select_layer", "mm_vision_select_feature", "vision_model_name_or_path")


@strict
class LlavaPythiaConfig(GPTNeoXConfig):
    model_type = MODEL_TYPE
    vision_config: dict | None = None
    concat: str | None = None
    # a TinyVLA policy's head (a base VLM has none: then they come from vla-exp's model.config)
    action_head_type: str | None = None
    action_dim: int | None = None
    state_dim: int | None = None
    chunk_size: int | None = None
    # vla-exp's head settings and pooling (from model.config)
    horizon: int | None = None
    down_dims: list | None = None
    step_embed_dim: int | None = None
    kernel_size: int | None = None
    n_groups: int | None = None
    pooling: str = "mean"


def tower_kind(tower):
    """"clip" or "siglip", from the tower's vision_model_name_or_path (as TinyVLA's builder decides), else None."""
    name = str(tower.get("vision_model_name_or_path", "")).lower()
    return next((kind for kind in TOWERS if kind in name), None)


def check_config(path, raw):
    """Raise UsageError, before anything is built, for a config.json this module cannot build a model from."""
    vision = raw.get("vision_config")
    if not isinstance(vision, dict) or not {"vision_tower", "mm_projector"} <= vision.keys():
        raise UsageError(f"model.path={path}: config.json's vision_config must hold vision_tower and mm_projector "
                         "(a LLaVA-Pythia config)")
    tower, proj = vision["vision_tower"], vision["mm_projector"]
    for name, node in (("vision_tower", tower), ("mm_projector", proj)):
        if not isinstance(node, dict):
            raise UsageError(f"model.path={path}: config.json's vision_config.{name} is a {type(node).__name__}, "
                             "not a mapping (a LLaVA-Pythia config)")
    heads, width = raw.get("num_attention_heads"), raw.get("hidden_size")
    if not (isinstance(heads, int) and isinstance(width, int) and heads >= 1 and width % heads == 0):
        raise UsageError(f"model.path={path}: num_attention_heads={heads!r} must be an integer >= 1 that divides "
                         f"hidden_size={width!r}")
    if tower_kind(tower) is None:
        name = tower.get("vision_model_name_or_path")
        raise UsageError(f"model.path={path}: vision_model_name_or_path={name!r} names neither a CLIP nor a SigLIP "
                         "vision tower (the name must contain 'clip' or 'siglip')")
    kind = proj.get("mm_projector_type", "linear")
    if not (kind in ("linear", "identity") or re.fullmatch(r"mlp(\d+)x_gelu", str(kind))):
        raise UsageError(f"model.path={path}: mm_projector_type={kind!r}: must be {PROJECTORS}")
    if missing := [k for k in ("mm_hidden_size", "hidden_size") if not isinstance(proj.get(k), int) or proj[k] < 1]:
        raise UsageError(f"model.path={path}: vision_config.mm_projector.{missing[0]} must be an integer >= 1 "
                         f"(here {proj.get(missing[0])!r})")
    layers, select = tower.get("num_hidden_layers"), tower.get("mm_vision_select_layer", -2)
    if isinstance(layers, int) and not (isinstance(select, int) and -(layers + 1) <= select <= layers):
        raise UsageError(f"model.path={path}: mm_vision_select_layer={select!r}: the tower has {layers} layers, so "
                         f"it must be an integer from {-(layers + 1)} to {layers}")


def projector(config):
    """TinyVLA's mm_projector: Linear, Identity, or Linear (GELU Linear) x N-1 (keys .0, .2, ...)."""
    p = config.vision_config["mm_projector"]
    kind, d_in, d_out = p.get("mm_projector_type", "linear"), p["mm_hidden_size"], p["hidden_size"]
    if kind == "identity":
        return nn.Identity()
    if kind == "linear":
        return nn.Linear(d_in, d_out)
    layers = [nn.Linear(d_in, d_out)]
    for _ in range(int(re.fullmatch(r"mlp(\d+)x_gelu", kind)[1]) - 1):
        layers += [nn.GELU(), nn.Linear(d_out, d_out)]
    return nn.Sequential(*layers)


class VisionTower(nn.Module):
    """TinyVLA's CLIPVisionTower: the vision model held as `vision_model`."""

    def __init__(self, config):
        super().__init__()
        tower = config.vision_config["vision_tower"]
        config_class, model_class = TOWERS[tower_kind(tower)]
        self.vision_model = model_class(config_class(**{k: v for k, v in tower.items() if k not in TOWER_KEYS}))


class LlavaPythiaModel(GPTNeoXModel):
    """The file's `gpt_neox`: the GPTNeoX language model with the vision tower and the projector inside it."""

    def __init__(self, config):
        super().__init__(config)
        self.vision_tower = VisionTower(config)
        self.mm_projector = projector(config)


class LlavaPythiaForCausalLM(PreTrainedModel):
    """A LLaVA-Pythia VLM: image features -> projector -> GPTNeoX, with its vocabulary head `embed_out`."""
    config_class = LlavaPythiaConfig
    base_model_prefix = "gpt_neox"
    LORA_SCOPES = {"llm": "gpt_neox.layers.", "vit": "gpt_neox.vision_tower."}
    PROJECTOR = "gpt_neox.mm_projector"

    def __init__(self, config):
        super().__init__(config)
        self.gpt_neox = LlavaPythiaModel(config)
        self.embed_out = self.make_head(config)
        self.register_buffer("pixel_mean", torch.full((1, 3, 1, 1), 0.5), persistent=False)  # set from the folder's
        self.register_buffer("pixel_std", torch.full((1, 3, 1, 1), 0.5), persistent=False)   # preprocessor config
        self.post_init()

    def make_head(self, config):
        return nn.Linear(config.hidden_size, config.vocab_size, bias=False)

    @property
    def tower(self):
        return self.config.vision_config["vision_tower"]

    @property
    def image_size(self):
        return self.tower["image_size"]

    def pixels(self, images):
        return (images.float() / 255 - self.pixel_mean) / self.pixel_std

    def encode(self, images, input_ids, attention_mask):
        out = self.gpt_neox.vision_tower.vision_model(pixel_values=self.pixels(images), output_hidden_states=True)
        features = out.hidden_states[self.tower.get("mm_vision_select_layer", -2)]
        if tower_kind(self.tower) == "clip" and self.tower.get("mm_vision_select_feature", "patch") == "patch":
            features = features[:, 1:]  # SigLIP has no CLS token
        return encode_tokens(self.gpt_neox, self.gpt_neox.mm_projector(features), input_ids, attention_mask,
                             self.config.pooling)


class LlavaPythiaPolicy(DiffusionPolicy, LlavaPythiaForCausalLM):
    pass


def set_preprocessing(policy, path):
    """The image mean and std of the folder's preprocessor_config.json (CLIP's or SigLIP's), where it has one."""
    if (Path(path) / "preprocessor_config.json").is_file():
        processor = AutoImageProcessor.from_pretrained(path)
        policy.pixel_mean.copy_(torch.tensor(processor.image_mean).view(1, 3, 1, 1))
        policy.pixel_std.copy_(torch.tensor(processor.image_std).view(1, 3, 1, 1))


def check_head(path, raw, head):
    """A TinyVLA policy's trained head must fit the head vla-exp builds for the data: the same dims."""
    for theirs, ours in (("action_dim", "action_dim"), ("state_dim", "state_dim"), ("chunk_size", "horizon")):
        if raw.get(theirs) is not None and raw[theirs] != head[ours]:
            raise UsageError(f"model.path={path}: its trained head has {theirs}={raw[theirs]}, the data and "
                             f"model.config give {ours}={head[ours]}")


TOWER_NAMES = {"clip": "openai/clip-vit-base-patch16", "siglip": "google/siglip-base-patch16-224"}


def write_random_folder(path, text, vision, projector_type="mlp2x_gelu", select_feature="patch", seed=0,
                        tower="clip"):
    """Write a random-weight LLaVA-Pythia base VLM into `path` in TinyVLA's layout, from transformers' own classes
    (GPTNeoXForCausalLM, CLIPVisionModel or SiglipVisionModel) and TinyVLA's key names: config.json,
    model.safetensors, a GPT-NeoX fast tokenizer (tokenizer.json) and the tower's preprocessor_config.json. For tests
    and the benchmark: no weights can be downloaded here. `text` and `vision` are GPTNeoXConfig and vision config
    fields."""
    from safetensors.torch import save_file
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import CLIPImageProcessor, GPTNeoXForCausalLM, PreTrainedTokenizerFast, SiglipImageProcessor

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    lm = GPTNeoXForCausalLM(GPTNeoXConfig(**text))
    config_class, model_class = TOWERS[tower]
    vision_config = config_class(**vision)
    vision_model = model_class(vision_config)
    config = {"vision_tower": {**vision_config.to_dict(), "model_type": f"llava_pythia_{tower}_vision_model",
                               "mm_vision_select_layer": -2, "mm_vision_select_feature": select_feature,
                               "vision_model_name_or_path": TOWER_NAMES[tower]},
              "mm_projector": {"mm_projector_type": projector_type, "mm_hidden_size": vision_config.hidden_size,
                               "hidden_size": lm.config.hidden_size}}
    proj = projector(LlavaPythiaConfig(**text, vision_config=config))
    weights = {**{k.replace("lm_head.", "embed_out."): v for k, v in lm.state_dict().items()},  # TinyVLA's name
               **{f"gpt_neox.vision_tower.vision_model.{k}": v for k, v in vision_model.state_dict().items()},
               **{f"gpt_neox.mm_projector.{k}": v for k, v in proj.state_dict().items()}}
    save_file({k: v.contiguous() for k, v in weights.items()}, path / "model.safetensors", metadata={"format": "pt"})
    (path / "config.json").write_text(json.dumps({
        **lm.config.to_dict(), "model_type": MODEL_TYPE, "architectures": ["LlavaPythiaForCausalLM"],
        "vision_config": config, "concat": "None"}, indent=2))
    bpe = Tokenizer(models.BPE(unk_token="<|endoftext|>"))
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    bpe.train_from_iterator(["push the block to the left", "pick up the red green blue cube"], trainers.BpeTrainer(
        vocab_size=min(text.get("vocab_size", 300), 300), special_tokens=["<|endoftext|>", "<|padding|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    PreTrainedTokenizerFast(tokenizer_object=bpe, bos_token="<|endoftext|>", eos_token="<|endoftext|>",
                            unk_token="<|endoftext|>").save_pretrained(path)
    size = vision_config.image_size
    processor = CLIPImageProcessor(size={"shortest_edge": size}, crop_size={"height": size, "width": size}) \
        if tower == "clip" else SiglipImageProcessor(size={"height": size, "width": size})
    processor.save_pretrained(path)
    return path


LORA_TRAINABLES = "non_lora_trainables.bin"
PEFT_PREFIX = "base_model.model."


def save_policy(policy, tokenizer, source, folder):
    """Write a trained policy, its tokenizer and the image preprocessing of the folder it was loaded from (`source`)
    into `folder` in TinyVLA's layout, and return the policy as a plain model (LoRA merged).
    Under LoRA (`policy` a peft PeftModel): config.json with the head's fields, peft's adapter_config.json and
    adapter weights, and non_lora_trainables.bin (the other trained weights, keys prefixed `base_model.model.`, as
    TinyVLA saves them); the base weights stay in the base folder the adapter config names. Otherwise config.json
    and the full weights (save_pretrained)."""
    from peft import PeftModel
    folder = Path(folder)
    lora = isinstance(policy, PeftModel)
    model = policy.get_base_model() if lora else policy
    model.config.action_head_type, model.config.chunk_size = "droid_diffusion", model.config.horizon
    tokenizer.save_pretrained(folder)
    if (Path(source) / "preprocessor_config.json").is_file():
        AutoImageProcessor.from_pretrained(source).save_pretrained(folder)
    if not lora:
        model.save_pretrained(folder)
        return model
    policy.save_pretrained(folder)
    torch.save({n: p.detach().cpu() for n, p in policy.named_parameters() if p.requires_grad and "lora_" not in n},
               folder / LORA_TRAINABLES)
    model = policy.merge_and_unload()
    model.config.save_pretrained(folder)
    return model


def adapter_base(path):
    """The base folder of a LoRA policy folder (peft's adapter_config.json names it), or None for a full one."""
    config = Path(path) / "adapter_config.json"
    if not config.is_file():
        return None
    try:
        base = json.loads(config.read_text())["base_model_name_or_path"]
    except (ValueError, KeyError, TypeError):
        base = None
    if not isinstance(base, str) or not base:
        raise UsageError(f"model.path={path}: adapter_config.json names no base model (base_model_name_or_path, the "
                         "folder of the base weights the adapters were trained on)")
    base = Path(base)
    if not (base / "config.json").is_file():
        raise UsageError(f"model.path={path}: its LoRA adapters were trained on the base model in {base}, which is "
                         "not there (the adapter folder holds no base weights, as in TinyVLA)")
    return base


def apply_adapters(policy, path):
    """As TinyVLA's loader: the base policy, then non_lora_trainables.bin over it, then the adapters, merged.
    Returns (the policy, the names non_lora_trainables.bin set)."""
    from peft import PeftModel

    trained = {k.removeprefix(PEFT_PREFIX): v for k, v in read(Path(path) / LORA_TRAINABLES, "LoRA trainables").items()}
    unknown = policy.load_state_dict(trained, strict=False).unexpected_keys
    if unknown:
        raise UsageError(f"model.path={path}: {LORA_TRAINABLES} holds weights the model has not (first: {unknown[0]})")
    if not (Path(path) / "adapter_model.safetensors").is_file() and not (Path(path) / "adapter_model.bin").is_file():
        raise UsageError(f"model.path={path}: adapter_config.json but no adapter_model.safetensors (peft's adapter "
                         "weights)")
    try:
        return PeftModel.from_pretrained(policy, path).merge_and_unload(), set(trained)
    except (RuntimeError, ValueError, OSError, SafetensorError) as e:
        raise UsageError(f"model.path={path}: its LoRA adapters do not load onto the base "
                         f"({type(e).__name__}: {one_line(e)})") from None
