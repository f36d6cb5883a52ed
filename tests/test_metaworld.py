"""MetaWorld for real: expert demonstrations written as training episodes, and closed-loop rollouts of a policy in
the simulator (vla_exp/data/metaworld.py, vla_exp/evaluation/closed_loop.py)."""
import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf

from vla_exp import UsageError
from vla_exp.data import metaworld as mw
from vla_exp.data.sources import datasets
from vla_exp.data.chunks import load_split
from vla_exp.data.episodes import read_episode
from vla_exp.data.sources import episodes_dir
from vla_exp.evaluation.closed_loop import build_policy, closed_loop, evaluate_run, load_run, run
from vla_exp.data.sources import validate

pytestmark = pytest.mark.skipif(importlib.util.find_spec("metaworld") is None,
                                reason='MetaWorld is an optional extra: pip install -e ".[metaworld]"')
ROOT = Path(__file__).resolve().parent.parent
TASKS = ["reach-v3", "push-v3", "button-press-topdown-v3"]
SMALL = ("data=metaworld", "data.episodes=2", "data.steps=60", "data.tasks=[reach-v3,push-v3]")


def no_time(result):
    return {k: v for k, v in result.items() if k != "wall_time_s"}


@pytest.fixture(autouse=True)
def one_thread():
    torch.set_num_threads(1)


# ---------------------------------------------------------------------------------------------------------------
# demonstrations


@pytest.mark.slow
def test_generated_episodes_are_valid_reproducible_and_held_out_from_evaluation(make_cfg, tmp_path):
    cfg = make_cfg(*SMALL)
    validate(cfg)
    data_dir = Path(episodes_dir(cfg))
    m = cfg.model.config
    train_set, val_set = load_split(data_dir, "corner4", 0.5, 0, m.horizon, 64, 4, 10)  # the training loop's checks
    files = sorted(data_dir.glob("*.hdf5"))
    assert [f.name for f in files] == ["push-v3_00000.hdf5", "push-v3_00001.hdf5", "reach-v3_00000.hdf5",
                                       "reach-v3_00001.hdf5"]
    ended = {"reach-v3": 0, "push-v3": 0}
    for f in files:
        ep = read_episode(f, "corner4")
        task = f.name.split("_")[0]
        assert ep["instruction"] == {"reach-v3": "reach the goal", "push-v3": "push the puck to the goal"}[task]
        assert ep["images"].shape[1:] == (64, 64, 3) and ep["qpos"].shape[1] == 10 and ep["action"].shape[1] == 4
        assert 1 < len(ep["action"]) <= 60 and np.abs(ep["action"]).max() <= 1
        ended[task] += len(ep["action"]) < 60  # an episode ends early only at the expert's success
        goal = ep["qpos"][:, 7:]
        assert np.abs(goal).sum() > 0 and (goal == goal[0]).all()  # the goal is in the state, fixed per episode
        # upright: the black background above the table is at the top, the table (bright) below
        assert ep["images"][0, :8].mean() < ep["images"][0, -8:].mean()
    assert json.loads((data_dir / "generation.json").read_text())["expert_successes"] == ended
    assert ended["reach-v3"] == 2  # the expert reaches in about 45 steps

    # same config, another cache: the same bytes; another generator seed: other starts
    again = episodes_dir(make_cfg(*SMALL, f"paths.cache_dir={tmp_path}"))
    assert again != data_dir
    for f in files:
        a, b = read_episode(f, "corner4"), read_episode(again / f.name, "corner4")
        assert all(np.array_equal(a[k], b[k]) for k in ("images", "qpos", "action"))
    other = make_cfg(*SMALL, f"paths.cache_dir={tmp_path}", "data.generator_seed=1", "data.episodes=1",
                     "data.tasks=[reach-v3]")
    (f,) = episodes_dir(other).glob("*.hdf5")
    assert not np.array_equal(read_episode(f, "corner4")["qpos"][0], read_episode(files[2], "corner4")["qpos"][0])

    # the evaluation's episode i starts elsewhere than the training data's episode i
    env = mw.make_env("reach-v3", 60)
    try:
        first = mw.state(mw.reset(env, mw.DATA, 0, "reach-v3", 0))
        assert np.array_equal(first, read_episode(files[2], "corner4")["qpos"][0])
        assert not np.allclose(first, mw.state(mw.reset(env, mw.EVALUATION, 0, "reach-v3", 0)))
    finally:
        env.close()


def test_bad_task_names_and_camera_are_named_with_what_is_allowed(make_cfg):
    for tasks in ("[rech-v3]", "[reach-v3,reach-v3]", "[]"):
        with pytest.raises(UsageError, match=r"^data\.tasks=\[.*\]: must be a non-empty list of distinct MetaWorld "
                                             r"tasks from: assembly-v3, .*reach-v3"):
            validate(make_cfg("data=metaworld", f"data.tasks={tasks}"))
    with pytest.raises(UsageError, match=r"^data\.camera='top': must be one of corner, corner2"):
        validate(make_cfg("data=metaworld", "data.camera=top"))


# ---------------------------------------------------------------------------------------------------------------
# the harness with reference policies


@pytest.mark.slow
def test_expert_succeeds_random_fails_and_results_repeat_for_a_seed(make_cfg):
    cfg = make_cfg("data=metaworld")
    expert = run(mw.Expert(), "expert", cfg, 4, 0, tasks=TASKS)
    assert all(r["success_rate"] == 1 and r["mean_length"] < cfg.data.steps for r in expert["tasks"].values())
    assert expert["success_rate"] == 1 and expert["ci_low"] > 0.7  # Wilson, 12 of 12
    random = run(mw.RandomPolicy(0), "random", cfg, 4, 0, tasks=TASKS)
    assert random["success_rate"] == 0 and random["ci_high"] < 0.3
    assert all(r["mean_length"] == cfg.data.steps for r in random["tasks"].values())
    assert no_time(run(mw.RandomPolicy(0), "random", cfg, 4, 0, tasks=TASKS)) == no_time(random)
    other = run(mw.RandomPolicy(1), "random", cfg, 4, 1, tasks=TASKS)
    assert other["tasks"]["reach-v3"]["mean_return"] != random["tasks"]["reach-v3"]["mean_return"]


# ---------------------------------------------------------------------------------------------------------------
# a trained run, through the command lines


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory, cache_dir):
    """A sweep of one job, so its W&B group is the sweep's."""
    sweep_dir = tmp_path_factory.mktemp("metaworld") / "sweep"
    subprocess.run([sys.executable, "-m", "vla_exp.training.main", "-m", *SMALL, "recipe=fixed", "epochs=1", "threads=1",
                    "logger.mode=offline", "progress=false", "eval.samples=8", f"hydra.sweep.dir={sweep_dir}"],
                   cwd=ROOT, check=True, capture_output=True)
    (run_dir,) = sweep_dir.glob("0_*")
    return run_dir


def evaluate_cli(*args):
    return subprocess.run([sys.executable, "-m", "vla_exp.evaluation.closed_loop", *map(str, args)], cwd=ROOT, capture_output=True,
                          text=True)


@pytest.mark.slow
def test_evaluate_writes_closed_loop_into_the_run_and_repeats_in_process(trained_run, wandb_records):
    before = json.loads((trained_run / "summary.json").read_text())
    out = evaluate_cli(trained_run, "--episodes", 2, "--seed", 3, "--threads", 1)
    assert out.returncode == 0, out.stderr
    summary = json.loads((trained_run / "summary.json").read_text())
    assert {k: v for k, v in summary.items() if k != "closed_loop"} == before  # the training's keys kept
    result = summary["closed_loop"]
    assert {k: result[k] for k in ("policy", "episodes_per_task", "seed", "execute")} == \
        {"policy": "trained", "episodes_per_task": 2, "seed": 3, "execute": 8}
    assert list(result["tasks"]) == ["reach-v3", "push-v3"]
    for r in [result, *result["tasks"].values()]:
        assert r["ci_low"] <= r["success_rate"] <= r["ci_high"] and 0 < r["mean_length"] <= 60
    assert (trained_run / "closed_loop.png").stat().st_size and (trained_run / "closed_loop.gif").stat().st_size
    assert "overall" in out.stdout

    # the library call the training loop makes gives the same figures for the same seed
    cfg = load_run(trained_run)
    trained = build_policy("trained", trained_run, cfg, 3)
    assert no_time(closed_loop(trained.policy, trained.tokenizer, trained.norm, cfg, 2, 3)) == no_time(result)

    # a reference policy goes beside it, under its own key
    mean = evaluate_run(trained_run, episodes=2, seed=3, tasks=["reach-v3"], policy="mean_chunk")
    summary = json.loads((trained_run / "summary.json").read_text())
    assert summary["closed_loop"] == result and no_time(summary["closed_loop_mean_chunk"]) == no_time(mean)
    train_set, _ = datasets(cfg)
    chunk = build_policy("mean_chunk", trained_run, cfg, 3).chunk
    assert np.allclose(trained.norm.actions(chunk), train_set.mean_chunk(), atol=1e-5)

    # and W&B got the evaluation as a run of its own, in the training's group: the sweep's
    offline = sorted((trained_run / "wandb").glob("offline-run-*"))
    assert len(offline) == 3  # training, then the two evaluations
    records = [wandb_records(path) for path in offline[:2]]
    train_run, (config,) = ([r["run"] for r in recs if r.get("type") == "run"] for recs in records)
    assert config["job_type"] == "evaluate" and train_run[0]["job_type"] == "train"
    assert config["run_group"] == train_run[0]["run_group"] == str(trained_run.parent)
    records = records[1]
    summary = {k: v for r in records if r.get("type") == "summary" for k, v in r["summary"]["update"].items()}
    assert summary["closed_loop/success_rate"] == result["success_rate"]
    assert summary["closed_loop/reach-v3/mean_length"] == result["tasks"]["reach-v3"]["mean_length"]


@pytest.mark.slow
def test_bad_input_is_one_line(trained_run, make_cfg, tmp_path):
    out = evaluate_cli(tmp_path / "nowhere")
    assert out.returncode == 1 and out.stderr.splitlines() == [f"error: {tmp_path / 'nowhere'}: no such run folder"]
    tint = tmp_path / "tint"
    (tint / ".hydra").mkdir(parents=True)
    OmegaConf.save(make_cfg(), tint / ".hydra" / "config.yaml")
    with pytest.raises(UsageError, match="trained on data.task=tint, not on MetaWorld"):
        evaluate_run(tint)
    unfinished = tmp_path / "unfinished"
    (unfinished / ".hydra").mkdir(parents=True)
    for name in (".hydra/config.yaml", "normalization.json"):
        (unfinished / name).write_bytes((trained_run / name).read_bytes())
    with pytest.raises(UsageError, match="no policy.pt there"):
        evaluate_run(unfinished)
    with pytest.raises(UsageError, match="--tasks door-v3: not MetaWorld tasks"):
        evaluate_run(trained_run, tasks=["door-v3"])


@pytest.mark.slow
def test_training_rolls_out_during_training_and_the_report_shows_success(make_cfg, tmp_path):
    from vla_exp.attribution.report import report
    from vla_exp.training.loop import train
    run_dir = tmp_path / "runs" / "run"
    summary = train(make_cfg(*SMALL, "recipe=fixed", "epochs=3", "eval.rollouts=1", "eval.rollout_every=2",
                             "logger=none", "progress=false", "eval.samples=8", "threads=1"), run_dir)
    epochs = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    epochs = [r for r in epochs if r["kind"] == "epoch"]
    # rolled out after epoch 2 (every 2) and after the last, epoch 3
    assert ["success_rate" in r for r in epochs] == [False, True, True]
    final = summary["closed_loop"]
    assert final["episodes_per_task"] == 1 and list(final["tasks"]) == ["reach-v3", "push-v3"]
    assert epochs[-1]["success_rate"] == final["success_rate"]
    assert epochs[-1]["success_reach-v3"] == final["tasks"]["reach-v3"]["success_rate"]
    assert json.loads((run_dir / "summary.json").read_text())["closed_loop"] == final
    assert (run_dir / "closed_loop.png").is_file()  # the strip of the last evaluation

    report([tmp_path / "runs"], out=tmp_path / "report")
    runs = (tmp_path / "report" / "runs.csv").read_text().splitlines()
    header = runs[0].split(",")
    assert "success_rate" in header and "success_reach-v3" in header
    assert float(runs[1].split(",")[header.index("success_rate")]) == final["success_rate"]
    assert (tmp_path / "report" / "success_rate.png").is_file()
    assert "closed-loop success" in (tmp_path / "report" / "table.md").read_text()


@pytest.mark.slow
def test_metaworld_study_reports_recipes_and_references_side_by_side(tmp_path):
    out = tmp_path / "study"
    run = subprocess.run([sys.executable, "-m", "vla_exp.attribution.studies", "metaworld", "--seeds", "0", "--jobs", "1",
                          "--out", str(out), *SMALL, "data.tasks=[reach-v3]", "epochs=2", "eval.rollouts=2",
                          "eval.samples=8", "logger=none"], cwd=ROOT, capture_output=True, text=True)
    assert run.returncode == 0, run.stderr[-3000:]
    summaries = [json.loads(p.read_text()) for p in sorted(out.glob("*/summary.json"))]
    assert sorted(s["choices"]["recipe"] for s in summaries) == ["fixed", "original"]
    # the fixed recipe again at half the epochs: batch 8 against 16, so the original's number of updates
    equal = [json.loads(p.read_text()) for p in sorted(Path(f"{out}_equal_updates").glob("*/summary.json"))]
    assert [(s["choices"]["recipe"], s["epochs"], s["seed"]) for s in equal] == [("fixed", 1, 0)]
    original = [s for s in summaries if s["choices"]["recipe"] == "original"]
    assert abs(equal[0]["updates"] - original[0]["updates"]) <= 2  # the last, partial batch of each epoch aside
    assert all(s["updates"] == 2 * equal[0]["updates"] for s in summaries if s["choices"]["recipe"] == "fixed")
    first = summaries[0]  # the references were rolled out from the first run, as many episodes as the runs had
    assert {k for k in first if k.startswith("closed_loop")} == \
        {"closed_loop", "closed_loop_expert", "closed_loop_mean_chunk", "closed_loop_random"}
    assert all(first[f"closed_loop_{r}"]["episodes_per_task"] == 2 for r in ("expert", "mean_chunk", "random"))
    table = (out / "success.md").read_text()
    rates = {"fixed": [], "original": []}
    for s in summaries:
        rates[s["choices"]["recipe"]].append(s["closed_loop"]["success_rate"])
    for recipe, r in rates.items():
        assert f"| {recipe} | 2 | {round(np.mean(r), 2)} |" in table
    assert "| expert |" in table and "| random | 0.0 |" in table
    diff = np.mean(rates["fixed"]) - np.mean(rates["original"])
    assert f"minus original (2 epochs, {original[0]['updates']} updates), equal epochs: {diff:+.3g}" in table
    diff = np.mean([s["closed_loop"]["success_rate"] for s in equal]) - np.mean(rates["original"])
    assert f"equal updates: {diff:+.3g}" in table
    assert f"| fixed | 1 | {equal[0]['updates']} |" in table
    assert (out / "report" / "success_rate.png").is_file()
