import json
import os
import subprocess
import sys

import pytest

from vla_exp.config import compose


@pytest.fixture(scope="session", autouse=True)
def cache_dir(tmp_path_factory):
    """Generated data and embedded backbones go to a per-session folder, never the user's cache."""
    path = tmp_path_factory.mktemp("cache")
    os.environ["VLA_EXP_CACHE"] = str(path)
    return path


@pytest.fixture(scope="session")
def uninterrupted(tmp_path_factory):
    """test_resume's short run, never stopped, in one process: what the stopped, resumed and distributed runs of
    the same config are compared with."""
    from test_resume import ROOT, command
    path = tmp_path_factory.mktemp("uninterrupted") / "run"
    subprocess.run(command(path, "logger=none"), cwd=ROOT, check=True, capture_output=True)
    return path


@pytest.fixture
def make_cfg():
    """Compose the real config, as the CLI would, from a list of overrides."""
    return compose


@pytest.fixture
def wandb_records():
    """The records of an offline W&B run (its folder, or the one in a run folder), read back by W&B's own tool."""
    def read(path):
        (offline,) = [path] if path.name.startswith("offline-run-") else (path / "wandb").glob("offline-run-*")
        out = subprocess.run([sys.executable, "-m", "wandb", "leet", "inspect", "--json", str(offline)],
                             capture_output=True, text=True, check=True).stdout
        return [json.loads(line) for line in out.splitlines() if line.strip()]
    return read
