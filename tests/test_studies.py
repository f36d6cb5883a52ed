"""A study's hold on its folder, its arguments checked before anything is written, and a signal handed on to its
jobs: the running ones save and the same command resumes."""
import argparse
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from test_sweep import wait_for

from vla_exp.attribution import studies
from vla_exp.files import STUDY_LOCK, exclusive

ROOT = Path(__file__).resolve().parent.parent
TINY = ["debug=smoke", "progress=false", "logger=none", "epochs=1", "data.episodes=6"]


def refused(capsys, *argv):
    """The one line a study's command prints for bad input (argparse's or its own), with nothing launched."""
    with pytest.raises(SystemExit) as e:
        studies.main(list(argv))
    if e.value.code == 2:  # argparse: its usage, then one line
        return capsys.readouterr().err.strip().splitlines()[-1]
    return str(e.value.code)


@pytest.mark.parametrize("seeds, message", [
    ("0,0,0", "argument --seeds: '0,0,0': seed 0 is given 3 times; each seed is one replicate, so give distinct seeds"),
    ("1,2,1", "argument --seeds: '1,2,1': seed 1 is given 2 times; each seed is one replicate, so give distinct seeds"),
    ("a,b,c", "argument --seeds: 'a,b,c': 'a' is not a seed: each must be an integer from 0 to 4294967295"),
    ("0,,1", "argument --seeds: '0,,1': '' is not a seed: each must be an integer from 0 to 4294967295"),
    ("-1,0,1", "argument --seeds: '-1,0,1': '-1' is not a seed: each must be an integer from 0 to 4294967295"),
    ("4294967296", "argument --seeds: '4294967296': '4294967296' is not a seed: each must be an integer from 0 to "
                   "4294967295"),
    ("1_0", "argument --seeds: '1_0': '1_0' is not a seed: each must be an integer from 0 to 4294967295")])
@pytest.mark.parametrize("study", [["add_one"], ["screen", "--method", "bisect", "--a", "recipe=original", "--b",
                                                 "recipe=fixed"]])
def test_seeds_that_are_no_distinct_seeds_are_one_line_before_anything(tmp_path, capsys, seeds, message, study):
    for dry in ([], ["--dry-run"]):
        assert refused(capsys, *study, f"--seeds={seeds}", "--out", str(tmp_path / "s"), *dry) == \
            f"vla-exp-study: error: {message}"
    assert not any(tmp_path.iterdir())


def test_seeds_are_read_once_in_the_order_given():
    assert studies.seed_list(" 3,0 ,4294967295") == "3,0,4294967295"


@pytest.mark.parametrize("option, value, allowed", [
    ("--delta1", "inf", "must be a finite number > 0"), ("--delta1", "0", "must be a finite number > 0"),
    ("--delta0", "-0.1", "must be a finite number >= 0"), ("--delta0", "nan", "must be a finite number >= 0"),
    ("--threshold", "-1", "must be a finite number > 0"), ("--threshold", "abc", "must be a finite number > 0")])
def test_a_screens_numbers_must_be_finite_and_in_range(tmp_path, capsys, option, value, allowed):
    line = refused(capsys, "screen", "--a", "recipe=original", "--b", "recipe=fixed", "--out", str(tmp_path / "s"),
                   f"{option}={value}")
    assert line == f"vla-exp-study: error: argument {option}: {value!r}: {allowed}"
    assert not any(tmp_path.iterdir())


@pytest.mark.parametrize("method", ["design", "bisect"])
def test_a_screens_metric_must_be_a_figure_a_run_writes(tmp_path, capsys, method):
    """A misspelt --metric would be found only after the design's runs: refused before them."""
    line = refused(capsys, "screen", "--a", "recipe=original", "--b", "recipe=fixed", "--method", method,
                   "--metric", "val_action_eror", "--out", str(tmp_path / "s"))
    assert line.startswith("vla-exp-study: error: --metric val_action_eror: not a figure a run's summary holds; "
                           "one of initial_output_std, ") and "val_action_error" in line
    assert not any(tmp_path.iterdir())


@pytest.mark.parametrize("study", [["add_one"], ["screen", "--a", "recipe=original", "--b", "recipe=fixed"]])
def test_a_study_into_a_folder_a_sweep_holds_or_another_study_holds_writes_nothing(tmp_path, capsys, study):
    """A sweep running in the folder (its .lock), or another study (its STUDY_LOCK): one line, before anything is
    written, and nothing of theirs is touched."""
    out = tmp_path / "s"
    args = [*study, "--seeds", "0,1", "--jobs", "1", "--out", str(out), *TINY]
    with exclusive(out, "another sweep"):
        assert refused(capsys, *args) == f"error: {out} is in use by a run or sweep (pid {os.getpid()}): wait for " \
                                         "it to end, or give this one another folder"
    assert sorted(p.name for p in out.iterdir()) == [".lock"]
    with exclusive(out, "another study", lock=STUDY_LOCK):
        assert refused(capsys, *args) == f"error: {out} is in use by another study (pid {os.getpid()}): wait for " \
                                         "it to end, or give this one another folder"
    assert sorted(p.name for p in out.iterdir()) == [".lock", STUDY_LOCK]


@pytest.mark.parametrize("held, study, message", [
    ({"study": "screen", "a": "recipe=original", "b": "recipe=fixed", "method": "design"}, ["add_one"],
     "holds another study (study 'screen')"),
    ({"study": "add_one", "seeds": "0"}, ["screen", "--a", "recipe=original", "--b", "recipe=fixed"],
     "holds another study (study 'add_one')"),
    ({"study": "screen", "a": "recipe=original", "b": "recipe=fixed", "method": "bisect"},
     ["screen", "--a", "recipe=original", "--b", "recipe=fixed"],
     "holds another study (study 'screen', a 'recipe=original', b 'recipe=fixed', method 'bisect')"),
    ("a string", ["add_one"], "study.json is not a study's record")])
def test_a_study_never_takes_over_a_folder_another_study_made(tmp_path, capsys, held, study, message):
    out = tmp_path / "s"
    out.mkdir()
    (out / "study.json").write_text(json.dumps(held))
    line = refused(capsys, *study, "--seeds", "0,1", "--jobs", "1", "--out", str(out), *TINY)
    assert line.startswith("error: ") and message in line and "\n" not in line
    assert json.loads((out / "study.json").read_text()) == held
    assert sorted(p.name for p in out.iterdir()) == [STUDY_LOCK, "study.json"]


def test_a_study_whose_folder_is_a_file_is_one_line(tmp_path, capsys):
    (tmp_path / "f").write_text("mine")
    for study in (["add_one"], ["screen", "--a", "recipe=original", "--b", "recipe=fixed"]):
        line = refused(capsys, *study, "--seeds", "0,1", "--jobs", "1", "--out", str(tmp_path / "f"), *TINY)
        assert line == f"error: {tmp_path / 'f'} is a file, not a folder: the study folder {tmp_path / 'f'} cannot be " \
                       "made there; remove it or give another folder"
    assert (tmp_path / "f").read_text() == "mine"


@pytest.mark.slow  # a multirun process
def test_a_refused_multirun_stops_the_study_by_name(tmp_path):
    """The race the hold leaves (a sweep that takes the folder after the study looked): the multirun launches
    nothing, and the study says so rather than read the folder's runs as its own."""
    with exclusive(tmp_path, "another sweep"), pytest.raises(studies.Refused) as e:
        studies.launch(["seed=0", f"hydra.sweep.dir={tmp_path}", *TINY], [])
    assert str(e.value) == "the study's multirun launched nothing (the line above says why); the study stops there"


@pytest.mark.slow  # a study's multiruns, stopped and resumed
@pytest.mark.parametrize("jobs", ["1", "2"])
def test_ctrl_c_on_a_study_lets_its_running_jobs_save_then_the_same_command_resumes(tmp_path, jobs):
    """SIGINT to the study alone (as a terminal's Ctrl-C reaches it): it hands the signal on to its multirun's jobs
    (joblib workers too), waits while they write a checkpoint, starts no other, and ends in one line with no report.
    The same command resumes the stopped runs from their checkpoints and skips the finished ones."""
    args = [sys.executable, "-m", "vla_exp.attribution.studies", "add_one", "--seeds", "0", "--jobs", jobs,
            "--out", str(tmp_path), *TINY[:-2], "epochs=2", "data.episodes=40"]
    study = subprocess.Popen(args, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    started = lambda: [p for p in tmp_path.glob("*/metrics.jsonl") if p.read_text().count('"step"') >= 2]
    wait_for(started, study)
    study.send_signal(signal.SIGINT)
    _, err = study.communicate(timeout=300)
    assert study.returncode == 130 and "Traceback" not in err, err[-3000:]
    assert err.strip().splitlines()[-1] == ("interrupted by SIGINT: the running jobs saved a checkpoint and no report "
                                           "was written; the same command resumes the study and skips its finished runs")
    stopped = {p.parent.name: json.loads(p.read_text()) for p in tmp_path.glob("*/summary.json")}
    assert 1 <= len(stopped) <= int(jobs) and all(s["status"] == "interrupted" for s in stopped.values())
    assert all((tmp_path / name / "checkpoint.pt").is_file() for name in stopped)
    assert not (tmp_path / "report").exists() and not (tmp_path / "study.json").exists()
    assert not (tmp_path / ".stopping").exists()
    if jobs == "1":  # the resume is the same for both launchers: checked once
        return
    again = subprocess.run(args, cwd=ROOT, capture_output=True, text=True)
    assert again.returncode == 0, again.stderr[-3000:]
    done = {p.parent.name: json.loads(p.read_text()) for p in tmp_path.glob("*/summary.json")}
    assert len(done) == 5 and all(s["status"] == "completed" for s in done.values())
    assert all(done[name]["resumed_at_step"] > 0 for name in stopped)
    assert (tmp_path / "report" / "table.md").is_file()


@pytest.mark.slow  # an HTTP server in a process of its own
def test_a_ray_address_where_something_that_is_not_ray_answers_is_one_line_within_seconds(tmp_path):
    """Ray's own client retries any address for minutes; an HTTP server there, a port out of range and a port where
    nothing listens are each one line, under --dry-run too, before anything is written."""
    import socket
    import time
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = subprocess.Popen([sys.executable, "-m", "http.server", str(port), "--bind", "127.0.0.1"],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 30
        while socket.socket().connect_ex(("127.0.0.1", port)) and time.time() < deadline:
            time.sleep(0.1)
        cases = [(f"127.0.0.1:{port}", "something answers there, but not a Ray cluster's head (UNAVAILABLE; "
                                        "`ray start --head` starts one and prints its address)"),
                 ("127.0.0.1:99999", "port 99999 is out of range (1 to 65535)")]
        for address, message in cases:
            began = time.time()
            out = subprocess.run([sys.executable, "-m", "vla_exp.attribution.studies", "screen", "--a",
                                  "recipe=original", "--b", "recipe=fixed", "--dry-run", "--jobs-per-gpu", "2",
                                  "--ray-address", address, "--out", str(tmp_path / "s")],
                                 cwd=ROOT, capture_output=True, text=True, timeout=120)
            assert out.returncode == 2 and time.time() - began < 60
            assert out.stderr.strip().splitlines()[-1] == f"vla-exp-study: error: --ray-address {address}: {message}"
    finally:
        server.kill()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        free = s.getsockname()[1]
    with pytest.raises(studies.UsageError, match=rf"--ray-address 127.0.0.1:{free}: nothing answers there \("):
        studies.check_ray_head(f"127.0.0.1:{free}")
    assert not tmp_path.joinpath("s").exists()


def test_the_bounds_of_a_screens_numbers_are_where_they_are_said_to_be():
    assert studies.number(0)("0") == 0.0 and studies.number(0, above=True)("1e-9") == 1e-9
    with pytest.raises(argparse.ArgumentTypeError):
        studies.number(0, above=True)("0")


@pytest.mark.parametrize("address, message", [
    ("127.0.0.1:abc", "give the head's host:port, or auto for the cluster `ray start --head` started on this machine"),
    (":6379", "give the head's host:port, or auto for the cluster `ray start --head` started on this machine"),
    ("127.0.0.1:0", "port 0 is out of range (1 to 65535)"),
    ("127.0.0.1:65536", "port 65536 is out of range (1 to 65535)"),
    ("127.0.0.1:65535", "nothing answers there (Connection refused)"),
    ("127.0.0.1:1", "nothing answers there (Connection refused)")])
def test_a_ray_address_is_read_before_anything_is_asked_of_it(address, message):
    with pytest.raises(studies.UsageError) as e:
        studies.check_ray_head(address)
    assert str(e.value) == f"--ray-address {address}: {message}"


@pytest.mark.slow  # a joblib multirun
def test_a_signal_to_a_joblib_sweeps_process_alone_lets_its_running_jobs_finish_and_starts_no_more(tmp_path):
    """SIGTERM to the sweep's own process (not its group): its jobs did not get it and finish; the job not yet
    started does not start; the sweep says how to go on and exits 128 + 15."""
    sweep = subprocess.Popen([sys.executable, "-m", "vla_exp.training.main", "-m", "seed=0,1,2", *TINY,
                              "hydra/launcher=joblib", "hydra.launcher.n_jobs=2", f"hydra.sweep.dir={tmp_path}"],
                             cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    wait_for(lambda: len(list(tmp_path.glob("*/metrics.jsonl"))) >= 2, sweep)
    sweep.send_signal(signal.SIGTERM)
    out, err = sweep.communicate(timeout=300)
    assert sweep.returncode == 128 + signal.SIGTERM and "Traceback" not in err, err[-3000:]
    done = {p.parent.name: json.loads(p.read_text())["status"] for p in tmp_path.glob("*/summary.json")}
    assert sorted(done.values()) == ["completed", "completed"] and not any("s2" in name for name in done)
    assert "job 2: not started, the sweep is stopping on SIGTERM; the same command runs it" in err
    assert out.strip().splitlines()[-1] == "the same command resumes the interrupted runs and skips the finished ones"
    assert not (tmp_path / ".stopping").exists()


def test_a_joblib_sweep_keeps_the_first_signal_and_a_second_ctrl_c_stops_it_at_once(tmp_path):
    """The sweep's own process, in process: the first signal is kept (its name in .stopping for the jobs about to
    start), a later SIGTERM changes nothing, a second Ctrl-C raises at once; the handlers go back afterwards."""
    from vla_exp.training.sweep import STOPPING, Sweep, stopping
    sweep, before = Sweep(), signal.getsignal(signal.SIGINT)
    sweep.signum = None
    restore = sweep.hold_signals(tmp_path)
    try:
        assert stopping(tmp_path) is None
        os.kill(os.getpid(), signal.SIGINT)
        assert sweep.signum == signal.SIGINT and stopping(tmp_path) == "SIGINT"
        os.kill(os.getpid(), signal.SIGTERM)
        assert sweep.signum == signal.SIGINT and (tmp_path / STOPPING).read_text() == "SIGINT"
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)
    finally:
        restore()
    assert signal.getsignal(signal.SIGINT) is before


@pytest.mark.slow  # a multirun process
def test_a_stopping_mark_left_by_a_killed_sweep_stops_no_later_sweep(tmp_path):
    """A joblib sweep killed while it stopped leaves .stopping behind; a later sweep into the folder, on any launcher,
    runs its jobs."""
    (tmp_path / ".stopping").write_text("SIGINT")
    out = subprocess.run([sys.executable, "-m", "vla_exp.training.main", "-m", "seed=0", *TINY,
                          f"hydra.sweep.dir={tmp_path}"], cwd=ROOT, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-3000:]
    assert [json.loads(p.read_text())["status"] for p in tmp_path.glob("*/summary.json")] == ["completed"]
    assert not (tmp_path / ".stopping").exists()
