"""Move episodes between vla-exp's HDF5 format and LeRobot datasets, both ways.

  vla-exp-convert data=tint out/tint-lerobot             # the embedded task as a LeRobot v3.0 dataset
  vla-exp-convert "data=metaworld data.episodes=5" out/mw   # MetaWorld demonstrations (the extra)
  vla-exp-convert path/to/hdf5-folder out/ds --codebase-version v2.1 --images image
  vla-exp-convert path/to/lerobot-dataset out/hdf5         # LeRobot -> HDF5 episodes

A source with meta/info.json is a LeRobot dataset and becomes HDF5 episodes (all its episodes, frames at their size
unless --image-size, the camera as --camera or its only one). Anything else vla-exp reads (a folder of HDF5 episodes,
or quoted overrides naming a data config, generated into the cache first) becomes a LeRobot dataset. OUT must not
exist; it appears when it is complete.
"""
import argparse
import sys
from pathlib import Path

from vla_exp import UsageError
from vla_exp.files import check_new
from vla_exp.data.lerobot import SUPPORTED, Dataset, cameras_of, generate, write_dataset


def hdf5_source(source):
    """(the folder of HDF5 episodes, the camera to read) for a folder or a quoted list of data overrides."""
    from vla_exp.data.episodes import camera_name
    from vla_exp.data.sources import compose_checked, episodes_dir
    if Path(source).expanduser().is_dir():
        return Path(source).expanduser(), None
    overrides = source.split()
    if not overrides or not all("=" in o for o in overrides):
        raise UsageError(f"{source}: neither a folder nor overrides naming data (such as \"data=tint\")")
    cfg = compose_checked(overrides, f"the source {source!r}")
    return Path(episodes_dir(cfg)), camera_name(cfg.data.camera)


def check_apart(source, out):
    """Refuse an output inside its source (a cache entry would then hold files its manifest does not list) or a source
    inside its output, before anything is written."""
    source, out = Path(source).expanduser().resolve(), Path(out).expanduser().resolve()
    if source == out or source in out.parents:
        raise UsageError(f"{out} is inside the source {source}: give an output folder outside it")
    if out in source.parents:
        raise UsageError(f"the source {source} is inside the output {out}: give an output folder outside it")


def at_least_one(text):
    """An argparse type: a whole number >= 1."""
    if not (text.strip().isdigit() and int(text) >= 1):
        raise argparse.ArgumentTypeError(f"{text!r}: must be a whole number >= 1")
    return int(text)


def to_lerobot(source, out, camera, fps, version, images):
    from vla_exp.data.episodes import episode_files, only_camera, read_episode
    folder, default_camera = hdf5_source(source)
    check_apart(folder, out)
    files = episode_files(folder)
    camera = camera or default_camera or only_camera(files[0])
    write_dataset(out, (read_episode(f, camera) for f in files), camera.replace("observation.images.", ""), fps,
                  version, images, len(files))
    return f"{len(files)} episodes of {folder} -> LeRobot {version} dataset {out}"


def to_hdf5(source, out, camera, image_size):
    ds, out = Dataset(source), Path(out).expanduser()
    check_new(out)  # before anything is decoded
    check_apart(ds.root, out)
    generate(out, ds.root, ds.fingerprint(), cameras_of(camera, ds), {"state": "observation.state", "action": "action"},
             len(ds.episodes), image_size)
    return f"{len(ds.episodes)} episodes of LeRobot {ds.version} dataset {ds.root} -> HDF5 episodes {out}"


def main(argv=None):
    p = argparse.ArgumentParser(prog="vla-exp-convert", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("source", help="a LeRobot dataset, a folder of HDF5 episodes, or quoted data overrides")
    p.add_argument("out", help="the folder to write (must not exist)")
    p.add_argument("--camera", help="the camera to read (default: the source's only one, or data.camera)")
    p.add_argument("--codebase-version", default="v3.0", choices=SUPPORTED, help="LeRobot layout to write")
    p.add_argument("--images", default="video", choices=("video", "image"),
                   help="LeRobot images as AV1 video (LeRobot's default) or PNG image features")
    p.add_argument("--fps", type=at_least_one, default=20,
                   help="frames per second of a written LeRobot dataset (default 20)")
    p.add_argument("--image-size", type=at_least_one, help="LeRobot -> HDF5: resize frames to this square size")
    args = p.parse_args(argv)
    try:
        if (Path(args.source).expanduser() / "meta" / "info.json").is_file():
            print(to_hdf5(args.source, args.out, args.camera, args.image_size))
        else:
            print(to_lerobot(args.source, args.out, args.camera, args.fps, args.codebase_version, args.images))
    except UsageError as e:
        sys.exit(f"error: {e}")


if __name__ == "__main__":
    main()
