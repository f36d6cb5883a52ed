import json
import os
import subprocess
import sys

import pytest
from hydra import compose, initialize_config_dir

from vla_exp.train import CONF_DIR


@pytest.fixture(scope="session", autouse=True)
def cache_dir(tmp_path_factory):
    """Generated data and embedded backbones go to a per-session folder, never the user's cache."""
    path = tmp_path_factory.mktemp("cache")
    os.environ["VLA_EXP_CACHE"] = str(path)
    return path


@pytest.fixture
def make_cfg():
    """Compose the real config, as the CLI would, from a list of overrides."""
    def make(*overrides):
        with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
            return compose(config_name="train", overrides=list(overrides))
    return make


@pytest.fixture
def wandb_records():
    """The records of a run's offline W&B file, read back by W&B's own tool."""
    def read(run_dir):
        (offline,) = (run_dir / "wandb").glob("offline-run-*")
        out = subprocess.run([sys.executable, "-m", "wandb", "leet", "inspect", "--json", str(offline)],
                             capture_output=True, text=True, check=True).stdout
        return [json.loads(line) for line in out.splitlines() if line.strip()]
    return read
