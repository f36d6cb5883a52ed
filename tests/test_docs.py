"""The README matches the code: CI runs its test command, and its layout names every module and config group."""
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text()


def test_ci_runs_the_readme_test_command():
    command = (ROOT / ".ci/run").read_text().strip().splitlines()[-1]
    assert command.startswith("python3 -m venv") and "pytest" in command
    assert f"\n{command}\n" in README


def test_layout_names_every_module_and_group():
    for module in (ROOT / "vla_exp").glob("*.py"):
        if module.name != "__init__.py":
            assert f"vla_exp/{module.name}" in README, module.name
    for group in (ROOT / "conf").iterdir():
        if group.is_dir():
            assert f"conf/{group.name}/" in README, group.name
            for option in group.glob("*.yaml"):
                assert option.stem in README, f"{group.name}={option.stem}"
