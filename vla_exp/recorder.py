"""Where a run's figures go: `metrics.jsonl` and `summary.json` in the run directory, mirrored to W&B.

W&B degrades to a stub (logger=none, or when it fails to start), so the training loop never asks whether it is on.
"""
import json
import os
import warnings
from pathlib import Path

from vla_exp.files import write_json, write_text


class NoTracker:
    id = None

    def log(self, row, step=None):
        pass

    def summary(self, summary):
        pass

    def finish(self, exit_code=0):
        pass


class WandbTracker:
    def __init__(self, cfg, run_dir, config, name, run_id=None):
        import wandb  # imported here: a run with logger=none never pays for it
        self.run = wandb.init(project=cfg.project, entity=cfg.entity, mode=cfg.mode, dir=run_dir, config=config,
                              group=cfg.group, job_type=cfg.job_type, name=name, tags=list(cfg.tags),
                              id=run_id, resume="allow" if run_id else None,
                              settings=wandb.Settings(console="off", silent=True, x_disable_stats=not cfg.system_stats))
        self.id = self.run.id

    def log(self, row, step=None):
        self.run.log(row, step=step)

    def summary(self, summary):
        self.run.summary.update(summary)

    def finish(self, exit_code=0):
        self.run.finish(exit_code=exit_code)


class Recorder:
    """A resumed run passes its checkpoint: it keeps the rows written before the checkpoint (from the folder that
    holds it) and drops those after (they are about to be written again), and goes on in the same W&B run."""
    def __init__(self, run_dir, logger_cfg, config, name, checkpoint=None, write=True):
        self.run_dir, self.write = Path(run_dir), write
        if not write:  # a process of distributed training other than rank 0: rank 0 records for all
            self.metrics, self.rows, self.tracker = open(os.devnull, "w"), 0, NoTracker()
            return
        path, wandb_id, kept = self.run_dir / "metrics.jsonl", None, []
        if checkpoint:
            source = Path(checkpoint["path"]).parent / "metrics.jsonl"
            kept = source.read_text().splitlines(keepends=True)[:checkpoint["metrics_rows"]] if source.exists() else []
            wandb_id = checkpoint["wandb_id"]
        write_text(path, "".join(kept))  # a new run into an old folder starts afresh
        self.metrics, self.rows = open(path, "a"), len(kept)
        self.tracker = NoTracker()
        if logger_cfg.kind == "wandb":
            try:
                self.tracker = WandbTracker(logger_cfg, str(self.run_dir), config, name, wandb_id)
            except Exception as e:  # W&B must never stop training: the local files hold everything
                warnings.warn(f"W&B did not start ({e}); this run writes its local files only")

    def log(self, row):
        self.metrics.write(json.dumps(row) + "\n")
        self.metrics.flush()
        self.rows += 1
        prefix = "train" if row["kind"] == "step" else row["kind"]  # W&B merges rows logged at the same step
        self.mirror("log", {f"{prefix}/{k}": v for k, v in row.items() if k not in ("kind", "step")}, step=row["step"])

    def summary(self, summary):
        if self.write:
            write_json(self.run_dir / "summary.json", summary)
        self.mirror("summary", summary)

    def finish(self, exit_code=0):
        self.metrics.close()
        self.mirror("finish", exit_code)

    def mirror(self, method, *args, **kwargs):
        """W&B must never stop training: the first failure is reported once, and the run goes on without W&B."""
        try:
            getattr(self.tracker, method)(*args, **kwargs)
        except Exception as e:
            warnings.warn(f"W&B failed ({type(e).__name__}: {e}); this run goes on with its local files only")
            self.tracker = NoTracker()
