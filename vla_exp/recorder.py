"""Where figures go: W&B through one `Tracker` (training runs, closed-loop evaluations and reports alike), and a
training run's `metrics.jsonl` and `summary.json` in its folder, mirrored to W&B by the `Recorder`.

W&B must never stop the work: a tracker that fails to start or to log warns once and does nothing from then on, as
it does with logger=none, so no caller ever asks whether W&B is on. The local files hold everything.
"""
import json
import os
import warnings
from pathlib import Path

from vla_exp.files import write_text
from vla_exp.runs import METRICS, write_summary


class Tracker:
    """One W&B run as the logger config says (`kind: none`: nothing), of `job_type` (default: the config's) in the
    config's group; `run_id` goes on in an earlier run. No logger config: nothing."""

    def __init__(self, logger_cfg, run_dir, name, config, job_type=None, run_id=None):
        self.run, self.id = None, None
        if logger_cfg is None or logger_cfg.kind != "wandb":
            return
        try:
            import wandb  # imported here: a run with logger=none never pays for it
            self.run = wandb.init(project=logger_cfg.project, entity=logger_cfg.entity, mode=logger_cfg.mode,
                                  dir=str(run_dir), config=config, group=logger_cfg.group,
                                  job_type=job_type or logger_cfg.job_type, name=name, tags=list(logger_cfg.tags),
                                  id=run_id, resume="allow" if run_id else None,
                                  settings=wandb.Settings(console="off", silent=True,
                                                          x_disable_stats=not logger_cfg.system_stats))
            self.id = self.run.id
        except Exception as e:
            warnings.warn(f"W&B did not start ({type(e).__name__}: {e}); the local files hold everything")

    def log(self, row, step=None, images=None, tables=None):
        """A row of figures, with images ({key: PNG path}) and tables ({key: DataFrame}) as W&B media."""
        def log(run):
            media = {}
            if images or tables:
                import wandb
                media = {k: wandb.Image(str(path)) for k, path in (images or {}).items()}
                media |= {k: wandb.Table(dataframe=df.astype(object).where(df.notna(), None))
                          for k, df in (tables or {}).items()}
            run.log({**row, **media}, step=step)
        self.call(log)

    def summary(self, summary):
        self.call(lambda run: run.summary.update(summary))

    def finish(self, exit_code=0):
        self.call(lambda run: run.finish(exit_code=exit_code))

    def call(self, fn):
        if self.run is None:
            return
        try:
            fn(self.run)
        except Exception as e:
            warnings.warn(f"W&B failed ({type(e).__name__}: {e}); going on without it, the local files hold "
                          "everything")
            self.run = None


class Recorder:
    """A training run's figures: rows of `metrics.jsonl`, the summary, and their mirror in W&B.

    A resumed run passes its checkpoint: it keeps the rows written before the checkpoint (from the folder that holds
    it) and drops those after (they are about to be written again), and goes on in the same W&B run. With
    `write=False` (a process of distributed training other than rank 0) it records nothing: rank 0 records for all."""

    def __init__(self, run_dir, logger_cfg, config, name, checkpoint=None, write=True):
        self.run_dir, self.write = Path(run_dir), write
        if not write:
            self.metrics, self.rows = open(os.devnull, "w"), 0
            self.tracker = Tracker(None, run_dir, name, config)
            return
        path, wandb_id, kept = self.run_dir / METRICS, None, []
        if checkpoint:
            source = Path(checkpoint["path"]).parent / METRICS
            kept = source.read_text().splitlines(keepends=True)[:checkpoint["metrics_rows"]] if source.exists() else []
            wandb_id = checkpoint["wandb_id"]
        write_text(path, "".join(kept))  # a new run into an old folder starts afresh
        self.metrics, self.rows = open(path, "a"), len(kept)
        self.tracker = Tracker(logger_cfg, self.run_dir, name, config, run_id=wandb_id)

    def log(self, row):
        self.metrics.write(json.dumps(row) + "\n")
        self.metrics.flush()
        self.rows += 1
        prefix = "train" if row["kind"] == "step" else row["kind"]  # W&B merges rows logged at the same step
        self.tracker.log({f"{prefix}/{k}": v for k, v in row.items() if k not in ("kind", "step")}, step=row["step"])

    def summary(self, summary):
        if self.write:
            write_summary(self.run_dir, summary)
        self.tracker.summary(summary)

    def finish(self, exit_code=0):
        self.metrics.close()
        self.tracker.finish(exit_code)
