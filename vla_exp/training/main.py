"""The Hydra entry point: `vla-exp-train recipe=fixed init=none`, `vla-exp-train -m init=xavier,none`."""
import sys
import traceback

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode

from vla_exp import UsageError
from vla_exp.config import CONF_DIR, choices, run_name
from vla_exp.files import Busy
from vla_exp.runs import read_summary, write_summary
from vla_exp.signals import Interrupted
from vla_exp.training.ddp import rank
from vla_exp.training.loop import train
from vla_exp.policy.shape import adopt_checkpoint
from vla_exp.training.sweep import jobs_apart, save_config, stopping, sweep_settings


@hydra.main(version_base="1.3", config_path=str(CONF_DIR), config_name="train")
def main(cfg):
    hc = HydraConfig.get()
    sweep = hc.mode == RunMode.MULTIRUN
    if sweep:
        if signame := stopping(hc.sweep.dir):
            print(f"job {hc.job.num}: not started, the sweep is stopping on {signame}; the same command runs it",
                  file=sys.stderr)
            return
        sweep_settings(cfg, hc)
    try:
        if adopt_checkpoint(cfg, hc.overrides.task):
            save_config(cfg, hc)
        s = train(cfg, hc.runtime.output_dir)
    except Interrupted as e:  # one line; then submitit's requeue where it asked for the signal, else the exit
        if rank() == 0:
            print(f"job {hc.job.num}: {e}" if sweep else e, file=sys.stderr)
        if not_requeued(e) or sweep and jobs_apart(hc.launcher):
            return  # the job ends as interrupted; the sweep goes on to its count line and the resume hint
        sys.exit(128 + e.signum)  # a sweep stops too: the same command resumes this job and skips the finished ones
    except KeyboardInterrupt:
        sys.exit("stopped at once by Ctrl-C; the same command resumes from the last checkpoint, if there is one")
    except UsageError as e:  # bad input: one line, no traceback (bugs keep theirs)
        if not sweep:
            sys.exit(f"error: {e}")
        if rank() == 0:
            print(f"job {hc.job.num} failed: {e}", file=sys.stderr)
        if not isinstance(e, Busy) and read_summary(hc.runtime.output_dir) is None:  # rejected before it began
            write_summary(hc.runtime.output_dir, {"choices": choices(cfg), "seed": cfg.seed, "status": "failed",
                                                  "error": f"UsageError: {e}"})
    except Exception:
        if not sweep:
            raise
        traceback.print_exc()  # a failed job must not stop the sweep: its summary.json says failed, the report shows it
        print(f"job {hc.job.num} failed; the sweep goes on", file=sys.stderr)
    else:
        if sweep and rank() == 0:
            error = s.get("val_action_error", float("nan"))
            print(f"job {hc.job.num} {run_name(cfg)}: {s['status']}, action error {error:.4g}, {s['wall_time_s']:.0f} s")


def not_requeued(stop):
    """Hand the signal on (submitit requeues the job, and never returns here); True where submitit would not requeue:
    a time limit reached more often than the launcher's max_num_timeout allows (Hydra's submitit launcher defaults it
    to 0, so every time limit; `hydra/launcher=slurm` sets it higher)."""
    try:
        stop.hand_on()
    except Exception as e:
        if type(e).__name__ != "UncompletedJobError":  # submitit's own "not requeued"; anything else is a bug
            raise
        if rank() == 0:
            why = str(e).removeprefix("Job not requeued because: ").rstrip(".")
            print(f"job {HydraConfig.get().job.num}: not requeued: {why} (hydra.launcher.max_num_timeout); "
                  "the same command resumes it", file=sys.stderr)
        return True
    return False


if __name__ == "__main__":
    main()
