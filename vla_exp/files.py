"""Writing files so that a crash or a parallel job never leaves half of one behind, and one writer per folder."""
import fcntl
import hashlib
import json
import os
import shutil
import tempfile
import uuid
from contextlib import contextmanager
from pathlib import Path

from safetensors import SafetensorError

from vla_exp import UsageError


@contextmanager
def atomic(path):
    """A temporary name beside `path` that replaces it when the block succeeds: a crash leaves the old file or the
    new one, never half of one. The name is this writer's alone, so two writers never write into one file."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}-{uuid.uuid4().hex[:8]}.tmp")
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_text(path, text):
    with atomic(path) as tmp:
        tmp.write_text(text)


def write_json(path, obj):
    write_text(path, json.dumps(obj, indent=2, default=str))


def check_new(path):
    if path.exists():
        raise UsageError(f"{path} exists: give a new folder, or delete this one")
    return path


@contextmanager
def staged_dir(path):
    """A temporary folder beside `path` that becomes `path` when the block succeeds: a crash leaves nothing at
    `path`. An existing `path` is refused before anything is written."""
    path = check_new(Path(path).expanduser())
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}-"))
    try:
        yield tmp
        tmp.rename(path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


MANIFEST = "manifest.json"
CACHE_HINT = "set VLA_EXP_CACHE to a writable folder with space"
CACHE_FORMAT = 2  # 2: entries carry a manifest. Part of every entry's key: entries of another format are not used


def cache_path(cache_dir, kind, name, key):
    """The cache entry of `kind` ("data", "backbones") named `name` for `key`, everything that decides its files."""
    digest = hashlib.sha256(json.dumps({**key, "cache_format": CACHE_FORMAT}, sort_keys=True).encode()).hexdigest()
    return Path(cache_dir).expanduser() / kind / f"{name}-{digest[:12]}"


@contextmanager
def cache_entry(path, what):
    """A temporary folder beside `path` that becomes the cache entry `path` (`what`: "data", "backbone") when the
    block succeeds, with a manifest of every file's size for `check_cache_entry`. If another job made `path` first,
    theirs is kept (same inputs, same contents). A cache that cannot be written says so in one line."""
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(dir=path.parent, prefix=".tmp-"))
    except OSError as e:
        raise UsageError(f"cannot write the cache folder {path.parent} ({e.strerror}): {CACHE_HINT}") from None
    try:
        yield tmp
        sizes = {str(f.relative_to(tmp)): f.stat().st_size for f in sorted(tmp.rglob("*")) if f.is_file()}
        write_json(tmp / MANIFEST, sizes)
        tmp.rename(path)
    except (OSError, SafetensorError) as e:  # safetensors' writer reports a failed write as its own error
        if not path.is_dir():
            reason = e.strerror if isinstance(e, OSError) else str(e).rpartition(": ")[2]
            raise UsageError(f"cannot write the cached {what} in {path.parent} ({reason}): {CACHE_HINT}") from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def check_cache_entry(path, what):
    """Raise UsageError unless the cache entry `path` holds exactly the files its manifest lists, at their sizes: a
    deleted, truncated or added file would otherwise be trained on without a word."""
    path = Path(path)
    try:
        sizes = json.loads((path / MANIFEST).read_text())
    except (OSError, ValueError):
        sizes = None
    there = {str(f.relative_to(path)): f.stat().st_size for f in path.rglob("*") if f.is_file()}
    there.pop(MANIFEST, None)
    problems = [f"no readable {MANIFEST}"] if sizes is None else [
        *(f"{name} is missing" if name not in there else f"{name} is {there[name]} bytes, not {size}"
          for name, size in sizes.items() if there.get(name) != size),
        *(f"{name} was added" for name in sorted(set(there) - set(sizes)))]
    if problem := next(iter(problems), None):
        raise UsageError(f"the cached {what} in {path} is incomplete ({problem}): delete the folder and it will be "
                         "regenerated")


STUDY_LOCK = ".study.lock"


class Busy(UsageError):
    """The folder is held by another process."""


@contextmanager
def exclusive(folder, what, lock=".lock"):
    """Hold `folder` for the block, as `what` ("a run", "a sweep"): another process that asks for it meanwhile stops
    with one line naming this one's pid. The lock is the kernel's (flock) on the file `lock` in the folder: it goes
    when the process does, even on SIGKILL, so a crash never leaves a folder locked. A study holds its folder with
    a lock of its own (STUDY_LOCK), since the multiruns it launches there take `.lock`."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / lock, "a+") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            f.seek(0)
            raise Busy(f"{folder} is in use by {what} (pid {f.read().strip() or 'unknown'}): wait for it to "
                       "end, or give this one another folder") from None
        f.truncate(0)
        f.write(str(os.getpid()))
        f.flush()
        yield
