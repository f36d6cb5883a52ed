"""Closed-loop success in MetaWorld: `vla-exp-evaluate <run dir> [--episodes N] [--seed S] [--tasks ...]
[--policy trained|expert|mean_chunk|random]`.

The policy is rolled out for N episodes per task from held-out starts (vla_exp/data/metaworld.py draws evaluation starts
from another stream than the training data's). Every `execute` steps it samples an action chunk with DDIM and runs its
first `execute` actions. Per task and overall: success rate with a 95% Wilson interval, mean return and mean length.
The results go into the run's summary.json under `closed_loop` (`closed_loop_<policy>` for a reference policy) and
to W&B as the run's logger config says; a strip and a GIF of one rollout per task go into the run folder.
"""
import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch
from omegaconf import OmegaConf

from vla_exp import UsageError
from vla_exp.config import own_interpolations
from vla_exp.data import metaworld as mw
from vla_exp.runs import NORMALIZATION, POLICY, add_to_summary, read_normalization

POLICIES = ("trained", "expert", "mean_chunk", "random")
EXECUTE = 8  # of each 16-step chunk, as diffusion policy does


class Trained:
    """The trained policy: image, normalised state and instruction in, a DDIM-sampled action chunk out."""
    sees_image = True

    def __init__(self, policy, tokenizer, normalizer, cfg, seed):
        from vla_exp.policy.diffusion import schedulers
        self.policy, self.tokenizer, self.norm = policy, tokenizer, normalizer
        self.ddim, self.steps = schedulers(cfg.diffusion)[1], cfg.diffusion.inference_steps
        self.shape = (cfg.model.config.horizon, cfg.model.config.action_dim)
        self.gen = torch.Generator().manual_seed(seed)

    def __call__(self, obs):
        from vla_exp.policy.diffusion import sample_actions
        n = len(obs["state"])
        batch = {"image": torch.from_numpy(obs["image"]).permute(0, 3, 1, 2),
                 "state": torch.from_numpy(self.norm.qpos(obs["state"])), "instruction": [obs["instruction"]] * n,
                 "actions": torch.zeros(n, *self.shape)}
        chunks = sample_actions(self.policy, self.ddim, batch, self.tokenizer, self.steps, self.gen)
        return self.norm.unactions(chunks.numpy())


def wilson(successes, n):
    from statsmodels.stats.proportion import proportion_confint
    return tuple(float(x) for x in proportion_confint(successes, n, alpha=0.05, method="wilson"))


def rates(eps):
    k = sum(e["success"] for e in eps)
    low, high = wilson(k, len(eps))
    return {"success_rate": k / len(eps), "ci_low": low, "ci_high": high,
            "mean_return": float(np.mean([e["return"] for e in eps])),
            "mean_length": float(np.mean([e["length"] for e in eps])), "episodes": len(eps)}


def key(name):
    """Where the results of policy `name` go in summary.json, and the name of its strip and GIF."""
    return "closed_loop" if name == "trained" else f"closed_loop_{name}"


def run(policy, name, cfg, episodes, seed, execute=EXECUTE, tasks=None, out_dir=None):
    """Roll `policy` out for `episodes` episodes of each task (default: the data's) and return the results; with
    `out_dir`, save a strip and a GIF of each task's first episode there (`<key>.png`, `<key>.gif`)."""
    start, d = time.time(), cfg.data
    result = {"policy": name, "episodes_per_task": episodes, "seed": seed, "execute": execute, "steps": d.steps,
              "tasks": {}}
    shown, everything = {}, []
    for task in tasks or list(d.tasks):
        envs, camera = mw.open_task(task, episodes, d.steps, d.camera, cfg.model.config.vision_config.image_size)
        try:
            eps = mw.rollout(envs, camera, policy, task, mw.EVALUATION, seed, 0, d.steps, execute,
                             record=(0,) if out_dir else ())
        finally:
            mw.close_task(envs, camera)
        result["tasks"][task] = rates(eps)
        shown[task] = eps[0]
        everything += eps
    result.update(rates(everything), wall_time_s=time.time() - start)
    del result["episodes"]  # overall: episodes_per_task says it
    if out_dir:
        save_rollouts(Path(out_dir) / key(name), shown)
    return result


def closed_loop(policy, tokenizer, normalizer, cfg, episodes, seed, out_dir=None, execute=EXECUTE, tasks=None):
    """Closed-loop success of a trained policy (in eval mode for the rollouts, then back in its mode) on the tasks
    of `cfg.data` (the full run config), in the format of summary.json's `closed_loop`."""
    was_training = policy.training
    policy.eval()
    try:
        return run(Trained(policy, tokenizer, normalizer, cfg, seed), "trained", cfg, episodes, seed, execute,
                   tasks, out_dir)
    finally:
        policy.train(was_training)


def save_rollouts(path, shown, columns=8):
    """`path`.png: one row per task, `columns` frames from start to end; `path`.gif: the tasks side by side."""
    from PIL import Image, ImageDraw
    rows = []
    for task, ep in shown.items():
        frames = ep["images"]
        row = np.concatenate([frames[i] for i in np.linspace(0, len(frames) - 1, columns).round().astype(int)], 1)
        label = Image.new("RGB", (row.shape[1], 12), "white")
        outcome = f"success at step {ep['length']}" if ep["success"] else f"no success in {ep['length']} steps"
        ImageDraw.Draw(label).text((2, 0), f"{task}: {outcome}", fill="black")
        rows += [np.asarray(label), row]
    Image.fromarray(np.concatenate(rows)).save(path.with_suffix(".png"))
    length = max(len(ep["images"]) for ep in shown.values())
    gif = [Image.fromarray(np.concatenate([ep["images"][min(t, len(ep["images"]) - 1)] for ep in shown.values()], 1))
           for t in range(length)]
    gif[0].save(path.with_suffix(".gif"), save_all=True, append_images=gif[1:], duration=80, loop=0)


# ---------------------------------------------------------------------------------------------------------------
# Command line


def load_run(run_dir):
    """The composed config of a run folder written by vla-exp-train on MetaWorld data."""
    if not run_dir.is_dir():
        raise UsageError(f"{run_dir}: no such run folder")
    path = run_dir / ".hydra" / "config.yaml"
    if not path.is_file():
        raise UsageError(f"{run_dir}: no .hydra/config.yaml there: not a run folder written by vla-exp-train")
    cfg = OmegaConf.load(path)
    own_interpolations(OmegaConf.to_container(cfg, resolve=False), path)  # before anything resolves the config
    if OmegaConf.select(cfg, "data.task") != "metaworld":
        raise UsageError(f"{run_dir}: trained on data.task={OmegaConf.select(cfg, 'data.task')}, not on MetaWorld "
                         f"(data=metaworld): there is no simulator to roll it out in")
    return cfg


def build_policy(kind, run_dir, cfg, seed):
    """The policy to roll out: the run's own (from policy.pt and normalization.json) or a reference."""
    if kind == "expert":
        return mw.Expert()
    if kind == "random":
        return mw.RandomPolicy(seed)
    from vla_exp.data.chunks import Normalizer
    for name in (NORMALIZATION, POLICY)[:2 if kind == "trained" else 1]:
        if not (run_dir / name).is_file():
            raise UsageError(f"{run_dir}: no {name} there (the run did not finish?)")
    norm = Normalizer(**read_normalization(run_dir))
    if kind == "mean_chunk":
        from vla_exp.data.sources import datasets
        return mw.FixedChunk(norm.unactions(datasets(cfg)[0].mean_chunk()))
    from vla_exp import tensors
    from vla_exp.policy.load import load_policy
    policy, tokenizer, _ = load_policy(cfg.model, cfg.paths.cache_dir, cfg.seed)
    policy.load_state_dict(tensors.read(run_dir / POLICY, "policy"))
    return Trained(policy.eval(), tokenizer, norm, cfg, seed)


def to_wandb(cfg, run_dir, result):
    """The results as a W&B run beside the training's (its logger config: same project and group, job type
    "evaluate"). W&B never stops the evaluation: a failure warns once, and summary.json holds everything."""
    from vla_exp.recorder import Tracker
    name = key(result["policy"])
    tracker = Tracker(cfg.logger, run_dir, f"{run_dir.name}-{name}", OmegaConf.to_container(cfg, resolve=True),
                      job_type="evaluate")
    flat = {f"{name}/{k}": v for k, v in result.items() if k != "tasks"}
    flat |= {f"{name}/{task}/{k}": v for task, r in result["tasks"].items() for k, v in r.items()}
    tracker.log(flat, images={f"{name}/rollouts": run_dir / f"{name}.png"})
    tracker.summary(flat)
    tracker.finish()


def evaluate_run(run_dir, episodes=10, seed=0, tasks=None, policy="trained", execute=EXECUTE, threads=None):
    """Evaluate a run folder's policy (or a reference policy) and write the results into its summary.json."""
    run_dir = Path(run_dir)
    cfg = load_run(run_dir)
    names = mw.task_names()
    tasks = tasks or list(cfg.data.tasks)
    if unknown := [t for t in tasks if t not in names]:
        raise UsageError(f"--tasks {' '.join(unknown)}: not MetaWorld tasks; choose from {', '.join(names)}")
    if threads:
        torch.set_num_threads(threads)
    result = run(build_policy(policy, run_dir, cfg, seed), policy, cfg, episodes, seed, execute, tasks, run_dir)
    add_to_summary(run_dir, **{key(policy): result})
    to_wandb(cfg, run_dir, result)
    return result


def table(result):
    lines = [f"{'task':28s} {'success':>8s} {'95% CI':>14s} {'return':>8s} {'length':>7s}"]
    for task, r in {**result["tasks"], "overall": result}.items():
        lines.append(f"{task:28s} {r['success_rate']:8.2f} {r['ci_low']:6.2f} - {r['ci_high']:4.2f} "
                     f"{r['mean_return']:8.1f} {r['mean_length']:7.1f}")
    return "\n".join(lines)


def main(argv=None):
    p = argparse.ArgumentParser(prog="vla-exp-evaluate", description=__doc__.split("\n\n")[0])
    p.add_argument("run_dir", help="a run folder of vla-exp-train with data=metaworld")
    p.add_argument("--episodes", type=int, default=10, help="episodes per task (default 10)")
    p.add_argument("--seed", type=int, default=0, help="evaluation seed: starts and sampling noise (default 0)")
    p.add_argument("--tasks", nargs="+", help="MetaWorld tasks (default: the run's data.tasks)")
    p.add_argument("--policy", choices=POLICIES, default="trained", help="the run's policy or a reference")
    p.add_argument("--execute", type=int, default=EXECUTE, help=f"actions run per chunk (default {EXECUTE})")
    p.add_argument("--threads", type=int, help="torch threads (default: torch's)")
    args = p.parse_args(argv)
    if args.episodes < 1 or args.execute < 1:
        p.error("--episodes and --execute must be >= 1")
    try:
        result = evaluate_run(**vars(args))
    except UsageError as e:  # bad input: one line, no traceback
        sys.exit(f"error: {e}")
    print(table(result))
    print(f"{args.run_dir}/summary.json: {key(args.policy)} ({result['wall_time_s']:.0f} s)")


if __name__ == "__main__":
    main()
