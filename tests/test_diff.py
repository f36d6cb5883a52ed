"""vla-exp-diff: every difference between two recipes or runs, grouped into factors."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from vla_exp.attribution.diff import Side, diff, main

ROOT = Path(__file__).resolve().parent.parent


def factors(d):
    return {f["factor"]: f for f in d["factors"]}


def test_the_two_recipes_differ_in_the_four_fix_groups():
    d = diff(Side("recipe=original", "A"), Side("recipe=fixed", "B"))
    f = factors(d)
    assert list(f) == ["clipping", "init", "loss_handling", "optim"]
    assert (f["optim"]["a"], f["optim"]["b"], f["optim"]["kind"]) == ("original", "fixed", "group")
    assert f["optim"]["leaves"] == {"optim.batch_size": [16, 8], "optim.lr": [0.001, 0.0001],
                                    "optim.schedule._target_": ["vla_exp.fixes.ConstantLR", "vla_exp.fixes.CosineLR"],
                                    "optim.schedule.eta_min_ratio": ["(absent)", 0.1]}
    assert f["init"]["leaves"]["init.gain"] == ["(absent)", 0.5]
    assert d["labels"]["recipe"] == ["original", "fixed"] and "optim.name" in d["labels"]
    assert d["not_results"] == {}


def test_split_makes_each_leaf_a_factor_and_names_what_cannot_change_alone():
    f = factors(diff(Side("recipe=original", "A"), Side("recipe=fixed", "B"), split=["optim"]))
    assert {"optim.lr", "optim.batch_size", "optim.schedule._target_", "optim.schedule.eta_min_ratio"} <= set(f)
    assert "optim" not in f and f["optim.lr"]["composable"] and f["optim.lr"]["kind"] == "key"
    eta = f["optim.schedule.eta_min_ratio"]
    assert not eta["composable"] and eta["note"] == ("optim.schedule.eta_min_ratio exists on B only: it cannot be "
                                                     "changed alone; leave optim unsplit, or give both sides the key")


def test_a_changed_value_inside_one_group_option_is_a_factor_of_its_own():
    f = factors(diff(Side("recipe=fixed", "A"), Side("recipe=fixed optim.lr=0.0003 adamw.betas=[0.9,0.95]", "B")))
    assert set(f) == {"optim.lr", "adamw.betas"} and f["adamw.betas"]["b"] == [0.9, 0.95]


def test_a_list_of_overrides_longer_than_a_file_name_is_read_as_overrides():
    many = " ".join(f"model.lora.{k}={v}" for k, v in [("r", 32), ("alpha", 64), ("dropout", 0.1), ("lr", 1e-4)])
    b = f"recipe=reported_script {many} diverge_after=50 converge_loss=0.05 early_stop.min_delta=0.001 " * 2
    assert len(b) > 255  # past NAME_MAX: asking the file system whether it is a folder raises ENAMETOOLONG
    f = factors(diff(Side("recipe=reported_script", "A"), Side(b, "B")))
    assert set(f) == {"model.lora.r", "model.lora.alpha", "model.lora.dropout", "model.lora.lr", "diverge_after",
                      "converge_loss", "early_stop.min_delta"}


def test_keys_that_decide_nothing_are_listed_apart_never_as_factors():
    d = diff(Side("recipe=fixed", "A"), Side("recipe=fixed logger=none threads=1 progress=false", "B"))
    assert d["factors"] == [] and {"threads", "progress", "logger.kind"} <= set(d["not_results"])


def test_identical_configs_say_so(capsys):
    main(["recipe=fixed", "recipe=fixed init=xavier"])
    assert capsys.readouterr().out.strip().endswith("A and B are the same config: nothing differs")


@pytest.mark.parametrize("args,message", [
    (["recipe=nope", "recipe=fixed"], "error: A: 'recipe=nope' is neither a run folder nor valid overrides ("),
    (["recipe=fixed", "optim.lr=="], "error: B: 'optim.lr==' is neither a run folder nor valid overrides ("),
    (["recipe=fixed", "recipe=original", "--split", "optimizer"],
     "error: --split optimizer: not a config group; the groups are clipping, data, init, logger, loss_handling, "
     "model, optim"),
])
def test_bad_sides_are_one_line_naming_them(args, message):
    with pytest.raises(SystemExit) as e:
        main(args)
    assert str(e.value).startswith(message) and "\n" not in str(e.value)


def test_a_folder_that_is_no_run_is_named(tmp_path):
    with pytest.raises(SystemExit) as e:
        main([str(tmp_path), "recipe=fixed"])
    assert str(e.value) == (f"error: A: {tmp_path} is a folder without .hydra/config.yaml (the config a run of "
                            "vla-exp-train saves): give a run folder or a list of overrides")


@pytest.mark.slow
def test_run_folders_show_what_differs_outside_the_config_too(tmp_path):
    for name, extra in (("a", []), ("b", ["optim.lr=0.0003", "data.episodes=7"])):
        subprocess.run([sys.executable, "-m", "vla_exp.training.main", "debug=smoke", "logger=none", "progress=false", *extra,
                        f"hydra.run.dir={tmp_path / name}"], cwd=ROOT, check=True, capture_output=True, env=os.environ)
    summary = json.loads((tmp_path / "a" / "summary.json").read_text())
    summary["versions"]["transformers"] = "4.37.1"  # as a run made with an older transformers records it
    (tmp_path / "a" / "summary.json").write_text(json.dumps(summary))
    out = subprocess.run([sys.executable, "-m", "vla_exp.attribution.diff", str(tmp_path / "a"), str(tmp_path / "b"), "--json"],
                         cwd=ROOT, capture_output=True, text=True, env=os.environ)
    assert out.returncode == 0, out.stderr[-2000:]
    d = json.loads(out.stdout)
    assert set(factors(d)) == {"optim.lr", "data.episodes"}
    o = d["outside_config"]
    assert o["versions"]["transformers"][0] == "4.37.1" and o["note"].startswith("transformers 4.37.1 against 5.")
    assert o["data"][0] != o["data"][1] and all("(" in x for x in o["data"])  # another cache entry, with its hash
    assert set(o["normalization"]) <= {"action_min", "action_max", "action_mean", "action_std", "qpos_mean",
                                       "qpos_std"} and o["normalization"]


def test_a_saved_configs_environment_is_not_read(tmp_path, monkeypatch):
    """${oc.env:...} in a run folder's config is shown as written: its value may be a secret, or unset here."""
    from omegaconf import OmegaConf
    from vla_exp.config import compose
    from vla_exp.attribution.diff import text
    for name, token in (("a", "${oc.env:VLA_TEST_SECRET}"), ("b", "${oc.env:VLA_TEST_UNSET}")):
        cfg = compose("recipe=fixed")
        cfg.paths.cache_dir = token
        (tmp_path / name / ".hydra").mkdir(parents=True)
        OmegaConf.save(cfg, tmp_path / name / ".hydra" / "config.yaml")
    monkeypatch.setenv("VLA_TEST_SECRET", "hunter2")
    monkeypatch.delenv("VLA_TEST_UNSET", raising=False)
    d = diff(Side(str(tmp_path / "a"), "A"), Side(str(tmp_path / "b"), "B"))
    assert d["not_results"] == {"paths.cache_dir": ["${oc.env:VLA_TEST_SECRET}", "${oc.env:VLA_TEST_UNSET}"]}
    assert "hunter2" not in text(d) and "${oc.env:VLA_TEST_SECRET}" in text(d)


def test_the_head_loading_line_is_at_transformers_4_54():
    from vla_exp.attribution.diff import older
    assert older("4.53.3") and not older("4.54.0") and not older("5.24.0")


def test_settings_that_decide_nothing_are_still_a_difference(capsys):
    from vla_exp.attribution.diff import text
    shown = text(diff(Side("recipe=fixed", "A"), Side("recipe=fixed threads=2 progress=false", "B")))
    assert "same config" not in shown and "not results (never factors):" in shown and "threads: null -> 2" in shown


def test_a_data_folders_fingerprint_follows_its_manifest(tmp_path):
    from vla_exp.attribution.diff import fingerprint
    (tmp_path / "manifest.json").write_text('{"a": 1}')
    before = fingerprint(str(tmp_path))
    (tmp_path / "manifest.json").write_text('{"a": 2}')
    assert fingerprint(str(tmp_path)) != before and str(tmp_path) in before


def saved_run(folder, cfg=None, hydra=None):
    """A run folder's .hydra as Hydra saves it: the composed config, and its record of the choices."""
    from omegaconf import OmegaConf
    from vla_exp.config import compose
    (folder / ".hydra").mkdir(parents=True)
    if cfg is None:
        cfg = OmegaConf.to_yaml(compose("recipe=fixed"))
    (folder / ".hydra" / "config.yaml").write_text(cfg)
    if hydra is not None:
        (folder / ".hydra" / "hydra.yaml").write_text(hydra)
    return folder


@pytest.mark.parametrize("cfg, hydra, message", [
    ("optim: [unclosed", None, "config.yaml is not valid YAML ("),
    ("- 1\n- 2\n", None, "config.yaml holds a YAML list, not a config (a mapping of keys)"),
    (None, "- 1\n", "hydra.yaml holds a YAML list, not Hydra's record of the run (a mapping of keys)"),
    (None, "hydra:\n  runtime: {}\n", "hydra.yaml has no hydra.runtime.choices mapping (not written by Hydra?)"),
])
def test_a_run_folders_saved_yaml_of_the_wrong_shape_is_one_line(tmp_path, cfg, hydra, message):
    folder = saved_run(tmp_path / "run", cfg, hydra)
    with pytest.raises(SystemExit) as e:
        main([str(folder), "recipe=fixed"])
    assert str(e.value).startswith(f"error: A: {folder / '.hydra'}/") and message in str(e.value)
    assert "\n" not in str(e.value)


def test_a_key_the_project_has_not_is_refused_from_a_folder_or_the_command_line(tmp_path):
    from omegaconf import OmegaConf
    from vla_exp.config import compose
    cfg = compose("recipe=fixed")
    OmegaConf.update(cfg, "init.fname", "/tmp/planted", force_add=True)  # a hand-edited run folder
    folder = saved_run(tmp_path / "run", OmegaConf.to_yaml(cfg))
    with pytest.raises(SystemExit) as e:
        main([str(folder), "recipe=fixed"])
    assert str(e.value) == f"error: A: {folder} sets init.fname, which is no key of the project's config"
    with pytest.raises(SystemExit) as e:
        main(["recipe=fixed", "recipe=fixed +init.fname=x +extra.a=1"])
    assert str(e.value) == ("error: B: recipe=fixed +init.fname=x +extra.a=1 sets init.fname, which is no key of the "
                            "project's config (1 more)")
    assert Side(str(saved_run(tmp_path / "plain")), "A").leaves == Side("recipe=fixed", "B").leaves


def test_what_differs_outside_the_config_is_printed_side_by_side(tmp_path):
    from vla_exp.attribution.diff import text
    for name, version, data in (("a", "4.37.1", "/data/one"), ("b", "5.24.0", "/data/two")):
        folder = saved_run(tmp_path / name)
        (folder / "summary.json").write_text(json.dumps({"versions": {"transformers": version, "torch": "2.13.0"},
                                                         "data_dir": data}))
    (tmp_path / "b" / "normalization.json").write_text(json.dumps({"action_min": [0.0], "action_max": [1.0]}))
    d = diff(Side(str(tmp_path / "a"), "A"), Side(str(tmp_path / "b"), "B"))
    o = d["outside_config"]
    assert o["versions"] == {"transformers": ["4.37.1", "5.24.0"]}  # torch is the same: not listed
    assert o["normalization"] == {"action_max": [None, [1.0]], "action_min": [None, [0.0]]}  # A has none
    shown = text(d)
    assert f"  data: {o['data'][0]} -> {o['data'][1]}" in shown and o["data"][0] != o["data"][1]
    assert "  transformers 4.37.1 -> 5.24.0" in shown
    assert o["note"].startswith("transformers 4.37.1 against 5.24.0: from 4.54 on, from_pretrained initialises")
    assert f"  note: {o['note']}" in shown
    # 4.54.0 already initialises what a checkpoint lacks: no note against a newer one, nor where A's is unknown
    for version in ("4.54.0", None):
        (tmp_path / "a" / "summary.json").write_text(json.dumps({"versions": {"transformers": version}}))
        o = diff(Side(str(tmp_path / "a"), "A"), Side(str(tmp_path / "b"), "B"))["outside_config"]
        assert o["versions"] == {"transformers": [version, "5.24.0"], "torch": [None, "2.13.0"]} and "note" not in o
    # a folder against overrides: nothing outside a config to compare
    assert "outside_config" not in diff(Side(str(tmp_path / "a"), "A"), Side("recipe=fixed", "B"))


def test_a_group_factor_lists_its_leaves_under_it():
    from vla_exp.attribution.diff import text
    shown = text(diff(Side("recipe=original", "A"), Side("recipe=fixed", "B")))
    assert "  optim: original -> fixed\n" in shown and "      optim.lr: 0.001 -> 0.0001\n" in shown


@pytest.mark.parametrize("token", ["${ oc.env:VLA_TEST_SECRET}", "${oc.env: VLA_TEST_SECRET}",
                                   "x${oc.env:VLA_TEST_SECRET}", "${oc.decode:${oc.env:VLA_TEST_SECRET}}",
                                   "${hydra:runtime.cwd}", "${oc.env:VLA_TEST_UNSET}", "${now:%H}"])
def test_no_interpolation_in_a_folders_config_is_resolved(tmp_path, monkeypatch, token):
    """A folder's config is data: an interpolation of any form, anywhere, stays the text it is (a spaced resolver
    once printed the variable); only the project's own `${key}` references take the value they name."""
    from omegaconf import OmegaConf
    from vla_exp.config import compose
    from vla_exp.attribution import screen
    from vla_exp.attribution.diff import text
    monkeypatch.setenv("VLA_TEST_SECRET", "hunter2")
    monkeypatch.delenv("VLA_TEST_UNSET", raising=False)
    cfg = compose("recipe=fixed")
    cfg.data.camera = token
    record = {"hydra": {"runtime": {"choices": Side("recipe=fixed", "A").choices}}}
    folder = saved_run(tmp_path / "run", OmegaConf.to_yaml(cfg), OmegaConf.to_yaml(record))
    b = Side(str(folder), "B")
    d = diff(Side("recipe=fixed", "A"), b)
    assert [(f["factor"], f["b"]) for f in d["factors"]] == [("data.camera", token)]
    assert b.leaves["model.config.action_dim"] == compose("recipe=fixed").data.action_dim  # ${data.action_dim}
    assert "hunter2" not in text(d) and token in text(d)
    facs, _ = screen.factors(Side("recipe=fixed", "A"), b)
    assert "hunter2" not in screen.config_yaml([1], facs, "design", Side("recipe=fixed", "A"), b)


@pytest.mark.parametrize("value, message", [
    ("${no.such.key}", "data.camera=${no.such.key} names no value of the config"),
    ("${data.camera}", "data.camera=${data.camera} names a circle of references")])
def test_a_reference_to_nothing_in_a_folders_config_is_one_line(tmp_path, value, message):
    from omegaconf import OmegaConf
    from vla_exp.config import compose
    cfg = OmegaConf.to_yaml(compose("recipe=fixed")).replace("camera: top", f"camera: {value}")
    folder = saved_run(tmp_path / "run", cfg)
    with pytest.raises(SystemExit) as e:
        main(["recipe=fixed", str(folder)])
    assert str(e.value) == (f"error: B: {folder / '.hydra' / 'config.yaml'}: {message} (a config read from a folder "
                            "is data: its interpolations are not resolved)")


@pytest.mark.parametrize("option", ["bogus", "${oc.env:VLA_TEST_SECRET}"])
def test_a_folder_whose_hydra_record_names_no_option_is_one_line(tmp_path, monkeypatch, option):
    from omegaconf import OmegaConf
    monkeypatch.setenv("VLA_TEST_SECRET", "tint")  # resolved, it would pass for an option
    choices = {**Side("recipe=fixed", "A").choices, "data": option}
    folder = saved_run(tmp_path / "run", hydra=OmegaConf.to_yaml({"hydra": {"runtime": {"choices": choices}}}))
    with pytest.raises(SystemExit) as e:
        main([str(folder), "recipe=fixed"])
    assert str(e.value) == (f"error: A: {folder / '.hydra' / 'hydra.yaml'} names data={option}, which is no option "
                            "of data (the options: blocks, lerobot, metaworld, tint)")
