"""Checkpoints: everything a run needs to go on exactly where it stopped, written atomically, read safely.

Data order depends only on seed and epoch and the learning rate only on the epoch, so the model, the optimizer, the
RNG states and the position (epoch, batch, step) are all the state there is; the loop's own tallies ride along
(`progress`: the fields of vla_exp.training.loop.LoopState, and the seconds the run had taken).

A checkpoint holds tensors and plain values only (vla_exp.tensors reads it with `weights_only=True`). `FORMAT`
says which code wrote it; a checkpoint of another format is refused in one line before any training, never half-read.
"""
import json
import random
from pathlib import Path

import numpy as np
import torch

from vla_exp import UsageError, tensors
from vla_exp.runs import CHECKPOINT

NAME = CHECKPOINT
FORMAT = 2  # 1: before the format was versioned (pickled numpy RNG state and loop state); raise on any change


def save(run_dir, policy, optimizer, gen, progress, metrics_rows, config_hash, wandb_id):
    state = {"format": FORMAT, "policy": policy.state_dict(), "optimizer": optimizer.state_dict(),
             "progress": json.dumps(progress, default=lambda v: v.item()),  # numpy scalars as plain numbers
             "config_hash": config_hash, "rng": rng_state(gen), "metrics_rows": metrics_rows, "wandb_id": wandb_id}
    tensors.write(state, Path(run_dir) / NAME, "checkpoint")


def rng_state(gen):
    """Every RNG the run draws from, as tensors and plain values."""
    name, key, pos, has_gauss, gauss = np.random.get_state()
    return {"python": random.getstate(), "numpy": (name, key.tolist(), pos, has_gauss, gauss),
            "torch": torch.get_rng_state(), "noise": gen.get_state()}


def find(run_dir, resume):
    """The checkpoint to go on from: `resume` (a checkpoint file or a run folder) if given, else this run folder's."""
    if resume:
        path = Path(resume)
        path = path / NAME if path.is_dir() else path
        if not path.is_file():
            raise UsageError(f"resume={resume}: no checkpoint there (expected a run folder holding {NAME}, or the file)")
        return path
    path = Path(run_dir) / NAME
    return path if path.is_file() else None


def find_and_load(run_dir, resume, config_hash):
    """The checkpoint a run of this config goes on from, or None. One in the run folder written by another config
    is left alone (the run starts afresh); an explicit `resume` of another config is refused."""
    ckpt = load(path) if (path := find(run_dir, resume)) else None
    if ckpt and ckpt["config_hash"] != config_hash:
        if resume:
            raise UsageError(f"resume={resume}: that checkpoint was written by another config; resume needs the "
                             "same one")
        print(f"{path}: written by another config; this run starts afresh")
        return None
    return ckpt


def load(path):
    ckpt = tensors.read(path, "checkpoint")
    version = ckpt.get("format", 1) if isinstance(ckpt, dict) else None
    if version != FORMAT:
        raise UsageError(f"{path}: a checkpoint of format {version}; this version of vla-exp reads format {FORMAT}. "
                         "Delete it (the run then starts afresh) or finish the run with the version that wrote it")
    try:
        progress = json.loads(ckpt["progress"])
    except (KeyError, TypeError, ValueError):
        raise UsageError(f"{path}: its progress record is not readable JSON: delete it (the run then starts afresh)"
                         ) from None
    return {**ckpt, "progress": progress, "path": str(path)}


def restore(ckpt, policy, optimizer, gen):
    own = policy.state_dict()
    if odd := next((k for k, v in ckpt["policy"].items() if k in own and tuple(v.shape) != tuple(own[k].shape)), None):
        raise UsageError(f"{ckpt['path']}: {odd} is {tuple(ckpt['policy'][odd].shape)} there, "
                         f"{tuple(own[odd].shape)} in this run's model: delete it (the run then starts afresh)")
    policy.load_state_dict(ckpt["policy"])
    optimizer.load_state_dict(ckpt["optimizer"])
    rng = ckpt["rng"]
    random.setstate(rng["python"])
    np.random.set_state(tuple(rng["numpy"]))
    torch.set_rng_state(rng["torch"])
    gen.set_state(rng["noise"])
    return {k: v for k, v in ckpt["progress"].items() if k != "elapsed_s"}
