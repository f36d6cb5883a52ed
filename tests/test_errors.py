"""Bad input gets one clear line before any work: config values (vla_exp/schema.py), episode files
(vla_exp/data/episodes.py) and checkpoints (vla_exp/policy/model.py). Every broken file here is a real one, written by the project and then damaged."""
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch

from vla_exp import UsageError
from vla_exp.data import chunks, tasks
from vla_exp.config import CONF_DIR, compose
from vla_exp.policy.load import backbone_path, load_policy
from vla_exp.policy.model import TinyVLAForCausalLM
from vla_exp.data.sources import validate

ROOT = Path(__file__).resolve().parent.parent
HORIZON, SIZE, STEPS = 16, 64, 8


def one_line_error(excinfo):
    message = str(excinfo.value)
    assert "\n" not in message and message.strip() == message
    return message


# ---------------------------------------------------------------------------------------------------------------
# config rules, in-process

BAD_VALUES = [  # overrides, the exact message
    (["optim.lr=-1"], "optim.lr=-1: must be a number > 0"),
    (["optim.lr=0"], "optim.lr=0: must be a number > 0"),
    (["optim.lr='0.001'"], "optim.lr='0.001': must be a number > 0"),
    (["optim.lr=true"], "optim.lr=true: must be a number > 0"),
    (["optim.lr=nan"], "optim.lr=nan: must be a number > 0"),
    (["optim.lr=inf"], "optim.lr=inf: must be a number > 0"),
    (["~optim.lr"], "optim.lr is not set: it must be a number > 0"),
    (["optim.batch_size=0"], "optim.batch_size=0: must be an integer >= 1"),
    (["optim.batch_size=2.5"], "optim.batch_size=2.5: must be an integer >= 1"),
    (["optim.batch_size=true"], "optim.batch_size=true: must be an integer >= 1"),
    (["epochs=0"], "epochs=0: must be an integer >= 1"),
    (["epochs=2.0"], "epochs=2.0: must be an integer >= 1"),
    (["seed=1.5"], "seed=1.5: must be an integer from 0 to 4294967295"),
    (["seed=false"], "seed=false: must be an integer from 0 to 4294967295"),
    (["seed=null"], "seed=null: must be an integer from 0 to 4294967295"),
    (["seed=-3"], "seed=-3: must be an integer from 0 to 4294967295"),
    (["seed=4294967296"], "seed=4294967296: must be an integer from 0 to 4294967295"),
    (["recipe=fixed", "clipping.max_norm=0"], "clipping.max_norm=0: must be a number > 0"),
    (["recipe=fixed", "clipping.max_norm=-1.0"], "clipping.max_norm=-1.0: must be a number > 0"),
    (["loss_handling.threshold=0"], "loss_handling.threshold=0: must be a number > 0"),
    (["loss_handling.threshold=big"], "loss_handling.threshold='big': must be a number > 0"),
    (["loss_handling.factor=0"], "loss_handling.factor=0: must be a number in (0, 1]"),
    (["loss_handling.factor=1.5"], "loss_handling.factor=1.5: must be a number in (0, 1]"),
    (["loss_handling.factor=true"], "loss_handling.factor=true: must be a number in (0, 1]"),
    (["logger.mode=offlin"], "logger.mode='offlin': must be one of offline, online, disabled"),
    (["logger.kind=tensorboard"], "logger.kind='tensorboard': must be one of wandb, none"),
    (["eval.samples=0"], "eval.samples=0: must be an integer >= 1"),
    (["eval.rollouts=-1"], "eval.rollouts=-1: must be an integer >= 0"),
    (["eval.rollout_every=0"], "eval.rollout_every=0: must be an integer >= 1"),
    (["eval.rollouts=5"], "eval.rollouts=5: closed-loop rollouts need a simulator, data=metaworld (here "
                          "data.task=tint); set eval.rollouts=0"),
    (["log_every=0"], "log_every=0: must be an integer >= 1"),
    (["converge_loss=low"], "converge_loss='low': must be a number"),
    (["diverge_after=0"], "diverge_after=0: must be null or an integer >= 1"),
    (["checkpoint.every=-1"], "checkpoint.every=-1: must be an integer >= 0"),
    (["checkpoint.keep=maybe"], "checkpoint.keep='maybe': must be true or false"),
    (["converge_loss=true"], "converge_loss=true: must be a number"),
    (["device=gpu"], "device='gpu': must be one of auto, cpu, cuda"),
    (["precision=fp16"], "precision='fp16': must be one of auto, fp32, bf16"),
    (["threads=0"], "threads=0: must be null or an integer >= 1"),
    (["threads=1.5"], "threads=1.5: must be null or an integer >= 1"),
    (["diffusion.train_steps=0"], "diffusion.train_steps=0: must be an integer >= 1"),
    (["eval.epoch_samples=0"], "eval.epoch_samples=0: must be null or an integer >= 1"),
    (["diffusion.inference_steps=0"],
     "diffusion.inference_steps=0: must be an integer from 1 to diffusion.train_steps=100"),
    (["diffusion.inference_steps=101"],
     "diffusion.inference_steps=101: must be an integer from 1 to diffusion.train_steps=100"),
    (["diffusion.train_steps=20", "diffusion.inference_steps=50"],
     "diffusion.inference_steps=50: must be an integer from 1 to diffusion.train_steps=20"),
    (["data.episodes=1"], "data.episodes=1: must be an integer >= 2, or null (data=lerobot: every episode)"),
    (["data.steps=0"], "data.steps=0: must be an integer >= 1"),
    (["data.val_fraction=0"], "data.val_fraction=0: must be a number in (0, 1)"),
    (["data.val_fraction=1"], "data.val_fraction=1: must be a number in (0, 1)"),
    (["data.val_fraction=true"], "data.val_fraction=true: must be a number in (0, 1)"),
    (["data.task=cubes"], "data.task='cubes': must be one of tint, blocks, metaworld, lerobot"),
    (["model.head_loading=legacy"],
     "model.head_loading='legacy': must be one of current, legacy_zeros, legacy_stale, legacy_empty"),
    (["model.stale_fraction=1.5"], "model.stale_fraction=1.5: must be a number in [0, 1]"),
    (["model.stale_fraction=-0.1"], "model.stale_fraction=-0.1: must be a number in [0, 1]"),
    (["init._target_=numpy.savetxt", "+init.fname=/tmp/x"], "init._target_='numpy.savetxt': must be one of the "
     "project's own classes (ConstantLR, CosineLR, GradNormClip, NoClip, NoInit, ReportedXavierInit, "
     "ReportedXavierMoreInit, ScaleDown, SkipNonFinite, TorchDefaultInit, XavierAllInit in vla_exp)"),
    (["+optim.schedule.extra={_target_: shutil.copyfile}"], "optim.schedule.extra._target_='shutil.copyfile': must "
     "be one of the project's own classes (ConstantLR, CosineLR, GradNormClip, NoClip, NoInit, ReportedXavierInit, "
     "ReportedXavierMoreInit, ScaleDown, SkipNonFinite, TorchDefaultInit, XavierAllInit in vla_exp)"),
]


@pytest.mark.parametrize("overrides,message", BAD_VALUES, ids=[" ".join(o) for o, _ in BAD_VALUES])
def test_bad_value_is_named_with_what_is_allowed(make_cfg, overrides, message):
    with pytest.raises(UsageError) as e:
        validate(make_cfg(*overrides))
    assert one_line_error(e) == message


@pytest.mark.parametrize("overrides", [
    ["model.stale_fraction=0"], ["model.stale_fraction=1"], ["loss_handling.factor=1"], ["threads=1"],
    ["diffusion.inference_steps=1"], ["diffusion.inference_steps=100"], ["eval.samples=8", "eval.epoch_samples=64"],
    ["logger.mode=disabled"], ["seed=0"], ["seed=4294967295"],
    ["converge_loss=0"], ["optim.lr=1"],  # an integer is a number
    ["logger=none", "+logger.mode=anything"],  # the mode only matters to W&B
    ["data.dir=/some/folder", "data.task=cubes"],  # a folder of episodes: nothing is generated
])
def test_edge_values_pass(make_cfg, overrides):
    validate(make_cfg(*overrides))


def options(group):
    return sorted(p.stem for p in (CONF_DIR / group).glob("*.yaml"))


GROUP_OPTIONS = [f"{g.name}={o}" for g in sorted(CONF_DIR.iterdir()) if g.is_dir() for o in options(g.name)]


@pytest.mark.parametrize("override", ["", *GROUP_OPTIONS])
def test_every_shipped_option_and_recipe_passes(make_cfg, override):
    validate(make_cfg(*filter(None, [override])))


# ---------------------------------------------------------------------------------------------------------------
# the command line: one line on stderr, exit code 1, and no run output


def cli(tmp_path, *overrides):
    run_dir = tmp_path / "run"
    out = subprocess.run([sys.executable, "-m", "vla_exp.training.main", *overrides, f"hydra.run.dir={run_dir}"], cwd=ROOT,
                         capture_output=True, text=True)
    return out, run_dir


@pytest.mark.slow
@pytest.mark.parametrize("override,message", [
    ("optim.lr=-1", "optim.lr=-1: must be a number > 0"),
    ("clipping._target_=os.symlink", "clipping._target_='os.symlink': must be one of the project's own classes "
     "(ConstantLR, CosineLR, GradNormClip, NoClip, NoInit, ReportedXavierInit, ReportedXavierMoreInit, ScaleDown, "
     "SkipNonFinite, TorchDefaultInit, XavierAllInit in vla_exp)"),
    ("model.head_loading=legacy", "model.head_loading='legacy': must be one of current, legacy_zeros, legacy_stale, "
                                  "legacy_empty"),
])
def test_cli_rejects_a_bad_value_before_writing_anything(tmp_path, override, message):
    out, run_dir = cli(tmp_path, override, "logger=none")
    assert out.returncode == 1
    assert out.stderr.splitlines() == [f"error: {message}"]
    # Hydra makes the folder and records the config before the job starts; the run itself wrote nothing
    assert {p.name for p in run_dir.iterdir()} <= {".hydra", "train.log"}


@pytest.mark.slow
def test_cli_unknown_group_option_lists_the_valid_ones(tmp_path):
    out, run_dir = cli(tmp_path, "init=xaviar")
    assert out.returncode != 0
    assert "xaviar" in out.stderr
    listed = out.stderr[out.stderr.index("Available options"):].split()
    assert {"xavier", "xavier_all", "none", "torch_default"} <= set(listed)
    assert not run_dir.exists()


# ---------------------------------------------------------------------------------------------------------------
# episode files: written by the project's generator, then broken with h5py


@pytest.fixture(scope="module")
def good_dir(tmp_path_factory):
    cfg = compose("data.episodes=3", f"data.steps={STEPS}")
    return tasks.generate(tmp_path_factory.mktemp("good") / "tint", **tasks.params(cfg))


@pytest.fixture
def episodes(good_dir, tmp_path):
    """A fresh copy of three good episodes; the tests break episode_00001.hdf5."""
    return Path(shutil.copytree(good_dir, tmp_path / "episodes"))


def load(folder, camera="top", **expected):
    expected = {"image_size": SIZE, "action_dim": 2, "state_dim": 2, **expected}
    return chunks.load_split(folder, camera, 0.34, 0, HORIZON, **expected)


def load_error(folder, **kwargs):
    with pytest.raises(UsageError) as e:
        load(folder, **kwargs)
    return one_line_error(e)


def rewrite(path, key, change):
    """Replace dataset `key` of an episode file by `change(old array)`, or delete it when `change` is None."""
    with h5py.File(path, "r+") as f:
        old = f[key][()]
        del f[key]
        if change is not None:
            f[key] = change(old)


def test_good_episodes_load(episodes):
    train, val = load(episodes)
    assert len(train) + len(val) == 3 * STEPS


def test_missing_folder(tmp_path):
    assert load_error(tmp_path / "nowhere") == f"data.dir={tmp_path / 'nowhere'}: no such folder"


def test_folder_without_episodes(tmp_path):
    (tmp_path / "notes.txt").write_text("no episodes")
    assert load_error(tmp_path) == f"data.dir={tmp_path}: no *.hdf5 episode files there"


def test_folder_with_one_episode(episodes):
    for f in sorted(episodes.glob("*.hdf5"))[1:]:
        f.unlink()
    assert load_error(episodes).startswith(f"data.dir={episodes}: 1 episode file(s): at least 2 are needed")


def test_file_that_is_not_hdf5(episodes):
    bad = episodes / "episode_00001.hdf5"
    bad.write_text("an episode, honestly")
    assert load_error(episodes).startswith(f"{bad}: not a readable HDF5 file (")


def test_truncated_file(episodes):
    bad = episodes / "episode_00001.hdf5"
    bad.write_bytes(bad.read_bytes()[:bad.stat().st_size // 2])
    assert re.fullmatch(re.escape(f"{bad}: not a readable HDF5 file (") + ".*truncated file.*\\)", load_error(episodes))


def test_corrupted_image_chunk(episodes):
    bad = episodes / "episode_00001.hdf5"
    with h5py.File(bad, "r") as f:  # where the first compressed chunk of images lies in the file
        chunk = f["observations/images/top"].id.get_chunk_info(0)
    with open(bad, "r+b") as f:
        f.seek(chunk.byte_offset)
        f.write(b"\xff" * chunk.size)
    assert load_error(episodes).startswith(f"{bad}: not a readable HDF5 file (")


@pytest.mark.parametrize("key", ["observations/images/top", "observations/qpos", "action", "language_raw"])
def test_missing_key(episodes, key):
    bad = episodes / "episode_00001.hdf5"
    rewrite(bad, key, None)
    assert load_error(episodes) == f"{bad}: no /{key}"


def test_missing_camera_lists_the_cameras_there(episodes):
    assert load_error(episodes, camera="wrist") == (f"{episodes / 'episode_00000.hdf5'}: no /observations/images/wrist "
                                                    f"(cameras there: top)")


@pytest.mark.parametrize("key,keep,message", [
    ("action", STEPS - 2, f"lengths differ: {STEPS} images, {STEPS} qpos, {STEPS - 2} actions"),
    ("observations/qpos", STEPS - 1, f"lengths differ: {STEPS} images, {STEPS - 1} qpos, {STEPS} actions"),
    ("observations/images/top", 3, f"lengths differ: 3 images, {STEPS} qpos, {STEPS} actions"),
])
def test_mismatched_lengths(episodes, key, keep, message):
    bad = episodes / "episode_00001.hdf5"
    rewrite(bad, key, lambda a: a[:keep])
    assert load_error(episodes) == f"{bad}: {message}"


@pytest.mark.parametrize("change,message", [
    (lambda a: a[..., 0], f"images are uint8 ({STEPS}, {SIZE}, {SIZE}), not uint8 (T, H, W, 3)"),
    (lambda a: a[..., :1], f"images are uint8 ({STEPS}, {SIZE}, {SIZE}, 1), not uint8 (T, H, W, 3)"),
    (lambda a: a / 255.0, f"images are float64 ({STEPS}, {SIZE}, {SIZE}, 3), not uint8 (T, H, W, 3)"),
    (lambda a: a[:, ::2, ::2], "image size 32x32 does not match 64x64 (model.config.vision_config.image_size)"),
])
def test_wrong_image_shape(episodes, change, message):
    bad = episodes / "episode_00001.hdf5"
    rewrite(bad, "observations/images/top", change)
    assert load_error(episodes) == f"{bad}: {message}"


def test_image_size_follows_the_model(episodes):
    assert load_error(episodes, image_size=224) == (f"{episodes / 'episode_00000.hdf5'}: image size 64x64 does not "
                                                    f"match 224x224 (model.config.vision_config.image_size)")


def test_without_model_sizes_episodes_must_agree_with_the_first(episodes):
    bad = episodes / "episode_00001.hdf5"
    rewrite(bad, "observations/images/top", lambda a: a[:, ::2, ::2])
    assert load_error(episodes, image_size=None) == (f"{bad}: image size 32x32 does not match 64x64 "
                                                     f"(episode_00000.hdf5)")


@pytest.mark.parametrize("key,what,field", [("action", "action dim", "action_dim"),
                                            ("observations/qpos", "state dim", "state_dim")])
def test_dims_follow_the_model(episodes, key, what, field):
    bad = episodes / "episode_00001.hdf5"
    rewrite(bad, key, lambda a: np.concatenate([a, a[:, :1]], axis=1))
    assert load_error(episodes) == f"{bad}: {what} 3 does not match 2 (model.config.{field})"


@pytest.mark.parametrize("key,value,step", [("action", np.nan, 5), ("action", -np.inf, 0),
                                            ("observations/qpos", np.inf, 2), ("baselines/ignore_image", np.nan, 3)])
def test_nan_or_inf(episodes, key, value, step):
    bad = episodes / "episode_00001.hdf5"

    def spoil(a):
        a[step, ..., -1] = value
        return a
    rewrite(bad, key, spoil)
    assert load_error(episodes) == f"{bad}: /{key} holds NaN or inf (first at step {step})"


PER_STEP = ("observations/images/top", "observations/qpos", "action", "baselines/ignore_image",
            "baselines/ignore_instruction")  # every array with one entry per time step


def test_episode_without_time_steps(episodes):
    bad = episodes / "episode_00001.hdf5"
    for key in PER_STEP:
        rewrite(bad, key, lambda a: a[:0])
    assert load_error(episodes) == f"{bad}: no time steps"


def test_episode_shorter_than_the_horizon_is_fine(episodes):
    """Chunks past an episode's end repeat its last action (chunks.ChunkDataset), so one step is enough."""
    bad = episodes / "episode_00001.hdf5"
    for key in PER_STEP:
        rewrite(bad, key, lambda a: a[:1])
    train, val = load(episodes)
    assert len(train) + len(val) == 2 * STEPS + 1


def test_baseline_chunks_shorter_than_the_horizon(episodes):
    bad = episodes / "episode_00001.hdf5"
    rewrite(bad, "baselines/ignore_image", lambda a: a[:, :8])
    assert load_error(episodes) == f"{bad}: /baselines/ignore_image is ({STEPS}, 8, 2), not ({STEPS}, >= {HORIZON}, 2)"


def test_baselines_differ_between_episodes(episodes):
    bad = episodes / "episode_00001.hdf5"
    rewrite(bad, "baselines/ignore_image", None)
    assert load_error(episodes) == (f"{bad}: baselines ['ignore_instruction'] does not match "
                                    f"['ignore_image', 'ignore_instruction'] (episode_00000.hdf5)")


def test_instruction_that_is_not_a_string(episodes):
    bad = episodes / "episode_00001.hdf5"
    rewrite(bad, "language_raw", lambda s: np.arange(3))
    assert load_error(episodes) == f"{bad}: /language_raw is not a string"


def test_a_bad_validation_file_stops_loading_too(episodes):
    """Every file is checked when the split is loaded, whichever side of the split it falls on."""
    _, val_files = chunks.split_episodes(sorted(episodes.glob("*.hdf5")), 0.34, 0)
    rewrite(val_files[0], "action", lambda a: a * np.nan)
    assert load_error(episodes) == f"{val_files[0]}: /action holds NaN or inf (first at step 0)"


# ---------------------------------------------------------------------------------------------------------------
# model.path


def tiny(*overrides):
    return compose(*overrides).model


@pytest.fixture(scope="module")
def good_checkpoint(cache_dir):
    return backbone_path(tiny(), cache_dir)


@pytest.fixture
def checkpoint(good_checkpoint, tmp_path):
    """A copy of the tiny backbone checkpoint to break, and a way to edit its config.json."""
    path = Path(shutil.copytree(good_checkpoint, tmp_path / "ckpt"))

    def edit(change):
        config = json.loads((path / "config.json").read_text())
        change(config)
        (path / "config.json").write_text(json.dumps(config))
    return path, edit


def model_error(path, cache_dir, *overrides):
    with pytest.raises(UsageError) as e:
        load_policy(tiny(f"model.path={path}", *overrides), cache_dir, 0)
    return one_line_error(e)


def test_copied_checkpoint_loads_its_backbone_and_misses_only_the_head(checkpoint, good_checkpoint, cache_dir):
    path, _ = checkpoint
    policy, _, missing = load_policy(tiny(f"model.path={path}"), cache_dir, 0)
    assert missing and all(k.startswith("embed_out.") for k in missing)
    saved = {n: p for n, p in TinyVLAForCausalLM.from_pretrained(good_checkpoint).named_parameters()
             if not n.startswith("embed_out.")}
    ours = {n: p for n, p in policy.named_parameters() if not n.startswith("embed_out.")}
    assert ours.keys() == saved.keys() and all(torch.equal(ours[n], saved[n]) for n in ours)


def test_model_path_that_does_not_exist(tmp_path, cache_dir):
    assert model_error(tmp_path / "nowhere", cache_dir) == f"model.path={tmp_path / 'nowhere'}: no such folder"


def test_model_path_that_is_a_file(checkpoint, cache_dir):
    path, _ = checkpoint
    assert model_error(path / "config.json", cache_dir) == f"model.path={path / 'config.json'}: not a folder"


def test_model_path_without_checkpoint(tmp_path, cache_dir):
    (tmp_path / "unrelated.txt").write_text("not a checkpoint")
    assert model_error(tmp_path, cache_dir).startswith(f"model.path={tmp_path}: no checkpoint there")


def test_config_json_without_weights(checkpoint, cache_dir):
    path, _ = checkpoint
    (path / "model.safetensors").unlink()
    assert model_error(path, cache_dir).startswith(f"model.path={path}: cannot load a TinyVLA backbone from it (")


def test_config_json_that_is_not_json(checkpoint, cache_dir):
    path, _ = checkpoint
    (path / "config.json").write_text("{model_type: tinyvla")
    assert model_error(path, cache_dir).startswith(f"model.path={path}: config.json is not a JSON object (")


def test_config_json_of_another_model_type(checkpoint, cache_dir):
    # Only vla-exp's own and TinyVLA's llava_pythia are loaded. (A type with no sub-configs, gpt_neox say, is rejected
    # the same way; without the check it would build VLAConfig's default backbone, a 20B GPTNeoX, and exhaust memory.)
    path, edit = checkpoint
    edit(lambda c: c.update(model_type="gpt_neox"))
    assert model_error(path, cache_dir) == (f"model.path={path}: config.json is a 'gpt_neox' checkpoint, neither "
                                            "vla-exp's TinyVLA ('vla_exp_tinyvla') nor TinyVLA's LLaVA-Pythia "
                                            "('llava_pythia')")
    edit(lambda c: c.update(model_type="llava_pythia"))  # but not a LLaVA-Pythia config: it has no vision tower
    assert model_error(path, cache_dir) == (f"model.path={path}: config.json's vision_config must hold vision_tower "
                                            "and mm_projector (a LLaVA-Pythia config)")


def test_weights_whose_shapes_do_not_fit_the_config(checkpoint, cache_dir):
    path, edit = checkpoint
    edit(lambda c: c["text_config"].update(hidden_size=64))
    assert model_error(path, cache_dir) == (f"model.path={path}: weights do not fit its config.json: "
                                            f"gpt_neox.embed_in.weight is (384, 128) there, (384, 64) in the model "
                                            f"(27 tensors differ)")


def test_weights_missing_from_the_checkpoint(checkpoint, cache_dir):
    path, edit = checkpoint
    edit(lambda c: c["text_config"].update(num_hidden_layers=3))  # the weights hold two layers
    assert re.fullmatch(re.escape(f"model.path={path}: ") + r"\d+ backbone weights missing from the checkpoint "
                        r"\(first: gpt_neox\.layers\.2\..*\)", model_error(path, cache_dir))


def test_truncated_weights(checkpoint, cache_dir):
    path, _ = checkpoint
    weights = path / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    assert model_error(path, cache_dir).startswith(f"model.path={path}: cannot load a TinyVLA backbone from it (")


def test_checkpoint_image_size_differs_from_the_config(checkpoint, cache_dir):
    path, _ = checkpoint
    assert model_error(path, cache_dir, "model.config.vision_config.image_size=32") == (
        f"model.path={path}: the checkpoint takes 64x64 images, model.config.vision_config.image_size=32")


@pytest.mark.slow
def test_without_metaworld_data_metaworld_says_how_to_install_it(tmp_path):
    hide = tmp_path / "hide"
    hide.mkdir()
    (hide / "metaworld.py").write_text('raise ImportError("No module named \'metaworld\'")\n')
    out = subprocess.run([sys.executable, "-m", "vla_exp.training.main", "data=metaworld", "logger=none",
                          f"hydra.run.dir={tmp_path / 'run'}"], cwd=ROOT, capture_output=True, text=True,
                         env={**os.environ, "PYTHONPATH": str(hide)})
    assert out.returncode == 1
    assert out.stderr.splitlines() == ['error: data.task=metaworld needs MetaWorld, which cannot be imported (No module '
                                       'named \'metaworld\'): pip install -e ".[metaworld]" (or pip install '
                                       '"vla-exp[metaworld]")']
    assert {p.name for p in (tmp_path / "run").iterdir()} <= {".hydra", "train.log"}


def test_out_of_memory_says_what_the_job_asked_for_on_the_cpu_and_in_a_gpu_message():
    from vla_exp.training.loop import out_of_memory
    cpu = torch.device("cpu")
    with pytest.raises(RuntimeError) as refused:  # the CPU allocator's own refusal
        torch.empty(2 ** 42)
    line = out_of_memory(refused.value, cpu)
    assert line.startswith("out of memory on cpu: the job asked for 16,384.00 GiB more with ") and "\n" not in line
    # torch's CUDA message, in the words its caching allocator uses (no GPU here: the peak is this process's)
    cuda = torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.50 GiB. GPU 0 has a total capacity of "
                                  "79.10 GiB of which 1.20 GiB is free.")
    assert out_of_memory(cuda, cpu).startswith("out of memory on cpu: the job asked for 2.50 GiB more with ")
    assert out_of_memory(RuntimeError("shape mismatch"), cpu) is None
