"""What a checkpoint folder (`model.path`) states about the model's shape decides it: the config takes the folder's
image size and chunk size, and the data follow (frames are rendered or resized to the model's image size). Only a
value given on the command line that differs is a conflict. Torch-free: it reads config.json only."""
import json
from pathlib import Path

from omegaconf import OmegaConf

from vla_exp import UsageError

IMAGE_SIZE, HORIZON = "model.config.vision_config.image_size", "model.config.horizon"


def stated(model):
    """{config key: value} that the folder's config.json states: the vision tower's image size (LLaVA-Pythia's
    vision_config.vision_tower, TinyVLA's vision_config) and a trained head's chunk size. Empty without a folder
    (loading then says what is wrong with it)."""
    if OmegaConf.is_missing(model, "path") or model.path is None:
        return {}
    try:
        raw = json.loads((Path(model.path).expanduser() / "config.json").read_text())
        vision = raw.get("vision_config") or {}
        tower = vision.get("vision_tower") if isinstance(vision.get("vision_tower"), dict) else vision
    except (OSError, ValueError, AttributeError):
        return {}
    facts = {IMAGE_SIZE: tower.get("image_size"), HORIZON: raw.get("chunk_size")}
    return {k: v for k, v in facts.items() if isinstance(v, int) and not isinstance(v, bool)}


def adopt_checkpoint(cfg, overrides=()):
    """Set what the checkpoint states; return whether anything changed. A command-line override (`overrides`, as
    Hydra records them) that sets one of these keys to another value is refused in one line."""
    given = {o.split("=", 1)[0].lstrip("+~"): o.split("=", 1)[1] for o in overrides if "=" in o}
    changed = False
    for key, value in stated(cfg.model).items():
        if OmegaConf.select(cfg, key) == value:
            continue
        if key in given:
            raise UsageError(f"model.path={cfg.model.path}: the checkpoint states {key}={value}, the command line "
                             f"sets {key}={given[key]}: leave it out, the checkpoint's value is taken")
        OmegaConf.update(cfg, key, value)
        changed = True
    return changed
