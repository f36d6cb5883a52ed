"""The screen: its factors, designs checked against their defining relation, the analysis against known answers,
missing runs, the confirmation's plan, and the study end to end at a tiny budget."""
import itertools
import json
import os
import signal
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest
from omegaconf import OmegaConf
from scipy import stats

from vla_exp import UsageError
from vla_exp.attribution import screen
from vla_exp.config import compose, leaves
from vla_exp.attribution.diff import Side

from test_sweep import ROOT, SMOKE, cli, pid_of, summaries, wait_for


def aliased_with_a_two_factor_interaction(matrix):
    """Main effects whose column equals (up to sign) some two-factor interaction's: computed from the columns
    alone, not from the defining relation."""
    k = matrix.shape[1]
    return {i for i in range(k) for a, b in itertools.combinations(range(k), 2)
            if abs(matrix[:, i] @ (matrix[:, a] * matrix[:, b])) == len(matrix)}


@pytest.mark.parametrize("k", [4, 5, 6, 7, 8, 9, 10])
def test_designs_have_the_resolution_their_defining_relation_says(k):
    matrix, desc = screen.design(k)
    assert set(np.unique(matrix)) == {-1, 1} and matrix.shape == (min(2 ** k, 32), k)
    assert len(np.unique(matrix, axis=0)) == len(matrix)
    for word in desc["defining_relation"]:  # every word of the relation is a constant column
        cols = [screen.LETTERS.index(c) for c in word]
        assert abs(matrix[:, cols].prod(axis=1).sum()) == len(matrix)
    if 2 ** k <= 32:
        assert desc["kind"] == f"full 2^{k} factorial" and desc["resolution"] is None
    else:  # resolution IV: no word shorter than 4, so no main effect is aliased with a 2-factor interaction
        assert desc["resolution"] == min(map(len, desc["defining_relation"])) >= 4
        assert desc["kind"] == f"2^({k}-{k - 5}) fraction"
        assert not aliased_with_a_two_factor_interaction(matrix)
        assert (matrix.T @ matrix == len(matrix) * np.eye(k)).all()  # main effects orthogonal


def test_resolution_three_and_the_foldover():
    matrix, desc = screen.design(9, max_runs=16, resolution=3)
    assert desc["runs"] == 16 and desc["resolution"] == 3 and aliased_with_a_two_factor_interaction(matrix)
    folded, desc = screen.design(9, max_runs=32, resolution=3, foldover=True)
    assert desc["runs"] == 32 and desc["kind"].endswith("and its foldover")
    assert desc["resolution"] == 4 and not aliased_with_a_two_factor_interaction(folded)


@pytest.mark.parametrize("k, max_runs, resolution, message", [
    (0, 32, 4, "0 factors differ between A and B: nothing to screen; A and B are the same config"),
    (1, 32, 4, "1 factor differs between A and B: nothing to screen; run A and B over seeds"),
    (9, 16, 4, "9 factors need 32 runs for a resolution IV design, above --max-runs 16: raise --max-runs to 32, or "
               "--resolution 3 (16 runs; main effects are then aliased with two-factor interactions"),
    (20, 32, 4, "20 factors need 64 runs for a resolution IV design, above --max-runs 32: raise --max-runs to 64, "
                "or --resolution 3 (32 runs"),
])
def test_designs_that_cannot_be_made_say_what_to_do(k, max_runs, resolution, message):
    with pytest.raises(UsageError) as e:
        screen.design(k, max_runs, resolution)
    assert str(e.value).startswith(message)


def test_a_resolution_iii_design_that_does_not_fit_offers_no_lower_resolution():
    with pytest.raises(UsageError) as e:
        screen.design(20, 16, 3)
    assert str(e.value) == ("20 factors need 32 runs for a resolution III design, above --max-runs 16: raise "
                            "--max-runs to 32")


@pytest.mark.parametrize("k, runs, resolution", [(4, 8, 4), (6, 16, 4), (12, 32, 4), (16, 32, 4), (32, 64, 4),
                                                 (7, 8, 3), (15, 16, 3)])
def test_the_written_generators_name_one_column_per_factor(k, runs, resolution):
    from pyDOE3 import fracfact
    generators = screen.generators(k, runs, resolution).split()
    assert len(generators) == k and screen.stated_resolution(fracfact(" ".join(generators))) == resolution


@pytest.mark.parametrize("k", [11, 16, 20, 32])
def test_many_factors_get_the_resolution_iv_asked_for(k):
    """pyDOE3's fracfact_by_res gives 16 and 20 factors (and 32) a resolution III design when asked for IV."""
    matrix, desc = screen.design(k, max_runs=64)
    assert desc["resolution"] == screen.stated_resolution(matrix) == 4 and len(matrix) == screen.min_runs(k, 4)
    assert not aliased_with_a_two_factor_interaction(matrix)


def test_a_configurations_label_lists_the_shorter_side():
    names = ["lr", "clip", "init"]
    assert [screen.label(levels, names) for levels in ([-1, -1, -1], [1, 1, 1], [1, -1, -1], [1, 1, -1])] == [
        "A", "B", "A + lr", "B - init"]


def synthetic(matrix, names, effects, interaction, seeds=2, noise=0.01, rng=0):
    """Runs of a design with known main effects (B minus A) and one known two-factor interaction."""
    rng = np.random.default_rng(rng)
    rows = []
    for seed in range(seeds):
        for x in matrix:
            (a, b), gamma = interaction
            y = 1.0 + sum(e / 2 * xi for e, xi in zip(effects, x)) + gamma / 2 * x[a] * x[b] + rng.normal(0, noise)
            rows.append({"seed": seed, "val_action_error": y, **{f"level:{n}": int(xi > 0) for n, xi in zip(names, x)},
                         "design_name": screen.config_name(x), "design_part": "design"})
    return pd.DataFrame(rows)


def test_the_analysis_recovers_known_main_effects_and_an_aliased_interaction():
    matrix, _ = screen.design(9)
    names = [f"f{i}" for i in range(9)]
    effects = [-0.3, 0.2, 0.0, 0.1, 0.0, -0.05, 0.0, 0.0, 0.4]
    res = screen.estimate_effects(synthetic(matrix, names, effects, ((0, 1), 0.25)), "val_action_error", names)
    assert res["method"] == "replicates" and res["df"] == 32 and abs(res["sigma"] - 0.01) < 0.004
    e = res["effects"].set_index("term")
    for name, true in zip(names, effects):
        assert e.loc[name, "lo"] < true < e.loc[name, "hi"] and abs(e.loc[name, "effect"] - true) < 0.01
        aliases = e.loc[name, "aliases"].split(" = ")  # resolution IV: three-factor interactions at the least
        assert aliases and all(a.lstrip("-").count(" x ") == 2 for a in aliases), aliases
    # the interaction's column: its effect is found, and it is named with the interactions it cannot be told from
    column = next(t for t, r in e.iterrows() if "f0 x f1" in [t, *r.aliases.split(" = ")])
    assert abs(e.loc[column, "effect"] - 0.25) < 0.01 and e.loc[column, "lo"] > 0
    chain = [column, *e.loc[column, "aliases"].split(" = ")]
    assert len(chain) > 1 and all(" x " in t for t in chain)
    f0f1 = matrix[:, 0] * matrix[:, 1]
    for term in chain:  # every term of the chain has the same column over the design, up to sign
        i, j = (names.index(t) for t in term.lstrip("-").split(" x "))
        assert abs(matrix[:, i] * matrix[:, j] @ f0f1) == len(matrix)
    mains = e.loc[names]
    assert list(names[i] for i in np.flatnonzero((mains.lo > 0) | (mains.hi < 0))) == ["f0", "f1", "f3", "f5", "f8"]


def test_without_replicates_lenth_pseudo_standard_error():
    effects = np.array([10.0, -8.0, 0.5, -0.3, 0.2, 0.1, -0.4, 0.6, 0.25, -0.15, 0.05, 0.35, -0.2, 0.45, 0.3])
    me, pse = screen.lenth(effects)
    s0 = 1.5 * 0.3  # median |effect| is 0.3
    small = np.abs(effects)[np.abs(effects) < 2.5 * s0]  # 10 and -8 drop out
    assert pse == pytest.approx(1.5 * np.median(small))
    from scipy import stats
    assert me == pytest.approx(stats.t.ppf(0.975, 5) * pse)
    matrix, _ = screen.design(4)
    names = ["a", "b", "c", "d"]
    res = screen.estimate_effects(synthetic(matrix, names, [2.0, 0, 0, -1.0], ((1, 2), 0.0), seeds=1, noise=0.05),
                         "val_action_error", names)
    e = res["effects"].set_index("term")
    assert res["method"] == "lenth" and "Lenth's pseudo standard error" in res["notes"][0]
    assert res["df"] == pytest.approx(15 / 3)  # 15 effect columns
    assert e.loc["a", "lo"] > 0 and e.loc["d", "hi"] < 0 and e.loc["b", "lo"] < 0 < e.loc["b", "hi"]


def test_missing_runs_are_data_points_the_analysis_names_what_they_cost():
    matrix, _ = screen.design(9)
    names = [f"f{i}" for i in range(9)]
    runs = synthetic(matrix, names, [-0.3, 0.2] + [0.0] * 7, ((0, 1), 0.0))
    runs.loc[[0, 5, 9, 14], "val_action_error"] = np.nan  # four diverged runs (one seed each)
    res = screen.estimate_effects(runs, "val_action_error", names)
    assert res["n"] == 60 and res["dropped"] == 4 and len(res["effects"][res["effects"].order == 1]) == 9
    assert any(n.startswith("missing runs widen the intervals of f0 (standard error x1.06)") for n in res["notes"])
    both = runs.design_name == runs.design_name[3]
    runs.loc[both, "val_action_error"] = np.nan  # a whole configuration lost: an interaction column goes
    res = screen.estimate_effects(runs, "val_action_error", names)
    assert "runs missing from whole rows: 1 interaction columns dropped from the model" in res["notes"]
    assert abs(res["effects"].set_index("term").loc["f0", "effect"] + 0.3) < 0.02


def test_a_factor_that_changes_the_held_out_samples_is_named_from_the_runs_baselines():
    """Runs scored on the same held-out samples share their baselines; data.split_seed-like factors do not."""
    matrix, _ = screen.design(4)
    names = ["a", "b", "c", "d"]
    runs = synthetic(matrix, names, [0.1, 0, 0, 0], ((0, 1), 0.0)).assign(baseline_mean_action=0.44)
    assert screen.held_out_changes(runs, names) is None  # one set of samples
    assert screen.held_out_changes(runs.drop(columns="baseline_mean_action"), names) is None  # no baselines
    runs["baseline_hold_state"] = np.where(runs["level:c"] == 1, 0.087, 0.11)
    only_c = ("c changes the held-out samples, the baselines differing between its levels (hold_state 0.11 at A's "
              "value, 0.087 at B's): an effect on a figure read on those samples (val_action_error) is partly a change "
              "of the samples it is read on")
    assert screen.held_out_changes(runs, names) == only_c
    runs.loc[runs["level:a"] == 1, "baseline_hold_state"] = np.nan  # runs that failed before their evaluation
    assert screen.held_out_changes(runs, names) == only_c  # not a, whose runs at B's value have nothing to compare
    assert screen.held_out_changes(runs.assign(baseline_hold_state=np.nan), names) is None  # every run failed
    runs["baseline_hold_state"] = 0.1 + 0.01 * runs["level:b"] + 0.02 * runs["level:c"]  # two factors
    assert screen.held_out_changes(runs, names).startswith(
        "b, c change the held-out samples, the baselines differing between their levels (b: hold_state 0.1/0.12 at "
        "A's value, 0.11/0.13 at B's; c: hold_state 0.1/0.11 at A's value, 0.12/0.13 at B's): ")


def test_factors_from_a_diff_change_a_node_together_and_refuse_what_a_file_cannot_remove():
    facs, _ = screen.factors(Side("recipe=original", "A"), Side("recipe=fixed", "B"), ["optim"])
    by_name = {f.name: f for f in facs}
    assert sorted(by_name) == ["clipping", "init", "loss_handling", "optim.batch_size", "optim.lr", "optim.schedule"]
    assert by_name["optim.schedule"].values == {"optim.schedule._target_": "vla_exp.fixes.CosineLR",
                                                  "optim.schedule.eta_min_ratio": 0.1}
    assert by_name["init"] == screen.Factor(name="init", group="init", a="none", b="xavier", values={})
    assert screen.level_text(by_name["optim.schedule"].b) == "_target_=vla_exp.fixes.CosineLR, eta_min_ratio=0.1"
    seeded, _ = screen.factors(Side("recipe=original seed=3", "A"), Side("recipe=fixed", "B"))
    assert [f.name for f in seeded] == ["clipping", "init", "loss_handling", "optim"]  # seeds are replicates
    with pytest.raises(UsageError, match="optim.schedule.eta_min_ratio exists on A only: a screen can add keys, "
                                         "not remove them; leave optim unsplit"):
        screen.factors(Side("recipe=fixed", "A"), Side("recipe=original", "B"), ["optim"])


def test_a_configuration_file_composes_to_a_with_the_chosen_factors_at_b(tmp_path):
    a, b = Side("recipe=original", "A"), Side("recipe=reported_script", "B")
    facs, _ = screen.factors(a, b, ["optim"])
    names = [f.name for f in facs]
    levels = [int(n in ("init", "optim.schedule", "data.action_norm", "adamw.betas")) for n in names]
    (name,) = screen.write_configs(tmp_path, [(levels, "design")], facs, a, b)
    cfg = compose(f"hydra.searchpath=[file://{tmp_path}]", f"+screen={name}")
    got = leaves(OmegaConf.to_container(cfg, resolve=True))
    for f, x in zip(facs, levels):
        side = b if x else a
        keys = [k for k in side.leaves if k.startswith(f.name + ".") or k == f.name]
        assert keys and all(got[k] == side.leaves[k] for k in keys), f.name
    assert got["design.label"] == "A + init, adamw.betas, data.action_norm, optim.schedule"
    assert got["optim.lr"] == 0.001 and got["optim.schedule._target_"] == "vla_exp.fixes.CosineLR"


def composed(folder, name):
    return leaves(OmegaConf.to_container(compose(f"hydra.searchpath=[file://{folder}]", f"+screen={name}"),
                                        resolve=True))


@pytest.mark.parametrize("a_text, b_text, split", [
    ("recipe=original", "recipe=fixed optim.lr=0.0005", []),  # B's own value inside a group it switches
    ("optim=original", "optim=fixed optim.lr=0.0005 clipping=grad_norm", []),  # A names the group on its line
    ("recipe=original", "recipe=reported_script optim.lr=0.0005", ["optim"]),
    ("recipe=fixed init=none data.episodes=40", "recipe=original model.config.horizon=8 diffusion.train_steps=50", []),
])
def test_every_configuration_composes_to_each_sides_own_values(tmp_path, a_text, b_text, split):
    """A, B and mixed configurations, composed as the study runs them, hold every resolved leaf of the side whose
    level each factor is at: checked key by key against the sides' own compositions."""
    a, b = Side(a_text, "A"), Side(b_text, "B")
    facs, _ = screen.factors(a, b, split)
    k = len(facs)
    rows = [[1] * k, [-1] * k, *([1 if i == j else -1 for i in range(k)] for j in range(k)),
            [-1 if i == 0 else 1 for i in range(k)]]
    names = screen.write_configs(tmp_path, [(r, "design") for r in rows], facs, a, b)
    ignored = ("logger", "progress", "threads", "paths", "skip_finished", "checkpoint", "resume", "design", "seed")
    for levels, name in zip(rows, names):
        got = composed(tmp_path, name)
        for f, x in zip(facs, levels):
            side = b if x > 0 else a
            prefix = f.group or f.name
            keys = [key for key in side.leaves if key == prefix or key.startswith(prefix + ".")]
            assert keys and {key: got.get(key) for key in keys} == {key: side.leaves[key] for key in keys}, (name, f)
        decided = {key for f in facs for key in (*a.leaves, *b.leaves)
                   if key == (f.group or f.name) or key.startswith((f.group or f.name) + ".")}
        rest = {key: v for key, v in a.leaves.items() if key not in decided and key.split(".")[0] not in ignored
                and key != "recipe"}
        assert {key: got.get(key) for key in rest} == rest, name  # every other leaf is A's (= B's)
    assert composed(tmp_path, "B")["optim.lr"] == b.leaves["optim.lr"]


def saved_run(folder, *overrides, drop=()):
    """A run folder's .hydra as Hydra saves it (OmegaConf.save of the job's config and of the hydra node), with the
    keys `drop` left out of the config, as in a run made before they existed."""
    from hydra import compose as hydra_compose, initialize_config_dir
    from vla_exp.config import CONF_DIR
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = hydra_compose("train", list(overrides), return_hydra_config=True)
    (folder / ".hydra").mkdir(parents=True)
    OmegaConf.save(OmegaConf.create({"hydra": cfg.hydra}), folder / ".hydra" / "hydra.yaml")
    job = OmegaConf.masked_copy(cfg, [k for k in cfg if k != "hydra" and k not in drop])
    OmegaConf.save(job, folder / ".hydra" / "config.yaml")
    return folder


def test_a_configuration_that_cannot_compose_to_its_side_is_refused_and_writes_nothing(tmp_path):
    a = Side(str(saved_run(tmp_path / "old", "recipe=original", drop=("diverge_after",))), "A")
    b = Side("recipe=fixed", "B")
    facs, _ = screen.factors(a, b)
    assert "diverge_after" in [f.name for f in facs]
    with pytest.raises(UsageError, match=r"configuration A \(A\) composes diverge_after=100, not A's \(absent\): "
                                         "the screen cannot run it as A and B were given"):
        screen.write_configs(tmp_path / "design", [([-1] * len(facs), "design")], facs, a, b)
    assert not (tmp_path / "design").exists()


def test_a_run_folder_cannot_make_the_screen_run_foreign_code(tmp_path):
    planted = saved_run(tmp_path / "p", "recipe=original", "init._target_=numpy.savetxt", "+init.fname=x")
    with pytest.raises(UsageError, match=r"sets init.fname, which is no key of the project's config$"):
        Side(str(planted), "A")  # the key numpy.savetxt needs is refused first
    a = Side(str(saved_run(tmp_path / "a", "recipe=original", "init._target_=numpy.savetxt")), "A")
    facs, _ = screen.factors(a, Side("recipe=fixed", "B"))
    with pytest.raises(UsageError, match=r"configuration A \(A\): init._target_='numpy.savetxt': must be one of the "
                                         "project's own classes"):
        screen.write_configs(tmp_path / "design", [([-1] * len(facs), "design")], facs, a, Side("recipe=fixed", "B"))
    assert not (tmp_path / "design").exists() and not (tmp_path / "x").exists()


def test_a_run_folder_side_composes_to_its_saved_config(tmp_path):
    a = Side(str(saved_run(tmp_path / "a", "optim=original", "data.episodes=40")), "A")
    b = Side(str(saved_run(tmp_path / "b", "optim=fixed", "optim.lr=0.0005", "data.episodes=40")), "B")
    facs, _ = screen.factors(a, b)
    assert [f.name for f in facs] == ["optim"]
    with pytest.raises(UsageError, match="1 factor differs"):
        screen.design(len(facs))
    screen.write_configs(tmp_path / "design", [([1], "design"), ([-1], "design")], facs, a, b)
    for name, side in (("B", b), ("A", a)):
        got = composed(tmp_path / "design", name)
        assert {k: got[k] for k in side.leaves if k.startswith("optim.")} == \
               {k: v for k, v in side.leaves.items() if k.startswith("optim.")}
        assert got["data.episodes"] == 40


def test_an_override_for_every_run_that_sets_a_factor_is_refused():
    facs, _ = screen.factors(Side("recipe=original", "A"), Side("recipe=original epochs=5", "B"))
    with pytest.raises(UsageError, match=r"epochs=3 is set for every run of the study, but epochs differs between A "
                                         r"and B \(4 -> 5\): it would not vary"):
        screen.budget_conflicts(["data.episodes=100", "epochs=3"], facs)
    facs, _ = screen.factors(Side("recipe=original", "A"), Side("recipe=fixed", "B"))
    with pytest.raises(UsageError, match="optim.lr=0.01 is set for every run"):
        screen.budget_conflicts(["optim.lr=0.01"], facs)
    with pytest.raises(UsageError, match="optim=fixed is set for every run"):
        screen.budget_conflicts(["optim=fixed"], facs)
    screen.budget_conflicts(["epochs=3", "data.episodes=100", "optimizer_note=1"], facs)  # none of them a factor


def test_literal_interpolation_text_stays_literal_in_a_configuration():
    from vla_exp.config import literal
    assert literal("a ${oc.env:HOME} b") == "a \\${oc.env:HOME} b"
    assert OmegaConf.create({"x": literal("${oc.env:HOME}")}).x == "${oc.env:HOME}"


def plan_runs(values):
    """Runs of named configurations (2 seeds each) for the confirmation's plan."""
    return pd.DataFrame([{"design_name": n, "seed": s, "val_action_error": v}
                         for n, vs in values.items() for s, v in enumerate(vs)])


def test_the_confirmation_adds_factors_in_order_of_effect_until_b_is_reached():
    names = ["lr", "clip", "init", "betas"]
    result = {"effects": pd.DataFrame({"term": names, "effect": [-0.3, -0.05, -0.2, 0.01]}), "sigma": 0.01,
              "df": 32}
    values = {"A": [0.5, 0.52]}
    plan = screen.confirmation(plan_runs(values), "val_action_error", names, result)
    assert plan["next"] == [1, 1, 1, 1]  # B first
    values["B"] = [0.1, 0.11]
    plan = screen.confirmation(plan_runs(values), "val_action_error", names, result)
    assert plan["order"] == ["lr", "init", "clip", "betas"] and plan["next"] == [1, 0, 0, 0]
    values["x1000"] = [0.3, 0.31]
    values["x1010"] = [0.104, 0.1]  # lr and init reach B
    plan = screen.confirmation(plan_runs(values), "val_action_error", names, result)
    assert plan["reached"] == 2 and plan["next"] == [0, 0, 1, 0]  # then init without lr
    assert [(s["added"], s["set"]) for s in plan["steps"]] == [("lr", ["lr"]), ("init", ["lr", "init"])]
    values["x0010"] = [0.35, 0.36]
    plan = screen.confirmation(plan_runs(values), "val_action_error", names, result)
    assert plan["next"] is None
    assert screen.sentence(plan) == ("2 of the 4 differences (lr, init) recover B's val action error: 0.102 ± 0.0028 "
                                     "against B's 0.105 ± 0.0071; without lr they do not (0.355 ± 0.0071); without "
                                     "init they do not (0.305 ± 0.0071)")
    saved = json.loads(json.dumps(plan))  # what the study writes and the report reads back
    assert saved == plan and screen.sentence(saved) == screen.sentence(plan)
    values["B"] = [np.nan, np.nan]  # B diverged: nothing to recover, said in one line
    with pytest.raises(UsageError, match="B's runs have no finite val_action_error"):
        screen.confirmation(plan_runs(values), "val_action_error", names, result)


def test_the_confirmation_says_when_no_subset_short_of_all_recovers_b():
    names = ["lr", "init"]
    result = {"effects": pd.DataFrame({"term": names, "effect": [-0.3, -0.2]}), "sigma": 0.01, "df": 8}
    plan = screen.confirmation(plan_runs({"A": [0.5, 0.5], "B": [0.1, 0.1], "x10": [0.3, 0.31]}),
                               "val_action_error", names, result)
    assert plan["next"] is None and plan["reached"] is None
    assert screen.sentence(plan) == ("no subset short of all 2 differences recovers B's val action error: with all "
                                     "but init it is 0.305 ± 0.0071 against B's 0.1 ± 0")


def load_study():
    from vla_exp.attribution import studies
    return studies


def test_a_screen_into_a_folder_held_by_another_study_or_a_run_is_refused_and_writes_nothing(tmp_path):
    from vla_exp.files import STUDY_LOCK, exclusive
    study = load_study()
    screen_args = ["screen", "--a", "recipe=original", "--b", "recipe=fixed", "--seeds", "0,1", "--jobs", "1"]
    out = tmp_path / "s"
    with exclusive(out, "a screen", lock=STUDY_LOCK), pytest.raises(SystemExit) as e:
        study.main([*screen_args, "--out", str(out)])
    assert str(e.value.code) == f"error: {out} is in use by another study (pid {os.getpid()}): wait for it to end, or give " \
                                "this one another folder"
    assert [p.name for p in out.iterdir()] == [STUDY_LOCK]  # the first study's files stay its own
    out = tmp_path / "r"
    with exclusive(out, "a run"), pytest.raises(SystemExit) as e:
        study.main([*screen_args, "--out", str(out)])
    assert f"{out} is in use by a run or sweep (pid" in str(e.value.code)
    assert [p.name for p in out.iterdir()] == [".lock"]


@pytest.mark.slow  # composes the design's 32 configurations
def test_a_study_dry_run_of_a_screen_prints_its_runs_and_writes_nothing(tmp_path, capsys):
    study = load_study()
    out = tmp_path / "s"
    assert study.main(["screen", "--a", "recipe=original", "--b", "recipe=reported_script", "--split", "optim",
                       "--seeds", "0,1", "--dry-run", "--out", str(out)]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[0].startswith("9 factors: clipping (none -> grad_norm); init (none -> xavier_more)")
    assert lines[1].startswith("design: 2^(9-4) fraction, 32 configurations x 2 seeds = 64 runs, resolution 4")
    jobs = [line for line in lines if "+screen=" in line]
    assert len(jobs) == 64 and len(set(jobs)) == 64 and not out.exists()
    assert lines[-1] == (f"64 runs into {out}, then A, B and the confirmation's steps where the design lacks them "
                         "(2 runs each, at most 17); nothing launched")
    with pytest.raises(SystemExit):  # one seed needs a threshold
        study.main(["screen", "--a", "recipe=original", "--b", "recipe=fixed", "--seeds", "0", "--dry-run"])
    assert "screen with one seed has no seed noise" in capsys.readouterr().err


@pytest.mark.slow
def test_a_screen_study_runs_its_design_confirms_the_smallest_fix_and_reports(tmp_path):
    """A 2^2 screen at one epoch, confirmed again at two. With --threshold 100 every step reaches B: the set is the
    first factor alone, and at the second budget A (the set without it) reaches B too, so the budgets disagree.
    First its design's multirun gets SIGKILL once a run has finished: the study draws nothing from part of the
    design, and the same command finishes it, the finished runs skipped."""
    out_dir, again = tmp_path / "s", tmp_path / "s_confirm"
    args = ["-m", "vla_exp.attribution.studies", "screen", "--a", "recipe=original",
            "--b", "recipe=original init=xavier_all optim.lr=0.0001", "--seeds", "0", "--threshold", "100",
            "--jobs", "1", "--out", str(out_dir), "--confirm-budget", "epochs=2", *SMOKE, "logger=none", "epochs=1",
            "data.episodes=6"]
    study = subprocess.Popen([sys.executable, *args], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                             text=True)
    wait_for(lambda: list(out_dir.glob("*/summary.json")), study)
    os.kill(pid_of(b"vla_exp.training.main", str(out_dir).encode()), signal.SIGKILL)
    _, err = study.communicate(timeout=300)
    kept = summaries(out_dir)
    assert study.returncode != 0 and 1 <= len(kept) < 4
    assert err.strip().splitlines()[-1].startswith(f"error: {4 - len(kept)} of the 4 runs ended without a summary: ")
    assert not (out_dir / "confirmation.json").exists() and not (out_dir / "report").exists()
    assert not list(again.glob("*/summary.json"))  # nothing at the second budget
    out = cli(*args)
    assert out.returncode == 0, out.stderr[-3000:]
    runs = summaries(out_dir)
    assert {name: runs[name]["started_at"] for name in kept} == {n: s["started_at"] for n, s in kept.items()}
    assert sorted(s["design"]["name"] for s in runs.values()) == ["A", "B", "x01", "x10"]  # the full 2^2, no more
    assert {s["epochs"] for s in runs.values()} == {1}
    plan = json.loads((out_dir / "confirmation.json").read_text())
    assert plan["factors"] == ["init", "optim.lr"] and plan["next"] is None
    errors = {s["design"]["name"]: s["val_action_error"] for s in runs.values()}
    assert plan["a"] == [errors["A"]] and plan["b"] == [errors["B"]]  # the plan's figures are the runs'
    (first,) = plan["steps"]
    assert first["values"] == [errors[first["name"]]] and first["reached"] and plan["reached"] == 1
    # the second budget: A, B and the set (the set without its factor is A), each at two epochs, its own figures
    second = summaries(again)
    assert sorted(second) == sorted(["A-s0", "B-s0", f"{first['name']}-s0"])
    assert {s["epochs"] for s in second.values()} == {2}
    check = plan["budget"]
    assert check["label"] == "the confirmation budget (epochs=2)" and check["set"] == first["set"]
    assert check["a"] == [second["A-s0"]["val_action_error"]] and check["b"] == [second["B-s0"]["val_action_error"]]
    assert check["with_set"]["values"] == [second[f"{first['name']}-s0"]["val_action_error"]]
    assert check["not_needed"] == first["set"] and not check["holds"]
    assert check["b_beats"] == [int(second["B-s0"]["beats_baselines"]), 1]
    sentence = (out_dir / "confirmation.md").read_text().strip()
    assert sentence == screen.sentence(plan) and sentence in out.stdout
    assert "\n4 runs and 3 at the confirmation budget (epochs=2), " in out.stdout  # the last line counts both
    assert sentence.startswith("At the study's budget (epochs=3 eval.epoch_samples=64 debug=smoke")
    assert ". At the confirmation budget (epochs=2) A plus" in sentence and "but the budgets disagree" in sentence
    analysis = (out_dir / "report" / "analysis.md").read_text()
    assert "2 factors (a = init, b = optim.lr); 4 configurations of the design, 4 runs; full factorial" in analysis
    assert "Lenth's pseudo standard error" in analysis and f"## Confirmation\n\n{sentence}" in analysis
    assert "### At the confirmation budget (epochs=2):" in analysis
    dash = (out_dir / "report" / "dashboard.html").read_text()
    assert "Half normal" in dash and dash.index("Confirmation: the smallest set") < dash.index("Screen: the design")


def test_run_counts_of_the_smallest_fractions():
    # resolution III needs 2^ceil(log2(k + 1)) runs: k = 4 factors and the intercept do not fit 4 runs
    assert [screen.min_runs(k, 3) for k in (3, 4, 7, 8)] == [4, 8, 8, 16]
    assert [screen.min_runs(k, 4) for k in (4, 5, 8, 9)] == [8, 16, 16, 32]


def test_lenths_pseudo_standard_error_by_hand():
    # |c| = 1, 2, 3, 4, 9: s0 = 1.5 x 3 = 4.5 keeps all five (< 11.25), PSE = 1.5 x 3 = 4.5; with s0 = median the 9
    # would be dropped (PSE 3.75)
    margin, pse = screen.lenth(np.array([1.0, -2.0, 3.0, -4.0, 9.0]))
    assert pse == pytest.approx(4.5) and margin == pytest.approx(stats.t.ppf(0.975, 5 / 3) * 4.5)
    # |c| = 1, 1, 2, 7.5, 7.5: s0 = 3 and an effect of exactly 2.5 s0 is dropped (Lenth's "<"): PSE = 1.5 x 1
    assert screen.lenth(np.array([1.0, -1.0, 2.0, 7.5, -7.5]))[1] == pytest.approx(1.5)
    assert screen.lenth(np.zeros(5)) == (0, 0)  # no effect at all (a factor that never acts): no noise either


def test_the_confirmations_margin_counts_both_means_and_a_zero_threshold():
    ok, margin = screen.reached([1.0, 1.1], [1.0, 1.2, 1.4], sigma=0.1, df=4)
    assert margin == pytest.approx(stats.t.ppf(0.975, 4) * 0.1 * np.sqrt(1 / 2 + 1 / 3)) and ok
    assert screen.reached([1.0], [1.0], 0.1, 4, threshold=0) == (True, 0)
    assert screen.reached([1.0], [1.01], 0.1, 4, threshold=0) == (False, 0)  # 0 is a threshold, not "none"


def test_one_replicate_degree_of_freedom_is_used_not_lenth():
    matrix, _ = screen.design(2)
    runs = synthetic(matrix, ["f0", "f1"], [0.2, 0.1], ((0, 1), 0.0), seeds=2, noise=0.01)
    one_more = pd.concat([runs[runs.seed == 0], runs[runs.seed == 1].head(1)])  # 5 runs, 4 columns: df 1
    result = screen.estimate_effects(one_more, "val_action_error", ["f0", "f1"])
    assert result["method"] == "replicates" and result["df"] == 1


def test_a_screen_split_of_no_group_is_refused(tmp_path):
    study = load_study()
    with pytest.raises(SystemExit) as e:
        study.main(["screen", "--a", "recipe=original", "--b", "recipe=fixed", "--split", "optm", "--dry-run",
                    "--out", str(tmp_path)])
    assert str(e.value).startswith("error: --split optm: not a config group; the groups are ")
    assert not any(tmp_path.iterdir())


def test_a_main_effect_that_missing_runs_leave_inestimable_is_named():
    names = ["f0", "f1", "f2"]
    runs = synthetic(screen.design(3, max_runs=8)[0], names, [0.3, 0.2, 0.1], ((0, 1), 0.0))
    runs.loc[runs["level:f0"] == 1, "val_action_error"] = np.nan  # every run with f0 at B's level diverged
    res = screen.estimate_effects(runs, "val_action_error", names)
    assert "runs missing from whole rows leave main effects inestimable: f0" in res["notes"]


def test_a_confirmation_step_the_design_already_ran_keeps_the_designs_config(tmp_path):
    a, b = Side("recipe=original", "A"), Side("recipe=original init=xavier_all optim.lr=0.0001", "B")
    facs, _ = screen.factors(a, b)
    screen.write_configs(tmp_path, [([1, -1], "design")], facs, a, b)
    screen.write_configs(tmp_path, [([1, -1], "confirm"), ([-1, 1], "confirm")], facs, a, b)
    part = lambda name: OmegaConf.load(tmp_path / "screen" / f"{name}.yaml").design.part
    assert part("x10") == "design" and part("x01") == "confirm"  # its runs count for both


@pytest.mark.parametrize("k", [4, 5, 8, 10, 12, 14])
def test_the_smallest_resolution_iv_fractions_are_resolution_iv(k):
    """4 factors in 8 runs is one that pyDOE3's fracfact_by_res refuses: the screen writes its generators itself."""
    runs = screen.min_runs(k, 4)
    matrix, desc = screen.design(k, max_runs=runs)
    assert matrix.shape == (runs, k) and screen.stated_resolution(matrix) >= 4 and desc["resolution"] >= 4


def test_replicated_intervals_are_the_pooled_two_sample_intervals_by_hand():
    """A full 2^2 with 3 seeds: the saturated model fits the 4 cell means, so sigma is the pooled within-cell
    standard deviation (8 df) and each effect's interval is a difference of two means of 6 runs."""
    matrix, _ = screen.design(2)
    runs = synthetic(matrix, ["f0", "f1"], [0.2, -0.1], ((0, 1), 0.0), seeds=3, noise=0.05)
    res = screen.estimate_effects(runs, "val_action_error", ["f0", "f1"])
    cells = runs.groupby("design_name").val_action_error
    s2 = ((runs.val_action_error - cells.transform("mean")) ** 2).sum() / 8
    assert res["method"] == "replicates" and res["df"] == 8 and res["sigma"] == pytest.approx(np.sqrt(s2))
    e = res["effects"].set_index("term")
    for name in ("f0", "f1"):
        high = runs[f"level:{name}"] == 1
        diff = runs.val_action_error[high].mean() - runs.val_action_error[~high].mean()
        half = stats.t.ppf(0.975, 8) * np.sqrt(s2 * (1 / 6 + 1 / 6))
        assert (e.loc[name, "effect"], e.loc[name, "lo"], e.loc[name, "hi"]) == pytest.approx(
            (diff, diff - half, diff + half))


def test_replicates_that_agree_exactly_leave_no_noise_to_use_and_lenth_is_used():
    matrix, _ = screen.design(2)
    runs = synthetic(matrix, ["f0", "f1"], [0.2, -0.1], ((0, 1), 0.05), seeds=2, noise=0.0)
    res = screen.estimate_effects(runs, "val_action_error", ["f0", "f1"])
    assert res["method"] == "lenth" and res["sigma"] is None


def test_two_runs_are_enough_to_analyse_one_fewer_is_not():
    runs = synthetic(np.array([[-1], [1]]), ["f0"], [0.3], ((0, 0), 0.0), seeds=1, noise=0.0)  # A and B alone
    res = screen.estimate_effects(runs, "val_action_error", ["f0"])
    assert "error" not in res and res["effects"].set_index("term").loc["f0", "effect"] == pytest.approx(0.3)
    runs.loc[0, "val_action_error"] = np.nan
    assert screen.estimate_effects(runs, "val_action_error", ["f0"])["error"].startswith("1 runs with a finite")


def test_one_factor_that_recovers_b_is_compared_with_a_and_a_failed_left_out_step_does_not_count():
    names = ["lr", "init"]
    result = {"effects": pd.DataFrame({"term": names, "effect": [-0.3, -0.2]}), "sigma": 0.01, "df": 8}
    plan = screen.confirmation(plan_runs({"A": [0.5, 0.5], "B": [0.1, 0.1], "x10": [0.1, 0.1]}),
                               "val_action_error", names, result)
    assert plan["reached"] == 1 and plan["next"] is None
    assert screen.sentence(plan) == ("1 of the 2 differences (lr) recovers B's val action error: 0.1 ± 0 against "
                                     "B's 0.1 ± 0; without lr they do not (0.5 ± 0)")
    names = ["lr", "init", "clip"]
    result = {"effects": pd.DataFrame({"term": names, "effect": [-0.3, -0.2, -0.01]}), "sigma": 0.01, "df": 8}
    runs = {"A": [0.5, 0.5], "B": [0.1, 0.1], "x100": [0.3, 0.3], "x110": [0.1, 0.1], "x010": [np.nan, np.nan]}
    plan = screen.confirmation(plan_runs(runs), "val_action_error", names, result)  # init alone: all runs failed
    assert plan["reached"] == 2 and plan["without"] == [{"left_out": "lr", "name": "x010", "values": [],
                                                         "reached": False}]


def test_the_analysis_does_not_depend_on_the_metrics_units():
    """An action error in metres or in micrometres: the same method, and effects and intervals in proportion."""
    matrix, _ = screen.design(3)
    runs = synthetic(matrix, ["f0", "f1", "f2"], [0.2, -0.1, 0.0], ((0, 1), 0.0), seeds=2, noise=0.01)
    small = runs.assign(val_action_error=runs.val_action_error * 1e-6)
    big, tiny = (screen.estimate_effects(r, "val_action_error", ["f0", "f1", "f2"]) for r in (runs, small))
    assert big["method"] == tiny["method"] == "replicates"
    assert tiny["effects"][["effect", "lo", "hi"]].to_numpy() == pytest.approx(
        big["effects"][["effect", "lo", "hi"]].to_numpy() * 1e-6)


def budget_runs(values, baseline=0.2):
    """Runs at a second budget: {configuration: errors by seed}, each run with one baseline's error beside it."""
    return pd.DataFrame([{"design_name": n, "seed": s, "val_action_error": v, "baseline_mean_chunk": baseline}
                         for n, vs in values.items() for s, v in enumerate(vs)])


def test_the_confirmation_at_a_second_budget_holds_or_says_what_the_budgets_disagree_about():
    names, chosen = ["lr", "clip", "init"], ["lr", "init"]
    check = screen.budget_check(budget_runs({}), "val_action_error", names, chosen)
    assert check["next"] == [[0, 0, 0], [1, 1, 1]]  # A and B first
    values = {"A": [0.5, 0.52], "B": [np.nan, np.inf]}
    check = screen.budget_check(budget_runs(values), "val_action_error", names, chosen)
    assert check["next"] is None and check["b_beats"] == [0, 2]
    assert screen.budget_sentence({**check, "label": "the working budget"}) == (
        "At the working budget: B's runs have no finite val_action_error at this budget: nothing can be confirmed "
        "there; B's policies do not beat every baseline there (0 of 2 seeds): this verdict is about policies that do "
        "not work yet")
    values["B"] = [0.1, 0.11]
    check = screen.budget_check(budget_runs(values), "val_action_error", names, chosen)
    assert check["next"] == [[1, 0, 1], [0, 0, 1], [1, 0, 0]]  # the set, without lr, without init: one multirun
    values.update(x101=[0.105, 0.1], x001=[0.3, 0.31], x100=[0.4, 0.42])
    check = screen.budget_check(budget_runs(values), "val_action_error", names, chosen)
    assert check["holds"] and check["not_needed"] == [] and check["b_beats"] == [2, 2]
    assert screen.budget_sentence({**check, "label": "the working budget"}) == (
        "At the working budget the verdict holds: A plus lr, init gives 0.103 ± 0.0035 against B's 0.105 ± 0.0071, "
        "and without lr 0.305 ± 0.0071, init 0.41 ± 0.014 it does not; B's policies beat every baseline there in 2 "
        "of 2 seeds")
    values["x001"] = [0.1, 0.104]  # init alone reaches B here: lr is not needed at this budget
    check = screen.budget_check(budget_runs(values, baseline=0.101), "val_action_error", names, chosen)
    assert not check["holds"] and check["not_needed"] == ["lr"] and check["b_beats"] == [1, 2]
    text = screen.budget_sentence({**check, "label": "the working budget"})
    assert text.startswith("At the working budget A plus lr, init gives 0.103 ± 0.0035 against B's 0.105 ± 0.0071, "
                           "but the budgets disagree: without lr it still reaches B (0.102 ± 0.0028); this budget's "
                           "verdict stands: init is needed there; B's policies do not beat every baseline there "
                           "(1 of 2 seeds)")
    values["x101"] = [0.3, 0.3]  # the set falls short, init alone reaches B: lr keeps the set from B here
    check = screen.budget_check(budget_runs(values), "val_action_error", names, chosen)
    assert not check["holds"] and check["not_needed"] == ["lr"]
    assert screen.budget_sentence({**check, "label": "the working budget"}).startswith(
        "At the working budget the verdict does not hold: A plus lr, init gives 0.3 ± 0 against B's 0.105 ± 0.0071, "
        "but without lr it reaches B (0.102 ± 0.0028): the budgets disagree about lr, which keeps the set from B "
        "there (this budget's verdict stands; whether init is needed without it was not run there); ")
    values["x001"] = [0.3, 0.31]  # and nothing short of the set reaches B either: more changes matter
    check = screen.budget_check(budget_runs(values), "val_action_error", names, chosen)
    assert not check["holds"] and check["not_needed"] == [] and screen.budget_sentence(
        {**check, "label": "the working budget"}).startswith(
        "At the working budget the verdict does not hold: A plus lr, init gives 0.3 ± 0 against B's 0.105 ± 0.0071, "
        "so more changes matter there (this budget's verdict stands; screen at it to find them); ")
    values["x001"] = [0.1, 0.104]
    # the margin is the pooled seed noise of this budget's five configurations (5 df): by hand
    values["x101"] = [0.105, 0.1]
    check = screen.budget_check(budget_runs(values), "val_action_error", names, chosen)
    groups = [np.array(v) for v in values.values()]
    sigma = np.sqrt(sum(((g - g.mean()) ** 2).sum() for g in groups) / 5)
    margin = stats.t.ppf(0.975, 5) * sigma * np.sqrt(1 / 2 + 1 / 2)
    assert 0.003 < margin < 0.3  # so: the set and the set without lr reach B, the set without init does not
    assert [check["with_set"]["reached"], *(w["reached"] for w in check["without"])] == [True, True, False]
    check = screen.budget_check(budget_runs(values), "val_action_error", names, chosen, threshold=0.002)
    assert [check["with_set"]["reached"], *(w["reached"] for w in check["without"])] == [False, False, False]


@pytest.mark.parametrize("budget, message", [
    ("bogus", "--confirm-budget 'bogus': give a budget (working, quick) or quoted Hydra overrides (key=value ...)"),
    ("epochs=abc", "--confirm-budget 'epochs=abc': epochs='abc': must be an integer >= 1"),
    ("epochs=2 nosuch.key=1", "--confirm-budget 'epochs=2 nosuch.key=1' does not compose: Could not override "
                              "'nosuch.key'."),
    ("'epochs=2", "--confirm-budget \"'epochs=2\": No closing quotation")])
def test_a_confirmation_budget_that_is_neither_a_budget_nor_overrides_is_refused_in_one_line(tmp_path, budget, message):
    study = load_study()
    with pytest.raises(SystemExit) as e:
        study.main(["screen", "--a", "recipe=original", "--b", "recipe=fixed", "--seeds", "0,1", "--out",
                    str(tmp_path / "s"), "--confirm-budget", budget])
    assert str(e.value.code).startswith(f"error: {message}") and "\n" not in str(e.value.code)
    assert not any(tmp_path.iterdir())  # refused before anything ran or was written


def test_a_screen_confirms_again_at_the_working_budget_unless_it_ran_there(tmp_path, capsys):
    study = load_study()
    args = ["screen", "--a", "recipe=original", "--b", "recipe=original init=xavier_all optim.lr=0.0001", "--seeds", "0,1",
            "--dry-run", "--out", str(tmp_path / "s")]
    assert study.main([*args, "--budget", "quick"]) == 0
    assert capsys.readouterr().out.strip().splitlines()[-1].endswith(
        f"then the set found again at the working budget (epochs=3 eval.epoch_samples=64) into {tmp_path / 's'}_confirm "
        "(A, B, the set and the set without each factor, 2 runs each); nothing launched")
    assert study.main(args) == 0  # the study's own budget is the working one: the confirmation ran there
    assert capsys.readouterr().out.strip().splitlines()[-1].endswith("(2 runs each, at most 3); nothing launched")
    # where the second budget composes to the study's own, the confirmation already ran there: nothing runs twice
    assert study.second_budget("working", "working", []) is None
    assert study.second_budget("quick", "quick", ["data.episodes=20"]) is None
    assert study.second_budget("epochs=3", "working", []) is None  # overrides that change nothing
    assert study.second_budget("epochs=2", "working", ["seed=4"]) == (
        "the confirmation budget (epochs=2)", ["epochs=3", "eval.epoch_samples=64", "seed=4", "epochs=2"])
    assert not (tmp_path / "s").exists()
