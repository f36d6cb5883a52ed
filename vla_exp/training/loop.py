"""One training core for every recipe: the loop, its state and its parts (`vla-exp-train` runs it, vla_exp.training.main)."""
import functools
import itertools
import math
import os
import platform
import re
import resource
import signal
import sys
import time
from contextlib import contextmanager, nullcontext
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from hydra.utils import instantiate
from omegaconf import OmegaConf
from tqdm import tqdm

from vla_exp import UsageError
from vla_exp.config import choices, config_hash, run_name
from vla_exp.files import exclusive, write_json
from vla_exp.runs import INIT_REPORT, NORMALIZATION, POLICY, check_run_folder, finished
from vla_exp.signals import Interrupted, StopOnSignal


def versions():
    import diffusers
    import transformers
    return {"python": platform.python_version(), "torch": torch.__version__, "transformers": transformers.__version__,
            "diffusers": diffusers.__version__}


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


def gpu_memory(device):
    """A job's peak on its GPU as the allocator counts it (MiB), what the GPU holds, and the rest in use there at the
    end, which the allocator does not count: this process's CUDA context, and any other process's memory."""
    free, total = torch.cuda.mem_get_info(device)
    return {"peak_gpu_mb": torch.cuda.max_memory_reserved(device) / 2 ** 20, "gpu_total_mb": total / 2 ** 20,
            "gpu_other_mb": (total - free - torch.cuda.memory_reserved(device)) / 2 ** 20}


def ram_mb():
    """The machine's memory (MiB)."""
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2 ** 20


class OutOfMemory(UsageError):
    """A job that asked for more memory than its device has: one line, like bad input; its summary says failed, so
    a sweep goes on and its re-run retries it."""


def out_of_memory(e, device):
    """The line for an error that is the allocator running out of memory (torch.OutOfMemoryError on a GPU, the CPU
    allocator's RuntimeError), saying what the job asked for, its peak and what the device holds; else None."""
    text = str(e)
    if not (isinstance(e, torch.OutOfMemoryError) or "can't allocate memory" in text):
        return None
    gib = lambda n: f"{n / 2 ** 30:,.2f} GiB"
    asked = re.search(r"[Tt]ried to allocate ([\d.]+) (bytes|KiB|MiB|GiB|TiB)", text)
    asked = float(asked[1]) * 1024 ** "bytes KiB MiB GiB TiB".split().index(asked[2]) if asked else None
    if device.type == "cuda":
        peak, total = torch.cuda.max_memory_reserved(device), torch.cuda.get_device_properties(device).total_memory
    else:
        peak, total = peak_memory_mb() * 2 ** 20, ram_mb() * 2 ** 20
    more = f"asked for {gib(asked)} more" if asked is not None else "asked for more"
    return (f"out of memory on {device}: the job {more} with {gib(peak)} at its peak, of the {gib(total)} the "
            "device holds; fewer jobs side by side (--jobs-per-gpu, --jobs), a smaller batch_size or a smaller model "
            "would fit")


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


@contextmanager
def timed(spent, part):
    """Add the seconds spent in the block to `spent[part]`."""
    tick = time.perf_counter()
    try:
        yield
    finally:
        spent[part] = spent.get(part, 0.0) + time.perf_counter() - tick


def build(node):
    """Instantiate a fix from its config group, whose `name` is a label, not an argument."""
    return instantiate(OmegaConf.masked_copy(node, [k for k in node if k != "name"]))


@dataclass
class LoopState:
    """Everything the loop carries from step to step; a checkpoint saves it, so a resumed run goes on bit for bit."""
    epoch: int = 0             # epochs done
    batch: int = 0             # batches done in this epoch
    step: int = 0
    skipped: int = 0           # batches the loss handling skipped
    scaled: int = 0            # losses it scaled
    grad_norms: list = field(default_factory=list)
    epoch_losses: list = field(default_factory=list)
    nonfinite_streak: int = 0  # steps in a row with a NaN/inf loss or gradient
    diverged: bool = False
    best_loss: float = None    # early stopping: the lowest epoch training loss so far
    bad_epochs: int = 0        # epochs in a row without a fall below it
    stopped_early: int = None  # the epoch after which early stopping ended the run
    converged_epoch: int = None
    converged_at: float = None  # seconds into the run
    epoch_row: dict = field(default_factory=dict)  # the last epoch's metrics.jsonl row
    held_out: dict = field(default_factory=dict)   # the last epoch's held-out figures
    closed_loop: dict = None   # the last closed-loop rollouts (data=metaworld)


@dataclass
class Parts:
    """What a run builds before it trains: the model and every piece a step or an epoch's end calls."""
    policy: torch.nn.Module
    model: torch.nn.Module  # the policy, under DDP where several processes train it
    tokenizer: object
    optimizer: torch.optim.Optimizer
    params: list
    lr_at: object
    handle_loss: object
    clip: object
    train_scheduler: object
    ddim: object
    autocast: object
    train_set: torch.utils.data.Dataset
    val_set: torch.utils.data.Dataset
    eval_idx: np.ndarray
    mean_chunk: np.ndarray
    missing: list  # names of the weights the checkpoint did not hold (the head's, for a backbone)
    source: str    # the folder the weights were loaded from
    gen: torch.Generator = None  # the noise and timesteps of training steps


def train(cfg, run_dir):
    """Train one run into `run_dir` and return its summary (also written to `run_dir/summary.json`). One run at a
    time holds the folder; a signal stops the run at a step boundary with everything saved (vla_exp.signals)."""
    from vla_exp.training import ddp
    from vla_exp.data.sources import validate

    validate(cfg)
    procs = ddp.setup()  # under distributed training only rank 0 writes files, logs to W&B and prints
    run_dir = Path(procs.same_dir(run_dir, cfg.optim.batch_size))
    check_run_folder(run_dir)
    digest = config_hash(cfg)
    if cfg.skip_finished and (done := finished(run_dir, digest)):
        print(f"{run_dir}: finished before with the same config; skipped (skip_finished=false reruns it)")
        return done
    with exclusive(run_dir, "another run") if procs.is_main else nullcontext(), StopOnSignal() as stop:
        return train_in(cfg, run_dir, procs, digest, stop)


def train_in(cfg, run_dir, procs, digest, stop):
    """The run itself: build, init report, train, summarise; the summary is written however it ends."""
    from vla_exp.data.sources import episodes_dir
    from vla_exp.recorder import Recorder
    from vla_exp.training import checkpoint

    device, bf16 = device_and_precision(cfg, procs.local_rank)
    ckpt = checkpoint.find_and_load(run_dir, cfg.resume, digest)
    start = time.time() - (ckpt["progress"]["elapsed_s"] if ckpt else 0)
    spent, began = {}, time.perf_counter()  # seconds by part of the run in this process (summary.json's time_s)
    reset_peak_memory()
    if device.type == "cuda":  # a job's own peak and memory, also where a worker process runs several jobs
        torch.cuda.empty_cache()  # blocks a job before it in this process cached, one that ran out of memory too
        torch.cuda.reset_peak_memory_stats(device)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    config = {**OmegaConf.to_container(cfg, resolve=True), "choices": choices(cfg)}
    rec = Recorder(run_dir, cfg.logger, config, run_name(cfg), ckpt, write=procs.is_main)
    summary = {"choices": choices(cfg), "seed": cfg.seed, "status": "running", "config_hash": digest,
               "replicate_hash": config_hash(cfg, ignore=("seed",)),
               "threads": torch.get_num_threads(), "device": str(device), "precision": "bf16" if bf16 else "fp32",
               "processes": procs.world, "versions": versions(), "started_at": time.time(),
               # the GPUs a launcher gave this job (Ray, SLURM), so a study's placement can be checked afterwards
               "cuda_visible_devices": os.environ.get("CUDA_VISIBLE_DEVICES"),
               **({"design": OmegaConf.to_container(cfg.design)} if "design" in cfg else {})}
    try:
        with timed(spent, "build"):
            p = build_parts(cfg, procs, device, bf16, run_dir)
        summary.update(data_dir=str(episodes_dir(cfg)), missing_head_params=len(p.missing))
        with timed(spent, "init_report"):
            summary.update(write_init_report(p, cfg, procs, run_dir))
        run = Run(cfg, p, procs, rec, run_dir, digest, start, spent)
        state = first_state(run, ckpt)
        if ckpt:
            summary["resumed_at_step"] = state.step
        if train_epochs(run, state, stop):
            run.save(state)
            name = signal.Signals(stop.signum).name
            summary.update(status="interrupted", signal=name, steps=state.step, wall_time_s=time.time() - start)
            raise stop.interrupted(f"{run_dir}: interrupted by {name} at step {state.step} of "
                                   f"{cfg.epochs * steps_per_epoch(p, cfg)}, checkpoint saved; run the same command "
                                   "again to resume")
        summary.update(summarise(state, cfg), wall_time_s=time.time() - start, peak_rss_mb=peak_memory_mb(),
                       **(gpu_memory(device) if device.type == "cuda" else {}))
        if procs.is_main:
            with timed(spent, "saving"):
                write_policy(p, cfg, run_dir)
        if procs.is_main and not cfg.checkpoint.keep:
            (run_dir / checkpoint.NAME).unlink(missing_ok=True)
        return summary
    except Interrupted:
        raise
    except KeyboardInterrupt:  # a second Ctrl-C: at once, mid-step; the last checkpoint is where a resume goes on
        summary.update(status="interrupted", signal="SIGINT", wall_time_s=time.time() - start)
        raise
    except BaseException as e:  # the summary says why; rows already in metrics.jsonl stay
        oom = out_of_memory(e, device)
        summary.update(status="failed", error=oom or f"{type(e).__name__}: {e}", wall_time_s=time.time() - start)
        if oom:
            raise OutOfMemory(oom) from None
        raise
    finally:
        summary["time_s"] = {**spent, "other": time.perf_counter() - began - sum(spent.values())}
        try:
            rec.summary(summary)
        except OSError as e:  # a full disk: the error that brought the run here is the one to show
            print(f"{run_dir}: summary.json could not be written ({e.strerror})", file=sys.stderr)
        rec.finish(exit_code=int(summary["status"] in ("failed", "interrupted")))
        procs.finish()


@dataclass
class Run:
    """What the loop of one run carries beside its state: the config, the parts, the processes, the records, and
    the clock (`start`, and `spent`: seconds by part of the run)."""
    cfg: object
    p: Parts
    procs: object
    rec: object
    run_dir: Path
    digest: str
    start: float
    spent: dict

    def save(self, state):
        """A checkpoint of everything the run needs to go on where it stopped (rank 0 writes it)."""
        from vla_exp.training import checkpoint
        if self.procs.is_main:
            with timed(self.spent, "saving"):
                checkpoint.save(self.run_dir, self.p.policy, self.p.optimizer, self.p.gen,
                                {**asdict(state), "elapsed_s": time.time() - self.start}, self.rec.rows, self.digest,
                                self.rec.tracker.id)


def write_init_report(p, cfg, procs, run_dir):
    """The head's weights and first outputs before any update, into init_report.json (rank 0); returns the
    summary's fields from it."""
    from vla_exp.evaluation.heldout import init_report
    first = next(iter(torch.utils.data.DataLoader(torch.utils.data.Subset(p.val_set, p.eval_idx), 64)))
    report = init_report(p.policy, p.train_scheduler, first, p.tokenizer, cfg.seed)
    names = [n for n, _ in p.policy.named_parameters() if "lora_" not in n]  # peft's adapters are new, not loaded
    report.update(checkpoint=p.source, missing_weights=p.missing, loaded_weights=len(names) - len(p.missing))
    if procs.is_main:
        write_json(run_dir / INIT_REPORT, report)
        for w in report["warnings"]:
            print(f"init report: WARNING {w}")
    return dict(initial_output_std=report["initial_output_std"], initial_loss=report["initial_loss"],
                init_warnings=report["warnings"], nonfinite_head_params=report["nonfinite_params"])


def first_state(run, ckpt):
    """The loop's state at its first step: seeded afresh, or restored (with the RNGs) from a checkpoint."""
    from vla_exp.training import checkpoint
    torch.manual_seed(run.cfg.seed)
    run.p.gen = torch.Generator().manual_seed(run.cfg.seed)
    if not ckpt:
        return LoopState()
    state = LoopState(**checkpoint.restore(ckpt, run.p.policy, run.p.optimizer, run.p.gen))
    if run.procs.is_main:
        print(f"{ckpt['path']}: resuming at epoch {state.epoch}, step {state.step}")
    return state


def steps_per_epoch(p, cfg):
    return math.ceil(len(p.train_set) / cfg.optim.batch_size)


def train_epochs(run, state, stop):
    """Epochs until the budget, a divergence or early stopping; returns True where a signal stopped them first."""
    cfg, p, procs, rec = run.cfg, run.p, run.procs, run.rec
    bar = tqdm(total=cfg.epochs * steps_per_epoch(p, cfg), initial=state.step, desc=run_name(cfg),
               disable=not (cfg.progress and procs.is_main))
    stopping = False
    while state.epoch < cfg.epochs and not state.diverged and not state.stopped_early:
        for group in p.optimizer.param_groups:  # the LoRA weights' group has its own base rate
            group["lr"] = p.lr_at(group["base_lr"], state.epoch, cfg.epochs)
        lr = p.optimizer.param_groups[0]["lr"]
        tick, seen = time.time(), 0
        for batch in epoch_batches(p.train_set, cfg.optim.batch_size, cfg.seed, state.epoch, state.batch):
            with timed(run.spent, "steps"):
                raw_loss, grad_norm, pred = optimisation_step(p, batch, state, procs, cfg.log_every)
            seen += len(batch["actions"])
            bar.update()
            if state.step % cfg.log_every == 0:
                rec.log({"kind": "step", "step": state.step, "epoch": state.epoch, "loss": raw_loss,
                         "output_std": procs.output_std(pred), "grad_norm": grad_norm, "lr": lr,
                         "skipped_batches": state.skipped, "scaled_loss_steps": state.scaled,
                         "samples_per_s": seen / (time.time() - tick)})
                bar.set_postfix(loss=f"{raw_loss:.4g}")
            if cfg.diverge_after and state.nonfinite_streak >= cfg.diverge_after:
                state.diverged = True  # nothing more to learn: every recent step was NaN or inf
                break
            if cfg.checkpoint.every and state.step % cfg.checkpoint.every == 0:
                run.save(state)
            if stopping := procs.any(stop.signum is not None):
                break
        if stopping:
            break
        with timed(run.spent, "evaluation"):
            end_of_epoch(p, state, cfg, procs, rec, run.run_dir, run.start)
        if cfg.checkpoint.every:
            run.save(state)
    bar.close()
    return stopping


def write_policy(p, cfg, run_dir):
    """The trained policy: policy.pt, and for a LLaVA-Pythia model TinyVLA's folder layout too."""
    from vla_exp import tensors
    policy = p.policy
    if policy.config.model_type == "llava_pythia":  # TinyVLA's layout: model.path=<run>/policy loads it back
        from vla_exp.policy.llava_pythia import save_policy
        policy = save_policy(p.policy, p.tokenizer, cfg.model.path, run_dir / "policy")
    elif hasattr(policy, "merge_and_unload"):  # LoRA: policy.pt holds the merged weights
        policy = policy.merge_and_unload()
    tensors.write({k: v.cpu() for k, v in policy.state_dict().items()}, run_dir / POLICY, "policy")


def build_parts(cfg, procs, device, bf16, run_dir):
    """The data, the policy with its head initialised by the init fix, the optimizer and the other fixes."""
    from vla_exp.data.sources import datasets
    from vla_exp.policy.diffusion import schedulers
    from vla_exp.policy.load import load_policy
    from vla_exp.policy.model import trainable

    with procs.rank0_first():  # the data and the backbone are cached on first use
        train_set, val_set = datasets(cfg)
        if procs.is_main:
            write_json(run_dir / NORMALIZATION, train_set.norm.state_dict())
        policy, tokenizer, missing = load_policy(cfg.model, cfg.paths.cache_dir, cfg.seed)
    if missing:  # the init fix sets up a new head; a trained one (a TinyVLA policy folder) is kept as it is
        build(cfg.init)(policy.embed_out)
    elif procs.is_main:
        print(f"{cfg.model.path}: the head's weights came from the checkpoint; init={cfg.init.name} leaves them")
    policy.to(device).train()
    train_scheduler, ddim = schedulers(cfg.diffusion)
    policy, groups = trainable(policy, cfg.model, cfg.optim.lr)
    params = [p for g in groups for p in g["params"]]
    # fused: one kernel for all parameters; the per-tensor loop was a third of a CPU step (docs/sweeps-and-scale.md)
    optimizer = torch.optim.AdamW(groups, lr=cfg.optim.lr, betas=tuple(cfg.adamw.betas),
                                  weight_decay=cfg.adamw.weight_decay, fused=True)
    parts = Parts(policy=policy, model=procs.wrap(policy), tokenizer=tokenizer, optimizer=optimizer, params=params,
                  lr_at=instantiate(cfg.optim.schedule), handle_loss=build(cfg.loss_handling), clip=build(cfg.clipping),
                  train_scheduler=train_scheduler, ddim=ddim,
                  autocast=functools.partial(torch.autocast, device.type, dtype=torch.bfloat16, enabled=bf16),
                  train_set=train_set, val_set=val_set,
                  eval_idx=np.random.default_rng(0).permutation(len(val_set))[:cfg.eval.samples],
                  mean_chunk=train_set.mean_chunk(), missing=missing, source=str(policy.name_or_path))
    return parts


def epoch_batches(dataset, batch_size, seed, epoch, start=0):
    """The batches of `epoch` from batch `start` on, shuffled by the seed and the epoch alone: each epoch has its own
    order, and a resumed run skips what was done and sees the rest in the same order."""
    loader = torch.utils.data.DataLoader(dataset, batch_size, shuffle=True,
                                         generator=torch.Generator().manual_seed(seed * 1000 + epoch))
    return itertools.islice(loader, start, None)


def optimisation_step(p, batch, state, procs, log_every):
    """Forward, loss handling, backward, clipping and the optimizer's step on one global batch (this process's
    share of it). Returns (the batch's loss before loss handling, the gradient norm before clipping or NaN where
    no update was made or None where it was not measured, the predicted noise)."""
    from vla_exp.policy.diffusion import noise_prediction
    n = len(batch["actions"])
    share, weight = procs.part(n)
    with p.autocast():
        loss, pred = noise_prediction(p.model, p.train_scheduler, batch, p.tokenizer, p.gen, share)
    loss = procs.batch_loss(loss, weight, n)
    raw_loss = loss.item()
    loss, scaled = p.handle_loss(loss)
    state.scaled += scaled
    grad_norm = float("nan")
    if loss is None:
        state.skipped += 1
    else:
        p.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        grad_norm = p.clip(p.params, logged=(state.step + 1) % log_every == 0)
        p.optimizer.step()
        state.epoch_losses.append(raw_loss)
        if grad_norm is not None:
            state.grad_norms.append(grad_norm)
    state.step += 1
    state.batch += 1
    finite = math.isfinite(raw_loss) and (grad_norm is None or math.isfinite(grad_norm))
    state.nonfinite_streak = 0 if finite else state.nonfinite_streak + 1
    return raw_loss, grad_norm, pred


def end_of_epoch(p, state, cfg, procs, rec, run_dir, start):
    """Held-out figures, closed-loop rollouts where due, the epoch's row, convergence; then the next epoch."""
    from vla_exp.evaluation.heldout import held_out_metrics
    losses = state.epoch_losses
    train_loss = float(np.mean(losses)) if losses else float("nan")
    early_stop(state, train_loss, cfg.early_stop)
    last = state.epoch + 1 == cfg.epochs or state.diverged or state.stopped_early
    idx = p.eval_idx if last else p.eval_idx[:cfg.eval.epoch_samples]  # the same samples' first ones: comparable
    state.held_out = held_out = held_out_metrics(p.policy, p.train_scheduler, p.ddim, p.val_set, idx,
                                                 p.tokenizer, cfg.diffusion.inference_steps, p.mean_chunk)
    state.epoch_row = {"kind": "epoch", "step": state.step, "epoch": state.epoch + 1, "train_loss": train_loss,
                       **{k: v for k, v in held_out.items() if k != "baseline_action_errors"}}
    if procs.is_main and cfg.eval.rollouts and ((state.epoch + 1) % cfg.eval.rollout_every == 0 or last):
        from vla_exp.evaluation.closed_loop import closed_loop  # the simulator: imported only for data=metaworld
        state.closed_loop = cl = closed_loop(p.policy, p.tokenizer, p.train_set.norm, cfg, cfg.eval.rollouts,
                                             seed=0, out_dir=run_dir if last else None)
        state.epoch_row.update(success_rate=cl["success_rate"],
                               **{f"success_{t}": r["success_rate"] for t, r in cl["tasks"].items()})
    rec.log(state.epoch_row)
    if state.converged_epoch is None and held_out["val_loss"] <= cfg.converge_loss:
        state.converged_epoch, state.converged_at = state.epoch + 1, time.time() - start
    state.epoch, state.batch, state.epoch_losses = state.epoch + 1, 0, []


def early_stop(state, loss, settings):
    """The reported fixed script's early stopping on the training loss: after `patience` epochs in a row whose loss
    is not below the best by more than `min_delta`, the run ends at this epoch."""
    if not settings.patience:
        return
    if state.best_loss is None or loss < state.best_loss - settings.min_delta:
        state.best_loss, state.bad_epochs = loss, 0
    else:
        state.bad_epochs += 1
    if state.bad_epochs >= settings.patience:
        state.stopped_early = state.epoch + 1


def summarise(state, cfg):
    """The summary's figures from the loop's final state."""
    epoch_row, held_out, grad_norms = state.epoch_row, state.held_out, state.grad_norms
    final_loss = epoch_row["train_loss"]
    out = dict(
        status="diverged" if state.diverged or not math.isfinite(final_loss) else "completed",
        final_loss=final_loss, final_val_loss=epoch_row["val_loss"], final_output_std=epoch_row["val_output_std"],
        epochs_to_converge=state.converged_epoch, time_to_converge_s=state.converged_at,
        converge_loss=cfg.converge_loss, skipped_batches=state.skipped, scaled_loss_steps=state.scaled,
        steps=state.step, epochs=cfg.epochs, stopped_early_at_epoch=state.stopped_early,
        diverged_at_step=state.step if state.diverged else None,
        updates=state.step - state.skipped, grad_norm_median=float(np.median(grad_norms)) if grad_norms else None,
        nonfinite_grad_steps=int(sum(not math.isfinite(g) for g in grad_norms)),
        val_action_error=held_out["val_action_error"], baseline_action_errors=held_out["baseline_action_errors"],
        beats_baselines=all(held_out["val_action_error"] < b for b in held_out["baseline_action_errors"].values()))
    if state.closed_loop:
        out["closed_loop"] = state.closed_loop
    return out
