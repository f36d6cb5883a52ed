"""Performance and scale of the training core on the embedded default (model=tiny, data=tint), measured in one run.

    python experiments/benchmark.py                 # 3 repeats, the sweep once
    python experiments/benchmark.py --repeats 5 --sweep-repeats 2 --out results/benchmark/benchmark.json
    python experiments/benchmark.py --skip-sweep    # the sweep takes minutes
    python experiments/benchmark.py --profile       # also: the top costs of one training step (torch.profiler)
    python experiments/benchmark.py --llava-400m    # only: one LoRA step of the LLaVA-Pythia-400M shape, batch 2
    python experiments/benchmark.py --lerobot       # only: the LeRobot reader on a LeRobot copy of the default data
    python experiments/benchmark.py --options       # only: a step under each speed option; a run's time by part
    python experiments/benchmark.py --gpu           # only: the GPU figures (steps, jobs per GPU, the factorial and
                                                    # the headline table on the GPU; docs/scale.md)

Each repeat measures every figure once, in turn (the core and the raw loop swap places every other repeat), and the
table shows medians over repeats; every repeat's figures go to the JSON, rewritten after each repeat. The budget
is `recipe=fixed clipping=none epochs=1 data.episodes=40`, so that the core and the raw loop do the same arithmetic
(clipping is part of a recipe, not overhead; --profile prices it), with torch's default thread count (the cores)
for both. The data and backbone are cached by one warm-up run of the CLI before anything is timed.
"""
import argparse
import contextlib
import gc
import itertools
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import torch
from torch.utils.flop_counter import FlopCounterMode

from vla_exp.attribution.studies import BUDGETS
from vla_exp.config import compose
from vla_exp.data.sources import datasets
from vla_exp.policy.diffusion import noise_prediction, schedulers
from vla_exp.policy.load import load_policy
from vla_exp.runs import read_metrics, read_summary, summaries as run_summaries
from vla_exp.training.loop import train

BUDGET = ["recipe=fixed", "clipping=none", "epochs=1", "data.episodes=40"]
# the sweep's jobs train 4x longer than figures 1-5 take, so start-up (paid once by the basic launcher, per worker
# by joblib) does not hide what running side by side buys
SWEEP_BUDGET = [o for o in BUDGET if not o.startswith("data.episodes=")] + ["data.episodes=160"]
CLI = [sys.executable, "-m", "vla_exp.training.main"]
HOW = {
    "core": "train(cfg, run_dir) in this process (lean: clipping.every_step=false), W&B offline, log_every=10: samples_per_s of its last metrics.jsonl "
            "step row (samples since the epoch began / time since); the init report and evaluation fall outside it",
    "raw": "load_policy, the same DataLoader, AdamW(fused), noise_prediction: forward, backward, step, nothing else; "
           "the same steps and threads, timed from the loader's first batch",
    "first_step": "Popen of the CLI (log_every=1) until its metrics.jsonl holds a row (end of step 1), then killed; "
                  "one warm-up run filled the data and backbone cache first",
    "loader": "the same DataLoader alone, whole epochs for at least 1 s, against the raw loop's samples/s",
    "peak_rss": "core run's summary.json (this process, so it holds what the benchmark holds) / the largest of the "
                "sequential sweep's jobs (one CLI process each)",
    "flops": "FlopCounterMode over one forward+backward (matmul, conv, attention; no elementwise ops) x raw steps/s "
             "at batch 8, against 20 timed torch.mm of 1024x1024 float32",
    "sweep_ceiling": "2 jobs of 1 thread can beat 1 job of 2 threads by at most 2 x (raw steps/s at 1 thread) / "
                     "(raw steps/s at 2 threads), measured in each repeat",
    "sweep": "wall time of the 4-job CLI sweep (init=xavier,none seed=0,1, data.episodes=160): basic launcher, default threads / "
             "joblib n_jobs=2, 1 thread each",
}


def make_cfg(*overrides):
    return compose(*BUDGET, *overrides)


def loader(cfg, data, batch_size):  # the core's loader for epoch 0
    return torch.utils.data.DataLoader(data, batch_size, shuffle=True,
                                       generator=torch.Generator().manual_seed(cfg.seed * 1000))


class Raw:
    """A minimal training step on the core's model: noise_prediction, backward and the fused AdamW step alone."""

    def __init__(self, cfg, device="cpu"):
        self.policy, self.tokenizer, _ = load_policy(cfg.model, cfg.paths.cache_dir, cfg.seed)
        self.policy.to(device).train()
        self.scheduler, _ = schedulers(cfg.diffusion)
        self.params = [p for p in self.policy.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(self.params, lr=cfg.optim.lr, betas=tuple(cfg.adamw.betas),
                                           weight_decay=cfg.adamw.weight_decay, fused=True)

    def step(self, batch, gen=None, model=None, tokenizer=None, extra=None):
        """One step on `batch` (through `model`, default the policy; `extra` runs between backward and the
        optimizer's step); returns the loss tensor."""
        loss, _ = noise_prediction(self.policy if model is None else model, self.scheduler, batch,
                                   self.tokenizer if tokenizer is None else tokenizer, gen)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if extra:
            extra()
        self.optimizer.step()
        return loss


def raw_loop(cfg, data, batch_size, steps):
    """Samples/s and steps/s of forward, backward and optimizer step alone, over the first `steps` batches."""
    raw = Raw(cfg)
    torch.manual_seed(cfg.seed)
    gen = torch.Generator().manual_seed(cfg.seed)
    seen, done, tick = 0, 0, time.perf_counter()
    for batch in itertools.islice(loader(cfg, data, batch_size), steps):
        raw.step(batch, gen)
        seen, done = seen + len(batch["actions"]), done + 1
    seconds = time.perf_counter() - tick
    return {"samples_per_s": seen / seconds, "steps_per_s": done / seconds}


def core_run(cfg, run_dir, steps):
    train(cfg, run_dir)
    rows = read_metrics(run_dir)
    last = [r for r in rows if r["kind"] == "step"][-1]
    assert last["step"] == steps, f"the core's last step row is step {last['step']}, not {steps}"
    return {"samples_per_s": last["samples_per_s"],
            "peak_rss_mb": read_summary(run_dir)["peak_rss_mb"]}


def loader_rate(cfg, data, batch_size, min_s=1.0):
    seen, tick = 0, time.perf_counter()
    while time.perf_counter() - tick < min_s:  # one epoch takes a fraction of a second: too short to time alone
        for batch in loader(cfg, data, batch_size):
            seen += len(batch["actions"])
    return seen / (time.perf_counter() - tick)


def flops_per_step(cfg, data):
    policy, tokenizer, _ = load_policy(cfg.model, cfg.paths.cache_dir, cfg.seed)
    policy.train()
    batch = next(iter(loader(cfg, data, cfg.optim.batch_size)))
    with FlopCounterMode(display=False) as counter:
        noise_prediction(policy, schedulers(cfg.diffusion)[0], batch, tokenizer)[0].backward()
    return counter.get_total_flops()


def synchronize(device):
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def gpu_peak_mb(device):
    return torch.cuda.max_memory_allocated(device) / 2 ** 20 if torch.device(device).type == "cuda" else None


def matmul_flops(n=1024, reps=20):
    a, b = torch.randn(n, n), torch.randn(n, n)
    for _ in range(3):
        torch.mm(a, b)
    tick = time.perf_counter()
    for _ in range(reps):
        torch.mm(a, b)
    return 2 * n ** 3 * reps / (time.perf_counter() - tick)


def first_step_s(run_dir, timeout_s=300):
    """Seconds from starting the CLI to its first metrics.jsonl row; the process is then killed."""
    run_dir.mkdir(parents=True)
    metrics, log = run_dir / "metrics.jsonl", open(run_dir / "cli.log", "w")
    tick = time.perf_counter()
    proc = subprocess.Popen([*CLI, *BUDGET, "logger=none", "progress=false", "log_every=1",
                             f"hydra.run.dir={run_dir}"], stdout=log, stderr=subprocess.STDOUT)
    try:
        while not (metrics.exists() and metrics.stat().st_size):
            if proc.poll() is not None or time.perf_counter() - tick > timeout_s:
                raise RuntimeError(f"the CLI ended or hung before its first step:\n{(run_dir / 'cli.log').read_text()}")
            time.sleep(0.02)
        return time.perf_counter() - tick
    finally:
        proc.kill()
        proc.wait()
        log.close()


def sweep(sweep_dir, parallel):
    """Wall seconds of the 4-cell sweep as one CLI process, and the largest peak RSS among its jobs."""
    launcher = ["hydra/launcher=joblib", "hydra.launcher.n_jobs=2"] if parallel else []
    tick = time.perf_counter()
    out = subprocess.run([*CLI, "-m", "init=xavier,none", "seed=0,1", *SWEEP_BUDGET, "logger=none",
                          "progress=false", f"hydra.sweep.dir={sweep_dir}", *launcher], capture_output=True, text=True)
    seconds = time.perf_counter() - tick
    runs = summaries(sweep_dir)
    if out.returncode or len(runs) != 4:
        raise RuntimeError(f"sweep into {sweep_dir} failed ({len(runs)}/4 summaries):\n{out.stderr[-3000:]}")
    return seconds, max(s["peak_rss_mb"] for s in runs)


def profile(cfg, data, steps=30, top=10):
    """Self CPU time of the ops of `steps` training steps (the core's arithmetic, with its per-step gradient norm and
    the fixed recipe's clipping), top `top`, and each part of a step timed alone, in ms."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile
    raw = Raw(cfg)
    tokenizer, params = raw.tokenizer, raw.params
    batches = list(itertools.islice(loader(cfg, data, cfg.optim.batch_size), steps))
    parts = {"forward+backward+step": [], "+ gradient norm (clipping=none)": [], "+ clip_grad_norm_ (grad_norm)": [],
             "tokenizer": [], "loader (per batch)": []}
    step = lambda batch, extra=None: raw.step(batch, extra=extra).item()
    norm = lambda: torch.nn.utils.get_total_norm([p.grad for p in params if p.grad is not None]).item()
    clip = lambda: torch.nn.utils.clip_grad_norm_(params, 1.0).item()
    for batch in batches:  # interleaved, so that all parts see the same load
        for name, fn in [("forward+backward+step", lambda: step(batch)),
                         ("+ gradient norm (clipping=none)", lambda: step(batch, norm)),
                         ("+ clip_grad_norm_ (grad_norm)", lambda: step(batch, clip)),
                         ("tokenizer", lambda: tokenizer(list(batch["instruction"]), padding=True, return_tensors="pt")),
                         ("loader (per batch)", lambda: next(iter(loader(cfg, data, cfg.optim.batch_size))))]:
            tick = time.perf_counter()
            fn()
            parts[name].append(1000 * (time.perf_counter() - tick))
    with torch_profile(activities=[ProfilerActivity.CPU]) as prof:
        for batch in batches:
            step(batch, norm)
    ops = sorted(prof.key_averages(), key=lambda e: e.self_cpu_time_total, reverse=True)
    total = sum(e.self_cpu_time_total for e in ops)
    return {"step_parts_ms": {k: statistics.median(v) for k, v in parts.items()},
            "top_ops": [{"op": e.key, "share": e.self_cpu_time_total / total,
                         "ms_per_step": e.self_cpu_time_total / 1000 / steps} for e in ops[:top]]}


def llava_400m(tmp, steps=3, device="cpu", bf16=False):
    """Seconds per LoRA step (TinyVLA's recipe) and peak memory of model=llava_pythia_400m at batch 2 on a
    random-weight folder of that shape in TinyVLA's format, written first (no weights can be downloaded here)."""
    from omegaconf import OmegaConf

    from vla_exp.policy.llava_pythia import write_random_folder
    from vla_exp.policy.model import trainable
    from vla_exp.training.loop import peak_memory_mb, reset_peak_memory
    cfg = compose("model=llava_pythia_400m", f"model.path={tmp / 'llava_400m'}", "recipe=fixed")
    shape = OmegaConf.to_container(cfg.model.config, resolve=True)
    start = time.time()
    if not (tmp / "llava_400m" / "config.json").exists():  # --gpu measures it twice
        write_random_folder(tmp / "llava_400m", shape["text_config"], shape["vision_config"])
    written_s = time.time() - start
    policy, tokenizer, missing = load_policy(cfg.model, cfg.paths.cache_dir, 0)
    policy, groups = trainable(policy.to(device).train(), cfg.model, cfg.optim.lr)
    optimizer = torch.optim.AdamW(groups, fused=True)
    train_scheduler, _ = schedulers(cfg.diffusion)
    g = torch.Generator().manual_seed(0)
    size, c = shape["vision_config"]["image_size"], cfg.model.config
    batch = {"image": torch.randint(0, 256, (2, 3, size, size), generator=g, dtype=torch.uint8),
             "state": torch.randn(2, c.state_dim, generator=g), "instruction": ["pick up the red cube"] * 2,
             "actions": torch.rand(2, c.horizon, c.action_dim, generator=g) * 2 - 1}
    reset_peak_memory()
    times = []
    for _ in range(steps + 1):  # the first step pays for allocations: not counted
        start = time.time()
        with torch.autocast(torch.device(device).type, dtype=torch.bfloat16, enabled=bf16):
            loss, _ = noise_prediction(policy, train_scheduler, batch, tokenizer, g)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        synchronize(device)
        times.append(time.time() - start)
    n = sum(q.numel() for q in policy.parameters())
    return {"s_per_step": statistics.median(times[1:]), "first_step_s": times[0], "peak_rss_mb": peak_memory_mb(),
            "peak_gpu_mb": gpu_peak_mb(device),
            "params": n, "trainable": sum(q.numel() for gr in groups for q in gr["params"]),
            "missing_head_params": len(missing), "folder_written_s": written_s, "matmul_flops": matmul_flops(),
            "threads": torch.get_num_threads()}


def lerobot_io(tmp, batch_size=8):
    """The LeRobot reader on a LeRobot v3.0 (AV1 video) copy of the default data (data=tint, 200 episodes): frames/s
    of the first decode into the cache and of reading the cache back (split and normalised), the loader's samples/s
    against the raw loop's, and how far the decoded frames are from the originals."""
    from vla_exp.data.episodes import read_episode
    from vla_exp.data.sources import episodes_dir
    from vla_exp.data.lerobot import write_dataset
    hdf5 = episodes_dir(compose())  # the default data, generated once
    files = sorted(hdf5.glob("*.hdf5"))
    write_dataset(tmp / "tint-lerobot", (read_episode(f, "top") for f in files), "top", total=len(files))
    cfg = compose("data=lerobot", f"data.root={tmp / 'tint-lerobot'}", f"paths.cache_dir={tmp / 'cache'}")
    tick = time.perf_counter()
    decoded = episodes_dir(cfg)
    first_s = time.perf_counter() - tick
    tick = time.perf_counter()
    train_set, val_set = datasets(cfg)
    cached_s = time.perf_counter() - tick
    frames = sum(len(e["action"]) for e in train_set.episodes + val_set.episodes)
    diffs = [np.abs(read_episode(a, "top")["images"].astype(np.int16) - read_episode(b, None)["images"])
             for a, b in zip(files, sorted(decoded.glob("*.hdf5")))]
    diff = np.concatenate([d.reshape(-1) for d in diffs])
    mse = float(np.mean(diff.astype(np.float64) ** 2))
    loader_s = loader_rate(cfg, train_set, batch_size)
    raw = raw_loop(cfg, train_set, batch_size, 60)["samples_per_s"]
    return {"frames": frames, "first_decode_frames_per_s": frames / first_s, "first_decode_s": first_s,
            "cached_frames_per_s": frames / cached_s, "cached_s": cached_s, "loader_samples_per_s": loader_s,
            "raw_samples_per_s": raw, "loader_over_raw": loader_s / raw, "pixel_mean_abs_diff": float(diff.mean()),
            "pixel_max_abs_diff": int(diff.max()), "psnr_db": 10 * np.log10(255 ** 2 / mse),
            "matmul_flops": matmul_flops(), "threads": torch.get_num_threads()}


def step_options(cfg, data, steps=40, rounds=3, compiled=False):
    """Milliseconds a training step (batch 8, forward, backward, fused AdamW) takes under each option for a faster
    step, on the same batches, interleaved in `rounds` (medians): today's fp32; bfloat16 autocast; the instructions
    tokenised before the step (what pre-tokenising could save at most); denormals flushed to zero; oneDNN off
    (PyTorch's own convolutions); with `compiled`, torch.compile (its compile time apart: each new instruction
    length is a new shape)."""
    raw = Raw(cfg)
    batches = [b for b in itertools.islice(loader(cfg, data, 8), steps) if len(b["actions"]) == 8]
    gen = torch.Generator().manual_seed(0)

    class Tokens:  # the batch's tokens computed before the clock starts
        def __init__(self, batch):
            self.text = raw.tokenizer(list(batch["instruction"]), padding=True, return_tensors="pt")

        def __call__(self, *args, **kwargs):
            return self.text

    def timed(model=None, context=contextlib.nullcontext, pretokenised=False):
        tokens = [Tokens(b) if pretokenised else None for b in batches]
        tick = time.perf_counter()
        for b, tok in zip(batches, tokens):
            with context():
                raw.step(b, gen, model, tok)
        return 1000 * (time.perf_counter() - tick) / len(batches)

    @contextlib.contextmanager
    def denormals_flushed():
        torch.set_flush_denormal(True)
        try:
            yield
        finally:
            torch.set_flush_denormal(False)

    options = {"fp32 (today)": lambda: timed(),
               "bf16 autocast": lambda: timed(context=lambda: torch.autocast("cpu", dtype=torch.bfloat16)),
               "pre-tokenised": lambda: timed(pretokenised=True),
               "denormals flushed": lambda: timed(context=denormals_flushed),
               "oneDNN off": lambda: timed(context=lambda: torch.backends.mkldnn.flags(enabled=False))}
    out = {}
    if compiled:
        tick = time.perf_counter()
        model = torch.compile(raw.policy)
        timed(model)  # compiles once per shape it meets: every instruction length of these batches
        out["torch.compile: compile s"] = time.perf_counter() - tick
        options["torch.compile"] = lambda: timed(model)
    times = {k: [] for k in options}
    timed()  # allocations and oneDNN's kernels for these shapes: not counted
    for _ in range(rounds):
        for name, fn in options.items():
            times[name].append(fn())
    out.update({f"{k} ms": statistics.median(v) for k, v in times.items()})
    return out


def run_breakdown(tmp, recipes=("original", "fixed")):
    """Where the wall time of a run at the recipes' default budget goes (summary.json's time_s), per recipe."""
    out = {}
    for recipe in recipes:
        s = train(compose(f"recipe={recipe}", "logger=wandb", "progress=false"), tmp / recipe)
        out[recipe] = {"wall_time_s": s["wall_time_s"], "updates": s["updates"], "time_s": s["time_s"]}
    return out


def save(path, data):
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2) + "\n")


def measure(args, tmp):
    """Every figure, repeat by repeat; the JSON is rewritten after each, so a run cut short keeps what it measured."""
    threads = torch.get_num_threads()
    warmup_s = first_step_s(tmp / "warmup")  # fills the data and backbone cache: not counted
    cfg = make_cfg(f"threads={threads}", "log_every=10", "logger=wandb", "progress=false")
    lean = make_cfg(f"threads={threads}", "log_every=10", "logger=wandb", "progress=false", "clipping.every_step=false")
    data, batch = datasets(cfg)[0], cfg.optim.batch_size
    steps = len(loader(cfg, data, batch)) // cfg.log_every * cfg.log_every  # the core's last step row
    res = {"threads": threads, "batch_size": batch, "steps_timed": steps, "train_samples": len(data),
           "warmup_first_step_s": warmup_s, "flops_per_step": flops_per_step(cfg, data), "how": HOW,
           "budget": BUDGET, "repeats": [], "sweeps": [], "sweep_error": None}
    for i in range(args.repeats):
        gc.collect()
        # a shared machine: a repeat taken while another job runs reads several times slower, and this says so
        r = {"load_1min": os.getloadavg()[0]}
        for part in ["raw", "core", "lean"] if i % 2 else ["core", "lean", "raw"]:
            if part == "core":
                core = core_run(cfg, tmp / f"core{i}", steps)
                r.update(core_samples_per_s=core["samples_per_s"], peak_rss_mb=core["peak_rss_mb"])
            elif part == "lean":  # the gradient norm measured on logged steps only
                r["lean_samples_per_s"] = core_run(lean, tmp / f"lean{i}", steps)["samples_per_s"]
            else:  # the matmul rate right after the loop it is compared with, so that both see the same load
                raw = raw_loop(cfg, data, batch, steps)
                r.update(raw_samples_per_s=raw["samples_per_s"], steps_per_s_batch8=raw["steps_per_s"],
                         matmul_flops=matmul_flops())
            gc.collect()
        r["steps_per_s_batch16"] = raw_loop(cfg, data, 16, steps)["steps_per_s"]
        torch.set_num_threads(1)  # what one of two side-by-side jobs gets: the ceiling of the sweep's speed-up
        r["steps_per_s_batch8_1thread"] = raw_loop(cfg, data, batch, steps)["steps_per_s"]
        torch.set_num_threads(threads)
        r["loader_samples_per_s"] = loader_rate(cfg, data, batch)
        r["first_step_s"] = first_step_s(tmp / f"startup{i}")
        r.update(core_over_raw=r["core_samples_per_s"] / r["raw_samples_per_s"],
                 lean_over_raw=r["lean_samples_per_s"] / r["raw_samples_per_s"],
                 loader_over_raw=r["loader_samples_per_s"] / r["raw_samples_per_s"],
                 sweep_ceiling=2 * r["steps_per_s_batch8_1thread"] / r["steps_per_s_batch8"],
                 utilisation=res["flops_per_step"] * r["steps_per_s_batch8"] / r["matmul_flops"])
        res["repeats"].append(r)
        save(args.out, res)
        print(f"repeat {i + 1}/{args.repeats}: " + ", ".join(f"{k} {v:.4g}" for k, v in r.items()), flush=True)
    if args.profile:
        res["profile"] = profile(cfg, data)
        save(args.out, res)
    for i in range(0 if args.skip_sweep else args.sweep_repeats):
        try:  # minutes of figures 1-5 must not be lost to a failed sweep
            sequential, peak = sweep(tmp / f"sweep_seq{i}", parallel=False)
            parallel, _ = sweep(tmp / f"sweep_par{i}", parallel=True)
        except RuntimeError as e:
            res["sweep_error"] = str(e)
            print(e, file=sys.stderr)
            break
        res["sweeps"].append({"sequential_s": sequential, "parallel_s": parallel, "ratio": sequential / parallel,
                              "sweep_peak_rss_mb": peak})
        save(args.out, res)
        print(f"sweep {i + 1}/{args.sweep_repeats}: " +
              ", ".join(f"{k} {v:.4g}" for k, v in res["sweeps"][-1].items()), flush=True)
    return res


def median(rows, key):
    return statistics.median(r[key] for r in rows) if rows else None


def table(res):
    """(figure, measured, target, holds) rows from the medians."""
    m = {k: median(res["repeats"], k) for k in res["repeats"][0]}
    s = {k: median(res["sweeps"], k) for k in ("sequential_s", "parallel_s", "ratio", "sweep_peak_rss_mb")}
    rows = [
        ("1. core / raw samples/s", f"{m['core_over_raw']:.3f} ({m['core_samples_per_s']:.1f} / "
                                    f"{m['raw_samples_per_s']:.1f}, {res['threads']} threads)", ">= 0.95",
         m["core_over_raw"] >= 0.95),
        ("1. same, norm on logged steps only", f"{m['lean_over_raw']:.3f} ({m['lean_samples_per_s']:.1f} / "
                                               f"{m['raw_samples_per_s']:.1f})", ">= 0.95", m["lean_over_raw"] >= 0.95),
        ("2. start to first step", f"{m['first_step_s']:.2f} s", "<= 5 s", m["first_step_s"] <= 5),
        ("3. loader / model samples/s", f"{m['loader_over_raw']:.1f}x ({m['loader_samples_per_s']:.0f} / "
                                        f"{m['raw_samples_per_s']:.1f})", ">= 5x", m["loader_over_raw"] >= 5),
        ("4. steps/s at batch 8 / 16", f"{m['steps_per_s_batch8']:.2f} / {m['steps_per_s_batch16']:.2f}", "", None),
        ("4. peak RSS (core run / CLI job)", f"{m['peak_rss_mb']:.0f} / " +
         (f"{s['sweep_peak_rss_mb']:.0f} MB" if res["sweeps"] else "n/a (no sweep)"), "", None),
        ("5. FLOPs per step, matmul rate", f"{res['flops_per_step'] / 1e9:.2f} GFLOP, "
                                           f"{m['matmul_flops'] / 1e9:.1f} GFLOP/s", "", None),
        ("5. utilisation", f"{m['utilisation']:.1%}", "", None),
    ]
    if res["sweeps"]:
        rows.append(("6. sweep sequential / parallel", f"{s['ratio']:.2f}x ({s['sequential_s']:.0f} s / "
                                                       f"{s['parallel_s']:.0f} s)", ">= 1.6x", s["ratio"] >= 1.6))
    elif res["sweep_error"]:
        rows.append(("6. sweep sequential / parallel", "failed (sweep_error in the JSON)", ">= 1.6x", False))
    rows.append(("6. its ceiling (2 x 1-thread / 2-thread)", f"{m['sweep_ceiling']:.2f}x "
                 f"({m['steps_per_s_batch8_1thread']:.2f} / {m['steps_per_s_batch8']:.2f} steps/s)", "", None))
    return rows, m, s


WORKING_BUDGET = BUDGETS["working"]  # the studies' default budget: the fixed recipe's policies work at it


class GpuLoad:
    """nvidia-smi's utilisation and memory of GPU 0, sampled every 250 ms in the background, read by time window
    (nothing where nvidia-smi is missing)."""

    def __init__(self):
        self.samples = []
        try:
            self.proc = subprocess.Popen(["nvidia-smi", "-i", "0", "--query-gpu=utilization.gpu,memory.used",
                                          "--format=csv,noheader,nounits", "-lms", "250"],
                                         stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
        except OSError:
            self.proc = None
            return
        threading.Thread(target=self.read, daemon=True).start()

    def read(self):
        for line in self.proc.stdout:
            try:
                util, mem = (float(x) for x in line.split(",")[:2])
            except ValueError:
                continue
            self.samples.append((time.time(), util, mem))

    def window(self, start, end):
        inside = [(u, m) for t, u, m in self.samples if start <= t <= end]
        return {"gpu_util_mean": statistics.mean(u for u, _ in inside),
                "gpu_mem_used_max_mb": max(m for _, m in inside)} if inside else {}

    def close(self):
        if self.proc:
            self.proc.kill()


def step_ms(device, bf16, batch_size=8, steps=30, warmup=5):
    """Milliseconds per training step of model=tiny (fixed recipe, clipping off) at `batch_size` on `device`."""
    cfg = compose("recipe=fixed", "clipping=none")
    data = datasets(cfg)[0]
    raw = Raw(cfg, device)
    gen = torch.Generator().manual_seed(0)
    batches = list(itertools.islice(loader(cfg, data, batch_size), steps + warmup))
    if torch.device(device).type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    for i, batch in enumerate(batches):
        if i == warmup:
            synchronize(device)
            tick = time.perf_counter()
        with torch.autocast(torch.device(device).type, dtype=torch.bfloat16, enabled=bf16):
            loss, _ = noise_prediction(raw.policy, raw.scheduler, batch, raw.tokenizer, gen)
        raw.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        raw.optimizer.step()
    synchronize(device)
    return {"ms_per_step": 1000 * (time.perf_counter() - tick) / steps, "peak_gpu_mb": gpu_peak_mb(device)}


def summaries(folder):
    return list(run_summaries(folder).values())


def jobs_at_once(folder, k, runs, extra, load, timeout):
    """Runs per minute of `runs` working-budget runs (half each optimiser: the factorial's mix of step counts) with
    the joblib launcher at k jobs side by side on the one GPU; its wall time includes the workers' start."""
    cmd = [*CLI, "-m", "optim=original,fixed", f"seed=range(0,{max(1, runs // 2)})", *WORKING_BUDGET, "logger=none",
           "progress=false", f"hydra.sweep.dir={folder}", "hydra/launcher=joblib", f"hydra.launcher.n_jobs={k}",
           *extra]
    start = time.time()
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    end = time.time()
    runs_done = [s for s in summaries(folder) if s["status"] == "completed"]
    if done.returncode or not runs_done:
        raise RuntimeError(f"k={k}: exit {done.returncode}, {len(runs_done)} runs completed:\n{done.stderr[-2000:]}")
    return {"k": k, "runs": len(runs_done), "wall_s": end - start, "runs_per_min": 60 * len(runs_done) / (end - start),
            "run_wall_s_median": statistics.median(s["wall_time_s"] for s in runs_done),
            "peak_gpu_mb_max": max((s.get("peak_gpu_mb") or 0) for s in runs_done),
            "device": runs_done[0]["device"], "threads": runs_done[0]["threads"], **load.window(start, end)}


def gpu_figures(args, tmp):
    """The GPU figures, most wanted first; each stage runs only while the deadline leaves it room, and the JSON is
    rewritten after each, so a run cut short keeps what it measured."""
    deadline = time.time() + args.deadline_s
    device = "cuda" if torch.cuda.is_available() else "cpu"
    extra = args.gpu_overrides.split()
    res = {"device": torch.cuda.get_device_name(0) if device == "cuda" else "cpu", "torch": torch.__version__,
           "cpus": os.cpu_count(), "overrides": extra, "working_budget": WORKING_BUDGET, "stages": {}}
    load = GpuLoad()

    def stage(name, need_s, fn):
        left = deadline - time.time()
        if left < need_s:
            res["stages"][name] = f"skipped: {left:.0f} s left, needs about {need_s}"
        else:
            tick = time.time()
            try:
                res["stages"][name] = {**fn(left), "stage_s": time.time() - tick}
            except (RuntimeError, subprocess.TimeoutExpired, torch.OutOfMemoryError) as e:
                res["stages"][name] = f"failed: {type(e).__name__}: {e}"
        save(args.out, res)
        print(f"{name}: {res['stages'][name]}", flush=True)

    stage("machine", 5, lambda _: {"matmul_fp32_tflops": gpu_matmul(device, torch.float32),
                                   "matmul_bf16_tflops": gpu_matmul(device, torch.bfloat16),
                                   "gpu_memory_gb": torch.cuda.get_device_properties(0).total_memory / 1e9
                                   if device == "cuda" else None})
    stage("tiny_step_fp32", 20, lambda _: step_ms(device, False))
    stage("tiny_step_bf16", 20, lambda _: step_ms(device, device == "cuda"))
    rates = []
    for k in args.gpu_k:
        def measure_k(left, k=k):
            rates.append(jobs_at_once(tmp / f"k{k}", k, max(2, k), extra, load, left))
            return rates[-1]
        stage(f"jobs_per_gpu_{k}", 60, measure_k)
    best = max(rates, key=lambda r: r["runs_per_min"])["k"] if rates else max(args.gpu_k)

    def factorial(left):
        out = tmp / "factorial"
        cmd = [sys.executable, "-m", "vla_exp.attribution.studies", "factorial", "--jobs", str(best), "--out",
               str(out), "--seeds", args.gpu_seeds, "--budget", "working", "logger=none", *extra]
        start = time.time()
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=max(60, left - 180))  # room for the rest
        end = time.time()
        runs = summaries(out)
        shutil.copytree(out / "report", Path(args.out).parent / "factorial_report", dirs_exist_ok=True)
        return {"k": best, "exit": done.returncode, "runs": len(runs), "wall_s": end - start,
                "completed": sum(s["status"] == "completed" for s in runs), **load.window(start, end),
                "peak_gpu_mb_max": max((s.get("peak_gpu_mb") or 0) for s in runs) if runs else None,
                "stdout_tail": done.stdout[-1500:]}
    stage("factorial", 120, factorial)

    def headline(left):  # both precisions side by side: the table's figures, not its times, are what is compared
        procs = {p: subprocess.Popen([sys.executable, str(Path(__file__).parent / "reproduce_table.py"), "--out",
                                      str(tmp / f"table_{p}"), f"precision={p}", "logger=none",
                                      f"threads={max(1, os.cpu_count() // 2)}", *extra],
                                     stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
                 for p in ("auto", "fp32")}
        out = {}
        for p, proc in procs.items():
            try:
                text, _ = proc.communicate(timeout=max(1, deadline - time.time()))
            except subprocess.TimeoutExpired:
                proc.kill()
                text = "timed out"
            out[p] = {"exit": proc.returncode, "stdout_tail": text[-3000:]}
            table_md = tmp / f"table_{p}" / "table.md"
            if table_md.exists():
                shutil.copy(table_md, Path(args.out).parent / f"table_{p}.md")
        return out
    stage("headline_table", 60, headline)
    stage("llava_400m_lora_bf16", 45, lambda _: llava_400m(tmp, 3, device, device == "cuda"))
    stage("llava_400m_lora_fp32", 45, lambda _: llava_400m(tmp, 3, device, False))
    load.close()
    return res


def gpu_matmul(device, dtype, n=4096, reps=20):
    a, b = torch.randn(n, n, device=device, dtype=dtype), torch.randn(n, n, device=device, dtype=dtype)
    for _ in range(3):
        torch.mm(a, b)
    synchronize(device)
    tick = time.perf_counter()
    for _ in range(reps):
        torch.mm(a, b)
    synchronize(device)
    return 2 * n ** 3 * reps / (time.perf_counter() - tick) / 1e12


def in_scratch(measure):
    """measure(folder) in a scratch folder that is removed after."""
    with tempfile.TemporaryDirectory(prefix="vla_benchmark_", ignore_cleanup_errors=True) as tmp:
        return measure(Path(tmp))


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="results/benchmark/benchmark.json", help="the JSON file to write")
    p.add_argument("--repeats", type=int, default=3, help="repeats of figures 1-5 (medians are reported)")
    p.add_argument("--sweep-repeats", type=int, default=1, help="repeats of the sweep pair (minutes each)")
    p.add_argument("--skip-sweep", action="store_true", help="leave out figure 6")
    p.add_argument("--profile", action="store_true", help="also profile one training step (top ops, parts)")
    p.add_argument("--llava-400m", action="store_true", help="only one LoRA step of model=llava_pythia_400m")
    p.add_argument("--lerobot", action="store_true", help="only the LeRobot reader's figures")
    p.add_argument("--options", action="store_true", help="only: a step under each speed option, and where a run's "
                   "wall time goes at the default budget (minutes)")
    p.add_argument("--compile", action="store_true", help="with --options: torch.compile too (minutes more)")
    g = p.add_argument_group("--gpu")
    g.add_argument("--gpu", action="store_true", help="only the GPU figures, written beside --out as gpu.json")
    g.add_argument("--gpu-k", type=lambda t: [int(k) for k in t.split(",")], default=[1, 4, 8, 16],
                   help="jobs side by side on the GPU to measure runs per minute at (default 1,4,8,16)")
    g.add_argument("--gpu-seeds", default="0,1,2", help="the factorial's seeds (default 0,1,2)")
    g.add_argument("--gpu-overrides", default="", help="Hydra overrides for every run (to shrink a trial run)")
    g.add_argument("--deadline-s", type=float, default=3600, help="stop starting stages after this many seconds")
    args = p.parse_args()
    if args.gpu:
        args.out = args.out.replace("benchmark.json", "gpu.json")
        res = in_scratch(lambda tmp: gpu_figures(args, tmp))
        print(json.dumps(res, indent=1))
        return
    if args.lerobot:
        r = in_scratch(lerobot_io)
        print(f"LeRobot v3.0 copy of data=tint ({r['frames']} frames, AV1 64x64): first decode "
              f"{r['first_decode_frames_per_s']:.0f} frames/s ({r['first_decode_s']:.1f} s), cached reads "
              f"{r['cached_frames_per_s']:.0f} frames/s ({r['cached_s']:.2f} s); loader / model samples/s "
              f"{r['loader_over_raw']:.1f}x ({r['loader_samples_per_s']:.0f} / {r['raw_samples_per_s']:.1f}, "
              f"target >= 5x); decoded frames against the originals: mean |diff| {r['pixel_mean_abs_diff']:.2f}, "
              f"max {r['pixel_max_abs_diff']} of 255, PSNR {r['psnr_db']:.1f} dB; {r['threads']} threads, matmul "
              f"{r['matmul_flops'] / 1e9:.0f} GFLOP/s")
        save(args.out.replace("benchmark.json", "lerobot.json"), r)
        return
    if args.options:
        cfg = make_cfg()
        data = datasets(compose())[0]  # the default data: the runs below train on it
        r = {"matmul_flops": matmul_flops(), "threads": torch.get_num_threads(),
             "step": step_options(cfg, data, compiled=args.compile)}
        r["runs"] = in_scratch(run_breakdown)
        today = r["step"]["fp32 (today) ms"]
        print(f"One training step, batch 8, {r['threads']} threads, matmul {r['matmul_flops'] / 1e9:.0f} GFLOP/s "
              f"(medians of 3 interleaved rounds of the same batches):")
        for k, v in r["step"].items():
            print(f"  {k:<28} {v:8.1f}" + (f"   {today / v:.2f}x today's speed" if k.endswith(" ms") else ""))
        print("Where a run's wall time goes at the recipes' default budget (4 epochs of 180 training episodes):")
        for recipe, t in r["runs"].items():
            parts = ", ".join(f"{k} {v:.1f} s ({v / t['wall_time_s']:.1%})" for k, v in t["time_s"].items())
            print(f"  {recipe}: {t['wall_time_s']:.0f} s, {t['updates']} updates: {parts}")
        save(args.out.replace("benchmark.json", "options.json"), r)
        return
    if args.llava_400m:
        r = in_scratch(llava_400m)
        print(f"model=llava_pythia_400m, train=lora, batch 2: {r['s_per_step']:.2f} s a step (median of 3 after one "
              f"of {r['first_step_s']:.2f} s), peak RSS {r['peak_rss_mb']:.0f} MB, {r['params'] / 1e6:.0f}M "
              f"parameters ({r['trainable'] / 1e6:.1f}M trained), {r['threads']} threads, matmul "
              f"{r['matmul_flops'] / 1e9:.0f} GFLOP/s; the random-weight folder took {r['folder_written_s']:.0f} s")
        return
    res = in_scratch(lambda tmp: measure(args, tmp))
    rows, m, s = table(res)
    width = max(len(r[0]) for r in rows), max(len(r[1]) for r in rows)
    print(f"\n{'figure':<{width[0]}}  {'measured (median of ' + str(args.repeats) + ')':<{width[1]}}  target  holds")
    for name, value, target, holds in rows:
        print(f"{name:<{width[0]}}  {value:<{width[1]}}  {target or '-':<6}  "
              f"{'-' if holds is None else 'yes' if holds else 'NO'}")
    if "profile" in res:
        parts = res["profile"]["step_parts_ms"]
        print("\nOne step at batch 8, median ms: " + ", ".join(f"{k} {v:.2f}" for k, v in parts.items()))
        print("Top ops by self CPU time (forward, backward, gradient norm, step):")
        for e in res["profile"]["top_ops"]:
            print(f"  {e['op']:<40} {e['share']:6.1%}  {e['ms_per_step']:.2f} ms/step")
    print("\nHow each figure is measured:\n" + "\n".join(f"- {k}: {v}" for k, v in HOW.items()))
    save(args.out, {**res, "median": m, "sweep_median": s,
                    "table": [dict(zip(("figure", "measured", "target", "holds"), r)) for r in rows]})
    print(f"\nWritten to {args.out}")


if __name__ == "__main__":
    main()
