"""The module layering docs/architecture.md promises: its module table, read from the bottom up."""

import ast
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "xpcnn"
BUDGET = 500  # lines: a module that outgrows it is doing more than one job, split it
LONG_MODULES = {"nn": 870, "cli": 630, "bench": 640, "functional": 590}  # one contract each; capped near their size
MAX_MODULES = 35  # past this, group the package into folders by layer (backends, ops, nn, data, training, apps)


def table_order() -> list[str]:
    """Module names in the order of the table under '## Modules' in docs/architecture.md."""
    text = (ROOT / "docs" / "architecture.md").read_text()
    section = text.split("## Modules", 1)[1].split("\n## ", 1)[0]
    return re.findall(r"^\| `(\w+)\.py` \|", section, re.M)


def modules() -> dict[str, Path]:
    return {path.stem: path for path in PACKAGE.glob("*.py") if path.stem not in ("__init__", "__main__")}


def xpcnn_imports(path: Path, known: set[str]) -> set[str]:
    """The xpcnn modules ``path`` imports, at the top or inside functions."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            if node.level == 1 or node.module == "xpcnn":  # from . import x / from .x import y
                names = [node.module] if node.module and node.level else [alias.name for alias in node.names]
                found.update(name.split(".")[0] for name in names)
            elif node.module and node.module.startswith("xpcnn."):
                found.add(node.module.split(".")[1])
        elif isinstance(node, ast.Import):
            found.update(alias.name.split(".")[1] for alias in node.names if alias.name.startswith("xpcnn."))
    return found & known


def test_the_table_lists_every_module_once():
    order = table_order()
    assert len(order) == len(set(order))
    assert sorted(order) == sorted(modules())


@pytest.mark.parametrize("name", sorted(modules()))
def test_a_module_imports_only_modules_listed_above_it(name):
    order = table_order()
    above = set(order[: order.index(name)])
    below = xpcnn_imports(modules()[name], set(modules())) - above
    assert not below, f"{name}.py imports {sorted(below)}, listed after it in docs/architecture.md"


@pytest.mark.parametrize("name", sorted(modules()))
def test_a_module_keeps_to_its_size_budget(name):
    lines = len(modules()[name].read_text().splitlines())
    budget = LONG_MODULES.get(name, BUDGET)
    assert lines <= budget, f"{name}.py has {lines} lines, over its budget of {budget}: split what is a second job"


def test_the_package_is_flat_and_small_enough_to_stay_so():
    assert len(modules()) <= MAX_MODULES, "group the package into folders by layer (see docs/architecture.md)"
    assert not [path for path in PACKAGE.iterdir() if path.is_dir() and (path / "__init__.py").exists()]


def test_the_import_reader_sees_relative_absolute_and_lazy_imports(tmp_path):
    source = tmp_path / "sample.py"
    source.write_text(
        "from . import errors, files\nfrom .backend import x\nimport xpcnn.data\n"
        "def f():\n    from xpcnn.nn import Layer\n    from xpcnn import optim\n"
    )
    known = {"errors", "files", "backend", "data", "nn", "optim", "train"}
    assert xpcnn_imports(source, known) == known - {"train"}
