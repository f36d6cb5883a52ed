"""LeRobot datasets (codebase versions v3.0 and v2.1) as they lie on disk: read into vla-exp episodes, and written
from them.

The `lerobot` package pins older torch and transformers than vla-exp's and cannot be installed beside them, so the
files are read and written here with pyarrow (the parquet tables) and PyAV (the mp4 videos: its wheels bundle FFmpeg
with LeRobot's AV1 codec, libsvtav1 to write and dav1d to read), following the layout LeRobot's own writer produces.

`data=lerobot` is a generator of vla_exp.data.episodes like the built-in tasks: the first run decodes every episode's
frames (resized to the model's image size) and writes them with the episode's states, actions and task string as
HDF5 episodes in the cache, keyed by the dataset's fingerprint; later runs and sweep jobs read the cache.
"""
import hashlib
import io
import json
import math
import os
from functools import lru_cache
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from tqdm import tqdm

from vla_exp import UsageError, one_line
from vla_exp.files import cache_entry, staged_dir
from vla_exp.data.episodes import camera_name, write_episode

SUPPORTED = ("v2.1", "v3.0")
BASELINE = "baselines."  # features named baselines.<name>: a stored predictor's action chunks, (horizon, action dim)
CHUNKS_SIZE = 1000
PATHS = {"v3.0": ("data/chunk-{chunk_index:03d}/file-{file_index:03d}.parquet",
                  "videos/{video_key}/chunk-{chunk_index:03d}/file-{file_index:03d}.mp4"),
         "v2.1": ("data/chunk-{episode_chunk:03d}/episode_{episode_index:06d}.parquet",
                  "videos/chunk-{episode_chunk:03d}/{video_key}/episode_{episode_index:06d}.mp4")}
VIDEO = {"vcodec": "libsvtav1", "pix_fmt": "yuv420p", "g": 2, "crf": 30}  # LeRobot's defaults


# ---------------------------------------------------------------------------------------------------------------
# Reading


class Dataset:
    """A LeRobot dataset's metadata: `info`, `features`, `cameras` (video and image features), `tasks`
    {task_index: string} and `episodes` (one dict per episode: index, length, task, data file and, per camera,
    its video file and the time the episode starts in it). Every file the episodes name is checked to exist."""

    def __init__(self, root):
        self.root = root = Path(root).expanduser()
        self.version = None
        if not (root / "meta" / "info.json").is_file():
            raise UsageError(f"{root}: no meta/info.json, not a LeRobot dataset (data.root must be the folder that "
                             "holds meta/, data/ and videos/)")
        self.info = info = self.meta_json("info.json")
        if not isinstance(info, dict) or not isinstance(info.get("features"), dict):
            raise UsageError(f"{root / 'meta' / 'info.json'}: " + ("no features mapping in it" if isinstance(info, dict)
                             else f"holds a JSON {type(info).__name__}, not LeRobot's info (a mapping)"))
        self.version = info.get("codebase_version")
        if self.version not in SUPPORTED:
            raise UsageError(f"{root / 'meta' / 'info.json'}: codebase_version {self.version!r} is not supported "
                             f"(supported: {', '.join(SUPPORTED)})")
        self.features, self.fps = info["features"], info.get("fps")
        if bad := next((k for k, f in self.features.items() if not isinstance(f, dict) or "dtype" not in f
                        or "shape" not in f), None):
            raise UsageError(f"{root / 'meta' / 'info.json'}: feature {bad} has no dtype or shape")
        if isinstance(self.fps, bool) or not isinstance(self.fps, (int, float)) or not self.fps > 0:
            raise UsageError(f"{root / 'meta' / 'info.json'}: fps={self.fps!r}: must be a number > 0 (frames a "
                             "second, which place each frame in its video)")
        self.cameras = [k for k, f in self.features.items() if f["dtype"] in ("video", "image")]
        self.tasks, self.episodes = self.read_v30() if self.version == "v3.0" else self.read_v21()
        missing = next((p for e in self.episodes for p in (e["data"], *e["videos"].values()) if not p.is_file()), None)
        if missing:
            raise UsageError(f"{missing}: missing (named by meta/info.json's data_path/video_path for the episodes "
                             "in meta/)")

    def meta_path(self, name):
        path = self.root / "meta" / name
        if not path.is_file():
            raise UsageError(f"{path}: missing (every LeRobot {self.version} dataset has it)")
        return path

    def meta_json(self, name):
        try:
            return json.loads(self.meta_path(name).read_text())
        except ValueError as e:
            raise UsageError(f"{self.root / 'meta' / name}: not JSON ({e})") from None

    def meta_jsonl(self, name):
        rows = []
        for n, line in enumerate(self.meta_path(name).read_text().splitlines(), 1):
            if not line.strip():
                continue
            try:
                rows.append(json.loads(line))
            except ValueError:
                raise UsageError(f"{self.root / 'meta' / name}: line {n} is not JSON") from None
        return rows

    def path(self, template, **fields):
        """A file a template of meta/info.json names, with the fields a dataset of this version fills."""
        try:
            return self.root / template.format(**fields)
        except (KeyError, IndexError, ValueError) as e:
            raise UsageError(f"{self.root / 'meta' / 'info.json'}: the path template {template!r} cannot be filled "
                             f"({type(e).__name__}: {e}); a {self.version} dataset fills {', '.join(sorted(fields))}"
                             ) from None

    def read_v30(self):
        tasks = pd.read_parquet(self.meta_path("tasks.parquet"))
        tasks = dict(zip(tasks.task_index, tasks.index))
        files = sorted((self.root / "meta" / "episodes").glob("chunk-*/file-*.parquet"))
        if not files:
            raise UsageError(f"{self.root / 'meta' / 'episodes'}: no chunk-*/file-*.parquet episode tables")
        table = pd.concat([pd.read_parquet(f) for f in files]).sort_values("episode_index")
        data_path, video_path = self.info["data_path"], self.info["video_path"]
        videos = [k for k in self.cameras if self.features[k]["dtype"] == "video"]
        return tasks, [{
            "index": int(r["episode_index"]), "length": int(r["length"]), "task": list(r["tasks"])[0],
            "data": self.path(data_path, chunk_index=r["data/chunk_index"], file_index=r["data/file_index"]),
            "videos": {k: self.path(video_path, video_key=k, chunk_index=r[f"videos/{k}/chunk_index"],
                                    file_index=r[f"videos/{k}/file_index"]) for k in videos},
            "starts": {k: float(r[f"videos/{k}/from_timestamp"]) for k in videos}} for _, r in table.iterrows()]

    def read_v21(self):
        tasks = {t["task_index"]: t["task"] for t in self.meta_jsonl("tasks.jsonl")}
        chunks = self.info.get("chunks_size", CHUNKS_SIZE)
        videos = [k for k in self.cameras if self.features[k]["dtype"] == "video"]
        at = lambda template, e, **kw: self.path(template, episode_chunk=e // chunks, episode_index=e, **kw)
        return tasks, [{
            "index": e["episode_index"], "length": e["length"], "task": e["tasks"][0],
            "data": at(self.info["data_path"], e["episode_index"]),
            "videos": {k: at(self.info["video_path"], e["episode_index"], video_key=k) for k in videos},
            "starts": {k: 0.0 for k in videos}} for e in sorted(self.meta_jsonl("episodes.jsonl"), key=lambda e: e["episode_index"])]

    def fingerprint(self):
        """What identifies the dataset's contents: its metadata files' bytes and every data and video file's size."""
        digest = hashlib.sha256()
        for p in sorted(p for p in (self.root / "meta").rglob("*") if p.is_file()):
            digest.update(f"{p.relative_to(self.root)}\0".encode() + p.read_bytes())
        for p in sorted({p for e in self.episodes for p in (e["data"], *e["videos"].values())}):
            digest.update(f"{p.relative_to(self.root)}\0{p.stat().st_size}\0".encode())
        return digest.hexdigest()[:16]

    def width(self, key):
        return int(np.prod(self.features[key]["shape"]))


def cameras_of(camera, ds):
    """The camera keys a run reads: `data.camera` (one key or a list), or the dataset's only camera."""
    there = ", ".join(ds.cameras) or "none"
    if camera is None:
        if len(ds.cameras) != 1:
            raise UsageError(f"{ds.root}: name the camera with data.camera (cameras there: {there})")
        return list(ds.cameras)
    keys = [camera] if isinstance(camera, str) else list(camera)
    if bad := [k for k in keys if k not in ds.cameras]:
        raise UsageError(f"data.camera={bad[0]} is not a camera of {ds.root} (cameras there: {there})")
    return keys


def check_widths(ds, keys, action_dim, state_dim):
    for what, key, want in (("state", keys["state"], state_dim), ("action", keys["action"], action_dim)):
        if key not in ds.features:
            raise UsageError(f"data.keys.{what}={key} is not a feature of {ds.root} "
                             f"(features there: {', '.join(ds.features)})")
        if ds.width(key) != want:
            raise UsageError(f"{ds.root}: {key} is {ds.width(key)} wide but the model's {what} dim "
                             f"(model.config.{what}_dim) is {want}: set data.{what}_dim={ds.width(key)}, which the "
                             "built models follow, or load a checkpoint of that width")


def version():
    """Part of the cache key: bump it when the reader changes what it writes."""
    return "lerobot-1"


def params(cfg):
    """Everything that decides the episodes read from `data.root`; the dataset's metadata is checked here, before
    anything is decoded."""
    d = cfg.data
    if not d.root:
        raise UsageError("data=lerobot needs data.root=<the dataset's folder, the one holding meta/info.json>")
    ds = Dataset(d.root)
    n = len(ds.episodes) if d.episodes is None else min(d.episodes, len(ds.episodes))
    if n < 2:
        raise UsageError(f"{ds.root}: {n} episode{'s' * (n != 1)} used, at least 2 are needed to split train and "
                         "validation")
    keys = dict(d["keys"])  # d.keys is the DictConfig method
    if set(keys) != {"state", "action"}:
        raise UsageError(f"data.keys has {', '.join(keys)}: it maps exactly state and action to feature names")
    check_widths(ds, keys, cfg.model.config.action_dim, cfg.model.config.state_dim)
    return {"root": str(ds.root.resolve()), "fingerprint": ds.fingerprint(), "cameras": cameras_of(d.camera, ds),
            "keys": keys, "episodes": n, "image_size": d.image_size}


def generate(out_dir, root, fingerprint, cameras, keys, episodes, image_size):
    """Decode the first `episodes` episodes of the dataset at `root` into HDF5 episodes in `out_dir` (created
    atomically), each camera's frames side by side and resized to image_size x image_size (None: as they are)."""
    ds = Dataset(root)
    try:
        with cache_entry(out_dir, "data") as tmp, Frames() as frames:
            for e in tqdm(ds.episodes[:episodes], desc=f"decoding {ds.root.name}", unit="episode", leave=False):
                ep = read_episode(ds, e, cameras, keys, frames, image_size)
                write_episode(tmp / f"episode_{e['index']:06d}.hdf5", ep["images"], ep["qpos"], ep["action"],
                              ep["instruction"], ep["baselines"], camera_name(cameras))
    finally:
        data_file.cache_clear()  # a file read again later may have changed
    return Path(out_dir)


@lru_cache(maxsize=1)  # v3.0 files hold many episodes: read each once while its episodes are decoded in order
def data_file(path):
    try:
        return pq.read_table(path)
    except (OSError, pa.ArrowInvalid) as e:
        raise UsageError(f"{path}: not a readable parquet file ({one_line(e)})") from None


def column(table, name, shape, where):
    """A feature's column as an array (rows, *shape): lists (fixed-size or not, nested or not) flattened; `where`
    (the data file) names it when its rows do not hold the shape meta/info.json gives."""
    values = table.column(name).combine_chunks()
    while pa.types.is_list(values.type) or pa.types.is_fixed_size_list(values.type) \
            or pa.types.is_large_list(values.type):
        values = values.flatten()
    if len(values) != len(table) * math.prod(shape):
        raise UsageError(f"{where}: {name} holds {len(values) / max(len(table), 1):g} values a frame, but "
                         f"meta/info.json gives it shape {list(shape)}")
    return values.to_numpy(zero_copy_only=False).reshape(len(table), *shape)


def read_episode(ds, e, cameras, keys, frames, image_size=None):
    """One episode as vla_exp.data.episodes' readers return it; bad data raises UsageError naming its file."""
    table = data_file(e["data"])
    rows = table.filter(pc.equal(table.column("episode_index"), e["index"]))
    rows = rows.take(pc.sort_indices(rows, [("frame_index", "ascending")]))
    if len(rows) != e["length"]:
        raise UsageError(f"{e['data']}: episode {e['index']} has {len(rows)} rows but its length in meta/ is "
                         f"{e['length']}")
    arrays = {what: column(rows, key, [ds.width(key)], e["data"]).astype(np.float32) for what, key in keys.items()}
    for what, a in arrays.items():
        if not np.isfinite(a).all():
            step = np.argwhere(~np.isfinite(a))[0][0]
            raise UsageError(f"{e['data']}: {keys[what]} of episode {e['index']} holds NaN or inf (first at frame "
                             f"{step})")
    views = []
    for key in cameras:
        if key in e["videos"]:
            times = e["starts"][key] + (column(rows, "timestamp", [1], e["data"])[:, 0].astype(np.float64)
                                        if "timestamp" in rows.column_names else np.arange(len(rows)) / ds.fps)
            views.append(frames.read(e["videos"][key], times, ds.fps, e["index"], key))
        else:  # an image feature: encoded image files in the table
            from PIL import Image
            images = [np.asarray(Image.open(io.BytesIO(cell["bytes"])).convert("RGB"))
                      for cell in rows.column(key).to_pylist()]
            if odd := next((i for i, im in enumerate(images) if im.shape != images[0].shape), None):
                size = lambda im: f"{im.shape[1]}x{im.shape[0]}"
                raise UsageError(f"{e['data']}: {key} frame {odd} of episode {e['index']} is {size(images[odd])}, "
                                 f"frame 0 is {size(images[0])}: an image feature's frames must share one size")
            views.append(np.stack(images))
    baselines = {k[len(BASELINE):]: column(rows, k, ds.features[k]["shape"], e["data"]).astype(np.float32)
                 for k in ds.features if k.startswith(BASELINE)}
    if len({v.shape[1] for v in views}) > 1:
        raise UsageError(f"{ds.root}: cameras {', '.join(cameras)} have different heights "
                         f"({', '.join(str(v.shape[1]) for v in views)}): they are placed side by side, so they must match")
    return {"images": resize(np.concatenate(views, axis=2), image_size), "qpos": arrays["state"],
            "action": arrays["action"], "instruction": e["task"], "baselines": baselines}


def resize(images, size):
    """(T, H, W, 3) uint8 frames at size x size (bilinear), unchanged where they have it or size is None."""
    if size is None or images.shape[1:3] == (size, size):
        return images
    from PIL import Image
    return np.stack([np.asarray(Image.fromarray(f).resize((size, size), Image.BILINEAR)) for f in images])


class Frames:
    """Frames of mp4 files, decoded forward: a file holding many episodes back to back is decoded once when its
    episodes are read in order (one open file per path, reopened only to go back)."""

    def __init__(self):
        self.open = {}

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        for container, *_ in self.open.values():
            container.close()

    def read(self, path, times, fps, episode, camera):
        """The frames of `path` at `times` (seconds into the video), as (n, H, W, 3) uint8 RGB: each the frame whose
        timestamp is within half a frame of its time, so a gap in the video is refused, never filled from the next
        episode."""
        import av
        half = 0.5 / fps
        container, decoded, position, last = self.open.get(path, (None, None, 0, math.inf))
        if last >= times[0] - half:  # the frame wanted was decoded already: start again
            if container:
                container.close()
            try:
                container = av.open(str(path))
                decoded, position, last = container.decode(video=0), 0, -math.inf
            except (av.error.FFmpegError, IndexError) as e:
                raise UsageError(f"{path}: not a readable video ({e})") from None
        out = []
        try:
            for frame in decoded:
                last = frame.time if frame.time is not None else position / fps
                position += 1
                if last < times[len(out)] - half:
                    continue
                if last > times[len(out)] + half:
                    raise UsageError(f"{path}: episode {episode}, camera {camera}: no frame at {times[len(out)]:.3f} s "
                                     f"(the next frame there is at {last:.3f} s)")
                out.append(frame.to_ndarray(format="rgb24"))
                if len(out) == len(times):
                    break
        except av.error.FFmpegError as e:
            raise UsageError(f"{path}: cannot decode it ({e})") from None
        self.open[path] = (container, decoded, position, last)
        if len(out) < len(times):
            raise UsageError(f"{path}: episode {episode}, camera {camera}: no frame at {times[len(out)]:.3f} s (the "
                             f"video ends at {last:.3f} s; the episode has {len(times)} frames from {times[0]:.3f} s)")
        return np.stack(out)


# ---------------------------------------------------------------------------------------------------------------
# Writing


def write_dataset(out, episodes, camera, fps=20, version="v3.0", images="video", total=None):
    """Write `episodes` (an iterable of the dicts vla_exp.data.episodes reads) as a LeRobot dataset at `out`: the images
    as the camera `observation.images.<camera>` (AV1 video as LeRobot encodes it, or PNG image features), qpos as
    `observation.state`, the instruction as the task, stored baselines as `baselines.<name>` features. One data file
    and one video file (v3.0) or one of each per episode (v2.1). The folder appears when it is complete."""
    if version not in SUPPORTED:
        raise UsageError(f"codebase version {version!r} cannot be written (supported: {', '.join(SUPPORTED)})")
    key = f"observation.images.{camera}"
    data_path, video_path = PATHS[version]
    tasks, rows, metas, features, start = {}, [], [], None, 0
    with staged_dir(out) as tmp, Encoder(fps) as encoder:
        for e, ep in enumerate(tqdm(episodes, f"writing {Path(out).name}", total, unit="episode", leave=False)):
            T = len(ep["action"])
            features = features or feature_spec(ep, key, fps, images)
            table = {"observation.state": ep["qpos"], "action": ep["action"],
                     "timestamp": np.arange(T, dtype=np.float32) / np.float32(fps), "frame_index": np.arange(T),
                     "episode_index": np.full(T, e), "index": np.arange(start, start + T),
                     "task_index": np.full(T, tasks.setdefault(ep["instruction"], len(tasks))),
                     **{f"{BASELINE}{name}": chunks for name, chunks in ep["baselines"].items()}}
            meta = {"episode_index": e, "tasks": [ep["instruction"]], "length": T}
            if images == "image":
                table[key] = [{"bytes": png(f), "path": None} for f in ep["images"]]
            elif version == "v3.0":
                at = encoder.append(tmp / video_path.format(video_key=key, chunk_index=0, file_index=0), ep["images"])
                meta.update({f"videos/{key}/chunk_index": 0, f"videos/{key}/file_index": 0,
                             f"videos/{key}/from_timestamp": at, f"videos/{key}/to_timestamp": at + T / fps})
            else:
                encoder.append(tmp / video_path.format(video_key=key, episode_chunk=0, episode_index=e), ep["images"])
            if version == "v3.0":
                meta.update({"data/chunk_index": 0, "data/file_index": 0, "dataset_from_index": start,
                             "dataset_to_index": start + T})
            else:
                write_parquet(table, features, tmp / data_path.format(episode_chunk=0, episode_index=e))
            meta["stats"] = {k: stats(v) for k, v in table.items() if k != key}
            rows.append(table)
            metas.append(meta)
            start += T
        if features is None:
            raise UsageError(f"{out}: no episodes to write")
        whole = {k: [x for r in rows for x in r[k]] if k == key else np.concatenate([r[k] for r in rows])
                 for k in rows[0]}
        if version == "v3.0":
            write_parquet(whole, features, tmp / data_path.format(chunk_index=0, file_index=0))
        write_meta(tmp / "meta", version, features, tasks, metas, fps, images == "video", data_path, video_path)
        (tmp / "meta" / "stats.json").write_text(json.dumps({k: stats(v) for k, v in whole.items() if k != key}))
    return Path(out)


def png(frame):
    from PIL import Image
    buffer = io.BytesIO()
    Image.fromarray(frame).save(buffer, format="PNG")
    return buffer.getvalue()


def feature_spec(ep, key, fps, images):
    """info.json's `features` for episodes like `ep`, as LeRobot describes them."""
    vector = lambda a, name: {"dtype": "float32", "shape": list(a.shape[1:]),
                              "names": [f"{name}_{i}" for i in range(a.shape[1])]}
    scalar = lambda dtype: {"dtype": dtype, "shape": [1], "names": None}
    H, W = ep["images"].shape[1:3]
    camera = {"dtype": images, "shape": [H, W, 3], "names": ["height", "width", "channels"]}
    if images == "video":
        camera["info"] = {"video.height": H, "video.width": W, "video.codec": "av1", "video.pix_fmt": VIDEO["pix_fmt"],
                          "video.is_depth_map": False, "video.fps": fps, "video.channels": 3, "has_audio": False}
    return {key: camera, "observation.state": vector(ep["qpos"], "state"), "action": vector(ep["action"], "action"),
            **{f"{BASELINE}{n}": {"dtype": "float32", "shape": list(c.shape[1:]), "names": None}
               for n, c in ep["baselines"].items()},
            "timestamp": scalar("float32"), "frame_index": scalar("int64"), "episode_index": scalar("int64"),
            "index": scalar("int64"), "task_index": scalar("int64")}


def arrow(values, feature):
    """A column as LeRobot's writer (Hugging Face datasets) stores it: vectors as fixed-size lists."""
    if feature["dtype"] == "image":
        return pa.array(values, pa.struct([("bytes", pa.binary()), ("path", pa.string())]))
    values = np.asarray(values, dtype=feature["dtype"])
    out = pa.array(values.reshape(-1))
    for size in reversed(values.shape[1:]):
        out = pa.FixedSizeListArray.from_arrays(out, size)
    return out


def write_parquet(table, features, path):
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.table({k: arrow(v, features[k]) for k, v in table.items()}), path)


def stats(values):
    """A feature's statistics as LeRobot's meta files hold them (per dimension)."""
    values = np.asarray(values, np.float64).reshape(len(values), -1)
    return {"min": values.min(0).tolist(), "max": values.max(0).tolist(), "mean": values.mean(0).tolist(),
            "std": values.std(0).tolist(), "count": [len(values)]}


def write_meta(meta, version, features, tasks, metas, fps, video, data_path, video_path):
    meta.mkdir(parents=True, exist_ok=True)
    info = {"codebase_version": version, "robot_type": None, "total_episodes": len(metas),
            "total_frames": sum(m["length"] for m in metas), "total_tasks": len(tasks), "chunks_size": CHUNKS_SIZE,
            "fps": fps, "splits": {"train": f"0:{len(metas)}"}, "data_path": data_path,
            "video_path": video_path if video else None, "features": features}
    lines = lambda name, items: (meta / name).write_text("".join(json.dumps(i) + "\n" for i in items))
    if version == "v3.0":  # per-episode statistics as flattened columns, as LeRobot's episode tables hold them
        info.update(data_files_size_in_mb=100, video_files_size_in_mb=500)
        pd.DataFrame({"task_index": list(tasks.values())}, index=pd.Index(list(tasks), name="task")).to_parquet(
            meta / "tasks.parquet")
        (meta / "episodes" / "chunk-000").mkdir(parents=True)
        pd.DataFrame([{**{k: v for k, v in m.items() if k != "stats"},
                       **{f"stats/{f}/{s}": v for f, st in m["stats"].items() for s, v in st.items()},
                       "meta/episodes/chunk_index": 0, "meta/episodes/file_index": 0} for m in metas]).to_parquet(
            meta / "episodes" / "chunk-000" / "file-000.parquet")
    else:
        info.update(total_chunks=1, total_videos=len(metas) if video else 0)
        lines("tasks.jsonl", [{"task_index": i, "task": t} for t, i in tasks.items()])
        lines("episodes.jsonl", [{k: v for k, v in m.items() if k != "stats"} for m in metas])
        lines("episodes_stats.jsonl", [{"episode_index": m["episode_index"], "stats": m["stats"]} for m in metas])
    (meta / "info.json").write_text(json.dumps(info, indent=4))


class Encoder:
    """Appends frames to AV1 mp4 files as LeRobot encodes them (libsvtav1, yuv420p, a key frame every 2 frames,
    crf 30); a file holds many episodes back to back. `append` returns the time the frames start at."""

    def __init__(self, fps):
        self.fps, self.open = fps, {}
        # SVT-AV1 raises the calling thread to real-time priority (SCHED_FIFO 99) where it may (as root): kept, every
        # process started later inherits it, and two such processes that spin on 2 cores starve each other
        self.policy, self.param = os.sched_getscheduler(0), os.sched_getparam(0)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        try:
            for container, stream, _ in self.open.values():
                for packet in stream.encode():
                    container.mux(packet)
                container.close()
        finally:
            os.sched_setscheduler(0, self.policy, self.param)

    def append(self, path, frames):
        import av
        os.environ.setdefault("SVT_LOG", "1")  # SVT-AV1 prints its settings to stderr for every file; errors only
        if path not in self.open:
            path.parent.mkdir(parents=True, exist_ok=True)
            container = av.open(str(path), "w")
            stream = container.add_stream(VIDEO["vcodec"], rate=self.fps,
                                          options={"g": str(VIDEO["g"]), "crf": str(VIDEO["crf"])})
            stream.width, stream.height, stream.pix_fmt = frames.shape[2], frames.shape[1], VIDEO["pix_fmt"]
            self.open[path] = (container, stream, 0)
        container, stream, count = self.open[path]
        for frame in frames:
            for packet in stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")):
                container.mux(packet)
        self.open[path] = (container, stream, count + len(frames))
        return count / self.fps
