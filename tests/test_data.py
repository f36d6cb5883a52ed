"""Task generators (vla_exp/data/tasks.py), the episode format (vla_exp/data/episodes.py) and the data pipeline
(vla_exp/data/chunks.py)."""
import math
import re

import h5py
import numpy as np
import pytest
import torch

from vla_exp import UsageError
from vla_exp.data import chunks, episodes, tasks
from vla_exp.data.sources import validate

STEPS, HORIZON, SPEED, SIZE = 24, 16, tasks.SPEED, 64  # data=tint, model=tiny
N_EPISODES = 6


def arrays(path):
    """Every dataset of an episode file, by name."""
    out = {}
    with h5py.File(path, "r") as f:
        f.visititems(lambda name, obj: out.__setitem__(name, obj[()]) if isinstance(obj, h5py.Dataset) else None)
    return out


def generate(out_dir, *overrides):
    """Episodes as a run of these overrides would generate them."""
    from vla_exp.config import compose
    return tasks.generate(out_dir, **tasks.params(compose(f"data.episodes={N_EPISODES}", *overrides)))


@pytest.fixture(scope="module")
def tint_dir(tmp_path_factory):
    return generate(tmp_path_factory.mktemp("gen") / "tint")


@pytest.fixture(scope="module")
def tint_episodes(tint_dir):
    return [episodes.read_episode(f, "top") for f in sorted(tint_dir.glob("*.hdf5"))]


@pytest.fixture(scope="module")
def split(tint_dir):
    return chunks.load_split(tint_dir, "top", val_fraction=0.34, seed=0, horizon=HORIZON)


# ---------------------------------------------------------------------------------------------------------------
# generate


def test_generate_tint_writes_the_episode_files(tint_dir):
    files = sorted(tint_dir.glob("*.hdf5"))
    assert [f.name for f in files] == [f"episode_{i:05d}.hdf5" for i in range(N_EPISODES)]
    phrases = {p for ps in tasks.PHRASES.values() for p in ps}
    for f in files:
        a = arrays(f)
        assert set(a) == {"observations/images/top", "observations/qpos", "action", "language_raw",
                          "baselines/ignore_image", "baselines/ignore_instruction"}
        img = a["observations/images/top"]
        assert img.shape == (STEPS, SIZE, SIZE, 3) and img.dtype == np.uint8
        assert a["observations/qpos"].shape == (STEPS, 2) and a["action"].shape == (STEPS, 2)
        for name in ("baselines/ignore_image", "baselines/ignore_instruction"):
            assert a[name].shape == (STEPS, HORIZON, 2)
            assert np.isfinite(a[name]).all()
        assert a["language_raw"].decode() in phrases
        # the action is the next position: qpos[t+1] == action[t]
        np.testing.assert_array_equal(a["observations/qpos"][1:], a["action"][:-1])


def test_generate_is_deterministic_for_a_seed(tint_dir, tmp_path):
    again = generate(tmp_path / "again")
    other = generate(tmp_path / "other", "data.generator_seed=1")
    assert again == tmp_path / "again"
    for f in sorted(tint_dir.glob("*.hdf5")):
        a, b, c = arrays(f), arrays(again / f.name), arrays(other / f.name)
        assert a.keys() == b.keys() == c.keys()
        for k in a:
            np.testing.assert_array_equal(a[k], b[k], err_msg=k)
        assert not np.array_equal(a["observations/qpos"], c["observations/qpos"])
        assert not np.array_equal(a["observations/images/top"], c["observations/images/top"])


def test_generate_blocks(tmp_path):
    out = generate(tmp_path / "blocks", "data=blocks", "data.episodes=3")
    files = sorted(out.glob("*.hdf5"))
    assert len(files) == 3
    for f in files:
        ep = episodes.read_episode(f, "top")
        assert ep["images"].shape == (STEPS, SIZE, SIZE, 3) and ep["images"].dtype == np.uint8
        assert ep["qpos"].shape == ep["action"].shape == (STEPS, 2)
        assert re.fullmatch(r"reach the (red|green|blue) block", ep["instruction"])
        assert set(ep["baselines"]) == {"ignore_image", "ignore_instruction"}
        for v in ep["baselines"].values():
            assert v.shape == (STEPS, HORIZON, 2)


def test_unknown_task_names_the_valid_ones(make_cfg):
    with pytest.raises(UsageError, match=r"^data\.task='pick_place': must be one of tint, blocks, metaworld, lerobot$"):
        validate(make_cfg("data.task=pick_place"))


# ---------------------------------------------------------------------------------------------------------------
# expert_chunk


def test_expert_chunk_constant_speed_then_holds_at_goal():
    pos, goal = np.array([-0.5, 0.3]), np.array([0.6, -0.6])
    dist = np.linalg.norm(goal - pos)
    horizon = 20
    chunk = tasks.expert_chunk(pos, goal, horizon, SPEED)
    assert chunk.shape == (horizon, 2)
    arrive = math.ceil(dist / SPEED)  # index k-1 holds the position after k steps
    assert arrive < horizon
    path = np.concatenate([pos[None], chunk])
    steps = np.linalg.norm(np.diff(path, axis=0), axis=1)
    np.testing.assert_allclose(steps[:arrive - 1], SPEED, rtol=0, atol=1e-12)  # constant speed
    assert 0 < steps[arrive - 1] <= SPEED  # the last, partial step
    # towards the goal along the straight line
    direction = (goal - pos) / dist
    for k in range(1, arrive):
        np.testing.assert_allclose(chunk[k - 1], pos + k * SPEED * direction, rtol=0, atol=1e-12)
    # then holds: every later position is bit-identical, and it is the goal (pos + (goal - pos) can differ from goal
    # by one rounding step, hence the 1e-12)
    held = chunk[arrive - 1:]
    assert (held == held[0]).all()
    np.testing.assert_allclose(held[0], goal, rtol=0, atol=1e-12)


def test_expert_chunk_at_the_goal_stays_there():
    goal = np.array([0.6, 0.0])
    np.testing.assert_array_equal(tasks.expert_chunk(goal.copy(), goal, 5, SPEED), np.tile(goal, (5, 1)))


def test_expert_chunk_batch_equals_single_positions():
    rng = np.random.default_rng(0)
    pos = rng.uniform(-0.9, 0.9, (7, 2))
    goal = np.array([-0.6, 0.6])
    batch = tasks.expert_chunk(pos, goal, HORIZON, SPEED)
    assert batch.shape == (7, HORIZON, 2)
    for i in range(7):
        np.testing.assert_allclose(batch[i], tasks.expert_chunk(pos[i], goal, HORIZON, SPEED), rtol=0, atol=1e-15)
    # per-row goals too
    goals = rng.uniform(-0.9, 0.9, (7, 2))
    batch = tasks.expert_chunk(pos, goals, HORIZON, SPEED)
    for i in range(7):
        np.testing.assert_allclose(batch[i], tasks.expert_chunk(pos[i], goals[i], HORIZON, SPEED), rtol=0, atol=1e-15)


# ---------------------------------------------------------------------------------------------------------------
# HDF5 round trip


@pytest.mark.parametrize("instruction", ["go left", np.str_("move to the right")])
def test_write_then_read_episode_round_trip(tmp_path, instruction):
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (5, 8, 8, 3), dtype=np.uint8)
    qpos = rng.normal(size=(5, 2)).astype(np.float32)
    actions = rng.normal(size=(5, 2)).astype(np.float32)
    baselines = {"ignore_image": rng.normal(size=(5, 4, 2)).astype(np.float32)}
    path = tmp_path / "ep.hdf5"
    episodes.write_episode(path, images, qpos, actions, instruction, baselines, camera="wrist")
    ep = episodes.read_episode(path, "wrist")
    np.testing.assert_array_equal(ep["images"], images)
    assert ep["images"].dtype == np.uint8
    np.testing.assert_array_equal(ep["qpos"], qpos)
    np.testing.assert_array_equal(ep["action"], actions)
    assert ep["qpos"].dtype == ep["action"].dtype == np.float32
    assert type(ep["instruction"]) is str and ep["instruction"] == str(instruction)
    assert ep["baselines"].keys() == baselines.keys()
    np.testing.assert_array_equal(ep["baselines"]["ignore_image"], baselines["ignore_image"])


def test_read_episode_without_baselines(tmp_path):
    path = tmp_path / "ep.hdf5"
    episodes.write_episode(path, np.zeros((2, 4, 4, 3), np.uint8), np.zeros((2, 2)), np.ones((2, 2)), "go", {}, "top")
    ep = episodes.read_episode(path, "top")
    assert ep["baselines"] == {} and ep["instruction"] == "go"
    assert ep["qpos"].dtype == np.float32  # float64 on disk, float32 in memory


# ---------------------------------------------------------------------------------------------------------------
# split


@pytest.mark.parametrize("n, fraction, n_val", [(10, 0.2, 2), (10, 0.01, 1), (5, 0.0, 1), (10, 0.99, 9), (2, 0.5, 1)])
def test_split_episodes(n, fraction, n_val):
    files = [f"episode_{i:05d}.hdf5" for i in range(n)]
    train, val = chunks.split_episodes(files, fraction, seed=0)
    assert len(val) == n_val and len(train) == n - n_val
    assert not set(train) & set(val)
    assert sorted(train + val) == files
    assert train == sorted(train) and val == sorted(val)
    assert chunks.split_episodes(files, fraction, seed=0) == (train, val)


def test_split_needs_two_episodes():
    with pytest.raises(ValueError, match="at least 2"):
        chunks.split_episodes(["episode_00000.hdf5"], 0.1, seed=0)


def test_split_depends_on_the_seed():
    files = [f"episode_{i:05d}.hdf5" for i in range(20)]
    splits = {tuple(chunks.split_episodes(files, 0.2, seed)[1]) for seed in range(5)}
    assert len(splits) > 1


# ---------------------------------------------------------------------------------------------------------------
# normalisation


def test_normalizer_maps_train_actions_onto_minus_one_one(split):
    train, _ = split
    actions = np.concatenate([e["action"] for e in train.episodes])
    normed = train.norm.actions(actions)
    np.testing.assert_allclose(normed.min(0), [-1, -1], atol=1e-6)
    np.testing.assert_allclose(normed.max(0), [1, 1], atol=1e-6)
    qpos = train.norm.qpos(np.concatenate([e["qpos"] for e in train.episodes]))
    np.testing.assert_allclose(qpos.mean(0), [0, 0], atol=1e-5)
    np.testing.assert_allclose(qpos.std(0), [1, 1], atol=1e-4)


def test_normalizer_statistics_come_from_train_only(split):
    train, val = split
    assert len(train.episodes) == 4 and len(val.episodes) == 2  # round(6 * 0.34) = 2
    assert val.norm is train.norm
    fit = chunks.Normalizer.fit(train.episodes)
    for k, v in vars(fit).items():
        np.testing.assert_array_equal(getattr(train.norm, k), v, err_msg=k)
    both = chunks.Normalizer.fit(train.episodes + val.episodes)
    assert not np.array_equal(both.qpos_mean, train.norm.qpos_mean)
    # a validation episode reaching beyond the training range is normalised beyond [-1, 1]
    outside = np.stack([train.norm.action_max + 0.5, train.norm.action_min - 0.5])
    normed = train.norm.actions(outside)
    assert (normed[0] > 1).all() and (normed[1] < -1).all()


def test_normalizer_fit_is_min_max_and_mean_std():
    eps = [{"action": np.array([[0.0, -2.0], [1.0, 2.0]], np.float32), "qpos": np.array([[0.0, 0.0]], np.float32)},
           {"action": np.array([[0.5, 0.0]], np.float32), "qpos": np.array([[2.0, 4.0]], np.float32)}]
    norm = chunks.Normalizer.fit(eps)
    np.testing.assert_array_equal(norm.action_min, [0, -2])
    np.testing.assert_array_equal(norm.action_max, [1, 2])
    np.testing.assert_allclose(norm.qpos_mean, [1, 2])
    np.testing.assert_allclose(norm.qpos_std, [1 + 1e-6, 2 + 1e-6])
    np.testing.assert_allclose(norm.actions(np.array([[0.5, 0.0]])), [[0, 0]], atol=1e-7)
    assert chunks.Normalizer(**norm.state_dict()).state_dict() == norm.state_dict()


def test_mean_std_action_normalisation_and_its_min_max_reference():
    eps = [{"action": np.array([[0.0, -2.0], [1.0, 2.0]], np.float32), "qpos": np.array([[0.0, 0.0]], np.float32)},
           {"action": np.array([[0.5, 3.0]], np.float32), "qpos": np.array([[2.0, 4.0]], np.float32)}]
    norm = chunks.Normalizer.fit(eps, "meanstd")
    actions = np.concatenate([e["action"] for e in eps])
    np.testing.assert_allclose(norm.action_mean, actions.mean(0))
    np.testing.assert_allclose(norm.action_std, actions.std(0) + 1e-6)
    z = norm.actions(actions)
    np.testing.assert_allclose(z, (actions - actions.mean(0)) / (actions.std(0) + 1e-6), rtol=1e-6)
    np.testing.assert_allclose(norm.unactions(z), actions, atol=1e-6)
    minmax = chunks.Normalizer.fit(eps)  # the scale every action error is measured on
    np.testing.assert_allclose(norm.reference(z), minmax.actions(actions), atol=1e-6)
    np.testing.assert_allclose(norm.reference(torch.from_numpy(z)).numpy(), minmax.actions(actions), atol=1e-6)
    assert minmax.reference(z) is z  # min-max runs: their figures untouched
    saved = norm.state_dict()
    assert saved["action_norm"] == "meanstd" and chunks.Normalizer(**saved).state_dict() == saved
    old = {k: saved[k] for k in ("action_min", "action_max", "qpos_mean", "qpos_std")}  # an earlier run's file
    assert chunks.Normalizer(**old).action_norm == "minmax"


# ---------------------------------------------------------------------------------------------------------------
# ChunkDataset


def test_chunk_dataset_items(split):
    train, _ = split
    assert len(train) == sum(len(e["action"]) for e in train.episodes) == 4 * STEPS
    item = train[3]
    ep = train.episodes[0]
    assert item["image"].shape == (3, SIZE, SIZE) and item["image"].dtype == torch.uint8
    torch.testing.assert_close(item["image"], torch.from_numpy(ep["images"][3]).permute(2, 0, 1), rtol=0, atol=0)
    assert item["state"].shape == (2,) and item["state"].dtype == torch.float32
    np.testing.assert_allclose(item["state"].numpy(), train.norm.qpos(ep["qpos"][3]), rtol=0, atol=0)
    assert item["actions"].shape == (HORIZON, 2) and item["actions"].dtype == torch.float32
    np.testing.assert_allclose(item["actions"].numpy(), train.norm.actions(ep["action"][3:3 + HORIZON]), atol=0)
    assert item["instruction"] == ep["instruction"]


def test_chunk_past_the_end_repeats_the_final_action(split):
    train, _ = split
    ep = train.episodes[0]
    last = train[STEPS - 1]["actions"].numpy()
    np.testing.assert_array_equal(last, np.tile(train.norm.actions(ep["action"][-1]), (HORIZON, 1)))
    near = train[STEPS - 5]["actions"].numpy()  # 5 real actions, then the final one repeated
    np.testing.assert_array_equal(near[:5], train.norm.actions(ep["action"][-5:]))
    np.testing.assert_array_equal(near[5:], np.tile(train.norm.actions(ep["action"][-1]), (HORIZON - 5, 1)))
    # the next index starts the second episode
    np.testing.assert_array_equal(train[STEPS]["actions"].numpy()[0], train.norm.actions(train.episodes[1]["action"][0]))


def test_baselines(split):
    _, val = split
    indices = [0, 5, STEPS - 1, STEPS + 2]
    mean_chunk = np.linspace(-1, 1, HORIZON * 2).reshape(HORIZON, 2).astype(np.float32)
    out = val.baselines(indices, mean_chunk)
    assert set(out) == {"mean_action", "hold_state", "ignore_image", "ignore_instruction"}
    for v in out.values():
        assert v.shape == (len(indices), HORIZON, 2)
    for row, i in enumerate(indices):
        e, t = val.index[i]
        ep = val.episodes[e]
        np.testing.assert_array_equal(out["mean_action"][row], mean_chunk)
        np.testing.assert_array_equal(out["hold_state"][row], np.tile(val.norm.actions(ep["qpos"][t]), (HORIZON, 1)))
        for name in ("ignore_image", "ignore_instruction"):
            np.testing.assert_array_equal(out[name][row], val.norm.actions(ep["baselines"][name][t]))


def test_baselines_follow_a_shorter_horizon(tint_dir):
    _, val = chunks.load_split(tint_dir, "top", val_fraction=0.34, seed=0, horizon=8)
    out = val.baselines([0, 3], np.zeros((8, 2), np.float32))
    assert {v.shape for v in out.values()} == {(2, 8, 2)}
    e, t = val.index[3]
    np.testing.assert_array_equal(out["ignore_image"][1], val.norm.actions(val.episodes[e]["baselines"]["ignore_image"][t][:8]))


def test_load_split_empty_folder(tmp_path):
    (tmp_path / "notes.txt").write_text("no episodes")
    with pytest.raises(UsageError, match=re.escape(str(tmp_path))):
        chunks.load_split(tmp_path, "top", 0.1, 0, HORIZON)


# ---------------------------------------------------------------------------------------------------------------
# the tint task's meaning and its baselines


def column_of(instruction):
    sides = [s for s in tasks.COLUMNS if s in instruction]
    assert len(sides) == 1, instruction
    return sides[0]


def row_of(image):
    """The background colour (the median pixel; the distractors and gripper are small) names the row."""
    median = np.median(image.reshape(-1, 3), axis=0)
    return list(tasks.ROWS)[int(np.argmax(median))]  # red -> R, green -> G, blue -> B channel dominates


def test_tint_goal_is_the_column_of_the_words_and_the_row_of_the_colour(tint_episodes):
    # seed 0 covers both columns and all three rows, so the checks below see every case
    assert {column_of(ep["instruction"]) for ep in tint_episodes} == set(tasks.COLUMNS)
    assert {row_of(ep["images"][0]) for ep in tint_episodes} == set(tasks.ROWS)
    for ep in tint_episodes:
        goal = np.array([tasks.COLUMNS[column_of(ep["instruction"])], tasks.ROWS[row_of(ep["images"][0])]])
        assert {row_of(img) for img in ep["images"]} == {row_of(ep["images"][0])}
        np.testing.assert_allclose(ep["action"][-1], goal, atol=1e-6)  # reached within the episode


def test_tint_ignore_image_is_the_mean_over_the_rows_of_its_column(tint_episodes):
    for ep in tint_episodes:
        x = tasks.COLUMNS[column_of(ep["instruction"])]
        per_row = np.stack([tasks.expert_chunk(ep["qpos"], np.array([x, y]), HORIZON, SPEED)
                            for y in tasks.ROWS.values()])  # (3, T, horizon, 2)
        np.testing.assert_allclose(ep["baselines"]["ignore_image"], per_row.mean(0), rtol=0, atol=1e-6)
        # the expert's real chunk is the one towards this episode's row (up to the episode's float32 steps)
        true_row = list(tasks.ROWS).index(row_of(ep["images"][0]))
        real = chunks.ChunkDataset([ep], None, HORIZON).chunk(ep["action"], 0)
        np.testing.assert_allclose(real, per_row[true_row, 0], atol=1e-5)
        # without the image, each row is equally likely (rng.choice over ROWS): the mean has the lowest expected
        # squared error among image-blind guesses, e.g. below committing to any one row
        def risk(pred):
            return ((per_row - pred) ** 2).mean()
        base = risk(ep["baselines"]["ignore_image"])
        assert all(base < risk(per_row[r]) for r in range(3))


def test_tint_ignore_instruction_is_the_mean_over_the_columns_of_its_row(tint_episodes):
    for ep in tint_episodes:
        y = tasks.ROWS[row_of(ep["images"][0])]
        chunks = [tasks.expert_chunk(ep["qpos"], np.array([x, y]), HORIZON, SPEED) for x in tasks.COLUMNS.values()]
        np.testing.assert_allclose(ep["baselines"]["ignore_instruction"], np.mean(chunks, axis=0), rtol=0, atol=1e-6)
