"""LeRobot datasets: written by vla_exp.data.lerobot the way LeRobot lays them out (pyarrow parquet, PyAV AV1 video),
read back through `data=lerobot` with the HDF5 reader's split, normalisation and checks."""
import io
import json
import os
import shutil
from pathlib import Path

import h5py
import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from vla_exp import UsageError
from vla_exp.data import lerobot, tasks
from vla_exp.config import compose
from vla_exp.data.sources import datasets
from vla_exp.data.convert import main as convert
from vla_exp.data.chunks import sample_errors
from vla_exp.data.episodes import read_episode
from vla_exp.files import check_cache_entry
from vla_exp.data.sources import episodes_dir

FAST = ("logger=none", "progress=false", "debug=smoke")
LAYOUTS = [("v3.0", "video"), ("v3.0", "image"), ("v2.1", "video"), ("v2.1", "image")]


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    """Six short episodes of the embedded task, as HDF5 files."""
    folder = tmp_path_factory.mktemp("src") / "tint"
    tasks.generate(folder, **tasks.params(compose(*FAST)))
    return folder


@pytest.fixture(scope="module")
def originals(source):
    return [read_episode(f, "top") for f in sorted(source.glob("*.hdf5"))]


@pytest.fixture(scope="module")
def written(tmp_path_factory, originals):
    """The episodes as LeRobot datasets in each layout."""
    root = tmp_path_factory.mktemp("lerobot")
    return {(v, i): lerobot.write_dataset(root / f"{v}-{i}", originals, "top", 20, v, i) for v, i in LAYOUTS}


def lerobot_cfg(root, *overrides):
    return compose(*FAST, "data=lerobot", f"data.root={root}", *overrides)


def cached(root, *overrides):
    """The episodes a run on the dataset at `root` trains on, read from the cache it decodes them into."""
    cfg = lerobot_cfg(root, *overrides)
    return [read_episode(f, None) for f in sorted(episodes_dir(cfg).glob("*.hdf5"))]


@pytest.mark.parametrize("layout", LAYOUTS, ids=["-".join(x) for x in LAYOUTS])
def test_every_layout_reads_back_actions_states_instructions_exactly(written, originals, layout):
    got = cached(written[layout])
    assert len(got) == len(originals)
    for e, (g, o) in enumerate(zip(got, originals)):
        assert g["instruction"] == o["instruction"]
        np.testing.assert_array_equal(g["action"], o["action"])
        np.testing.assert_array_equal(g["qpos"], o["qpos"])
        assert g["baselines"].keys() == o["baselines"].keys()
        for name in o["baselines"]:
            np.testing.assert_array_equal(g["baselines"][name], o["baselines"][name])
        diff = np.abs(g["images"].astype(int) - o["images"])
        if layout[1] == "image":  # PNG is lossless
            assert diff.max() == 0
        else:  # AV1 at LeRobot's crf 30 with 4:2:0 chroma: close on average, and the episode's own frames
            assert diff.mean() < 6
            neighbour = originals[(e + 1) % len(originals)]["images"]
            assert diff.mean() < np.abs(g["images"].astype(int) - neighbour).mean() / 2


def test_v30_layout_is_lerobots(written, originals):
    root = written[("v3.0", "video")]
    info = json.loads((root / "meta" / "info.json").read_text())
    assert info["codebase_version"] == "v3.0" and info["total_episodes"] == len(originals)
    assert info["features"]["observation.images.top"]["dtype"] == "video"
    assert info["features"]["action"]["shape"] == [2]
    tasks_table = pd.read_parquet(root / "meta" / "tasks.parquet")
    assert tasks_table.index.name == "task" and set(tasks_table.index) == {o["instruction"] for o in originals}
    eps = pd.read_parquet(root / "meta" / "episodes" / "chunk-000" / "file-000.parquet")
    lengths = [len(o["action"]) for o in originals]
    assert eps.length.tolist() == lengths
    # one video file for every episode, back to back: episode e starts where e - 1 ends
    starts = eps["videos/observation.images.top/from_timestamp"].to_numpy()
    np.testing.assert_allclose(starts, np.concatenate([[0], np.cumsum(lengths)[:-1]]) / info["fps"])
    assert eps.dataset_to_index.tolist() == np.cumsum(lengths).tolist()
    data = pd.read_parquet(root / "data" / "chunk-000" / "file-000.parquet")
    assert data["index"].tolist() == list(range(sum(lengths)))
    np.testing.assert_allclose(data.timestamp, data.frame_index / info["fps"])
    assert (root / "videos" / "observation.images.top" / "chunk-000" / "file-000.mp4").is_file()
    # the meta files agree with the data, as LeRobot's tools read them: each episode's video span is its length,
    # the episodes table sits at the chunk and file it names, every feature's shape is its column's, and the
    # statistics are per dimension, over each episode and over the whole dataset
    spans = eps["videos/observation.images.top/to_timestamp"] - eps["videos/observation.images.top/from_timestamp"]
    np.testing.assert_allclose(spans, np.array(lengths) / info["fps"])
    for c, f in eps[["meta/episodes/chunk_index", "meta/episodes/file_index"]].itertuples(index=False):
        assert (root / "meta" / "episodes" / f"chunk-{c:03d}" / f"file-{f:03d}.parquet").is_file()
    camera = info["features"]["observation.images.top"]
    assert camera["info"]["video.channels"] == camera["shape"][2] == 3
    for name, feature in info["features"].items():
        if name != "observation.images.top":
            assert np.prod(feature["shape"]) == np.stack(np.atleast_1d(data[name].iloc[0])).size, name
    action = np.stack(data.action.to_numpy())
    whole = json.loads((root / "meta" / "stats.json").read_text())["action"]
    assert whole["count"] == [len(action)]
    for stat, want in (("min", action.min(0)), ("max", action.max(0)), ("mean", action.mean(0)), ("std", action.std(0))):
        np.testing.assert_allclose(whole[stat], want, rtol=1e-6)
    first = action[:lengths[0]]
    np.testing.assert_allclose(eps["stats/action/max"][0], first.max(0), rtol=1e-6)


def test_writing_video_leaves_the_process_at_its_own_priority(originals, tmp_path):
    """SVT-AV1 makes its caller real-time where it can; children of such a process livelock when they spin."""
    before = os.sched_getscheduler(0), os.sched_getparam(0)
    lerobot.write_dataset(tmp_path / "ds", originals[:2], "top")
    assert (os.sched_getscheduler(0), os.sched_getparam(0)) == before


def test_the_writer_restores_this_process_policy_not_another_ones(originals, tmp_path):
    """A process at SCHED_BATCH (not what init or the shell runs at) comes back at SCHED_BATCH."""
    before = os.sched_getscheduler(0), os.sched_getparam(0)
    os.sched_setscheduler(0, os.SCHED_BATCH, os.sched_param(0))
    try:
        lerobot.write_dataset(tmp_path / "ds", originals[:2], "top")
        assert os.sched_getscheduler(0) == os.SCHED_BATCH != os.sched_getscheduler(1)
    finally:
        os.sched_setscheduler(0, *before)


def test_v21_layout_is_one_file_per_episode(written, originals):
    root = written[("v2.1", "video")]
    assert [json.loads(line)["episode_index"] for line in (root / "meta" / "episodes.jsonl").open()] == \
        list(range(len(originals)))
    assert len(list(root.glob("data/chunk-000/episode_*.parquet"))) == len(originals)
    assert len(list(root.glob("videos/chunk-000/observation.images.top/episode_*.mp4"))) == len(originals)


def test_round_trip_hdf5_lerobot_hdf5_through_the_cli(source, originals, tmp_path):
    convert([str(source), str(tmp_path / "ds")])
    convert([str(tmp_path / "ds"), str(tmp_path / "back")])
    back = [read_episode(f, None) for f in sorted((tmp_path / "back").glob("*.hdf5"))]
    assert [b["instruction"] for b in back] == [o["instruction"] for o in originals]
    for b, o in zip(back, originals):
        np.testing.assert_array_equal(b["action"], o["action"])
        np.testing.assert_array_equal(b["qpos"], o["qpos"])
    with pytest.raises(SystemExit, match="exists"):  # nothing is overwritten
        convert([str(source), str(tmp_path / "ds")])


def test_convert_a_data_config(tmp_path):
    convert(["data=tint data.episodes=3 data.steps=4", str(tmp_path / "ds"), "--codebase-version", "v2.1"])
    info = json.loads((tmp_path / "ds" / "meta" / "info.json").read_text())
    assert (info["codebase_version"], info["total_episodes"], info["total_frames"]) == ("v2.1", 3, 12)


def test_convert_refuses_an_output_inside_its_source_and_a_source_inside_its_output(source, written, tmp_path):
    """Into a cache entry (a data config's episodes) the output would be files its manifest does not list, and every
    later run on that data would stop: refused before anything is written, both ways and both directions."""
    data = "data=tint data.episodes=3 data.steps=4"
    entry = Path(episodes_dir(compose(*data.split())))
    with pytest.raises(SystemExit) as e:
        convert([data, str(entry / "lerobot")])
    assert str(e.value) == f"error: {entry / 'lerobot'} is inside the source {entry}: give an output folder outside it"
    dataset = written[("v3.0", "video")]
    for src, out in ((str(source), source / "ds"), (str(dataset), dataset / "back"), (str(source), source.parent)):
        with pytest.raises(SystemExit) as e:
            convert([src, str(out)])
        assert "give an output folder outside it" in str(e.value) and "\n" not in str(e.value)
    assert not (entry / "lerobot").exists() and not (source / "ds").exists() and not (dataset / "back").exists()
    check_cache_entry(entry, "data")  # the entry is still whole


@pytest.mark.parametrize("args, message", [
    (["--fps", "-5"], "argument --fps: '-5': must be a whole number >= 1"),
    (["--fps", "0"], "argument --fps: '0': must be a whole number >= 1"),
    (["--image-size", "0"], "argument --image-size: '0': must be a whole number >= 1")])
def test_convert_numbers_below_one_are_one_line(tmp_path, capsys, args, message):
    from vla_exp.data.convert import at_least_one
    assert at_least_one("1") == 1 and at_least_one(" 30") == 30
    with pytest.raises(SystemExit):
        convert(["data=tint", str(tmp_path / "ds"), *args])
    assert capsys.readouterr().err.strip().splitlines()[-1] == f"vla-exp-convert: error: {message}"
    assert not (tmp_path / "ds").exists()


@pytest.mark.parametrize("source, message", [
    ("data=bogus", "error: the source 'data=bogus' does not compose: In 'train': Could not find 'data/bogus' "
                   "Available options in 'data': blocks lerobot metaworld tint"),
    ("data=tint foo=1", "error: the source 'data=tint foo=1' does not compose: Could not override 'foo'. To append "
                        "to your config use +foo=1"),
    ("data=tint data.episodes=1", "error: the source 'data=tint data.episodes=1': data.episodes=1: must be an integer "
                                  ">= 2, or null (data=lerobot: every episode)")])
def test_convert_a_data_config_that_does_not_compose_is_one_line(tmp_path, source, message):
    with pytest.raises(SystemExit) as e:
        convert([source, str(tmp_path / "ds")])
    assert str(e.value) == message
    assert not (tmp_path / "ds").exists()


def test_the_split_and_normalisation_are_the_hdf5_ones(written, source):
    """The same episodes split the same way: LeRobot data and their HDF5 originals give the same training set."""
    train_h, val_h = datasets(compose(*FAST, f"data.dir={source}"))
    train_l, val_l = datasets(lerobot_cfg(written[("v3.0", "image")], "data.past_end=hold"))
    assert len(train_h) == len(train_l) and len(val_h) == len(val_l)
    assert train_h.norm.state_dict() == train_l.norm.state_dict()
    for a, b in ((train_h[5], train_l[5]), (val_h[0], val_l[0])):
        assert a["instruction"] == b["instruction"] and torch.equal(a["actions"], b["actions"])


def test_chunks_past_the_end_are_flagged_and_left_out_of_the_errors(written):
    train, _ = datasets(lerobot_cfg(written[("v3.0", "image")]))
    steps = len(train.episodes[0]["action"])
    last = train[steps - 1]  # the episode's last step: only the first action of its chunk is real
    assert last["pad"].tolist() == [False] + [True] * (train.horizon - 1)
    assert train[0]["pad"].tolist() == [False] * steps + [True] * (train.horizon - steps)
    pred, target = torch.zeros(2, 3, 2), torch.ones(2, 3, 2)
    target[0, 1:] = 100.0  # padded: ignored
    pad = torch.tensor([[False, True, True], [False, False, False]])
    assert sample_errors(pred, target, pad).tolist() == [1.0, 1.0]
    assert sample_errors(pred.numpy(), target.numpy(), pad.numpy()).tolist() == [1.0, 1.0]


def test_the_loss_leaves_padded_steps_out(written, tmp_path):
    from vla_exp.policy.diffusion import noise_prediction
    from vla_exp.training.loop import build_parts
    from vla_exp.training import ddp
    cfg = lerobot_cfg(written[("v3.0", "image")])
    p = build_parts(cfg, ddp.OneProcess(), torch.device("cpu"), False, tmp_path)
    steps = len(p.train_set.episodes[0]["action"])
    batch = torch.utils.data.default_collate([p.train_set[i] for i in range(steps - 4, steps)])
    with torch.no_grad():
        loss, pred = noise_prediction(p.policy, p.train_scheduler, batch, p.tokenizer, torch.Generator().manual_seed(3))
    noise = torch.randn(batch["actions"].shape, generator=torch.Generator().manual_seed(3))
    real = ~batch["pad"][..., None].expand_as(noise)
    assert loss.item() == pytest.approx(((pred - noise) ** 2)[real].mean().item(), rel=1e-6)
    assert loss.item() != pytest.approx(((pred - noise) ** 2).mean().item(), rel=1e-3)


def test_several_cameras_are_placed_side_by_side(originals, tmp_path):
    two = [{**o, "images": o["images"]} for o in originals]
    root = lerobot.write_dataset(tmp_path / "a", two, "left", images="image")
    # a second camera: the same frames upside down, as its own image feature
    table = lerobot.data_file.__wrapped__(root / "data" / "chunk-000" / "file-000.parquet")
    flipped = [{"bytes": lerobot.png(np.asarray(f)[::-1]), "path": None}
               for o in originals for f in o["images"]]
    import pyarrow as pa
    pq.write_table(table.append_column("observation.images.right", pa.array(
        flipped, table.schema.field("observation.images.left").type)), root / "data" / "chunk-000" / "file-000.parquet")
    info = json.loads((root / "meta" / "info.json").read_text())
    info["features"]["observation.images.right"] = info["features"]["observation.images.left"]
    (root / "meta" / "info.json").write_text(json.dumps(info))
    with pytest.raises(UsageError, match="name the camera with data.camera .cameras there: observation.images.left, "
                                         "observation.images.right"):
        datasets(lerobot_cfg(root))
    got = cached(root, "data.camera=[observation.images.left,observation.images.right]")
    frame = originals[0]["images"][0]
    side_by_side = np.concatenate([frame, frame[::-1]], axis=1)  # 64 x 128, resized to the model's 64 x 64
    assert got[0]["images"].shape == (len(originals[0]["action"]), 64, 64, 3)
    assert np.abs(got[0]["images"][0].astype(int) - lerobot.resize(side_by_side[None], 64)[0]).max() == 0


def test_the_cache_is_keyed_by_the_datasets_contents(written, tmp_path):
    root = shutil.copytree(written[("v3.0", "video")], tmp_path / "ds")
    first = episodes_dir(lerobot_cfg(root))
    assert episodes_dir(lerobot_cfg(root)) == first  # decoded once
    info = json.loads((root / "meta" / "info.json").read_text())
    (root / "meta" / "info.json").write_text(json.dumps({**info, "robot_type": "other"}))
    assert episodes_dir(lerobot_cfg(root)) != first


# ---------------------------------------------------------------------------------------------------------------
# bad input: one line, before training, naming the file and what is allowed


def broken(written, tmp_path, layout=("v3.0", "video")):
    return shutil.copytree(written[layout], tmp_path / "ds")


def edit_info(root, **changes):
    info = json.loads((root / "meta" / "info.json").read_text())
    (root / "meta" / "info.json").write_text(json.dumps({**info, **changes}))


def refused(root, *overrides):
    with pytest.raises(UsageError) as e:
        datasets(lerobot_cfg(root, *overrides))
    return str(e.value)


def test_no_info_json(tmp_path):
    (tmp_path / "ds").mkdir()
    assert "ds: no meta/info.json, not a LeRobot dataset" in refused(tmp_path / "ds")


def test_no_root():
    assert refused("null").startswith("data=lerobot needs data.root=")


def test_unsupported_version(written, tmp_path):
    root = broken(written, tmp_path)
    edit_info(root, codebase_version="v2.0")
    assert refused(root).endswith("info.json: codebase_version 'v2.0' is not supported (supported: v2.1, v3.0)")


def test_unknown_camera(written, tmp_path):
    message = refused(written[("v3.0", "video")], "data.camera=observation.images.wrist")
    assert message.endswith("(cameras there: observation.images.top)") and "observation.images.wrist" in message


@pytest.mark.parametrize("layout", [("v3.0", "video"), ("v2.1", "video")], ids=["v3.0", "v2.1"])
@pytest.mark.parametrize("kind", ["data", "video"])
def test_missing_file(written, tmp_path, layout, kind):
    root = broken(written, tmp_path, layout)
    victim = sorted(root.glob("data/**/*.parquet" if kind == "data" else "videos/**/*.mp4"))[-1]
    victim.unlink()
    assert refused(root).startswith(f"{victim}: missing")


def test_video_with_fewer_frames_than_its_episode(written, originals, tmp_path):
    root = broken(written, tmp_path)
    video = root / "videos" / "observation.images.top" / "chunk-000" / "file-000.mp4"
    video.unlink()
    with lerobot.Encoder(20) as encoder:
        encoder.append(video, np.concatenate([o["images"] for o in originals])[:-3])
    assert refused(root) == (f"{video}: episode 5, camera observation.images.top: no frame at 2.250 s (the video "
                             f"ends at 2.200 s; the episode has 8 frames from 2.000 s)")


def encode_with_gap(path, frames, missing, fps=20):
    """An AV1 mp4 as LeRobot encodes one, each frame stamped with its own time, the frames `missing` left out (a
    camera that dropped frames)."""
    import av
    policy, param = os.sched_getscheduler(0), os.sched_getparam(0)  # SVT-AV1 raises it (lerobot.Encoder)
    try:
        encode_frames(av, path, frames, missing, fps)
    finally:  # else every process the later tests start inherits real-time priority and starves the others
        os.sched_setscheduler(0, policy, param)


def encode_frames(av, path, frames, missing, fps):
    from fractions import Fraction
    with av.open(str(path), "w") as container:
        stream = container.add_stream(lerobot.VIDEO["vcodec"], rate=fps, options={"g": str(lerobot.VIDEO["g"]),
                                                                                  "crf": str(lerobot.VIDEO["crf"])})
        stream.width, stream.height, stream.pix_fmt = frames.shape[2], frames.shape[1], lerobot.VIDEO["pix_fmt"]
        for i, frame in enumerate(frames):
            if i not in missing:
                f = av.VideoFrame.from_ndarray(frame, format="rgb24")
                f.pts, f.time_base = i, Fraction(1, fps)
                container.mux(stream.encode(f))
        container.mux(stream.encode())


def test_a_gap_in_a_video_is_refused_not_filled_from_the_next_episode(written, originals, tmp_path):
    root = broken(written, tmp_path)
    video = root / "videos" / "observation.images.top" / "chunk-000" / "file-000.mp4"
    video.unlink()
    before = os.sched_getscheduler(0)
    encode_with_gap(video, np.concatenate([o["images"] for o in originals]), missing={10, 11, 12})
    assert os.sched_getscheduler(0) == before
    assert refused(root) == (f"{video}: episode 1, camera observation.images.top: no frame at 0.500 s (the next "
                             "frame there is at 0.650 s)")
    video.unlink()  # the same file without the gap reads back frame for frame as the one LeRobot's writer made
    encode_with_gap(video, np.concatenate([o["images"] for o in originals]), missing=set())
    got, expected = cached(root), cached(written[("v3.0", "video")])
    assert all(np.array_equal(g["images"], x["images"]) for g, x in zip(got, expected))


def test_each_frame_is_the_one_its_timestamp_names(written, tmp_path):
    """Episode 0's timestamps moved one frame on: its frames are the video's next ones, the last one episode 1's
    first (episodes lie back to back in one file)."""
    root = broken(written, tmp_path)
    data = root / "data" / "chunk-000" / "file-000.parquet"
    table = pq.read_table(data)
    first = np.asarray(table.column("episode_index")) == 0
    stamps = np.asarray(table.column("timestamp")) + first / np.float32(20)
    index = table.schema.get_field_index("timestamp")
    pq.write_table(table.set_column(index, table.schema.field(index), pa.array(stamps.astype(np.float32))), data)
    got, expected = cached(root), cached(written[("v3.0", "video")])
    np.testing.assert_array_equal(got[0]["images"][:-1], expected[0]["images"][1:])
    np.testing.assert_array_equal(got[0]["images"][-1], expected[1]["images"][0])
    assert all(np.array_equal(g["images"], x["images"]) for g, x in zip(got[1:], expected[1:]))


def test_a_window_that_starts_at_the_last_frame_read_goes_back_for_it(written):
    """Frames.read decodes forward and reopens the file only to go back: a read that starts on the frame the last
    read ended on must reopen, not skip past it."""
    video = written[("v3.0", "video")] / "videos" / "observation.images.top" / "chunk-000" / "file-000.mp4"
    with lerobot.Frames() as frames:
        whole = frames.read(video, np.arange(4) / 20, 20, 0, "top")
    with lerobot.Frames() as frames:
        frames.read(video, np.arange(3) / 20, 20, 0, "top")
        np.testing.assert_array_equal(frames.read(video, np.arange(2, 4) / 20, 20, 0, "top"), whole[2:])


@pytest.mark.parametrize("fps, shown", [(0, "0"), ("20", "'20'"), (None, "None"), (-5, "-5")])
def test_fps_that_cannot_place_frames(written, tmp_path, fps, shown):
    root = broken(written, tmp_path)
    edit_info(root, fps=fps)
    assert refused(root) == (f"{root / 'meta' / 'info.json'}: fps={shown}: must be a number > 0 (frames a second, "
                             "which place each frame in its video)")


@pytest.mark.parametrize("change, length", [(+1, 9), (-1, 7)], ids=["fewer rows", "more rows"])
def test_episode_length_that_disagrees_with_its_rows(written, tmp_path, change, length):
    root = broken(written, tmp_path)
    table = root / "meta" / "episodes" / "chunk-000" / "file-000.parquet"
    eps = pd.read_parquet(table)
    eps.loc[2, "length"] += change
    eps.to_parquet(table)
    assert refused(root).endswith(f"file-000.parquet: episode 2 has 8 rows but its length in meta/ is {length}")


@pytest.mark.parametrize("what", ["action", "qpos"])
def test_nan_in_actions_or_states(originals, tmp_path, what):
    bad = [dict(o) for o in originals]
    bad[1] = {**bad[1], what: bad[1][what].copy()}
    bad[1][what][3, 1] = np.nan
    root = lerobot.write_dataset(tmp_path / "ds", bad, "top", images="image")
    key = "action" if what == "action" else "observation.state"
    assert refused(root).endswith(f"file-000.parquet: {key} of episode 1 holds NaN or inf (first at frame 3)")


def test_width_that_differs_from_the_models(written):
    assert "action is 2 wide but the model's action dim (model.config.action_dim) is 3: set data.action_dim=2" in \
        refused(written[("v3.0", "video")], "data.action_dim=3")
    assert "observation.state is 2 wide but the model's state dim (model.config.state_dim) is 5" in \
        refused(written[("v3.0", "video")], "model.config.state_dim=5")


def test_one_episode(originals, tmp_path):
    root = lerobot.write_dataset(tmp_path / "ds", originals[:1], "top", images="image")
    assert refused(root).endswith("1 episode used, at least 2 are needed to split train and validation")


def test_unknown_feature_key(written):
    assert "data.keys.state=observation.joints is not a feature" in refused(
        written[("v3.0", "video")], "data.keys.state=observation.joints")


def test_the_cache_holds_hdf5_episodes_h5py_reads(written):
    folder = episodes_dir(lerobot_cfg(written[("v2.1", "image")]))
    with h5py.File(sorted(folder.glob("*.hdf5"))[0]) as f:
        assert list(f["observations/images"]) == ["observation.images.top"]


@pytest.mark.slow
def test_a_sweep_and_its_report_on_a_lerobot_dataset(written, tmp_path):
    """Two runs through the CLI's multirun on a v2.1 video dataset (decoded once, by the first job), then the
    report: the held-out errors leave padded steps out and the table holds both runs."""
    import os
    import subprocess
    import sys
    root = written[("v2.1", "video")]
    out = subprocess.run([sys.executable, "-m", "vla_exp.training.main", "-m", "init=xavier,none", *FAST, "data=lerobot",
                          f"data.root={root}", f"hydra.sweep.dir={tmp_path}"], capture_output=True, text=True,
                         env=os.environ)
    assert out.returncode == 0, out.stderr[-2000:]
    summaries = [json.loads(p.read_text()) for p in sorted(tmp_path.glob("*/summary.json"))]
    assert len(summaries) == 2 and all(np.isfinite(s["val_action_error"]) for s in summaries)
    assert len({s["data_dir"] for s in summaries}) == 1 and "lerobot-" in summaries[0]["data_dir"]
    assert set(summaries[0]["baseline_action_errors"]) == {"mean_action", "hold_state", "ignore_image",
                                                           "ignore_instruction"}
    report = subprocess.run([sys.executable, "-m", "vla_exp.attribution.report", str(tmp_path)], capture_output=True, text=True,
                            env=os.environ)
    assert report.returncode == 0, report.stderr[-2000:]
    table = pd.read_csv(tmp_path / "report" / "table.csv")
    assert sorted(table.init) == ["none", "xavier"] and table.n_runs.tolist() == [1, 1]


# ------------------------------------------------------------------------------------------------ one line for each
def test_a_path_template_with_a_field_its_version_does_not_fill(written, tmp_path):
    root = broken(written, tmp_path)
    edit_info(root, data_path="data/chunk-{episode_chunk:03d}/file-{file_index:03d}.parquet")
    assert refused(root) == (f"{root / 'meta' / 'info.json'}: the path template "
                             "'data/chunk-{episode_chunk:03d}/file-{file_index:03d}.parquet' cannot be filled (KeyError: "
                             "'episode_chunk'); a v3.0 dataset fills chunk_index, file_index")


def test_a_feature_whose_shape_is_not_its_data(written, tmp_path):
    root = broken(written, tmp_path)
    info = json.loads((root / "meta" / "info.json").read_text())
    info["features"]["action"]["shape"] = [3]
    edit_info(root, features=info["features"])
    assert refused(root, "data.action_dim=3") == (
        f"{root / 'data' / 'chunk-000' / 'file-000.parquet'}: action holds 2 values a frame, but meta/info.json gives "
        "it shape [3]")


@pytest.mark.parametrize("info, message", [
    ("[1, 2]", "holds a JSON list, not LeRobot's info (a mapping)"),
    ('{"codebase_version": "v3.0"}', "no features mapping in it"),
    ('{"codebase_version": "v3.0", "features": {"action": {"shape": [2]}}}', "feature action has no dtype or shape"),
    ("{not json", "not JSON (Expecting property name enclosed in double quotes: line 1 column 2 (char 1))"),
])
def test_an_info_json_that_is_no_info(written, tmp_path, info, message):
    root = broken(written, tmp_path)
    (root / "meta" / "info.json").write_text(info)
    assert refused(root) == f"{root / 'meta' / 'info.json'}: {message}"


@pytest.mark.parametrize("layout, name", [(("v2.1", "video"), "episodes.jsonl"), (("v2.1", "video"), "tasks.jsonl"),
                                          (("v3.0", "video"), "tasks.parquet")])
def test_a_missing_meta_file(written, tmp_path, layout, name):
    root = broken(written, tmp_path, layout)
    (root / "meta" / name).unlink()
    assert refused(root) == f"{root / 'meta' / name}: missing (every LeRobot {layout[0]} dataset has it)"


def test_a_jsonl_line_that_is_not_json(written, tmp_path):
    root = broken(written, tmp_path, ("v2.1", "video"))
    path = root / "meta" / "episodes.jsonl"
    lines = path.read_text().splitlines()
    path.write_text("\n".join([lines[0], lines[1][:-5], *lines[2:]]) + "\n")
    assert refused(root) == f"{path}: line 2 is not JSON"


@pytest.mark.parametrize("frame", [3, 1])
def test_one_png_frame_of_another_size(originals, tmp_path, frame):
    bad = [dict(o) for o in originals]
    root = lerobot.write_dataset(tmp_path / "ds", bad, "top", images="image")
    from PIL import Image
    data = root / "data" / "chunk-000" / "file-000.parquet"
    table = pq.read_table(data)
    column = table.column("observation.images.top").to_pylist()
    small = io.BytesIO()
    Image.new("RGB", (32, 32)).save(small, format="PNG")
    episode = table.column("episode_index").to_pylist()
    first = episode.index(2)
    column[first + frame] = {**column[first + frame], "bytes": small.getvalue()}
    index = table.schema.get_field_index("observation.images.top")
    pq.write_table(table.set_column(index, table.schema.field(index), pa.array(column, table.schema.field(index).type)),
                   data)
    assert refused(root) == (f"{data}: observation.images.top frame {frame} of episode 2 is 32x32, frame 0 is 64x64: an image "
                             "feature's frames must share one size")


# ------------------------------------------------------------------------------------------------ what the reader promises
def test_inf_in_actions_is_refused_like_nan(originals, tmp_path):
    bad = [dict(o) for o in originals]
    bad[1] = {**bad[1], "action": bad[1]["action"].copy()}
    bad[1]["action"][2, 0] = np.inf
    root = lerobot.write_dataset(tmp_path / "ds", bad, "top", images="image")
    assert refused(root).endswith("file-000.parquet: action of episode 1 holds NaN or inf (first at frame 2)")


def test_frames_are_resized_bilinearly():
    checks = np.indices((64, 64)).sum(axis=0) % 2 * 255  # a 1-pixel checkerboard: nearest gives 0 or 255
    frames = np.repeat(checks[None, :, :, None], 3, axis=3).astype(np.uint8)
    small = lerobot.resize(frames, 32)
    assert small.shape == (1, 32, 32, 3) and 100 < small.min() <= small.max() < 155


def test_a_data_file_of_another_size_is_another_dataset(written, tmp_path):
    root = shutil.copytree(written[("v3.0", "image")], tmp_path / "ds")
    first = episodes_dir(lerobot_cfg(root))
    data = root / "data" / "chunk-000" / "file-000.parquet"
    pq.write_table(pq.read_table(data), data, compression="none")  # the same rows, rewritten: meta/ is unchanged
    assert episodes_dir(lerobot_cfg(root)) != first


def test_cameras_of_one_height_and_other_widths_go_side_by_side(originals, tmp_path):
    root = lerobot.write_dataset(tmp_path / "a", originals, "left", images="image")
    data = root / "data" / "chunk-000" / "file-000.parquet"
    table = pq.read_table(data)
    narrow = [{"bytes": lerobot.png(np.asarray(f)[:, :32]), "path": None} for o in originals for f in o["images"]]
    field = table.schema.field("observation.images.left")
    pq.write_table(table.append_column("observation.images.right", pa.array(narrow, field.type)), data)
    info = json.loads((root / "meta" / "info.json").read_text())
    info["features"]["observation.images.right"] = {**info["features"]["observation.images.left"], "shape": [64, 32, 3]}
    (root / "meta" / "info.json").write_text(json.dumps(info))
    got = cached(root, "data.camera=[observation.images.left,observation.images.right]")
    frame = originals[0]["images"][0]
    expected = lerobot.resize(np.concatenate([frame, frame[:, :32]], axis=1)[None], 64)[0]  # 64 x 96 -> 64 x 64
    assert np.array_equal(got[0]["images"][0], expected)


def test_an_episode_of_several_tasks_takes_its_first(written, tmp_path):
    root = broken(written, tmp_path)
    table = root / "meta" / "episodes" / "chunk-000" / "file-000.parquet"
    eps = pd.read_parquet(table)
    eps["tasks"] = [["pick the block", *t] for t in eps.tasks]
    eps.to_parquet(table)
    assert {e["instruction"] for e in cached(root)} == {"pick the block"}


def test_info_json_counts_and_describes_videos_as_lerobots_writer_does(written):
    for version in ("v3.0", "v2.1"):
        image = json.loads((written[(version, "image")] / "meta" / "info.json").read_text())
        video = json.loads((written[(version, "video")] / "meta" / "info.json").read_text())
        if version == "v2.1":  # v3.0's info.json has no total_videos
            assert image["total_videos"] == 0 and video["total_videos"] == video["total_episodes"] > 0
        camera = "observation.images.top"
        assert "info" not in image["features"][camera] and image["features"][camera]["dtype"] == "image"
        assert video["features"][camera]["info"]["video.codec"] == "av1"


def test_two_episodes_are_enough(originals, tmp_path):
    root = lerobot.write_dataset(tmp_path / "ds", originals[:2], "top", images="image")
    train, val = datasets(lerobot_cfg(root))
    assert len(train) and len(val)


def test_damage_inside_a_data_file_is_named_against_the_datasets_file(written, tmp_path):
    root = broken(written, tmp_path)
    data = root / "data" / "chunk-000" / "file-000.parquet"
    raw = bytearray(data.read_bytes())
    raw[len(raw) // 3:len(raw) // 3 + 400] = bytes(b ^ 0xFF for b in raw[len(raw) // 3:len(raw) // 3 + 400])
    data.write_bytes(bytes(raw))
    message = refused(root)
    assert message.startswith(f"{data}: not a readable parquet file (") and "\n" not in message


def test_data_episodes_takes_the_first_n_and_null_takes_all(written, originals):
    root = written[("v3.0", "image")]
    first = cached(root, "data.episodes=3")
    assert [e["action"].tolist() for e in first] == [o["action"].tolist() for o in originals[:3]]
    assert len(cached(root, "data.episodes=null")) == len(originals) > 3


def test_one_frame_a_second_places_every_frame(originals, tmp_path):
    """fps=1 is allowed: a frame a second, each read at its own timestamp."""
    root = lerobot.write_dataset(tmp_path / "ds", originals[:2], "top", fps=1)
    assert json.loads((root / "meta" / "info.json").read_text())["fps"] == 1
    back = cached(root)
    assert [len(e["action"]) for e in back] == [len(o["action"]) for o in originals[:2]]
    for e, o in zip(back, originals):  # AV1 is lossy: each frame near its own, far from its neighbour's
        err = np.abs(e["images"].astype(float) - o["images"].astype(float)).mean(axis=(1, 2, 3))
        assert err.max() < 8


def test_videos_are_written_with_lerobots_keyframe_interval(written):
    """LeRobot writes a keyframe every 2 frames (g=2), so that any frame decodes after at most one other."""
    import av
    path = written[("v3.0", "video")] / "videos" / "observation.images.top" / "chunk-000" / "file-000.mp4"
    with av.open(str(path)) as container:
        keys = [p.is_keyframe for p in container.demux(video=0) if p.size]
    assert len(keys) > 4 and keys == [i % 2 == 0 for i in range(len(keys))]
