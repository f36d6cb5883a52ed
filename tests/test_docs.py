"""The README matches the code: CI runs its test command, and its layout lists exactly the files and options."""
import re
from pathlib import Path

from vla_exp.config import GROUPS

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text()


def layout():
    """{path: what the README says of it} from the README's layout block."""
    block = README.split("## Layout", 1)[1].split("```")[1]
    return dict(line.split(None, 1) for line in block.strip().splitlines())


def test_ci_runs_the_readme_test_command():
    command = (ROOT / ".ci/run").read_text().strip().splitlines()[-1]
    assert command.startswith("python3 -m venv") and "pytest" in command
    assert f"\n{command}\n" in README


def test_layout_lists_exactly_the_modules_and_experiments():
    listed = set(layout())
    for folder, files in (("vla_exp", (ROOT / "vla_exp").glob("*.py")), ("experiments", (ROOT / "experiments").iterdir())):
        have = {f"{folder}/{p.name}" for p in files if p.is_file() and p.name != "__init__.py"}
        assert {e for e in listed if e.startswith(f"{folder}/")} == have


def test_layout_names_exactly_the_options_of_every_group():
    entries = layout()
    groups = sorted(p.name for p in (ROOT / "conf").iterdir() if p.is_dir())
    assert {e for e in entries if e.startswith("conf/") and e != "conf/train.yaml"} == {f"conf/{g}/*.yaml" for g in groups}
    for group in groups:
        named = {o.strip() for o in entries[f"conf/{group}/*.yaml"].split(":")[0].split("|")}
        named = {re.sub("<fix>", g, o) for o in named for g in GROUPS}  # fixed_without_<fix>: one per group
        assert named == {p.stem for p in (ROOT / "conf" / group).glob("*.yaml")}, group
