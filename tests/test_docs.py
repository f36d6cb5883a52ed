"""The docs match the code: CI runs the README's test command, its layout lists exactly the files and options, every
results file says how it was measured, and every file the docs name exists."""
import re
from pathlib import Path

import pytest

from vla_exp.config import GROUPS

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text()
RESULTS = sorted((ROOT / "docs" / "results").glob("*"))


def layout():
    """{path: what the README says of it} from the README's layout block."""
    block = README.split("## Layout", 1)[1].split("```")[1]
    return dict(line.split(None, 1) for line in block.strip().splitlines() if not line.startswith(" "))


def test_ci_runs_the_readme_test_command():
    command = (ROOT / ".ci/run").read_text().strip().splitlines()[-1]
    assert command.startswith("python3 -m venv") and "pytest" in command
    assert f"\n{command}\n" in README


def test_the_readme_stays_a_front_door():
    assert len(README.splitlines()) <= 220


def test_layout_lists_exactly_the_modules_and_experiments():
    listed = set(layout())
    modules = {str(p.relative_to(ROOT)) for p in (ROOT / "vla_exp").rglob("*.py") if p.name != "__init__.py"}
    assert {e for e in listed if e.startswith("vla_exp/")} == modules
    assert {e for e in listed if e.startswith("experiments/")} == {
        f"experiments/{p.name}" for p in (ROOT / "experiments").iterdir() if p.is_file()}


def test_layout_names_exactly_the_options_of_every_group():
    entries = layout()
    groups = sorted({p.parent.relative_to(ROOT / "conf").as_posix() for p in (ROOT / "conf").rglob("*/*.yaml")})
    assert {e for e in entries if e.startswith("conf/") and e != "conf/train.yaml"} == {f"conf/{g}/*.yaml" for g in groups}
    for group in groups:
        named = {o.strip() for o in entries[f"conf/{group}/*.yaml"].split(":")[0].split("|")}
        named = {re.sub("<fix>", g, o) for o in named for g in GROUPS}  # fixed_without_<fix>: one per group
        assert named == {p.stem for p in (ROOT / "conf" / group).glob("*.yaml")}, group


def test_there_are_results_files():
    assert len(RESULTS) >= 5


@pytest.mark.parametrize("path", RESULTS, ids=lambda p: p.name)
def test_every_results_file_is_dated_and_names_its_command_commit_and_machine(path):
    assert re.fullmatch(r"20\d\d-[01]\d-[0-3]\d-[a-z0-9-]+\.md", path.name)
    text = path.read_text()
    assert text.startswith("# ")
    assert re.search(r"^- Command: `[^`]+`", text, re.M), "a line '- Command: `...`'"
    assert re.search(r"^- Commit: [0-9a-f]{7}", text, re.M), "a line '- Commit: <hash>'"
    assert re.search(r"^- Machine: .*(GFLOP/s|GPU|H200)", text, re.M), "a line '- Machine: ...' with its rate"


def test_every_file_the_docs_name_exists():
    docs = [ROOT / "README.md", *(ROOT / "docs").rglob("*.md")]
    named = {m for d in docs for m in re.findall(r"`((?:docs|vla_exp|experiments|conf|tests)/[\w./-]+\.(?:md|py|yaml|json))`",
                                                  d.read_text())}
    assert named and not sorted(n for n in named if not (ROOT / n).exists())
