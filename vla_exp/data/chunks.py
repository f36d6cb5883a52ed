"""Training and validation sets from a folder of episodes: split by episode, normalised with training statistics,
one sample per time step with its action chunk."""
from pathlib import Path

import numpy as np
import torch

from vla_exp import UsageError
from vla_exp.data.episodes import check_episode, episode_files, read_episode

PAST_END = ("hold", "mask")  # data.past_end: what the steps of an action chunk past an episode's end are


def split_episodes(files, val_fraction, seed):
    """Train and validation files, split by episode with a seeded shuffle (at least one of each)."""
    if len(files) < 2:
        raise UsageError(f"{len(files)} episode file(s): at least 2 are needed to split train and validation")
    order = np.random.default_rng(seed).permutation(len(files))
    n_val = min(max(1, round(len(files) * val_fraction)), len(files) - 1)
    return [files[i] for i in sorted(order[n_val:])], [files[i] for i in sorted(order[:n_val])]


class Normalizer:
    """Actions min-max scaled to [-1, 1] (`minmax`, TinyVLA's) or standardised (`meanstd`, the reported fixed
    script's); states standardised. Statistics come from the training episodes only. Whatever the actions train in,
    `reference` puts them on the min-max scale, so action errors of runs that normalise differently compare."""

    def __init__(self, action_min, action_max, qpos_mean, qpos_std, action_norm="minmax", action_mean=None,
                 action_std=None):  # normalization.json of runs before action_norm existed: min-max
        self.action_min, self.action_max = np.asarray(action_min, np.float32), np.asarray(action_max, np.float32)
        self.qpos_mean, self.qpos_std = np.asarray(qpos_mean, np.float32), np.asarray(qpos_std, np.float32)
        self.action_norm = action_norm
        self.action_mean = None if action_mean is None else np.asarray(action_mean, np.float32)
        self.action_std = None if action_std is None else np.asarray(action_std, np.float32)

    @classmethod
    def fit(cls, episodes, action_norm="minmax"):
        actions = np.concatenate([e["action"] for e in episodes])
        qpos = np.concatenate([e["qpos"] for e in episodes])
        return cls(actions.min(0), actions.max(0), qpos.mean(0), qpos.std(0) + 1e-6, action_norm,
                   actions.mean(0), actions.std(0) + 1e-6)

    def actions(self, a):
        if self.action_norm == "meanstd":
            return (a - self.action_mean) / self.action_std
        return self.minmax(a)

    def unactions(self, a):
        """The inverse of `actions`: normalised actions back in the data's units."""
        if self.action_norm == "meanstd":
            return a * self.action_std + self.action_mean
        return (a + 1) / 2 * np.maximum(self.action_max - self.action_min, 1e-6) + self.action_min

    def minmax(self, a):
        return 2 * (a - self.action_min) / np.maximum(self.action_max - self.action_min, 1e-6) - 1

    def reference(self, a):
        """Normalised actions (an array or a tensor) on the min-max scale: unchanged under `minmax`."""
        if self.action_norm == "minmax":
            return a
        std, mean, lo, span = (self.action_std, self.action_mean, self.action_min,
                               np.maximum(self.action_max - self.action_min, 1e-6))
        if isinstance(a, torch.Tensor):
            std, mean, lo, span = (torch.from_numpy(x) for x in (std, mean, lo, span))
        return 2 * (a * std + mean - lo) / span - 1

    def qpos(self, q):
        return (q - self.qpos_mean) / self.qpos_std

    def state_dict(self):
        return {k: v.tolist() if isinstance(v, np.ndarray) else v for k, v in vars(self).items()}


class ChunkDataset(torch.utils.data.Dataset):
    """One sample per time step: image, state, instruction and the next `horizon` actions, the last one repeated
    past the episode's end. `past_end="hold"`: those steps are targets like any other (the robot holds its final
    pose); `"mask"`: they are padding, as LeRobot pads, and each sample's `pad` flags them so that neither the loss nor
    the action errors count them."""

    def __init__(self, episodes, normalizer, horizon, past_end="hold"):
        if past_end not in PAST_END:
            raise UsageError(f"data.past_end={past_end}: not one of {', '.join(PAST_END)}")
        self.episodes, self.norm, self.horizon, self.mask = episodes, normalizer, horizon, past_end == "mask"
        self.index = [(e, t) for e, ep in enumerate(episodes) for t in range(len(ep["action"]))]

    def __len__(self):
        return len(self.index)

    def chunk(self, actions, t):
        idx = np.minimum(np.arange(t, t + self.horizon), len(actions) - 1)
        return actions[idx]

    def __getitem__(self, i):
        e, t = self.index[i]
        ep = self.episodes[e]
        item = {"image": torch.from_numpy(ep["images"][t]).permute(2, 0, 1),
                "state": torch.from_numpy(self.norm.qpos(ep["qpos"][t])),
                "actions": torch.from_numpy(self.norm.actions(self.chunk(ep["action"], t))),
                "instruction": ep["instruction"]}
        if self.mask:
            item["pad"] = torch.arange(t, t + self.horizon) >= len(ep["action"])
        return item

    def pads(self, indices):
        """The `pad` flags of the samples `indices` (n, horizon), or None where nothing is padding."""
        return np.stack([self[i]["pad"].numpy() for i in indices]) if self.mask else None

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


def sample_errors(pred, target, pad=None):
    """Each sample's mean squared error over its chunk (arrays or tensors (n, horizon, dim)), padded steps left out."""
    sq = (pred - target) ** 2
    if pad is None:
        return sq.mean((1, 2))
    real = ~pad[..., None]
    return (sq * real).sum((1, 2)) / (real.sum((1, 2)) * sq.shape[-1])


def load_split(data_dir, camera, val_fraction, seed, horizon, image_size=None, action_dim=None, state_dim=None,
               action_norm="minmax", past_end="hold"):
    """Train and validation sets. Every file is read and checked first, so bad data stops a run before it trains;
    the model's image size and dims, where given, are what the episodes must have."""
    data_dir = Path(data_dir).expanduser()
    files = episode_files(data_dir)
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
    norm = Normalizer.fit(train, action_norm)
    return ChunkDataset(train, norm, horizon, past_end), ChunkDataset(val, norm, horizon, past_end)
