"""The four differences between the reported original and fixed training scripts, one small piece each.

The config picks them with `_target_` (conf/init, conf/loss_handling, conf/optim, conf/clipping) and holds their
settings (no defaults here: the YAML is their one home); the training loop calls them and never asks which recipe it
runs. A new variant is a class with the call signature of its section, and a YAML file naming it.
"""
import math

import torch
from torch import nn

# ---------------------------------------------------------------------------------------------------------------
# init: (head) -> None, applied to the diffusion head only, after loading


class NoInit:
    """Apply nothing: the head keeps what building and loading left (see model.head_loading)."""

    def __call__(self, head):
        pass


class ReportedXavierInit:
    """The reported fixed script's `proper_weight_init`, exactly: Linear xavier_uniform(gain), bias 0; Conv1d
    kaiming_normal(fan_out, relu, a), bias 0. Nothing else: ConvTranspose1d is not a Conv1d subclass and GroupNorm
    is not touched. On a 1x1 output conv, fan_out is the action dimension, so its weights get std
    ~ sqrt(2 / action_dim): a large output."""

    def __init__(self, gain, a):
        self.gain, self.a = gain, a

    def __call__(self, head):
        for m in head.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight, gain=self.gain)
            elif isinstance(m, nn.Conv1d):
                nn.init.kaiming_normal_(m.weight, a=self.a, mode="fan_out", nonlinearity="relu")
            else:
                continue
            if m.bias is not None:
                nn.init.zeros_(m.bias)


class ReportedXavierMoreInit(ReportedXavierInit):
    """The reported init with the "more layer types" its listing ends on, read as the usual completion: the
    reported rules for Linear and Conv1d, then norm layers (GroupNorm, LayerNorm) reset to weight 1, bias 0 and
    embeddings to normal(0, `embedding_std`). Still no rule for ConvTranspose1d, as in the listing."""

    def __init__(self, gain, a, embedding_std):
        super().__init__(gain, a)
        self.embedding_std = embedding_std

    def __call__(self, head):
        super().__call__(head)
        for m in head.modules():
            if isinstance(m, (nn.GroupNorm, nn.LayerNorm)) and m.weight is not None:
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Embedding):
                nn.init.normal_(m.weight, std=self.embedding_std)


class XavierAllInit:
    """A corrected variant: xavier_uniform(gain) on every Linear, Conv1d and ConvTranspose1d (fan_in and fan_out
    averaged, so the 1x1 output conv stays small), biases 0, norms reset to 1/0."""

    def __init__(self, gain):
        self.gain = gain

    def __call__(self, head):
        for m in head.modules():
            if isinstance(m, (nn.Linear, nn.Conv1d, nn.ConvTranspose1d)):
                nn.init.xavier_uniform_(m.weight, gain=self.gain)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, (nn.GroupNorm, nn.LayerNorm)):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)


class TorchDefaultInit:
    """PyTorch's own defaults (`reset_parameters`) for every head module, as a plain `nn.Module` would start."""

    def __call__(self, head):
        for m in head.modules():
            if hasattr(m, "reset_parameters"):
                m.reset_parameters()


# ---------------------------------------------------------------------------------------------------------------
# loss handling: (loss) -> (the loss to back-propagate, or None to skip the batch; whether it was scaled)


class ScaleDown:
    """The original script: a loss above `threshold` is multiplied by `factor` before backward. NaN is not > 1000,
    so a NaN loss is back-propagated as it is."""

    def __init__(self, threshold, factor):
        self.threshold, self.factor = threshold, factor

    def __call__(self, loss):
        if loss.item() > self.threshold:
            return loss * self.factor, True
        return loss, False


class SkipNonFinite:
    """The fixed script: skip a batch whose loss is NaN or inf; never scale."""

    def __call__(self, loss):
        if not math.isfinite(loss.item()):
            return None, False
        return loss, False


# ---------------------------------------------------------------------------------------------------------------
# optim: (lr, epoch, epochs) -> the epoch's learning rate, a pure function of the epoch (so a resumed run needs no
# scheduler state)


class ConstantLR:
    def __call__(self, lr, epoch, epochs):
        return lr


class CosineLR:
    """torch's CosineAnnealingLR(T_max=epochs, eta_min=eta_min_ratio * lr) stepped once per epoch, in closed form."""

    def __init__(self, eta_min_ratio):
        self.eta_min_ratio = eta_min_ratio

    def __call__(self, lr, epoch, epochs):
        eta_min = self.eta_min_ratio * lr
        return eta_min + (lr - eta_min) * (1 + math.cos(math.pi * epoch / epochs)) / 2


# ---------------------------------------------------------------------------------------------------------------
# clipping: (trainable parameters, logged) -> the gradient norm before clipping (None: not measured)


class NoClip:
    """Measure the norm only. `every_step=False` measures it on logged steps alone (None on the others): reading
    every gradient costs about 5% of a CPU step at model=tiny."""

    def __init__(self, every_step):
        self.every_step = every_step

    def __call__(self, params, logged):
        if not (self.every_step or logged):
            return None
        grads = [p.grad for p in params if p.grad is not None]
        return torch.nn.utils.get_total_norm(grads).item()


class GradNormClip:
    def __init__(self, max_norm):
        self.max_norm = max_norm

    def __call__(self, params, logged):
        return torch.nn.utils.clip_grad_norm_(params, self.max_norm).item()
