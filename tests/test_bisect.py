"""Sequential bifurcation (vla_exp/attribution/bisect.py) against responses whose important factors are known."""
import json

import numpy as np
import pytest

from vla_exp import UsageError
from vla_exp.attribution import bisect as bs
from vla_exp.attribution import screen as sc


def linear(beta, pairs=(), sigma=0.0, rng=None, fail=()):
    """respond() of y = beta.x + sum gamma x_a x_b + noise; configurations in `fail` always fail. Records every
    request."""
    asked = []

    def respond(requests):
        asked.extend(requests)
        out = []
        for config, _ in requests:
            x = np.asarray(config, dtype=float)
            y = float(np.dot(beta, x) + sum(g * x[a] * x[b] for a, b, g in pairs))
            out.append(float("nan") if config in fail else y + (rng.normal(0, sigma) if sigma else 0.0))
        return out
    respond.asked = asked
    return respond


def test_noise_free_it_names_exactly_the_factors_that_matter():
    beta = np.zeros(16)
    beta[[2, 9, 13]] = [0.1, 0.15, 0.09]
    found = bs.bisect(16, linear(beta), delta0=0.02, delta1=0.08, n0=2)
    assert found["important"] == [2, 9, 13]
    assert all(t.decision in ("important", "unimportant") for t in found["tests"])
    # A and B, then two configurations (one and its mirror) at each split of an important group: 9 splits here,
    # 20 configurations against the 32 of the resolution IV screen
    splits = sum(t.decision == "important" and t.size > 1 for t in found["tests"])
    assert len({c for c, _ in found["values"]}) == 2 + 2 * splits == 20 < sc.min_runs(16, 4)


def test_a_change_that_helps_only_with_another_is_found_through_the_mirror():
    """Factor 1 does nothing alone and 0.2 with factor 6: with A's levels around it (the prefix configurations
    alone) its group reads 0; the foldover's average reads its main effect, 0.1."""
    beta = np.zeros(8)
    beta[6] = 0.1
    respond = linear(beta, pairs=[(1, 6, 0.2)])
    found = bs.bisect(8, respond, delta0=0.02, delta1=0.08, n0=2)
    assert found["important"] == [1, 6]
    one = next(t for t in found["tests"] if (t.lo, t.hi) == (1, 2))
    assert one.estimates == pytest.approx([0.1, 0.1])
    prefix_only = respond([(bs.levels(2, 8), 0)])[0] - respond([(bs.levels(1, 8), 0)])[0]
    assert prefix_only == 0.0


def test_each_configuration_and_seed_is_run_once_and_a_and_b_are_the_ends():
    beta = np.zeros(9)
    beta[[0, 4]] = 0.2
    respond = linear(beta, sigma=0.02, rng=np.random.default_rng(1))
    found = bs.bisect(9, respond, delta0=0.02, delta1=0.08, n0=3)
    assert len(respond.asked) == len(set(respond.asked)) == len(found["values"])
    configs = {c for c, _ in respond.asked}
    assert (0,) * 9 in configs and (1,) * 9 in configs
    assert found["tests"][0].estimates[0] == pytest.approx(found["values"][((1,) * 9, 0)] - found["values"][((0,) * 9, 0)])


def test_kim_test_decides_by_the_sign_when_its_region_has_closed_and_waits_inside_it():
    assert bs.kim_test([0.1, 0.1], 2, 0.05, 0.02, 0.08) == "important"  # no spread: the region is closed
    assert bs.kim_test([0.01, 0.01], 2, 0.05, 0.02, 0.08) == "unimportant"
    assert bs.kim_test([0.3, -0.2, 0.1], 3, 0.05, 0.02, 0.08) is None  # noisy: one more replicate
    assert bs.kim_test([0.3, -0.2, 0.1] + [0.5] * 60, 3, 0.05, 0.02, 0.08) == "important"


def test_error_rates_on_a_small_simulated_batch():
    """200 cases, seed noise 0.1 a run: a factor of effect 0 is named in at most alpha of them (plus binomial
    slack), one of effect 0.2 (well above delta1) in nearly all."""
    rng = np.random.default_rng(0)
    named_null, named_big = 0, 0
    for _ in range(200):
        beta = np.zeros(4)
        beta[3] = 0.2
        found = bs.bisect(4, linear(beta, sigma=0.1, rng=rng), delta0=0.02, delta1=0.08, n0=3)
        named_null += 0 in found["important"]
        named_big += 3 in found["important"]
    assert named_null / 200 <= 0.05 + 0.03
    assert named_big / 200 >= 0.9


def test_failed_runs_are_replaced_once_then_the_group_cannot_tell():
    beta = np.zeros(4)
    beta[[0, 3]] = 0.2
    broken = bs.levels(2, 4, mirror=True)  # every run of this configuration fails
    found = bs.bisect(4, linear(beta, fail={broken}), delta0=0.02, delta1=0.08, n0=2)
    decisions = {(t.lo, t.hi): t.decision for t in found["tests"]}
    assert decisions[(0, 4)] == "important"
    assert decisions[(0, 2)] == decisions[(2, 4)] == "cannot tell"  # both halves need the broken configuration
    assert found["important"] == []


@pytest.mark.parametrize("kwargs, message", [
    (dict(delta0=0.1, delta1=0.05), "--delta0 0.1 and --delta1 0.05: need 0 <= delta0 < delta1"),
    (dict(delta0=0.02, delta1=0.08, n0=1), "1 replicate to start each group test"),
])
def test_settings_that_cannot_work_are_one_line(kwargs, message):
    with pytest.raises(UsageError, match=message.replace("(", r"\(")):
        bs.bisect(4, linear(np.zeros(4)), **kwargs)


def test_the_screen_analyses_32_factors_without_enumerating_every_word():
    matrix, desc = sc.design(32, max_runs=64)
    classes = sc.effect_columns(matrix)
    assert desc["resolution"] == 4 and len(classes) == 63
    assert [w for w, _ in classes[:32]] == [(i,) for i in range(32)]
    assert all(len(w) == 3 for _, aliases in classes[:32] for w, _ in aliases)  # resolution IV: mains with 3fis only


@pytest.mark.slow
def test_a_bisect_study_runs_a_and_b_goes_on_with_new_seeds_and_reports(tmp_path):
    """delta1 far below the seed noise: the root test cannot decide, takes a fourth seed (3, past --seeds 0,1,2),
    then stops at --max-seeds and says it cannot tell; every figure is the runs'."""
    from test_sweep import SMOKE, cli, summaries
    out = cli("-m", "vla_exp.attribution.studies", "screen", "--method", "bisect", "--a", "recipe=original", "--b",
              "recipe=original init=xavier_all optim.lr=0.0001", "--seeds", "0,1,2", "--delta0", "0",
              "--delta1", "1e-9", "--max-seeds", "4", "--jobs", "1", "--out", str(tmp_path), *SMOKE, "logger=none",
              "epochs=1", "data.episodes=6")
    assert out.returncode == 0, out.stderr[-3000:]
    runs = summaries(tmp_path)
    assert sorted((s["design"]["name"], s["seed"]) for s in runs.values()) == [
        (n, seed) for n in ("A", "B") for seed in range(4)]
    plan = json.loads((tmp_path / "bisect.json").read_text())
    root, = plan["tests"]
    assert root["decision"] == "cannot tell" and root["seeds"] == [0, 1, 2, 3] and plan["important"] == []
    error = {(s["design"]["name"], s["seed"]): s["val_action_error"] for s in runs.values()}
    toward = 1 if np.mean([error["B", s] for s in range(3)]) >= np.mean([error["A", s] for s in range(3)]) else -1
    assert plan["toward"] == toward
    assert root["estimates"] == pytest.approx([toward * (error["B", s] - error["A", s]) for s in range(4)])
    sentence = (tmp_path / "bisect.md").read_text().strip()
    assert sentence == bs.sentence(plan) and sentence in out.stdout
    assert sentence.startswith("At the study's budget (epochs=3 eval.epoch_samples=64 debug=smoke")
    assert ", none of the 2 differences" in sentence and "cannot tell for init, optim.lr" in sentence
    beat = sum(s["beats_baselines"] for s in runs.values() if s["design"]["name"] == "B")  # no set: nothing to confirm
    assert plan["budget"]["same"] and plan["budget"]["b_beats"] == [beat, 4]
    assert sentence.endswith(f"B's policies beat every baseline there in 4 of 4 seeds" if beat == 4 else
                             f"B's policies do not beat every baseline there ({beat} of 4 seeds): this verdict is "
                             "about policies that do not work yet")
    dashboard = (tmp_path / "report" / "dashboard.html").read_text()
    assert dashboard.index("Bisection: which differences carry B") < dashboard.index("Results per cell")
    assert f"## Bisection\n\n{sentence}" in (tmp_path / "report" / "analysis.md").read_text()


def test_bisect_settings_are_refused_before_anything_runs(tmp_path, capsys):
    from vla_exp.attribution import studies
    for argv, message in (
            (["--seeds", "0,1"], "--method bisect starts each group test with the seeds given and needs three or more"),
            (["--max-seeds", "2"], "--max-seeds 2: must be at least the 3 seeds each group test starts with"),
            (["--delta0", "0.1", "--delta1", "0.05"], "--delta0 0.1 and --delta1 0.05: need 0 <= delta0 < delta1"),
            (["--method", "bisector"], "argument --method: invalid choice: 'bisector' (choose from 'design', 'bisect')")):
        with pytest.raises(SystemExit) as e:  # argparse's errors go to stderr, the study's in the exit
            studies.main(["screen", "--method", "bisect", "--a", "recipe=original", "--b", "recipe=fixed",
                          "--seeds", "0,1,2", "--out", str(tmp_path), *argv])
        assert message in capsys.readouterr().err + str(e.value)
    assert not any(tmp_path.iterdir())
