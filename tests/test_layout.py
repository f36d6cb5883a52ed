"""The package's shape: one folder per concern, layered, with no import cycle (imports inside functions included)."""
import ast
import graphlib
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "vla_exp"
# Lower layers never import higher ones: the base knows no data source, a policy no training loop
LAYERS = ("base", "data", "policy", "evaluation", "training", "attribution")


def module_name(path):
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(p): p for p in PACKAGE.rglob("*.py")}


def layer(module):
    folder = module.split(".")[1] if "." in module else "base"
    return LAYERS.index(folder) if folder in LAYERS else 0


def imports(path):
    """Every vla_exp module that `path` imports, at any depth of the file."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.startswith("vla_exp")}
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("vla_exp"):
            found |= {f"{node.module}.{a.name}" if f"{node.module}.{a.name}" in MODULES else node.module
                      for a in node.names}
    return {m for m in found if m in MODULES}


GRAPH = {m: imports(p) - {m} for m, p in MODULES.items()}


def test_the_package_has_no_import_cycle():
    graphlib.TopologicalSorter(GRAPH).prepare()  # raises CycleError naming the cycle


@pytest.mark.parametrize("module", sorted(MODULES))
def test_no_module_imports_a_higher_layer(module):
    assert not [m for m in GRAPH[module] if layer(m) > layer(module)], LAYERS


def test_the_checks_see_function_level_imports_and_layers():
    assert "vla_exp.policy.llava_pythia" in GRAPH["vla_exp.policy.load"]  # imported at the top
    assert "vla_exp.evaluation.closed_loop" in GRAPH["vla_exp.attribution.study_tables"]  # inside a function
    assert layer("vla_exp.runs") == 0 and layer("vla_exp.data.sources") == 1 and layer("vla_exp.attribution.diff") == 5
    with pytest.raises(graphlib.CycleError):
        graphlib.TopologicalSorter({"a": {"b"}, "b": {"a"}}).prepare()
