"""The diffusion action head: TinyVLA's conditional 1-D UNet (policy_heads/models/droid_unet_diffusion.py).

It predicts the noise added to an action chunk, conditioned on the pooled language-model hidden state, the robot
state and the diffusion timestep. TinyVLA installs it as the language model's `embed_out`. The modules are nested
and named as TinyVLA's, so a TinyVLA policy's `embed_out.*` weights load as they are, with `strict=True`.
"""
import math
import re

import torch
from torch import nn


class SinusoidalPosEmb(nn.Module):
    def __init__(self, dim):
        super().__init__()
        self.dim = dim

    def forward(self, t):
        half = self.dim // 2
        freqs = torch.exp(torch.arange(half, device=t.device) * -(math.log(10000) / (half - 1)))
        args = t.float()[:, None] * freqs[None]
        return torch.cat([args.sin(), args.cos()], dim=-1)


class Conv1dBlock(nn.Module):
    def __init__(self, c_in, c_out, kernel_size, n_groups):
        super().__init__()
        self.block = nn.Sequential(nn.Conv1d(c_in, c_out, kernel_size, padding=kernel_size // 2),
                                   nn.GroupNorm(n_groups, c_out), nn.Mish())

    def forward(self, x):
        return self.block(x)


class Resample1d(nn.Module):
    """TinyVLA's Downsample1d / Upsample1d: one strided or transposed convolution, held as `conv`."""
    def __init__(self, conv):
        super().__init__()
        self.conv = conv

    def forward(self, x):
        return self.conv(x)


# the keys of heads vla-exp saved before its modules were nested as TinyVLA's -> TinyVLA's keys
OLD_KEYS = [(re.compile(r"^(.*blocks\.\d+\.)(\d+\.(?:weight|bias))$"), r"\1block.\2"),
            (re.compile(r"^(.*final_conv\.0\.)(\d+\.(?:weight|bias))$"), r"\1block.\2"),
            (re.compile(r"^(.*(?:down|up)_modules\.\d+\.2\.)(weight|bias)$"), r"\1conv.\2")]


def rename_old_keys(state_dict, prefix, *args):
    """A load_state_dict pre-hook: a head saved with the old keys (policy.pt of earlier runs) loads as it was."""
    for key in [k for k in state_dict if k.startswith(prefix)]:
        new = prefix + next((p.sub(r, key[len(prefix):]) for p, r in OLD_KEYS if p.match(key[len(prefix):])),
                            key[len(prefix):])
        if new != key:
            state_dict[new] = state_dict.pop(key)


class ConditionalResidualBlock1D(nn.Module):
    """Two conv blocks; the condition sets a per-channel scale and bias (FiLM) between them."""

    def __init__(self, c_in, c_out, cond_dim, kernel_size, n_groups):
        super().__init__()
        self.blocks = nn.ModuleList([Conv1dBlock(c_in, c_out, kernel_size, n_groups),
                                     Conv1dBlock(c_out, c_out, kernel_size, n_groups)])
        self.out_channels = c_out
        self.cond_encoder = nn.Sequential(nn.Mish(), nn.Linear(cond_dim, 2 * c_out))
        self.residual_conv = nn.Conv1d(c_in, c_out, 1) if c_in != c_out else nn.Identity()

    def forward(self, x, cond):
        out = self.blocks[0](x)
        scale, bias = self.cond_encoder(cond).unflatten(-1, (2, self.out_channels, 1)).unbind(1)
        out = self.blocks[1](scale * out + bias)
        return out + self.residual_conv(x)


class ConditionalUnet1D(nn.Module):
    def __init__(self, action_dim, state_dim, global_cond_dim, down_dims=(256, 512, 1024), step_embed_dim=256,
                 kernel_size=5, n_groups=8):
        super().__init__()
        # TinyVLA: LM hidden states -> LayerNorm -> concat robot state -> Linear
        self.norm_after_pool = nn.LayerNorm(global_cond_dim)
        self.combine = nn.Linear(global_cond_dim + state_dim, global_cond_dim)
        self.diffusion_step_encoder = nn.Sequential(
            SinusoidalPosEmb(step_embed_dim), nn.Linear(step_embed_dim, 4 * step_embed_dim), nn.Mish(),
            nn.Linear(4 * step_embed_dim, step_embed_dim))
        cond_dim = step_embed_dim + global_cond_dim
        dims = [action_dim, *down_dims]
        pairs = list(zip(dims[:-1], dims[1:]))
        block = lambda c_in, c_out: ConditionalResidualBlock1D(c_in, c_out, cond_dim, kernel_size, n_groups)

        self.down_modules = nn.ModuleList()
        for i, (c_in, c_out) in enumerate(pairs):
            last = i == len(pairs) - 1
            self.down_modules.append(nn.ModuleList([
                block(c_in, c_out), block(c_out, c_out),
                Resample1d(nn.Conv1d(c_out, c_out, 3, 2, 1)) if not last else nn.Identity()]))
        self.mid_modules = nn.ModuleList([block(down_dims[-1], down_dims[-1]), block(down_dims[-1], down_dims[-1])])
        self.up_modules = nn.ModuleList()
        for c_in, c_out in reversed(pairs[1:]):  # the first level's skip is unused, as in TinyVLA
            self.up_modules.append(nn.ModuleList([
                block(2 * c_out, c_in), block(c_in, c_in), Resample1d(nn.ConvTranspose1d(c_in, c_in, 4, 2, 1))]))
        self.final_conv = nn.Sequential(Conv1dBlock(down_dims[0], down_dims[0], kernel_size, n_groups),
                                        nn.Conv1d(down_dims[0], action_dim, 1))
        self._register_load_state_dict_pre_hook(rename_old_keys)

    def forward(self, sample, timestep, global_cond, state):
        """sample: (B, horizon, action_dim) noisy actions -> predicted noise of the same shape."""
        cond = self.combine(torch.cat([self.norm_after_pool(global_cond), state], dim=-1))
        cond = torch.cat([self.diffusion_step_encoder(timestep), cond], dim=-1)
        x = sample.transpose(1, 2)
        skips = []
        for res1, res2, down in self.down_modules:
            x = res2(res1(x, cond), cond)
            skips.append(x)
            x = down(x)
        for mid in self.mid_modules:
            x = mid(x, cond)
        for res1, res2, up in self.up_modules:
            x = res2(res1(torch.cat([x, skips.pop()], dim=1), cond), cond)
            x = up(x)
        return self.final_conv(x).transpose(1, 2)
