"""Checkpoints: everything a run needs to go on exactly where it stopped, written atomically.

Data order depends only on seed and epoch and the learning rate only on the epoch, so the model, the optimizer, the
RNG states and the position (epoch, batch, step) are all the state there is; the loop's own tallies ride along
(`progress`: the fields of vla_exp.train.LoopState, and the seconds the run had taken).
"""
import random
from pathlib import Path

import numpy as np
import torch

from vla_exp import UsageError
from vla_exp.files import atomic

NAME = "checkpoint.pt"


def save(run_dir, policy, optimizer, gen, progress, metrics_rows, config_hash, wandb_id):
    with atomic(Path(run_dir) / NAME) as tmp:
        torch.save({"policy": policy.state_dict(), "optimizer": optimizer.state_dict(), "progress": progress,
                    "config_hash": config_hash,
                    "rng": {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state(),
                            "noise": gen.get_state()},
                    "metrics_rows": metrics_rows, "wandb_id": wandb_id}, tmp)


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
    try:
        return {**torch.load(path, map_location="cpu", weights_only=False), "path": str(path)}
    except Exception as e:
        raise UsageError(f"resume: {path} is not a readable checkpoint ({type(e).__name__}: {e})") from None


def restore(ckpt, policy, optimizer, gen):
    policy.load_state_dict(ckpt["policy"])
    optimizer.load_state_dict(ckpt["optimizer"])
    rng = ckpt["rng"]
    random.setstate(rng["python"])
    np.random.set_state(rng["numpy"])
    torch.set_rng_state(rng["torch"])
    gen.set_state(rng["noise"])
    return {k: v for k, v in ckpt["progress"].items() if k != "elapsed_s"}
