"""Where a run's figures go: `metrics.jsonl` and `summary.json` in the run directory, mirrored to W&B.

W&B degrades to a stub (logger=none, or when it fails to start), so the training loop never asks whether it is on.
"""
import json
import warnings
from pathlib import Path

from vla_exp.files import write_json


class NoTracker:
    def log(self, row, step=None):
        pass

    def summary(self, summary):
        pass

    def finish(self, exit_code=0):
        pass


class WandbTracker:
    def __init__(self, cfg, run_dir, config, name):
        import wandb  # imported here: a run with logger=none never pays for it
        self.wandb = wandb
        self.run = wandb.init(project=cfg.project, entity=cfg.entity, mode=cfg.mode, dir=run_dir, config=config,
                              group=cfg.group, job_type=cfg.job_type, name=name, tags=list(cfg.tags),
                              settings=wandb.Settings(console="off", silent=True))

    def log(self, row, step=None):
        self.run.log(row, step=step)

    def summary(self, summary):
        self.run.summary.update(summary)

    def finish(self, exit_code=0):
        self.run.finish(exit_code=exit_code)


class Recorder:
    def __init__(self, run_dir, logger_cfg, config, name):
        self.run_dir = Path(run_dir)
        self.metrics = open(self.run_dir / "metrics.jsonl", "w")  # a new run into an old folder starts afresh
        self.tracker = NoTracker()
        if logger_cfg.kind == "wandb":
            try:
                self.tracker = WandbTracker(logger_cfg, str(self.run_dir), config, name)
            except Exception as e:  # W&B must never stop training: the local files hold everything
                warnings.warn(f"W&B did not start ({e}); this run writes its local files only")

    def log(self, row):
        self.metrics.write(json.dumps(row) + "\n")
        self.metrics.flush()
        prefix = "train" if row["kind"] == "step" else row["kind"]  # W&B merges rows logged at the same step
        self.tracker.log({f"{prefix}/{k}": v for k, v in row.items() if k not in ("kind", "step")}, step=row["step"])

    def summary(self, summary):
        write_json(self.run_dir / "summary.json", summary)
        self.tracker.summary(summary)

    def finish(self, exit_code=0):
        self.metrics.close()
        self.tracker.finish(exit_code)
