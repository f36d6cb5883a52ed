"""Config composition: every group option and preset, and the precedence rule (command line beats preset)."""
import os
import subprocess
import sys
from pathlib import Path

import pytest

from vla_exp.config import CONF_DIR, GROUPS

ROOT = Path(__file__).resolve().parent.parent

ORIGINAL = {"init": "none", "loss_handling": "scale_down", "optim": "original", "clipping": "none"}
FIXED = {"init": "xavier", "loss_handling": "skip_nonfinite", "optim": "fixed", "clipping": "grad_norm"}


def options(group):
    return sorted(p.stem for p in (CONF_DIR / group).glob("*.yaml"))


@pytest.mark.parametrize("group", GROUPS)
def test_every_option_composes_and_names_itself(make_cfg, group):
    assert len(options(group)) >= 2
    for option in options(group):
        cfg = make_cfg(f"{group}={option}")
        assert cfg[group].name == option
        if group != "optim":
            assert cfg[group]._target_.startswith("vla_exp.fixes.")


def test_defaults_are_the_original_script(make_cfg):
    cfg = make_cfg()
    assert {g: cfg[g].name for g in GROUPS} == ORIGINAL
    assert cfg.recipe is None and cfg.logger.kind == "wandb" and cfg.logger.mode == "offline"


@pytest.mark.parametrize("recipe,expected", [("original", ORIGINAL), ("fixed", FIXED)])
def test_presets_select_the_four_groups(make_cfg, recipe, expected):
    cfg = make_cfg(f"recipe={recipe}")
    assert {g: cfg[g].name for g in GROUPS} == expected
    assert cfg.recipe == recipe


@pytest.mark.parametrize("group", GROUPS)
def test_leave_one_out_and_add_one_presets_change_one_group(make_cfg, group):
    without, with_ = make_cfg(f"recipe=fixed_without_{group}"), make_cfg(f"recipe=original_with_{group}")
    assert {g: without[g].name for g in GROUPS} == {**FIXED, group: ORIGINAL[group]}
    assert {g: with_[g].name for g in GROUPS} == {**ORIGINAL, group: FIXED[group]}
    assert (without.recipe, with_.recipe) == (f"fixed_without_{group}", f"original_with_{group}")


@pytest.mark.parametrize("order", [("recipe=fixed", "init=none"), ("init=none", "recipe=fixed")])
def test_command_line_beats_preset_in_either_order(make_cfg, order):
    cfg = make_cfg(*order)
    assert {g: cfg[g].name for g in GROUPS} == {**FIXED, "init": "none"}


def test_recipes_hold_the_reported_values(make_cfg):
    original, fixed = make_cfg("recipe=original"), make_cfg("recipe=fixed")
    assert (original.optim.lr, original.optim.batch_size) == (1e-3, 16)
    assert (fixed.optim.lr, fixed.optim.batch_size, fixed.optim.schedule.eta_min_ratio) == (1e-4, 8, 0.1)
    assert original.loss_handling.threshold == 1000 and original.loss_handling.factor == 0.1
    assert fixed.clipping.max_norm == 1.0
    assert (fixed.init.gain, fixed.init.a) == (0.5, 0.1)
    # everything outside the four groups is shared by the recipes
    strip = lambda c: {k: v for k, v in c.items() if k not in (*GROUPS, "recipe")}
    assert strip(original) == strip(fixed)


def test_the_reported_script_preset_holds_every_difference_it_can(make_cfg):
    cfg = make_cfg("recipe=reported_script")
    assert {g: cfg[g].name for g in GROUPS} == {"init": "xavier_more", "loss_handling": "skip_nonfinite",
                                                "optim": "fixed", "clipping": "grad_norm"}
    assert list(cfg.adamw.betas) == [0.9, 0.95] and cfg.data.action_norm == "meanstd"
    assert cfg.early_stop.patience == 10 and cfg.epochs == make_cfg("recipe=original").epochs  # equal budgets
    original = make_cfg("recipe=original")
    assert original.early_stop.patience is None and original.data.action_norm == "minmax"


def test_smoke_shrinks_any_run(make_cfg):
    cfg = make_cfg("recipe=fixed", "debug=smoke")
    assert cfg.epochs == 1 and cfg.data.episodes <= 10 and cfg.optim.name == "fixed"


@pytest.mark.parametrize("model", options("model"))
def test_model_options(make_cfg, model):
    cfg = make_cfg(f"model={model}")
    assert cfg.model.name == model and cfg.model.head_loading == "current"


def test_the_report_path_imports_neither_torch_nor_transformers():
    """Reading runs, analysing and composing configs never load the training stack."""
    code = ("import sys, vla_exp.attribution.report, vla_exp.attribution.analysis, vla_exp.attribution.dashboard, vla_exp.config, vla_exp.schema; "
            "print(sorted(m for m in ('torch', 'transformers') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_a_study_places_its_runs_on_the_gpus_or_side_by_side_on_the_cpus(monkeypatch):
    from vla_exp import UsageError
    from vla_exp.attribution.studies import job_launcher
    monkeypatch.setattr(os, "cpu_count", lambda: 16)
    assert job_launcher(None, None) == ["hydra/launcher=joblib", "hydra.launcher.n_jobs=2"]
    assert job_launcher(1, None) == []
    # K jobs a GPU: each asks Ray for 1/K of one (rounded down to Ray's 1e-4, so that K fit) and its share of cores
    assert job_launcher(None, 3, gpus=2) == ["hydra/launcher=ray_gpus", "hydra.launcher.ray.remote.num_gpus=0.3333",
                                             "hydra.launcher.ray.remote.num_cpus=2.667"]
    assert job_launcher(None, 1, gpus=4)[1:] == ["hydra.launcher.ray.remote.num_gpus=1.0",
                                                 "hydra.launcher.ray.remote.num_cpus=4"]
    for args, says in [((2, 4, 1), "give --jobs (runs side by side on the CPUs) or --jobs-per-gpu (on each GPU), not "
                                   "both"),
                       ((0, None), "--jobs must be 1 or more, got 0"),
                       ((None, 0, 1), "--jobs-per-gpu must be 1 or more, got 0"),
                       ((None, 2, 0), "--jobs-per-gpu: this machine has no GPU that torch can use; --jobs N runs N "
                                      "jobs side by side on the CPUs instead"),
                       ((None, None, None, "auto"), "--ray-address places --jobs-per-gpu K jobs on a Ray cluster's "
                                                    "GPUs: give --jobs-per-gpu too"),
                       ((None, 2, None, "127.0.0.1:1"), "--ray-address 127.0.0.1:1: nothing answers there "
                                                        "(Connection refused)"),
                       ((None, 2, None, "headnode"), "--ray-address headnode: give the head's host:port, or auto for "
                                                     "the cluster `ray start --head` started on this machine")]:
        with pytest.raises(UsageError) as e:
            job_launcher(*args)
        assert str(e.value) == says


def test_a_study_dry_run_prints_every_run_and_launches_nothing(tmp_path, capsys):
    from vla_exp.attribution import studies as study
    assert study.main(["factorial", "--dry-run", "--seeds", "0,1", "--out", str(tmp_path / "s"), "epochs=2"]) == 0
    *runs, count, last = capsys.readouterr().out.strip().splitlines()
    assert (count, last) == (f"32 runs into {tmp_path / 's'}", "nothing launched") and len(set(runs)) == 32
    assert runs[0] == "init=none loss_handling=scale_down optim=original clipping=none seed=0 epochs=2 " \
                      "eval.epoch_samples=64"  # the working budget; what the user gave beats it
    assert {r.split()[4] for r in runs} == {"seed=0", "seed=1"} and not (tmp_path / "s").exists()
    # --budget quick: the cheaper budget by name; a budget that does not exist is one line naming those that do
    assert study.main(["leave_one_out", "--dry-run", "--seeds", "0", "--budget", "quick", "epochs=2"]) == 0
    assert capsys.readouterr().out.splitlines()[0] == "recipe=fixed seed=0 epochs=2 data.episodes=100 " \
                                                      "eval.epoch_samples=64"
    with pytest.raises(SystemExit):
        study.main(["factorial", "--dry-run", "--budget", "cheap"])
    assert "argument --budget: invalid choice: 'cheap' (choose from 'working', 'quick')" in capsys.readouterr().err
    # metaworld: both recipes, then the fixed recipe at half the epochs (the original's updates) into a second folder
    assert study.main(["metaworld", "--dry-run", "--seeds", "0", "--out", str(tmp_path / "m"), "epochs=8"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[2:] == [f"2 runs into {tmp_path / 'm'}", "seed=0 data=metaworld epochs=4 eval.rollouts=20 "
                         "eval.rollout_every=4 recipe=fixed", f"1 runs into {tmp_path / 'm'}_equal_updates",
                         "nothing launched"]
    assert [r.split()[:3] for r in lines[:2]] == [["recipe=original", "seed=0", "data=metaworld"],
                                                  ["recipe=fixed", "seed=0", "data=metaworld"]]
    assert "epochs=8" in lines[0] and not (tmp_path / "m").exists()
    with pytest.raises(SystemExit, match="epochs=7: the fixed recipe cannot make the original's updates in whole"):
        study.main(["metaworld", "--dry-run", "epochs=7"])
