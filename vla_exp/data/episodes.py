"""Episodes: the ACT/TinyVLA-style HDF5 format (reading, writing, checking); vla_exp.data.sources says where a run's
episodes come from.

An episode file holds `/observations/images/<camera>` (T, H, W, 3) uint8, `/observations/qpos` (T, state dim),
`/action` (T, action dim), `language_raw` (the instruction) and, optionally, `/baselines/<name>` (T, >= horizon,
action dim): the action chunks of a predictor to report beside the policy. Read, it is a dict of arrays with the keys
images, qpos, action, instruction and baselines: what every reader of another format must return too.
"""
import h5py
import numpy as np

from vla_exp import UsageError

IMAGES, QPOS, ACTION, INSTRUCTION, BASELINES = "observations/images", "observations/qpos", "action", "language_raw", \
    "baselines"


def write_episode(path, images, qpos, actions, instruction, baselines, camera):
    with h5py.File(path, "w") as f:
        f.create_dataset(f"{IMAGES}/{camera}", data=images, compression="lzf")
        f[QPOS] = qpos
        f[ACTION] = actions
        f[INSTRUCTION] = str(instruction)
        for name, chunks in baselines.items():
            f[f"{BASELINES}/{name}"] = chunks


def camera_name(camera):
    """The name a run's images go by in episode files: `data.camera`, or its cameras joined by '+' (several LeRobot
    cameras side by side), or None (the file's only camera)."""
    return camera if camera is None or isinstance(camera, str) else "+".join(camera)


def only_camera(path):
    """The one camera of an episode file; UsageError where it has several (naming them) or none."""
    with h5py.File(path, "r") as f:
        cameras = list(f[IMAGES]) if IMAGES in f else []
    if len(cameras) != 1:
        raise UsageError(f"{path}: name the camera (cameras there: {', '.join(cameras) or 'none'})")
    return cameras[0]


def read_episode(path, camera):
    """One episode file as arrays; camera None: the file's only one. A file that is not a readable episode raises
    UsageError naming it."""
    try:
        camera = camera or only_camera(path)
        with h5py.File(path, "r") as f:
            keys = (f"{IMAGES}/{camera}", QPOS, ACTION, INSTRUCTION)
            if missing := [k for k in keys if k not in f]:
                cameras = list(f[IMAGES]) if IMAGES in f else []
                hint = f" (cameras there: {', '.join(cameras)})" if missing[0] == keys[0] and cameras else ""
                raise UsageError(f"{path}: no /{missing[0]}{hint}")
            images, qpos, action, instruction = (f[k][()] for k in keys)
            baselines = {k: v[()] for k, v in f[BASELINES].items()} if BASELINES in f else {}
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
        raise UsageError(f"{path}: /{INSTRUCTION} is not a string")
    found = {"image size": "x".join(map(str, images.shape[1:3])), "action dim": action.shape[1],
             "state dim": qpos.shape[1], "baselines": sorted(ep["baselines"])}
    for what, value in found.items():
        want, source = expected.setdefault(what, (value, path.name))
        if value != want:
            raise UsageError(f"{path}: {what} {value} does not match {want} ({source})")
    steps, dim = action.shape
    for name, chunks in ep["baselines"].items():  # one stored chunk per step, at least a horizon long
        if chunks.ndim != 3 or len(chunks) != steps or chunks.shape[1] < horizon or chunks.shape[2] != dim:
            raise UsageError(f"{path}: /{BASELINES}/{name} is {chunks.shape}, not ({steps}, >= {horizon}, {dim})")
    arrays = {QPOS: qpos, ACTION: action, **{f"{BASELINES}/{k}": v for k, v in ep["baselines"].items()}}
    for name, a in arrays.items():
        if not np.isfinite(a).all():
            step = np.argwhere(~np.isfinite(a))[0][0]
            raise UsageError(f"{path}: /{name} holds NaN or inf (first at step {step})")


def episode_files(data_dir):
    """The episode files of a folder, sorted; UsageError if there is none."""
    if not data_dir.is_dir():
        raise UsageError(f"data.dir={data_dir}: no such folder")
    if not (files := sorted(data_dir.glob("*.hdf5"))):
        raise UsageError(f"data.dir={data_dir}: no *.hdf5 episode files there")
    return files
