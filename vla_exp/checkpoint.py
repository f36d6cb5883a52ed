"""Checkpoints: everything a run needs to go on exactly where it stopped, written atomically, read safely.

Data order depends only on seed and epoch and the learning rate only on the epoch, so the model, the optimizer, the
RNG states and the position (epoch, batch, step) are all the state there is; the loop's own tallies ride along
(`progress`: the fields of vla_exp.train.LoopState, and the seconds the run had taken).

A checkpoint holds tensors and plain values only, so it is read with `weights_only=True`: a file that holds anything
else (a pickle that would run code when loaded) is refused before it can. `FORMAT` says which code wrote it; a
checkpoint of another format is refused in one line before any training, never half-read.
"""
import errno
import json
import pickle
import random
from pathlib import Path

import numpy as np
import torch

from vla_exp import UsageError
from vla_exp.files import atomic

NAME = "checkpoint.pt"
FORMAT = 2  # 1: before the format was versioned (pickled numpy RNG state and loop state); raise on any change


def save(run_dir, policy, optimizer, gen, progress, metrics_rows, config_hash, wandb_id):
    state = {"format": FORMAT, "policy": policy.state_dict(), "optimizer": optimizer.state_dict(),
             "progress": json.dumps(progress, default=lambda v: v.item()),  # numpy scalars as plain numbers
             "config_hash": config_hash, "rng": rng_state(gen), "metrics_rows": metrics_rows, "wandb_id": wandb_id}
    write(state, Path(run_dir) / NAME, "checkpoint")


def write(obj, path, what):
    """`torch.save` atomically; a full disk (or quota, or file size limit) is one line naming the folder and the
    space the file needs."""
    try:
        with atomic(path) as tmp, open(tmp, "wb") as f:
            torch.save(obj, f)
    except (OSError, RuntimeError) as e:
        cause = e if isinstance(e, OSError) else e.__context__  # torch's writer wraps the failed write
        if not isinstance(cause, OSError) or cause.errno not in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG):
            raise
        raise UsageError(f"no space left on {Path(path).parent} ({cause.strerror}): the {what} needs about "
                         f"{tensor_bytes(obj) / 2 ** 20:.0f} MB") from None


def tensor_bytes(obj):
    """The bytes of every tensor in a nest of dicts, lists and tuples."""
    if isinstance(obj, torch.Tensor):
        return obj.numel() * obj.element_size()
    if isinstance(obj, dict):
        obj = list(obj.values())
    return sum(map(tensor_bytes, obj)) if isinstance(obj, (list, tuple)) else 0


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


def read(path, what):
    """`torch.load` of a file vla-exp wrote (`what` names it for the user), tensors and plain values only."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
        raise UsageError(f"{path}: refused: this {what} holds objects other than tensors and plain values, which "
                         "loading could run as code (a file of an older vla-exp, or not vla-exp's); delete it") from None
    except Exception as e:
        raise UsageError(f"{path} is not a readable {what} ({type(e).__name__}: {str(e)[:200]})") from None


def load(path):
    ckpt = read(path, "checkpoint")
    version = ckpt.get("format", 1) if isinstance(ckpt, dict) else None
    if version != FORMAT:
        raise UsageError(f"{path}: a checkpoint of format {version}; this version of vla-exp reads format {FORMAT}. "
                         "Delete it (the run then starts afresh) or finish the run with the version that wrote it")
    return {**ckpt, "progress": json.loads(ckpt["progress"]), "path": str(path)}


def restore(ckpt, policy, optimizer, gen):
    policy.load_state_dict(ckpt["policy"])
    optimizer.load_state_dict(ckpt["optimizer"])
    rng = ckpt["rng"]
    random.setstate(rng["python"])
    np.random.set_state(tuple(rng["numpy"]))
    torch.set_rng_state(rng["torch"])
    gen.set_state(rng["noise"])
    return {k: v for k, v in ckpt["progress"].items() if k != "elapsed_s"}
