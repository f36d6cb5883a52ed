"""MetaWorld (an optional extra: `pip install -e ".[metaworld]"`): demonstrations from its scripted experts, and the
harness that rolls any policy out in its simulator.

An episode is written in the format of vla_exp/data/episodes.py: images (T, 64, 64, 3) uint8, qpos (T, 10), action (T, 4),
the instruction; no baselines.
- state (`qpos`, 10): hand xyz, gripper opening (0 closed .. 1 open), object xyz, goal xyz. MetaWorld hides the goal
  unless `_partially_observable` is False; a policy whose tiny vision tower cannot yet localise a small goal marker
  has to read it here (a reaching task is learnt in CPU minutes with the goal in the state, not without it).
- action (4): MetaWorld's own, dx, dy, dz (hand moves, times 1 cm) and gripper (-1 open .. 1 close), each clipped
  to [-1, 1] as the simulator clips it.
- image: one camera rendered offscreen at the model's size with shadows, reflections and skybox off (13 ms instead
  of ~90 ms a 64x64 frame on a CPU); the "corner" cameras come out upside down and are turned upright.
- an episode ends at the first step MetaWorld reports success (the recorded demonstration and a rollout alike), or
  after `steps` steps. Success: `info["success"]` at any step, as MetaWorld's own evaluation counts it.
Episode i of a task starts from the environment state drawn by `np.random.default_rng((purpose, seed, task, i))`:
training data (purpose 0) and evaluation (purpose 1) never start from the same stream.
"""
import logging
import os
import warnings
import zlib
from importlib import metadata

os.environ.setdefault("MUJOCO_GL", "egl")  # offscreen rendering without a display (software Mesa on a CPU)
logging.getLogger("OpenGL").setLevel(logging.WARNING)  # under Hydra's logging, PyOpenGL's import notes would show

import numpy as np
from omegaconf import OmegaConf
from tqdm import tqdm

from vla_exp import UsageError
from vla_exp.data.episodes import write_episode
from vla_exp.files import cache_entry, write_json
from vla_exp.schema import check as check_key, one_of

VERSION = 1  # part of the cache key: bump it when what the generator writes changes (instructions included)
INSTALL = 'pip install -e ".[metaworld]" (or pip install "vla-exp[metaworld]")'
CAMERAS = ("corner", "corner2", "corner3", "corner4", "topview", "behindGripper", "gripperPOV")
DATA, EVALUATION = 0, 1  # the purposes that episode seeds are drawn for
INSTRUCTIONS = {  # other tasks: their name in words ("drawer-open-v3": "drawer open")
    "reach-v3": "reach the goal", "reach-wall-v3": "reach the goal behind the wall",
    "push-v3": "push the puck to the goal", "pick-place-v3": "pick up the puck and place it at the goal",
    "button-press-topdown-v3": "press the button from the top", "button-press-v3": "press the button",
    "drawer-open-v3": "open the drawer", "drawer-close-v3": "close the drawer", "door-open-v3": "open the door",
    "window-open-v3": "slide the window open", "window-close-v3": "slide the window closed",
    "plate-slide-v3": "slide the plate into the goal", "handle-press-v3": "press the handle down",
    "coffee-button-v3": "push the button on the coffee machine", "faucet-open-v3": "turn the faucet on",
    "dial-turn-v3": "turn the dial"}


def task_names():
    """The MetaWorld tasks that have a scripted expert; UsageError naming the install command if MetaWorld is not
    importable."""
    try:
        from metaworld.policies import ENV_POLICY_MAP
    except ImportError as e:
        raise UsageError(f"data.task=metaworld needs MetaWorld, which cannot be imported "
                         f"({' '.join(str(e).split())}): {INSTALL}") from None
    return sorted(ENV_POLICY_MAP)


def instruction(task):
    return INSTRUCTIONS.get(task, task.removesuffix("-v3").replace("-", " "))


def version():
    """What, beside `params`, decides the generated files: this generator and the simulator's versions."""
    task_names()
    return f"metaworld-{VERSION}, metaworld {metadata.version('metaworld')}, mujoco {metadata.version('mujoco')}"


def check(cfg):
    """data.tasks and data.camera: the task names come from MetaWorld itself (one line naming the install command
    where it cannot be imported)."""
    names = task_names()
    check_key(cfg, "data.tasks", (lambda v: OmegaConf.is_list(v) and all(t in names for t in v) and 0 < len(v) == len(set(v)),
                                  f"must be a non-empty list of distinct MetaWorld tasks from: {', '.join(names)}"))
    check_key(cfg, "data.camera", one_of(CAMERAS))


def params(cfg):
    """Everything in the config that decides the files `generate` writes."""
    d = cfg.data
    return {"tasks": list(d.tasks), "episodes": d.episodes, "steps": d.steps, "camera": d.camera,
            "image_size": d.image_size, "seed": d.generator_seed}


def state(obs):
    """The policy's low-dimensional state (..., 10) from MetaWorld observations (..., 39): hand xyz, gripper
    opening, object xyz, goal xyz."""
    return np.concatenate([obs[..., 0:7], obs[..., 36:39]], axis=-1).astype(np.float32)


# ---------------------------------------------------------------------------------------------------------------
# Environments


def make_env(task, steps):
    """A MetaWorld environment of `task` whose observation holds the goal and whose resets draw from its own
    `np_random` (set by `reset`), not numpy's global generator."""
    from metaworld.env_dict import ALL_V3_ENVIRONMENTS
    env = ALL_V3_ENVIRONMENTS[task]()
    env._partially_observable = False
    vars(env).pop("sawyer_observation_space", None)  # cached with the goal's bounds at 0, which clip it away
    env._freeze_rand_vec, env.seeded_rand_vec, env._set_task_called = False, True, True
    env.max_path_length = steps
    return env


def reset(env, purpose, seed, task, i):
    env.np_random = np.random.default_rng([purpose, seed, zlib.crc32(task.encode()), i])
    return env.reset()[0]


class Camera:
    """Upright frames of one camera. One renderer serves every environment of a task (they share the model's
    structure; what moves is in each one's data): a renderer costs ~190 MB, an environment ~25 MB."""

    def __init__(self, env, name, size):
        import mujoco
        self.renderer = mujoco.Renderer(env.model, size, size)
        for flag in (mujoco.mjtRndFlag.mjRND_SHADOW, mujoco.mjtRndFlag.mjRND_REFLECTION,
                     mujoco.mjtRndFlag.mjRND_SKYBOX):
            self.renderer.scene.flags[flag] = 0
        self.name, self.upside_down = name, name.startswith("corner")

    def __call__(self, env):
        self.renderer.update_scene(env.data, camera=self.name)
        frame = self.renderer.render()
        return np.ascontiguousarray(frame[::-1, ::-1]) if self.upside_down else frame

    def close(self):
        self.renderer.close()


# ---------------------------------------------------------------------------------------------------------------
# Policies: called with a batch of observations, they return action chunks (n, k, 4) of which the rollout executes
# the first `execute`, then asks again.


class Expert:
    """MetaWorld's scripted expert for the task (it reads the full observation, every step)."""
    sees_image = False

    def __call__(self, obs):
        from metaworld.policies import ENV_POLICY_MAP
        expert = ENV_POLICY_MAP[obs["task"]]()  # stateless: built in microseconds
        with warnings.catch_warnings():  # "Constant(s) may be too high": its gains exceed 1 by design; rollouts clip
            warnings.simplefilter("ignore", UserWarning)
            return np.stack([expert.get_action(o) for o in obs["raw"]])[:, None]


class RandomPolicy:
    """Uniform actions in [-1, 1], seeded."""
    sees_image = False

    def __init__(self, seed):
        self.rng = np.random.default_rng([EVALUATION, seed])

    def __call__(self, obs):
        return self.rng.uniform(-1, 1, (len(obs["state"]), 1, 4))


class FixedChunk:
    """The same action chunk whatever it sees (the de-normalised mean training chunk: the best predictor that sees
    nothing)."""
    sees_image = False

    def __init__(self, chunk):
        self.chunk = np.asarray(chunk)

    def __call__(self, obs):
        return np.broadcast_to(self.chunk, (len(obs["state"]), *self.chunk.shape))


# ---------------------------------------------------------------------------------------------------------------
# Rollouts


def rollout(envs, camera, policy, task, purpose, seed, first, steps, execute, record=()):
    """Episodes `first`, `first + 1`, ... of `task`, one per environment, side by side (one policy call for all that
    still run). Per episode: success, return, length; those in `record` (indices into `envs`) also keep their
    frames, states and the actions taken."""
    n = len(envs)
    raw = np.stack([reset(env, purpose, seed, task, first + i) for i, env in enumerate(envs)])
    out = [{"success": False, "return": 0.0, "length": 0} for _ in envs]
    for i in record:
        out[i].update(images=[], states=[], actions=[])
    plans, done = [[] for _ in envs], np.zeros(n, bool)
    text = instruction(task)
    for _ in range(steps):
        live = [i for i in range(n) if not done[i]]
        if not live:
            break
        ask = [i for i in live if not plans[i]]
        frames = {i: camera(envs[i]) for i in live if i in record or (policy.sees_image and i in ask)}
        if ask:
            images = np.stack([frames[i] for i in ask]) if policy.sees_image else None
            chunks = policy({"task": task, "instruction": text, "image": images, "state": state(raw[ask]),
                             "raw": raw[ask]})
            for i, chunk in zip(ask, chunks):
                plans[i] = list(np.clip(chunk[:execute], -1, 1))
        for i in live:
            action = plans[i].pop(0)
            if i in record:
                out[i]["images"].append(frames[i])
                out[i]["states"].append(state(raw[i]))
                out[i]["actions"].append(action.astype(np.float32))
            raw[i], reward, _, _, info = envs[i].step(action)
            out[i]["return"] += float(reward)
            out[i]["length"] += 1
            out[i]["success"] = bool(info["success"])
            done[i] = out[i]["success"] or out[i]["length"] >= steps
    return out


def open_task(task, n, steps, camera, size):
    envs = [make_env(task, steps) for _ in range(n)]
    return envs, Camera(envs[0], camera, size)


def close_task(envs, camera):
    camera.close()
    for env in envs:
        env.close()


# ---------------------------------------------------------------------------------------------------------------
# Demonstrations


def generate(out_dir, tasks, episodes, steps, camera, image_size, seed):
    """Write `episodes` expert demonstrations of each of `tasks` into `out_dir` (created atomically; same arguments
    and versions, same files)."""
    expert, succeeded = Expert(), {}
    with cache_entry(out_dir, "data") as tmp, tqdm(total=episodes * len(tasks), desc="generating metaworld episodes",
                                           leave=False) as bar:
        for name in tasks:
            envs, cam = open_task(name, 1, steps, camera, image_size)
            try:
                succeeded[name] = 0
                for i in range(episodes):
                    (ep,) = rollout(envs, cam, expert, name, DATA, seed, i, steps, 1, record=(0,))
                    write_episode(tmp / f"{name}_{i:05d}.hdf5", np.stack(ep["images"]), np.stack(ep["states"]),
                                  np.stack(ep["actions"]), instruction(name), {}, camera)
                    succeeded[name] += ep["success"]
                    bar.update()
                    bar.set_postfix(task=name)
            finally:
                close_task(envs, cam)
        write_json(tmp / "generation.json", {"tasks": list(tasks), "episodes_per_task": episodes,
                                             "expert_successes": succeeded, "versions": version()})
    return out_dir
