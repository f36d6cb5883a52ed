"""One training core for every recipe: `python -m vla_exp.train recipe=fixed init=none`."""
import functools
import hashlib
import itertools
import json
import math
import os
import platform
import re
import resource
import sys
import time
import traceback
from pathlib import Path

import hydra
import numpy as np
import torch
from hydra.core.hydra_config import HydraConfig
from hydra.experimental.callback import Callback
from hydra.types import RunMode
from hydra.utils import instantiate
from omegaconf import OmegaConf
from tqdm import tqdm

from vla_exp import UsageError
from vla_exp.files import write_json

GROUPS = ("init", "loss_handling", "optim", "clipping")
CONF_DIR = next(p for p in (Path(__file__).parent / "conf", Path(__file__).parent.parent / "conf") if p.is_dir())


def versions():
    import diffusers
    import transformers
    return {"python": platform.python_version(), "torch": torch.__version__, "transformers": transformers.__version__,
            "diffusers": diffusers.__version__}


def choices(cfg):
    return {**{g: cfg[g].name for g in GROUPS}, "recipe": cfg.recipe, "head_loading": cfg.model.head_loading}


def run_name(cfg):
    c = choices(cfg)
    return f"{c['recipe'] or 'custom'}-" + "-".join(c[g] for g in GROUPS) + f"-{c['head_loading']}-s{cfg.seed}"


# where a run goes and how it reports and restarts: none of it changes its results
NOT_RESULTS = ("logger", "progress", "threads", "paths", "skip_finished", "checkpoint", "resume")


def config_hash(cfg):
    """Fingerprint of everything that decides a run's results."""
    c = {k: v for k, v in OmegaConf.to_container(cfg, resolve=True).items() if k not in NOT_RESULTS}
    return hashlib.sha256(json.dumps(c, sort_keys=True).encode()).hexdigest()[:16]


def finished(run_dir, digest):
    """The summary of a run that already finished in `run_dir` with the same config, else None."""
    try:
        s = json.loads((Path(run_dir) / "summary.json").read_text())
    except (OSError, ValueError):
        return None
    return s if s.get("status") in ("completed", "diverged") and s.get("config_hash") == digest else None


def reset_peak_memory():
    """Linux: restart the peak-RSS count here, so a worker process that runs several sweep jobs reports each job's
    own peak."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pass


def peak_memory_mb():
    try:
        return int(re.search(r"VmHWM:\s+(\d+) kB", Path("/proc/self/status").read_text())[1]) / 1024
    except (OSError, TypeError):  # not Linux: the process's peak since it started
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def device_and_precision(cfg, local_rank):
    """The device (`auto`: this process's GPU if torch sees one, else the CPU) and whether to autocast to bfloat16
    (`auto`: on a GPU that supports it)."""
    cuda = torch.cuda.is_available()
    if cfg.device == "cuda" and not cuda:
        raise UsageError("device=cuda: torch sees no CUDA GPU here; use device=auto or device=cpu")
    device = torch.device(f"cuda:{local_rank}" if cuda and cfg.device != "cpu" else "cpu")
    bf16_ok = device.type == "cpu" or torch.cuda.is_bf16_supported()
    if cfg.precision == "bf16" and not bf16_ok:
        raise UsageError(f"precision=bf16: {torch.cuda.get_device_name(device)} has no bfloat16; use auto or fp32")
    return device, cfg.precision == "bf16" or (cfg.precision == "auto" and device.type == "cuda" and bf16_ok)


def build(node):
    """Instantiate a fix from its config group, whose `name` is a label, not an argument."""
    return instantiate(OmegaConf.masked_copy(node, [k for k in node if k != "name"]))


def train(cfg, run_dir):
    """Train one run into `run_dir` and return its summary (also written to `run_dir/summary.json`)."""
    from vla_exp import checkpoint, ddp, tasks
    from vla_exp.data import load_split
    from vla_exp.diagnostics import evaluate, init_report
    from vla_exp.diffusion import noise_prediction, schedulers
    from vla_exp.model import load_policy
    from vla_exp.recorder import Recorder
    from vla_exp.schema import validate

    validate(cfg)
    rank, world, local_rank = ddp.setup()
    main = rank == 0  # under distributed training only rank 0 writes files, logs to W&B and prints
    if world > 1:
        run_dir = ddp.same_dir(run_dir, world, cfg.optim.batch_size)
    device, bf16 = device_and_precision(cfg, local_rank)
    digest = config_hash(cfg)
    if cfg.skip_finished and (done := finished(run_dir, digest)):
        print(f"{run_dir}: finished before with the same config; skipped (skip_finished=false reruns it)")
        return done

    ckpt = checkpoint.load(path) if (path := checkpoint.find(run_dir, cfg.resume)) else None
    if ckpt and ckpt["config_hash"] != digest:
        if cfg.resume:
            raise UsageError(f"resume={cfg.resume}: that checkpoint was written by another config; resume needs "
                             "the same one")
        print(f"{path}: written by another config; this run starts afresh")
        ckpt = None

    # -------------------------------------------------------------------------------- build
    start = time.time() - (ckpt["progress"]["elapsed_s"] if ckpt else 0)
    reset_peak_memory()
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    config = {**OmegaConf.to_container(cfg, resolve=True), "choices": choices(cfg)}
    rec = Recorder(run_dir, cfg.logger, config, run_name(cfg), ckpt, write=main)
    summary = {"choices": choices(cfg), "seed": cfg.seed, "status": "running", "config_hash": digest,
               "threads": torch.get_num_threads(), "device": str(device), "precision": "bf16" if bf16 else "fp32",
               "processes": world, "versions": versions()}
    try:
        d = cfg.data
        if world > 1 and not main:  # rank 0 fills the cache first: transformers saves a backbone on rank 0 only
            ddp.barrier()
        data_dir = tasks.episodes_dir(cfg)
        m = cfg.model.config
        train_set, val_set = load_split(data_dir, d.camera, d.val_fraction, d.split_seed, m.horizon,
                                        m.vision_config.image_size, m.action_dim, m.state_dim)
        if main:
            write_json(run_dir / "normalization.json", train_set.norm.state_dict())
        policy, tokenizer, missing = load_policy(cfg.model, cfg.paths.cache_dir, cfg.seed)
        if world > 1 and main:
            ddp.barrier()
        build(cfg.init)(policy.embed_out)
        policy.to(device).train()
        model = ddp.wrap(policy) if world > 1 else policy  # each process trains on its share of every global batch
        autocast = functools.partial(torch.autocast, device.type, dtype=torch.bfloat16, enabled=bf16)
        train_scheduler, ddim = schedulers(cfg.diffusion)
        params = [p for p in policy.parameters() if p.requires_grad]
        # fused: one kernel for all parameters; the per-tensor loop was a third of a CPU step (66 -> 49 ms at batch 8)
        optimizer = torch.optim.AdamW(params, lr=cfg.optim.lr, betas=tuple(cfg.adamw.betas),
                                      weight_decay=cfg.adamw.weight_decay, fused=True)
        lr_at = instantiate(cfg.optim.schedule)
        handle_loss, clip = build(cfg.loss_handling), build(cfg.clipping)
        eval_idx = np.random.default_rng(0).permutation(len(val_set))[:cfg.eval.samples]
        mean_chunk = train_set.mean_chunk()
        summary.update(data_dir=str(data_dir), missing_head_params=len(missing))

        # ---------------------------------------------------------------------------- init report
        first = next(iter(torch.utils.data.DataLoader(torch.utils.data.Subset(val_set, eval_idx), 64)))
        report = init_report(policy, train_scheduler, first, tokenizer, cfg.seed)
        if main:
            write_json(run_dir / "init_report.json", report)
            for w in report["warnings"]:
                print(f"init report: WARNING {w}")
        summary.update(initial_output_std=report["initial_output_std"], initial_loss=report["initial_loss"],
                       init_warnings=report["warnings"], nonfinite_head_params=report["nonfinite_params"])

        # ---------------------------------------------------------------------------- train
        torch.manual_seed(cfg.seed)
        gen = torch.Generator().manual_seed(cfg.seed)
        # all the loop's state, so that a checkpoint holds it and a resumed run goes on bit for bit
        st = {"epoch": 0, "batch": 0, "step": 0, "skipped": 0, "scaled": 0, "grad_norms": [], "epoch_losses": [],
              "nonfinite_streak": 0, "diverged": False, "converged_epoch": None, "converged_at": None,
              "epoch_row": {}, "held_out": {}, "closed_loop": None}
        if ckpt:
            st = checkpoint.restore(ckpt, policy, optimizer, gen)
            if main:
                print(f"{path}: resuming at epoch {st['epoch']}, step {st['step']}")
            summary["resumed_at_step"] = st["step"]

        def save():
            if main:
                checkpoint.save(run_dir, policy, optimizer, gen, {**st, "elapsed_s": time.time() - start}, rec.rows,
                                digest, rec.tracker.id)

        per_epoch = math.ceil(len(train_set) / cfg.optim.batch_size)
        bar = tqdm(total=cfg.epochs * per_epoch, initial=st["step"], desc=run_name(cfg),
                   disable=not (cfg.progress and main))
        while st["epoch"] < cfg.epochs and not st["diverged"]:
            epoch = st["epoch"]
            lr = lr_at(cfg.optim.lr, epoch, cfg.epochs)
            for group in optimizer.param_groups:
                group["lr"] = lr
            loader = torch.utils.data.DataLoader(train_set, cfg.optim.batch_size, shuffle=True,
                                                 generator=torch.Generator().manual_seed(cfg.seed * 1000 + epoch))
            tick, seen = time.time(), 0
            for batch in itertools.islice(loader, st["batch"], None):  # the order is the seed's: skip what was done
                n = len(batch["actions"])
                lo, hi = n * rank // world, n * (rank + 1) // world  # this process's part of the global batch
                share = slice(lo, max(hi, lo + 1))  # left without samples by a short last batch: one, at weight 0
                with autocast():
                    loss, pred = noise_prediction(model, train_scheduler, batch, tokenizer, gen, share)
                if world > 1:
                    loss = ddp.whole_batch_loss(loss, hi - lo, n, world)
                raw_loss = loss.item()
                loss, event = handle_loss(loss)
                if event:
                    st[event] += 1
                grad_norm = float("nan")
                if loss is not None:
                    optimizer.zero_grad(set_to_none=True)
                    loss.backward()
                    grad_norm = clip(params, logged=(st["step"] + 1) % cfg.log_every == 0)  # None: not measured
                    optimizer.step()
                    st["epoch_losses"].append(raw_loss)
                    if grad_norm is not None:
                        st["grad_norms"].append(grad_norm)
                st["step"] += 1
                st["batch"] += 1
                finite = math.isfinite(raw_loss) and (grad_norm is None or math.isfinite(grad_norm))
                st["nonfinite_streak"] = 0 if finite else st["nonfinite_streak"] + 1
                seen += n
                bar.update()
                if st["step"] % cfg.log_every == 0:
                    rec.log({"kind": "step", "step": st["step"], "epoch": epoch, "loss": raw_loss,
                             "output_std": ddp.output_std(pred, world), "grad_norm": grad_norm, "lr": lr,
                             "skipped_batches": st["skipped"], "scaled_loss_steps": st["scaled"],
                             "samples_per_s": seen / (time.time() - tick)})
                    bar.set_postfix(loss=f"{raw_loss:.4g}")
                if cfg.diverge_after and st["nonfinite_streak"] >= cfg.diverge_after:
                    st["diverged"] = True  # nothing more to learn: every recent step was NaN or inf
                    break
                if cfg.checkpoint.every and st["step"] % cfg.checkpoint.every == 0:
                    save()
            st["held_out"] = held_out = evaluate(policy, train_scheduler, ddim, val_set, eval_idx, tokenizer,
                                                 cfg.diffusion.inference_steps, mean_chunk)
            losses = st["epoch_losses"]
            st["epoch_row"] = {"kind": "epoch", "step": st["step"], "epoch": epoch + 1,
                               "train_loss": float(np.mean(losses)) if losses else float("nan"),
                               **{k: v for k, v in held_out.items() if k != "baseline_action_errors"}}
            last = epoch + 1 == cfg.epochs or st["diverged"]
            if main and cfg.eval.rollouts and ((epoch + 1) % cfg.eval.rollout_every == 0 or last):
                from vla_exp.evaluate import closed_loop  # the simulator: imported only for data=metaworld
                st["closed_loop"] = cl = closed_loop(policy, tokenizer, train_set.norm, cfg, cfg.eval.rollouts,
                                                     seed=0, out_dir=run_dir if last else None)
                st["epoch_row"].update(success_rate=cl["success_rate"],
                                       **{f"success_{t}": r["success_rate"] for t, r in cl["tasks"].items()})
            rec.log(st["epoch_row"])
            if st["converged_epoch"] is None and held_out["val_loss"] <= cfg.converge_loss:
                st["converged_epoch"], st["converged_at"] = epoch + 1, time.time() - start
            st.update(epoch=epoch + 1, batch=0, epoch_losses=[])
            if cfg.checkpoint.every:
                save()
        bar.close()

        # ---------------------------------------------------------------------------- summarise
        epoch_row, held_out, grad_norms = st["epoch_row"], st["held_out"], st["grad_norms"]
        final_loss = epoch_row["train_loss"]
        summary.update(
            status="diverged" if st["diverged"] or not math.isfinite(final_loss) else "completed",
            final_loss=final_loss, final_val_loss=epoch_row["val_loss"], final_output_std=epoch_row["val_output_std"],
            epochs_to_converge=st["converged_epoch"], time_to_converge_s=st["converged_at"],
            converge_loss=cfg.converge_loss, skipped_batches=st["skipped"], scaled_loss_steps=st["scaled"],
            steps=st["step"], epochs=cfg.epochs, diverged_at_step=st["step"] if st["diverged"] else None,
            updates=st["step"] - st["skipped"], grad_norm_median=float(np.median(grad_norms)) if grad_norms else None,
            nonfinite_grad_steps=int(sum(not math.isfinite(g) for g in grad_norms)),
            val_action_error=held_out["val_action_error"], baseline_action_errors=held_out["baseline_action_errors"],
            beats_baselines=all(held_out["val_action_error"] < b for b in held_out["baseline_action_errors"].values()),
            wall_time_s=time.time() - start, peak_rss_mb=peak_memory_mb())
        if st["closed_loop"]:
            summary["closed_loop"] = st["closed_loop"]
        if main:
            torch.save({k: v.cpu() for k, v in policy.state_dict().items()}, run_dir / "policy.pt")
        if main and not cfg.checkpoint.keep:
            (run_dir / checkpoint.NAME).unlink(missing_ok=True)
        return summary
    except BaseException as e:  # the summary says why; rows already in metrics.jsonl stay
        summary.update(status="failed", error=f"{type(e).__name__}: {e}", wall_time_s=time.time() - start)
        raise
    finally:
        rec.summary(summary)
        rec.finish(exit_code=int(summary["status"] == "failed"))
        if world > 1:
            ddp.finish()


def sweep_settings(cfg, hc):
    """In a multirun: one W&B group per sweep, and the cores divided between parallel jobs so they do not fight."""
    if cfg.logger.get("group") is None and "group" in cfg.logger:
        cfg.logger.group = hc.sweep.dir
    n_jobs = hc.launcher.get("n_jobs")  # set by the joblib launcher; -1 means one job per core, as in joblib
    if cfg.threads is None and n_jobs:
        cpus = os.cpu_count()
        cfg.threads = max(1, cpus // min(cpus, n_jobs if n_jobs > 0 else cpus + 1 + n_jobs))


class SweepEnd(Callback):
    """After a multirun: how many jobs failed, and a non-zero exit if any did."""
    def on_multirun_end(self, config, **kwargs):
        sweep_dir = Path(config.hydra.sweep.dir)
        status = [json.loads(p.read_text()).get("status") for p in sorted(sweep_dir.glob("*/summary.json"))]
        failed = status.count("failed")
        print(f"{sweep_dir}: {len(status)} runs, {failed} failed. Report: python -m vla_exp.report {sweep_dir}")
        if failed:
            sys.exit(1)


@hydra.main(version_base="1.3", config_path=str(CONF_DIR), config_name="train")
def main(cfg):
    hc = HydraConfig.get()
    sweep = hc.mode == RunMode.MULTIRUN
    if sweep:
        sweep_settings(cfg, hc)
    try:
        s = train(cfg, hc.runtime.output_dir)
    except UsageError as e:  # bad input: one line, no traceback (bugs keep theirs)
        if not sweep:
            sys.exit(f"error: {e}")
        print(f"job {hc.job.num} failed: {e}", file=sys.stderr)
        if not Path(hc.runtime.output_dir, "summary.json").exists():  # rejected before the run began
            write_json(Path(hc.runtime.output_dir) / "summary.json", {"choices": choices(cfg), "seed": cfg.seed,
                                                                       "status": "failed", "error": f"UsageError: {e}"})
    except Exception:
        if not sweep:
            raise
        traceback.print_exc()  # a failed job must not stop the sweep: its summary.json says failed, the report shows it
        print(f"job {hc.job.num} failed; the sweep goes on", file=sys.stderr)
    else:
        if sweep:
            error = s.get("val_action_error", float("nan"))
            print(f"job {hc.job.num} {run_name(cfg)}: {s['status']}, action error {error:.4g}, {s['wall_time_s']:.0f} s")


if __name__ == "__main__":
    main()
