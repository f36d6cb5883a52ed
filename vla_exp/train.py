"""One training core for every recipe: `python -m vla_exp.train recipe=fixed init=none`."""
import math
import platform
import sys
import time
from pathlib import Path

import hydra
import numpy as np
import torch
from hydra.core.hydra_config import HydraConfig
from hydra.utils import instantiate
from omegaconf import OmegaConf
from tqdm import tqdm

from vla_exp import UsageError

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


def build(node):
    """Instantiate a fix from its config group, whose `name` is a label, not an argument."""
    return instantiate(OmegaConf.masked_copy(node, [k for k in node if k != "name"]))


def train(cfg, run_dir):
    """Train one run into `run_dir` and return its summary (also written to `run_dir/summary.json`)."""
    from vla_exp import tasks
    from vla_exp.data import load_split
    from vla_exp.diagnostics import evaluate, init_report
    from vla_exp.diffusion import noise_prediction, schedulers
    from vla_exp.files import write_json
    from vla_exp.model import load_policy
    from vla_exp.recorder import Recorder

    # -------------------------------------------------------------------------------- build
    start = time.time()
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    d = cfg.data
    data_dir = d.dir or tasks.cached(cfg.paths.cache_dir, task=d.task, episodes=d.episodes, seed=d.generator_seed,
                                     steps=d.steps, horizon=cfg.model.config.horizon, camera=d.camera)
    train_set, val_set = load_split(data_dir, d.camera, d.val_fraction, d.split_seed, cfg.model.config.horizon)
    write_json(run_dir / "normalization.json", train_set.norm.state_dict())
    policy, tokenizer, missing = load_policy(cfg.model, cfg.paths.cache_dir, cfg.seed)
    build(cfg.init)(policy.embed_out)
    policy.train()
    train_scheduler, ddim = schedulers(cfg.diffusion)
    params = [p for p in policy.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=cfg.optim.lr, betas=tuple(cfg.adamw.betas),
                                  weight_decay=cfg.adamw.weight_decay)
    lr_at = instantiate(cfg.optim.schedule)
    handle_loss, clip = build(cfg.loss_handling), build(cfg.clipping)
    eval_idx = np.random.default_rng(0).permutation(len(val_set))[:cfg.eval.samples]
    mean_chunk = train_set.mean_chunk()
    config = {**OmegaConf.to_container(cfg, resolve=True), "choices": choices(cfg)}
    rec = Recorder(run_dir, cfg.logger, config, run_name(cfg))
    summary = {"choices": choices(cfg), "seed": cfg.seed, "status": "running", "versions": versions(),
               "data_dir": str(data_dir), "missing_head_params": len(missing)}

    try:
        # ---------------------------------------------------------------------------- init report
        first = next(iter(torch.utils.data.DataLoader(torch.utils.data.Subset(val_set, eval_idx), 64)))
        report = init_report(policy, train_scheduler, first, tokenizer, cfg.seed)
        write_json(run_dir / "init_report.json", report)
        for w in report["warnings"]:
            print(f"init report: WARNING {w}")
        summary.update(initial_output_std=report["initial_output_std"], initial_loss=report["initial_loss"],
                       init_warnings=report["warnings"], nonfinite_head_params=report["nonfinite_params"])

        # ---------------------------------------------------------------------------- train
        torch.manual_seed(cfg.seed)
        gen = torch.Generator().manual_seed(cfg.seed)
        counts = {"skipped": 0, "scaled": 0}
        step, converged_epoch, converged_at, epoch_row, grad_norms = 0, None, None, {}, []
        bar = tqdm(total=cfg.epochs * math.ceil(len(train_set) / cfg.optim.batch_size), desc=run_name(cfg),
                   disable=not cfg.progress)
        for epoch in range(cfg.epochs):
            lr = lr_at(cfg.optim.lr, epoch, cfg.epochs)
            for group in optimizer.param_groups:
                group["lr"] = lr
            loader = torch.utils.data.DataLoader(train_set, cfg.optim.batch_size, shuffle=True,
                                                 generator=torch.Generator().manual_seed(cfg.seed * 1000 + epoch))
            epoch_losses, tick, seen = [], time.time(), 0
            for batch in loader:
                loss, pred = noise_prediction(policy, train_scheduler, batch, tokenizer, gen)
                raw_loss = loss.item()
                loss, event = handle_loss(loss)
                if event:
                    counts[event] += 1
                grad_norm = float("nan")
                if loss is not None:
                    optimizer.zero_grad(set_to_none=True)
                    loss.backward()
                    grad_norm = clip(params)
                    optimizer.step()
                    epoch_losses.append(raw_loss)
                    grad_norms.append(grad_norm)
                step += 1
                seen += len(pred)
                bar.update()
                if step % cfg.log_every == 0:
                    rec.log({"kind": "step", "step": step, "epoch": epoch, "loss": raw_loss,
                             "output_std": pred.std().item(), "grad_norm": grad_norm, "lr": lr,
                             "skipped_batches": counts["skipped"], "scaled_loss_steps": counts["scaled"],
                             "samples_per_s": seen / (time.time() - tick)})
                    bar.set_postfix(loss=f"{raw_loss:.4g}")
            held_out = evaluate(policy, train_scheduler, ddim, val_set, eval_idx, tokenizer,
                                cfg.diffusion.inference_steps, mean_chunk)
            epoch_row = {"kind": "epoch", "step": step, "epoch": epoch + 1,
                         "train_loss": float(np.mean(epoch_losses)) if epoch_losses else float("nan"),
                         **{k: v for k, v in held_out.items() if k != "baseline_action_errors"}}
            rec.log(epoch_row)
            if converged_epoch is None and held_out["val_loss"] <= cfg.converge_loss:
                converged_epoch, converged_at = epoch + 1, time.time() - start
        bar.close()

        # ---------------------------------------------------------------------------- summarise
        final_loss = epoch_row["train_loss"]
        summary.update(
            status="completed" if math.isfinite(final_loss) else "diverged",
            final_loss=final_loss, final_val_loss=epoch_row["val_loss"], final_output_std=epoch_row["val_output_std"],
            epochs_to_converge=converged_epoch, time_to_converge_s=converged_at, converge_loss=cfg.converge_loss,
            skipped_batches=counts["skipped"], scaled_loss_steps=counts["scaled"], steps=step, epochs=cfg.epochs,
            updates=len(grad_norms), grad_norm_median=float(np.median(grad_norms)) if grad_norms else None,
            nonfinite_grad_steps=int(sum(not math.isfinite(g) for g in grad_norms)),
            val_action_error=held_out["val_action_error"], baseline_action_errors=held_out["baseline_action_errors"],
            beats_baselines=all(held_out["val_action_error"] < b for b in held_out["baseline_action_errors"].values()),
            wall_time_s=time.time() - start)
        torch.save(policy.state_dict(), run_dir / "policy.pt")
        return summary
    except BaseException as e:  # the summary says why; rows already in metrics.jsonl stay
        summary.update(status="failed", error=f"{type(e).__name__}: {e}", wall_time_s=time.time() - start)
        raise
    finally:
        rec.summary(summary)
        rec.finish(exit_code=int(summary["status"] == "failed"))


@hydra.main(version_base="1.3", config_path=str(CONF_DIR), config_name="train")
def main(cfg):
    try:
        train(cfg, HydraConfig.get().runtime.output_dir)
    except UsageError as e:  # bad input: one line, no traceback (bugs keep theirs)
        sys.exit(f"error: {e}")


if __name__ == "__main__":
    main()
