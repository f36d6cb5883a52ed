"""The TinyVLA policy, built from transformers parts and loaded through transformers' real `from_pretrained` path.

`TinyVLAForCausalLM` is the vision-language backbone (CLIP vision tower -> projector -> GPTNeoX with its usual
vocabulary head `embed_out`). `TinyVLAPolicy` is the same model with `embed_out` replaced by the diffusion action head,
as TinyVLA's `LlavaPythiaForCausalLM` does. Loading a policy from a backbone checkpoint therefore leaves the head's
weights missing, and what the loader does with them is what the `model.head_loading` option studies.
"""

import torch
from torch import nn
from transformers import CLIPVisionConfig, CLIPVisionModel, GPTNeoXConfig, GPTNeoXModel, PretrainedConfig, PreTrainedModel

from vla_exp.policy.head import ConditionalUnet1D



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
    if pooling == "mean":  # TinyVLA's choice; dilutes a one-word instruction (docs/models.md)
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
