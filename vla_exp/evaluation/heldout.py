"""Figures about the model itself: the init report and the held-out action error beside trivial baselines."""
import math
from collections import defaultdict

import numpy as np
import torch
from torch.utils.data import DataLoader, Subset

from vla_exp.data.chunks import sample_errors
from vla_exp.policy.diffusion import noise_prediction, sample_actions

HEALTHY_OUTPUT_STD = (0.1, 1.5)
HEALTHY_FIRST_LOSS = 2.0


def weight_stats(module):
    """Per module type: tensors, parameters, mean weight std, largest |w|, non-finite values, all-zero tensors."""
    stats = defaultdict(lambda: {"tensors": 0, "params": 0, "stds": [], "max_abs": 0.0, "nonfinite": 0, "all_zero": 0})
    for m in module.modules():
        for p in m.parameters(recurse=False):
            s = stats[type(m).__name__]
            w = p.detach()
            finite = w[torch.isfinite(w)]
            s["tensors"] += 1
            s["params"] += w.numel()
            s["stds"].append(finite.std().item() if finite.numel() > 1 else 0.0)
            s["max_abs"] = max(s["max_abs"], finite.abs().max().item() if finite.numel() else 0.0)
            s["nonfinite"] += w.numel() - finite.numel()
            s["all_zero"] += int(not w.any())
    return {k: {**{n: v for n, v in s.items() if n != "stds"}, "mean_std": float(np.mean(s["stds"]))}
            for k, s in stats.items()}


@torch.no_grad()
def init_report(policy, scheduler, batch, tokenizer, seed):
    """Before the first update: head output std, first loss, weight statistics and warnings."""
    loss, pred = noise_prediction(policy, scheduler, batch, tokenizer, torch.Generator().manual_seed(seed))
    stats = weight_stats(policy.embed_out)
    report = {"initial_output_std": pred.std().item(), "initial_loss": loss.item(), "head_weights": stats,
              "nonfinite_params": sum(s["nonfinite"] for s in stats.values()),
              "all_zero_tensors": sum(s["all_zero"] for s in stats.values())}
    warnings = []
    std, lo, hi = report["initial_output_std"], *HEALTHY_OUTPUT_STD
    if not (lo / 2 <= std <= hi * 2):  # "far from" the healthy range: more than a factor 2 outside it
        warnings.append(f"head output std {std:.3g} is far from the healthy {lo}-{hi}")
    if not report["initial_loss"] <= 2 * HEALTHY_FIRST_LOSS:
        warnings.append(f"first loss {report['initial_loss']:.4g} is far above {HEALTHY_FIRST_LOSS}")
    if report["nonfinite_params"]:
        warnings.append(f"{report['nonfinite_params']} head weights are NaN or inf")
    report["warnings"] = warnings
    return report


@torch.no_grad()
def held_out_metrics(policy, train_scheduler, ddim, dataset, indices, tokenizer, steps, mean_chunk, batch_size=64):
    """Open loop, on held-out samples `indices`: loss and output std, and the mean squared error of DDIM-sampled
    action chunks beside each baseline's, on the min-max normalised scale whatever the actions train in
    (Normalizer.reference). The same noise every call, so epochs and runs compare."""
    ref = dataset.norm.reference
    policy.eval()
    gen = torch.Generator().manual_seed(1)
    losses, stds, sq, targets = [], [], [], []
    for batch in DataLoader(Subset(dataset, indices), batch_size):
        loss, pred = noise_prediction(policy, train_scheduler, batch, tokenizer, gen)
        losses.append(loss.item())
        stds.append(pred.std().item())
        sampled = sample_actions(policy, ddim, batch, tokenizer, steps, gen)
        sq.append(sample_errors(ref(sampled), ref(batch["actions"]), batch.get("pad")))
        targets.append(ref(batch["actions"].numpy()))
    policy.train()
    targets, pads = np.concatenate(targets), dataset.pads(indices)
    err = torch.cat(sq).mean().item()
    return {"val_loss": float(np.mean(losses)), "val_output_std": float(np.mean(stds)),
            "val_action_error": err if math.isfinite(err) else float("nan"),
            "baseline_action_errors": {name: float(sample_errors(ref(pred), targets, pads).mean())
                                       for name, pred in dataset.baselines(indices, mean_chunk).items()}}
