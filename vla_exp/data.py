"""Episodes from a folder of ACT/TinyVLA-style HDF5 files, split by episode, normalised with training statistics."""
from pathlib import Path

import h5py
import numpy as np
import torch

from vla_exp import UsageError


def read_episode(path, camera):
    """One episode file as arrays. A file that is not a readable episode raises UsageError naming it."""
    keys = (f"observations/images/{camera}", "observations/qpos", "action", "language_raw")
    try:
        with h5py.File(path, "r") as f:
            if missing := [k for k in keys if k not in f]:
                cameras = list(f["observations/images"]) if "observations/images" in f else []
                hint = f" (cameras there: {', '.join(cameras)})" if missing[0] == keys[0] and cameras else ""
                raise UsageError(f"{path}: no /{missing[0]}{hint}")
            images, qpos, action, instruction = (f[k][()] for k in keys)
            baselines = {k: v[()] for k, v in f["baselines"].items()} if "baselines" in f else {}
    except OSError as e:  # not HDF5, truncated, or a chunk that no longer decompresses
        raise UsageError(f"{path}: not a readable HDF5 file ({' '.join(str(e).split())})") from None
    if isinstance(instruction, bytes):
        instruction = instruction.decode()
    return {"images": images, "qpos": qpos.astype(np.float32), "action": action.astype(np.float32),
            "instruction": instruction, "baselines": baselines}


def check_episode(path, ep, horizon, expected):
    """Raise UsageError naming `path` if the episode cannot be trained on. `expected` maps what every episode must
    share (image size, dims, baseline names) to (value, where it comes from); what it lacks is taken from this
    episode, and later ones must match it."""
    images, qpos, action = ep["images"], ep["qpos"], ep["action"]
    if images.ndim != 4 or images.shape[-1] != 3 or images.dtype != np.uint8:
        raise UsageError(f"{path}: images are {images.dtype} {images.shape}, not uint8 (T, H, W, 3)")
    if qpos.ndim != 2 or action.ndim != 2:
        raise UsageError(f"{path}: qpos {qpos.shape} and action {action.shape} must both be (T, dim)")
    if len(set(lengths := (len(images), len(qpos), len(action)))) > 1:
        raise UsageError(f"{path}: lengths differ: {lengths[0]} images, {lengths[1]} qpos, {lengths[2]} actions")
    if not len(action):
        raise UsageError(f"{path}: no time steps")
    if not isinstance(ep["instruction"], str):
        raise UsageError(f"{path}: /language_raw is not a string")
    found = {"image size": "x".join(map(str, images.shape[1:3])), "action dim": action.shape[1],
             "state dim": qpos.shape[1], "baselines": sorted(ep["baselines"])}
    for what, value in found.items():
        want, source = expected.setdefault(what, (value, path.name))
        if value != want:
            raise UsageError(f"{path}: {what} {value} does not match {want} ({source})")
    steps, dim = action.shape
    for name, chunks in ep["baselines"].items():  # one stored chunk per step, at least a horizon long
        if chunks.ndim != 3 or len(chunks) != steps or chunks.shape[1] < horizon or chunks.shape[2] != dim:
            raise UsageError(f"{path}: /baselines/{name} is {chunks.shape}, not ({steps}, >= {horizon}, {dim})")
    arrays = {"observations/qpos": qpos, "action": action, **{f"baselines/{k}": v for k, v in ep["baselines"].items()}}
    for name, a in arrays.items():
        if not np.isfinite(a).all():
            step = np.argwhere(~np.isfinite(a))[0][0]
            raise UsageError(f"{path}: /{name} holds NaN or inf (first at step {step})")


def split_episodes(files, val_fraction, seed):
    """Train and validation files, split by episode with a seeded shuffle (at least one of each)."""
    if len(files) < 2:
        raise UsageError(f"{len(files)} episode file(s): at least 2 are needed to split train and validation")
    order = np.random.default_rng(seed).permutation(len(files))
    n_val = min(max(1, round(len(files) * val_fraction)), len(files) - 1)
    return [files[i] for i in sorted(order[n_val:])], [files[i] for i in sorted(order[:n_val])]


class Normalizer:
    """Actions min-max scaled to [-1, 1]; states standardised. Statistics come from the training episodes only."""

    def __init__(self, action_min, action_max, qpos_mean, qpos_std):
        self.action_min, self.action_max = np.asarray(action_min, np.float32), np.asarray(action_max, np.float32)
        self.qpos_mean, self.qpos_std = np.asarray(qpos_mean, np.float32), np.asarray(qpos_std, np.float32)

    @classmethod
    def fit(cls, episodes):
        actions = np.concatenate([e["action"] for e in episodes])
        qpos = np.concatenate([e["qpos"] for e in episodes])
        return cls(actions.min(0), actions.max(0), qpos.mean(0), qpos.std(0) + 1e-6)

    def actions(self, a):
        return 2 * (a - self.action_min) / np.maximum(self.action_max - self.action_min, 1e-6) - 1

    def qpos(self, q):
        return (q - self.qpos_mean) / self.qpos_std

    def state_dict(self):
        return {k: v.tolist() for k, v in vars(self).items()}


class ChunkDataset(torch.utils.data.Dataset):
    """One sample per time step: image, state, instruction and the next `horizon` actions (the last one repeated
    past the episode's end, where the robot holds its final pose)."""

    def __init__(self, episodes, normalizer, horizon):
        self.episodes, self.norm, self.horizon = episodes, normalizer, horizon
        self.index = [(e, t) for e, ep in enumerate(episodes) for t in range(len(ep["action"]))]

    def __len__(self):
        return len(self.index)

    def chunk(self, actions, t):
        idx = np.minimum(np.arange(t, t + self.horizon), len(actions) - 1)
        return actions[idx]

    def __getitem__(self, i):
        e, t = self.index[i]
        ep = self.episodes[e]
        return {"image": torch.from_numpy(ep["images"][t]).permute(2, 0, 1),
                "state": torch.from_numpy(self.norm.qpos(ep["qpos"][t])),
                "actions": torch.from_numpy(self.norm.actions(self.chunk(ep["action"], t))),
                "instruction": ep["instruction"]}

    def mean_chunk(self):
        """The mean normalised action chunk: the best predictor that sees nothing."""
        return np.mean([self.norm.actions(self.chunk(self.episodes[e]["action"], t)) for e, t in self.index], axis=0)

    def baselines(self, indices, mean_chunk):
        """Normalised action chunks of the trivial predictors for the samples `indices`."""
        samples = [(self.episodes[e], t) for e, t in (self.index[i] for i in indices)]
        out = {"mean_action": np.stack([mean_chunk] * len(indices))}
        first = self.episodes[0]
        if first["qpos"].shape[1] == first["action"].shape[1]:  # actions are target poses: holding still is a policy
            out["hold_state"] = np.stack([self.norm.actions(np.repeat(ep["qpos"][t][None], self.horizon, 0))
                                          for ep, t in samples])
        for name in first["baselines"]:  # stored chunks may be longer than the horizon: their prefix is the same predictor
            out[name] = np.stack([self.norm.actions(ep["baselines"][name][t][:self.horizon]) for ep, t in samples])
        return out


def load_split(data_dir, camera, val_fraction, seed, horizon, image_size=None, action_dim=None, state_dim=None):
    """Train and validation sets. Every file is read and checked first, so bad data stops a run before it trains;
    the model's image size and dims, where given, are what the episodes must have."""
    data_dir = Path(data_dir).expanduser()
    if not data_dir.is_dir():
        raise UsageError(f"data.dir={data_dir}: no such folder")
    files = sorted(data_dir.glob("*.hdf5"))
    if not files:
        raise UsageError(f"data.dir={data_dir}: no *.hdf5 episode files there")
    try:
        train_files, val_files = split_episodes(files, val_fraction, seed)
    except UsageError as e:
        raise UsageError(f"data.dir={data_dir}: {e}") from None
    expected = {what: (value, key) for what, value, key in [
        ("image size", image_size and f"{image_size}x{image_size}", "model.config.vision_config.image_size"),
        ("action dim", action_dim, "model.config.action_dim"), ("state dim", state_dim, "model.config.state_dim")]
        if value is not None}
    episodes = {}
    for f in files:
        episodes[f] = read_episode(f, camera)
        check_episode(f, episodes[f], horizon, expected)
    train, val = [episodes[f] for f in train_files], [episodes[f] for f in val_files]
    norm = Normalizer.fit(train)
    return ChunkDataset(train, norm, horizon), ChunkDataset(val, norm, horizon)
