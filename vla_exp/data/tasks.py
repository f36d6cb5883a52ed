"""Built-in task generators, written in the episode format of vla_exp/data/episodes.py: qpos (T, 2) is the gripper's
position, the action (T, 2) its next one, and `/baselines/<name>` (T, horizon, 2) the action chunk of the best
predictor that does not see one input, so held-out evaluation can report it beside the policy.

- `tint` (the embedded default): the background colour picks the row of the goal (red top, green middle, blue
  bottom) and the instruction picks the column ("left" / "right"). The policy must read both the image and the words.
- `blocks` (harder, for longer runs): three coloured blocks at random places; the instruction names the block to
  reach, so the policy has to localise small objects.
"""
from pathlib import Path

import numpy as np
from tqdm import tqdm

from vla_exp.data.episodes import write_episode
from vla_exp.files import cache_entry

COLOURS = {"red": (200, 40, 40), "green": (40, 170, 60), "blue": (50, 70, 210)}
ROWS = {"red": 0.6, "green": 0.0, "blue": -0.6}
COLUMNS = {"left": -0.6, "right": 0.6}
PHRASES = {"left": ["go left", "move to the left", "reach the left goal"],
           "right": ["go right", "move to the right", "reach the right goal"]}
SPEED = 0.12  # of the expert, per step


def expert_chunk(pos, goal, horizon, speed):
    """Next `horizon` positions of the expert from `pos` (..., 2) towards `goal` (..., 2) at constant speed."""
    delta = goal - pos
    dist = np.linalg.norm(delta, axis=-1, keepdims=True)
    frac = np.minimum(np.arange(1, horizon + 1) * speed, dist) / np.maximum(dist, 1e-9)  # (..., horizon)
    return pos[..., None, :] + frac[..., None] * delta[..., None, :]


def to_pixel(xy, size):
    return int(round((xy[0] + 1) / 2 * (size - 1))), int(round((1 - xy[1]) / 2 * (size - 1)))


def draw_square(img, xy, half, colour):
    c, r = to_pixel(xy, img.shape[0])
    img[max(r - half, 0):r + half + 1, max(c - half, 0):c + half + 1] = colour


def tint_episode(rng, size):
    colour = rng.choice(list(ROWS))
    side = rng.choice(list(COLUMNS))
    goal = np.array([COLUMNS[side], ROWS[colour]])
    background = np.clip(np.array(COLOURS[colour]) * rng.uniform(0.7, 1.2), 0, 255).astype(np.uint8)
    clutter = rng.uniform(-0.9, 0.9, (3, 2))  # grey distractors: the colour, not a place, carries the goal row

    def render(pos):
        img = np.broadcast_to(background, (size, size, 3)).copy()
        for xy in clutter:
            draw_square(img, xy, 3, (120, 120, 120))
        draw_square(img, pos, 2, (255, 255, 255))
        return img

    # the best predictors that miss one input average the expert over what that input would have told
    ignore_image = [np.array([COLUMNS[side], y]) for y in ROWS.values()]
    ignore_words = [np.array([x, ROWS[colour]]) for x in COLUMNS.values()]
    return goal, render, rng.choice(PHRASES[side]), {"ignore_image": ignore_image, "ignore_instruction": ignore_words}


def blocks_episode(rng, size):
    places = rng.uniform(-0.8, 0.8, (3, 2))
    name = rng.choice(list(COLOURS))
    goal = places[list(COLOURS).index(name)]
    other = rng.uniform(-0.8, 0.8, (32, 2))  # unseen image: the named block could be anywhere

    def render(pos):
        img = np.full((size, size, 3), 235, np.uint8)
        for place, colour in zip(places, COLOURS.values()):
            draw_square(img, place, 3, colour)
        draw_square(img, pos, 1, (0, 0, 0))
        return img

    return goal, render, f"reach the {name} block", {"ignore_image": list(other), "ignore_instruction": list(places)}


TASKS = {"tint": tint_episode, "blocks": blocks_episode}


def version():
    """Part of the cache key: bump it when a generator changes what it writes."""
    return "tasks-1"


def params(cfg):
    """Everything that decides the files `generate` writes for a run of `cfg`."""
    d = cfg.data
    return {"task": d.task, "episodes": d.episodes, "steps": d.steps, "image_size": d.image_size, "camera": d.camera,
            "seed": d.generator_seed, "horizon": cfg.model.config.horizon}


def generate(out_dir, task, episodes, steps, image_size, camera, seed, horizon):
    """Write `episodes` episodes of `task` into `out_dir` (created atomically; same arguments, same files)."""
    rng = np.random.default_rng(seed)
    with cache_entry(out_dir, "data") as tmp:
        for i in tqdm(range(episodes), desc=f"generating {task} episodes", leave=False):
            write_episode(tmp / f"episode_{i:05d}.hdf5", *expert_episode(task, rng, steps, horizon, image_size),
                          camera)
    return Path(out_dir)


def expert_episode(task, rng, steps, horizon, image_size):
    """One episode of `task`: images, qpos, actions, instruction and the baselines' action chunks."""
    goal, render, instruction, alternatives = TASKS[task](rng, image_size)
    path = [rng.uniform(-0.9, 0.9, 2)]
    for _ in range(steps):
        path.append(expert_chunk(path[-1], goal, 1, SPEED)[0])
    qpos = np.array(path[:-1], np.float32)
    baselines = {name: np.mean([expert_chunk(qpos, g, horizon, SPEED) for g in goals], axis=0).astype(np.float32)
                 for name, goals in alternatives.items()}
    return np.stack([render(p) for p in qpos]), qpos, np.array(path[1:], np.float32), instruction, baselines
