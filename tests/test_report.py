"""The report: the factorial analysis on data with known effects, failed cells, the self-contained dashboard, and the
real CLI on real runs (with W&B offline, read back with W&B's own tool)."""
import base64
import itertools
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from vla_exp import UsageError
from vla_exp.attribution import analysis
from vla_exp.attribution.report import main
from vla_exp.config import CONF_DIR, recipe_levels, reference_levels
from vla_exp.runs import Design, find_run_dirs, load_runs, sweep_group
from vla_exp.training.loop import train

ROOT = Path(__file__).resolve().parent.parent
FIXED = {"init": "xavier", "loss_handling": "skip_nonfinite", "optim": "fixed", "clipping": "grad_norm",
         "recipe": "fixed", "head_loading": "current"}
ORIGINAL = {"init": "none", "loss_handling": "scale_down", "optim": "original", "clipping": "none",
            "recipe": "original", "head_loading": "current"}
BASELINES = {"mean_action": 0.44, "hold_state": 0.11, "ignore_image": 0.14, "ignore_instruction": 0.17}


def factorial_runs(effect, seeds=3, noise=0.02, rng_seed=0, **levels):
    """Every combination of `levels` (group: options) x seeds, the rest at the fixed recipe's levels, with
    val_action_error = 0.5 + effect(cell) + N(0, noise) drawn from a fixed numpy seed."""
    rng, rows = np.random.default_rng(rng_seed), []
    for combo in itertools.product(*levels.values()):
        cell = {**FIXED, **dict(zip(levels, combo))}
        for seed in range(seeds):
            rows.append({**cell, "seed": seed, "status": "completed",
                         "val_action_error": 0.5 + effect(cell) + rng.normal(0, noise)})
    return pd.DataFrame(rows)


def test_recipe_levels_come_from_the_presets(tmp_path):
    levels = reference_levels()
    assert levels["fixed"] == {k: v for k, v in FIXED.items() if k != "recipe"}
    assert levels["original"] == {k: v for k, v in ORIGINAL.items() if k != "recipe"}
    # a preset built on another one: its own overrides win
    (tmp_path / "recipe").mkdir()
    (tmp_path / "recipe" / "base.yaml").write_text("defaults:\n  - override /init: xavier\n  - override /optim: fixed\n")
    (tmp_path / "recipe" / "child.yaml").write_text("defaults:\n  - base\n  - override /init: none\n")
    assert recipe_levels("child", tmp_path) == {"init": "none", "optim": "fixed"}


def test_wandb_group_is_the_sweeps(tmp_path):
    for run in ("0_a", "1_b"):
        (tmp_path / "sweep" / run).mkdir(parents=True)
    runs = sorted((tmp_path / "sweep").iterdir())
    assert sweep_group(runs) == "sweep"  # no multirun.yaml: the folder's name
    (tmp_path / "sweep" / "multirun.yaml").write_text("hydra:\n  sweep:\n    dir: multirun/2026-01-01/12-00-00\n")
    assert sweep_group(runs) == "multirun/2026-01-01/12-00-00"  # what vla-exp-train grouped the runs by
    (tmp_path / "sweep" / "multirun.yaml").write_text("hydra:\n  sweep:\n    dir: multirun/${now:%H}\n")
    assert sweep_group(runs) == "sweep"  # unresolved: it would resolve to today, not to the sweep's day


def test_factorial_recovers_known_effects_and_interaction():
    # init: -0.2; optim and clipping: +0.1 only together (marginal effects +0.05 each); loss_handling: nothing
    effect = lambda c: -0.2 * (c["init"] == "xavier") + 0.1 * (c["optim"] == "fixed") * (c["clipping"] == "grad_norm")
    runs = factorial_runs(effect, init=("none", "xavier"), loss_handling=("scale_down", "skip_nonfinite"),
                          optim=("original", "fixed"), clipping=("none", "grad_norm"))
    res = analysis.factorial(runs, "val_action_error", reference_levels())
    assert res["model"] == "two-way interactions" and res["n"] == 48 and not res["dropped"]
    e = res["effects"].set_index("factor")
    assert list(e.reference) == ["none", "scale_down", "original", "none"]  # level minus the original recipe's
    for factor, truth in [("init", -0.2), ("optim", 0.05), ("clipping", 0.05), ("loss_handling", 0.0)]:
        assert e.lo[factor] <= truth <= e.hi[factor], factor
    assert e.p["init"] < 0.001 and e.p["optim"] < 0.05 and e.p["clipping"] < 0.05
    assert e.p["loss_handling"] > 0.05
    assert res["anova"].p["optim:clipping"] < 0.001 and res["anova"].partial_eta_sq["init"] > 0.14
    verdicts = analysis.verdicts(res)
    assert re.fullmatch(r"init \(xavier vs none\): large effect on val_action_error, -0\.\d+ \[-0\.\d+, -0\.\d+\], "
                        r"p < 0\.001", verdicts[0]), verdicts[0]
    assert "loss_handling (skip_nonfinite vs scale_down): no detectable effect on val_action_error (p = " in verdicts[1]
    line = next(line for line in analysis.interactions(res) if line.startswith("optim × clipping"))
    simple = [float(x) for x in re.findall(r"([+-][\d.]+) when clipping=", line)]  # optim's effect per clipping level
    assert abs(simple[0]) < 0.03 and abs(simple[1] - 0.1) < 0.03, line


def test_factor_with_many_levels_and_one_level_choices():
    effect = lambda c: -0.3 * (c["init"] == "xavier_all")
    runs = factorial_runs(effect, init=("none", "xavier", "xavier_all", "torch_default"),
                          clipping=("none", "grad_norm"))
    runs.loc[0, "val_action_error"] = float("nan")  # a diverged run: dropped and counted
    runs.loc[0, "status"] = "diverged"
    res = analysis.factorial(runs, "val_action_error", reference_levels())
    assert res["factors"] == ["init", "clipping"]  # the other groups hold one level: no factor
    assert res["dropped"] == {"diverged": 1} and res["n"] == 23
    e = res["effects"].set_index("level")
    assert list(e.index) == ["torch_default", "xavier", "xavier_all", "grad_norm"]
    assert e.p["xavier_all"] < 0.001 and abs(e["diff"]["xavier_all"] + 0.3) < 0.05
    assert e.p["xavier"] > 0.05 and e.p["torch_default"] > 0.05 and e.p["grad_norm"] > 0.05


def test_confidence_intervals_cover_the_truth_95_percent_of_the_time():
    effect = lambda c: -0.2 * (c["init"] == "xavier") + 0.1 * (c["clipping"] == "grad_norm")
    covered = []
    for rng_seed in range(60):
        runs = factorial_runs(effect, rng_seed=rng_seed, init=("none", "xavier"), clipping=("none", "grad_norm"))
        e = analysis.factorial(runs, "val_action_error", reference_levels())["effects"].set_index("factor")
        covered += [e.lo["init"] <= -0.2 <= e.hi["init"], e.lo["clipping"] <= 0.1 <= e.hi["clipping"]]
    assert 0.88 <= np.mean(covered) <= 0.995  # 120 intervals: 95% expected, sd about 2%


def test_too_few_runs_say_so_without_crashing():
    runs = factorial_runs(lambda c: 0.0, seeds=1, init=("none", "xavier"))
    res = analysis.factorial(runs, "val_action_error", reference_levels())
    assert "too few" in res["error"] and res["anova"] is None and analysis.verdicts(res) == []
    confounded = factorial_runs(lambda c: 0.0, seeds=3, init=("none", "xavier"))
    confounded["optim"] = confounded.init.map({"none": "original", "xavier": "fixed"})
    res = analysis.factorial(confounded, "val_action_error", reference_levels())
    assert "init and optim together" in res["error"]


# ------------------------------------------------------------------------------------------------ report files
def fake_run(path, choices, seed, status="completed", error=0.05, loss=0.1):
    """A run folder in the format vla-exp-train writes; a failed one holds only its choices, status and error."""
    path.mkdir(parents=True)
    if status == "failed":
        summary = {"choices": choices, "seed": seed, "status": "failed", "error": "RuntimeError: out of memory"}
    else:
        summary = {"choices": choices, "seed": seed, "status": status, "initial_output_std": 0.1, "initial_loss": 1.0,
                   "final_loss": loss, "final_val_loss": loss, "final_output_std": 0.9, "epochs_to_converge": 2,
                   "time_to_converge_s": 10.0, "skipped_batches": 0, "scaled_loss_steps": 0, "steps": 4, "epochs": 2,
                   "val_action_error": error, "baseline_action_errors": BASELINES,
                   "beats_baselines": all(error < b for b in BASELINES.values()), "config_hash": "abc",
                   "overrides": ["seed=1"]}
        rows = [{"kind": "step", "step": s, "epoch": (s - 1) // 2, "loss": loss * (5 - s), "output_std": 0.5 + 0.1 * s,
                 "grad_norm": 1.0, "lr": 1e-4, "skipped_batches": 0, "scaled_loss_steps": 0, "samples_per_s": 50.0}
                for s in range(1, 5)]
        rows += [{"kind": "epoch", "step": 2 * e, "epoch": e, "train_loss": loss, "val_loss": loss,
                  "val_output_std": 0.9, "val_action_error": error * (3 - e)} for e in (1, 2)]
        (path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (path / "summary.json").write_text(json.dumps(summary))


@pytest.fixture(scope="module")
def synthetic_report(tmp_path_factory):
    root = tmp_path_factory.mktemp("sweep")
    for seed in range(2):
        fake_run(root / f"fixed-s{seed}", FIXED, seed, error=0.02 + 0.01 * seed)
        fake_run(root / f"original-s{seed}", ORIGINAL, seed, error=0.2 + 0.01 * seed)
    fake_run(root / "fixed-noinit-s0", {**FIXED, "init": "none"}, 0, status="failed")
    out = root / "report"
    main([str(root), "--out", str(out)])
    return out


def test_failed_cell_is_reported_as_failed(synthetic_report):
    table = pd.read_csv(synthetic_report / "table.csv").set_index("cell")
    assert table.loc["fixed with init=none", ["status", "n_runs", "n_failed"]].tolist() == ["failed", 1, 1]
    assert table.loc["fixed", ["status", "n_runs", "n_beat_baselines", "beats_baselines"]].tolist() == \
        ["completed", 2, 2, "yes"]
    assert table.loc["original", "beats_baselines"] == "no"  # 0.2 is worse than holding still (0.11)
    row = next(l for l in (synthetic_report / "table.md").read_text().splitlines() if "| fixed with init=none |" in l)
    assert "| failed |" in row
    runs = pd.read_csv(synthetic_report / "runs.csv")
    assert len(runs) == 5 and runs.status.value_counts()["failed"] == 1
    loo = (synthetic_report / "analysis.md").read_text()
    assert "| init: xavier → none | fixed with init=none | failed |" in loo
    assert "| optim: fixed → original | fixed with optim=original | not run |" in loo


def test_a_report_says_which_cells_work_and_says_so_where_none_does(synthetic_report, tmp_path, capsys):
    """Every table and analysis opens with whether its policies beat the baselines; a report in which none does says
    its figures are about early training."""
    said = "1 of 2 cells beat every baseline in all their seeds: fixed."  # the failed cell ran nothing
    assert said in (synthetic_report / "table.md").read_text().splitlines()[:3]
    assert said in (synthetic_report / "analysis.md").read_text().splitlines()[:3]
    assert said in (synthetic_report / "dashboard.html").read_text()
    for seed in range(2):  # one seed of the fixed recipe above the baselines: that cell does not work either
        fake_run(tmp_path / f"fixed-s{seed}", FIXED, seed, error=0.02 if seed else 0.12)
        fake_run(tmp_path / f"original-s{seed}", ORIGINAL, seed, error=0.2)
    main([str(tmp_path), "--out", str(tmp_path / "report")])
    none = ("No cell's policies beat every baseline in all their seeds (0 of 2 cells): these figures are about early "
            "training, not about policies that work.")
    assert none in capsys.readouterr().out
    assert none in (tmp_path / "report" / "table.md").read_text() and \
        none in (tmp_path / "report" / "analysis.md").read_text()


def test_every_output_is_written_and_no_temp_file_left(synthetic_report):
    names = {p.name for p in synthetic_report.iterdir()}
    assert {"runs.csv", "runs.parquet", "curves.csv", "table.md", "table.csv", "analysis.md", "dashboard.html",
            "loss_curves.png", "output_std_curves.png", "action_error.png", "effects.png"} <= names
    assert not [n for n in names if n.endswith(".tmp")]
    assert len(pd.read_parquet(synthetic_report / "runs.parquet")) == 5
    curves = pd.read_csv(synthetic_report / "curves.csv")
    assert len(curves) == 4 * 6 and set(curves.kind) == {"step", "epoch"}


def test_dashboard_is_one_self_contained_file(synthetic_report):
    page = (synthetic_report / "dashboard.html").read_text()
    assert "<table" in page and "fixed with init=none" in page and "Leave-one-out" in page
    images = re.findall(r'src="data:image/png;base64,([^"]+)"', page)
    assert len(images) == 4 and all(base64.b64decode(i).startswith(b"\x89PNG") for i in images)
    assert not re.search(r"https?://", page) and "<script" not in page and "<link" not in page


def test_empty_folder_is_a_usage_error(tmp_path):
    with pytest.raises(SystemExit) as e:
        main([str(tmp_path)])
    assert e.value.code == f"error: {tmp_path} holds no summary.json: not a run or sweep folder"


# ------------------------------------------------------------------------------------------------ real runs, real CLI
@pytest.mark.slow
def test_report_cli_on_real_runs_with_wandb(make_cfg, wandb_records, tmp_path):
    sweep = tmp_path / "sweep"
    for init, seed in itertools.product(("xavier", "none"), (0, 1)):
        cfg = make_cfg("logger=none", "progress=false", "debug=smoke", "threads=1", f"init={init}", f"seed={seed}")
        train(cfg, sweep / f"{init}-s{seed}")
    out = tmp_path / "report"
    done = subprocess.run([sys.executable, "-m", "vla_exp.attribution.report", str(sweep), "--out", str(out), "--wandb"],
                          capture_output=True, text=True, cwd=tmp_path, env=os.environ)
    assert done.returncode == 0, done.stderr[-3000:]
    runs = pd.read_csv(out / "runs.csv")
    assert sorted(zip(runs.init, runs.seed)) == [("none", 0), ("none", 1), ("xavier", 0), ("xavier", 1)]
    assert set(runs.optim) == {"original"} and set(runs.status) == {"completed"}
    assert {"baseline_hold_state", "val_action_error", "cell", "run_dir"} <= set(runs.columns)
    assert "init (xavier vs none)" in done.stdout and "| original with init=xavier |" in done.stdout
    records = wandb_records(out)  # W&B wrote its offline run into the report folder
    (run,) = (r["run"] for r in records if r["type"] == "run")
    assert run["job_type"] == "report" and run["run_group"] == "sweep" and run["project"] == "vla-exp"
    assert run["config"]["update"]["runs"] == 4
    logged = {k[:-len("._type")]: v for r in records if r["type"] == "history" for k, v in r["history"]["item"].items()
              if k.endswith("._type")}
    assert logged == {"runs": "table-file", "table": "table-file", **{f"plots/{p}": "image-file" for p in
                      ("loss_curves", "output_std_curves", "action_error", "effects")}}
    html, table = (out / "dashboard.html").read_text(), (out / "table.md").read_text()
    assert "| original with init=xavier |" in table and table in done.stdout
    assert "original with init=xavier" in html and html.count("data:image/png;base64,") == 4


@pytest.mark.slow
def test_missing_folder_exits_1_with_one_line(tmp_path):
    done = subprocess.run([sys.executable, "-m", "vla_exp.attribution.report", str(tmp_path / "nope")], capture_output=True,
                          text=True, cwd=ROOT)
    assert done.returncode == 1
    assert done.stderr.strip() == f"error: {tmp_path / 'nope'} is not a directory"


def test_a_run_beats_the_baselines_only_if_it_beats_every_one():
    runs = pd.DataFrame({"val_action_error": [0.5, 0.5, 0.5, float("nan")], "baseline_mean_action": [0.4, 0.6, 0.55, 1.0],
                         "baseline_hold_state": [0.6, 0.4, 0.6, 1.0]})
    assert analysis.beats(runs).tolist() == [False, False, True, False]


def test_budget_curve_compares_recipes_at_equal_epochs_and_equal_updates(tmp_path):
    """The budget study's table: the original recipe (batch 16) makes half the fixed recipe's (batch 8) updates an
    epoch, so its epoch 2 meets the fixed recipe's epoch 1. The report of a study folder rebuilds it (study.json)."""
    from vla_exp.attribution.report import report
    from vla_exp.runs import write_study
    for seed in range(2):
        for name, choices, per_epoch in (("fixed", FIXED, 2), ("original", ORIGINAL, 1)):
            run = tmp_path / f"{name}-s{seed}"
            fake_run(run, choices, seed, error=0.1 if name == "fixed" else 0.3)
            rows = [{"kind": "epoch", "step": per_epoch * e, "epoch": e, "val_action_error": e / 10 + seed / 100}
                    for e in (1, 2)]
            (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
            summary = json.loads((run / "summary.json").read_text())
            (run / "summary.json").write_text(json.dumps({**summary, "wall_time_s": 120.0}))
    write_study(tmp_path, "budget")
    report([tmp_path])
    text = (tmp_path / "budget.md").read_text()
    assert "At equal optimiser updates" in (tmp_path / "report" / "dashboard.html").read_text()
    assert "- 2 updates: fixed (epoch 1) 0.105 ± 0.0071, original (epoch 2) 0.205 ± 0.0071" in text
    assert "| original | 2 | 0.205 ± 0.0071 | 2 | 2.0 | 2.0 |" in text  # 120 s over 2 epochs
    assert (tmp_path / "budget.png").stat().st_size > 10_000


def test_a_finished_run_without_a_figure_the_analysis_reads_is_refused_by_name(tmp_path):
    fake_run(tmp_path / "fixed-s0", FIXED, 0)
    summary = json.loads((tmp_path / "fixed-s0" / "summary.json").read_text())
    summary["action_error"] = summary.pop("val_action_error")  # a renamed key
    (tmp_path / "fixed-s0" / "summary.json").write_text(json.dumps(summary))
    with pytest.raises(UsageError, match=r"fixed-s0/summary.json: a finished run's summary without val_action_error "):
        load_runs(find_run_dirs([tmp_path]), reference_levels())


def test_a_screen_runs_design_node_must_hold_every_key(tmp_path, capsys):
    design = Design(name="x01", label="A + init", part="design", factors=["optim", "init"], levels=[0, 1], a="A", b="B")
    assert Design.of(design.node(), "here") == design
    fake_run(tmp_path / "x01-s0", FIXED, 0)
    summary = json.loads((tmp_path / "x01-s0" / "summary.json").read_text())
    (tmp_path / "x01-s0" / "summary.json").write_text(json.dumps({**summary, "design": design.node()}))
    runs = load_runs(find_run_dirs([tmp_path]), reference_levels())
    assert runs[["cell", "design_name", "design_part", "level:optim", "level:init"]].values.tolist() == [
        ["A + init", "x01", "design", 0, 1]]
    node = {k: v for k, v in design.node().items() if k != "part"}
    (tmp_path / "x01-s0" / "summary.json").write_text(json.dumps({**summary, "design": node}))
    runs = load_runs(find_run_dirs([tmp_path]), reference_levels())  # named, and the run read without the node
    assert "design_name" not in runs and runs.cell.tolist() == ["fixed"]
    assert capsys.readouterr().out.strip() == (f"warning: {(tmp_path / 'x01-s0' / 'summary.json').resolve()}: its "
                                               "design node lacks part (written by another version?); read without it")


def test_a_figure_that_is_text_is_counted_and_named(tmp_path, capsys):
    fake_run(tmp_path / "fixed-s0", FIXED, 0)
    summary = json.loads((tmp_path / "fixed-s0" / "summary.json").read_text())
    (tmp_path / "fixed-s0" / "summary.json").write_text(json.dumps({**summary, "final_loss": "0.5 (bad)"}))
    runs = load_runs(find_run_dirs([tmp_path]), reference_levels())
    assert np.isnan(runs.final_loss.iloc[0]) and runs.val_action_error.iloc[0] == 0.05
    assert capsys.readouterr().out.strip() == (f"warning: 1 figure of summary.json not a number, read as missing: "
                                               f"{(tmp_path / 'fixed-s0').resolve()}: final_loss='0.5 (bad)'")


# ------------------------------------------------------------------------------------------------ hostile files
def bisection_folder(folder):
    """A bisection study's folder as vla-exp-study writes it: A and B x 3 seeds (runs with their design nodes),
    bisect.json from the real procedure on a noise-free response, study.json."""
    from vla_exp.attribution import bisect as bs
    names = ["optim.lr", "init"]
    found = bs.bisect(2, lambda reqs: [0.3 * c[0] for c, _ in reqs], 0.02, 0.08, n0=3)
    plan = bs.outcome(found, names, "val_action_error", 1, lambda r: r, 0.02, 0.08)
    plan["at"], plan["budget"] = "the study's budget (epochs=3)", {"label": "the study's budget", "same": True,
                                                                  "b_beats": [0, 3]}
    for name, levels, error in (("A", [0, 0], 0.4), ("B", [1, 1], 0.1)):
        for seed in range(3):
            fake_run(folder / f"{name}-s{seed}", FIXED, seed, error=error + 0.01 * seed)
            path = folder / f"{name}-s{seed}" / "summary.json"
            design = Design(name=name, label=name, part="bisect", factors=names, levels=levels, a="A", b="B")
            path.write_text(json.dumps({**json.loads(path.read_text()), "design": design.node()}))
    (folder / "bisect.json").write_text(json.dumps(plan))
    (folder / "study.json").write_text(json.dumps({"study": "screen", "method": "bisect"}))
    return plan


def edit_summary(path, **changes):
    path.write_text(json.dumps({**json.loads(path.read_text()), **changes}))


def damage(root, case):
    """The run or study file `case` names, damaged as a careless or hostile user would; returns the file."""
    run = root / "fixed-s0"
    if case == "study.json a string":
        (root / "study.json").write_text('"screen"')
        return root / "study.json"
    if case in ("bisect.json cut short", "bisect.json a list"):
        (root / "bisect.json").write_text('{"metric": "val_' if case.endswith("short") else "[]")
        return root / "bisect.json"
    if case in ("confirmation.json cut short", "confirmation.json without steps"):
        plan = {"metric": "val_action_error", "a": [0.4], "b": [0.1], "without": []}
        text = json.dumps(plan) if case.endswith("steps") else json.dumps(plan)[:30]
        (root / "confirmation.json").write_text(text)
        for name, levels in (("A", [0, 0]), ("B", [1, 1])):
            fake_run(root / f"{name}-s0", FIXED, 0)
            design = Design(name=name, label=name, part="design", factors=["init", "optim"], levels=levels, a="A",
                            b="B")
            edit_summary(root / f"{name}-s0" / "summary.json", design=design.node())
        return root / "confirmation.json"
    if case == "a 400-digit integer":
        edit_summary(run / "summary.json", final_loss=0)
        text = (run / "summary.json").read_text().replace('"final_loss": 0', '"final_loss": ' + "9" * 400)
        (run / "summary.json").write_text(text)
    elif case == "a huge seed":
        edit_summary(run / "summary.json", seed=10 ** 30)
    elif case in ("a seed past 32 bits", "a negative seed"):
        edit_summary(run / "summary.json", seed=2 ** 32 if "32" in case else -1)
    elif case == "a baseline that is text":
        edit_summary(run / "summary.json", baseline_action_errors={**BASELINES, "hold_state": "low"})
    elif case == "choices a string":
        edit_summary(run / "summary.json", choices="fixed")
    elif case == "baselines a list":
        edit_summary(run / "summary.json", baseline_action_errors=[0.1, 0.2])
    elif case == "a malformed design node":
        edit_summary(run / "summary.json", design={**Design("x1", "A + init", "design", ["init"], [1], "A",
                                                            "B").node(), "levels": "1"})
    elif case == "a bad metrics row":
        rows = (run / "metrics.jsonl").read_text().splitlines()
        # a last line cut short is a killed writer's, left out without a word; the lines before it are named
        (run / "metrics.jsonl").write_text("\n".join([rows[0], "not json", "[1, 2]", '{"step": 3}', *rows[1:],
                                                       '{"kind": "st']) + "\n")
        return run / "metrics.jsonl"
    return run / "summary.json"


@pytest.mark.parametrize("case, why", [
    ("study.json a string", "not the record of a study"),
    ("bisect.json cut short", "not JSON"), ("bisect.json a list", "holds a list, not the study's record"),
    ("confirmation.json cut short", "not JSON"), ("confirmation.json without steps", "lacks steps"),
    ("a 400-digit integer", None), ("a huge seed", "seed=1e+30 is no seed"),
    ("choices a string", "choices is a str, not a mapping"),
    ("baselines a list", "baseline_action_errors is a list, not a mapping"),
    ("a malformed design node", "its design node is malformed"),
    ("a bad metrics row", "lines 2, 3, 4 hold no metrics row; read without it"),
    ("a seed past 32 bits", "seed=4294967296 is no seed"), ("a negative seed", "seed=-1 is no seed"),
    ("a baseline that is text", "baseline_action_errors: hold_state is no number")])
def test_the_report_names_each_file_it_cannot_read_and_goes_on_with_the_rest(tmp_path, capsys, case, why):
    root = tmp_path / "study"
    if case.startswith("bisect"):
        bisection_folder(root)
        fake_run(root / "fixed-s0", FIXED, 0)
    else:
        for seed in range(2):
            fake_run(root / f"fixed-s{seed}", FIXED, seed)
            fake_run(root / f"original-s{seed}", ORIGINAL, seed, error=0.3)
    path = damage(root, case)
    main([str(root)])
    out = capsys.readouterr().out
    runs = pd.read_csv(root / "report" / "runs.csv")
    assert len(runs) == len(list(root.glob("*/summary.json")))  # every run read
    assert (root / "report" / "dashboard.html").is_file() and (root / "report" / "table.md").is_file()
    if why:
        assert f"warning: {path}: " in out and why in out and "; read without it" in out, out
    if case == "a 400-digit integer":
        assert runs.final_loss.max() == np.inf
    if case == "a baseline that is text":  # the run keeps its other baselines
        assert runs.baseline_mean_action.notna().all()


def test_a_bisection_beside_plain_runs_is_reported_with_what_was_found(tmp_path, capsys):
    """A bisection's folder nested beside plain runs: the report says what it found and analyses the bisection from
    its own runs and bisect.json (it once read the plain runs' folder, found no plan and printed an empty design)."""
    from vla_exp.attribution import bisect as bs
    plan = bisection_folder(tmp_path / "bisection")
    for seed in range(2):
        fake_run(tmp_path / f"fixed-s{seed}", FIXED, seed)
    main([str(tmp_path)])
    out = capsys.readouterr().out
    assert (f"note: 2 of the 8 runs are no screen's: the screen's analysis reads its 6 runs in "
            f"{(tmp_path / 'bisection').resolve()} alone; report the others apart") in out
    analysis_md = (tmp_path / "report" / "analysis.md").read_text()
    assert f"## Bisection\n\n{bs.sentence(plan)}" in analysis_md and "resolution 1" not in analysis_md
    assert plan["important"] == ["optim.lr"]


def test_a_screens_runs_without_a_design_or_a_plan_say_so(tmp_path, capsys):
    bisection_folder(tmp_path)
    (tmp_path / "bisect.json").unlink()
    main([str(tmp_path)])
    analysis_md = (tmp_path / "report" / "analysis.md").read_text()
    assert (f"The screen's 6 runs in {tmp_path.resolve()} hold no run of a design, and no readable bisect.json is "
            "beside them: there is nothing to analyse as a screen.") in analysis_md


def test_a_screens_confirmation_opens_its_report_and_a_whole_folder_gets_no_warning(tmp_path, capsys):
    """A screen's folder as the study leaves it (design runs, confirmation.json, study.json): its sentence and
    table lead the dashboard, and nothing is named as unreadable."""
    from vla_exp.attribution import screen
    names = ["lr", "init"]
    values = {"A": [0.5, 0.52], "x10": [0.104, 0.1], "x01": [0.45, 0.46], "B": [0.1, 0.11]}
    for name, errors in values.items():
        levels = {"A": [0, 0], "B": [1, 1]}.get(name) or [int(c) for c in name[1:]]
        for seed, error in enumerate(errors):
            fake_run(tmp_path / f"{name}-s{seed}", FIXED, seed, error=error)
            design = Design(name=name, label=screen.label(levels, names), part="design", factors=names,
                            levels=levels, a="recipe=original", b="recipe=fixed")
            edit_summary(tmp_path / f"{name}-s{seed}" / "summary.json", design=design.node())
    runs = pd.DataFrame([{"design_name": n, "seed": s, "val_action_error": v}
                         for n, vs in values.items() for s, v in enumerate(vs)])
    result = {"effects": pd.DataFrame({"term": names, "effect": [-0.4, -0.05]}), "sigma": 0.01, "df": 4}
    plan = screen.confirmation(runs, "val_action_error", names, result)
    assert plan["next"] is None and plan["reached"] == 1
    (tmp_path / "confirmation.json").write_text(json.dumps(plan))
    (tmp_path / "study.json").write_text(json.dumps({"study": "screen", "a": "recipe=original", "b": "recipe=fixed"}))
    main([str(tmp_path)])
    assert "warning" not in capsys.readouterr().out
    analysis_md = (tmp_path / "report" / "analysis.md").read_text()
    assert f"## Confirmation\n\n{screen.sentence(plan)}\n\n| step |" in analysis_md
    dashboard = (tmp_path / "report" / "dashboard.html").read_text()
    assert dashboard.index("Confirmation: the smallest set of changes") < dashboard.index("Screen: the design")


def test_the_wandb_logger_of_a_report_is_the_runs_own_read_as_text(tmp_path, monkeypatch):
    """`--wandb` takes the project of the first run whose saved logger is W&B's; a folder's config is data, so an
    interpolation there is the project's name as written, never an environment variable's value."""
    from omegaconf import OmegaConf
    from vla_exp.attribution.report import logger_config
    from vla_exp.config import compose
    monkeypatch.setenv("VLA_TEST_SECRET", "hunter2")
    for name, logger, project in (("a", "none", "ignored"), ("b", "wandb", "${oc.env:VLA_TEST_SECRET}"),
                                  ("c", "wandb", "third")):
        cfg = compose("logger=" + logger)
        if logger == "wandb":
            cfg.logger.project = project
        (tmp_path / name / ".hydra").mkdir(parents=True)
        OmegaConf.save(cfg, tmp_path / name / ".hydra" / "config.yaml")
    got = logger_config([tmp_path / "a", tmp_path / "b", tmp_path / "c"], "offline", "g")
    assert (got.project, got.mode, got.group) == ("${oc.env:VLA_TEST_SECRET}", "offline", "g")
    default = OmegaConf.load(CONF_DIR / "logger" / "wandb.yaml").project
    assert logger_config([tmp_path / "a"], "offline", "g").project == default


def test_an_integer_too_long_for_int64_reads_as_a_float():
    from vla_exp.runs import parse_json
    assert parse_json("[%s, %s, -%s]" % ("9" * 18, "9" * 19, "9" * 400)) == [10 ** 18 - 1, 1e19, -np.inf]
    assert type(parse_json("9" * 18)) is int and type(parse_json("9" * 19)) is float
