"""The module layering docs/architecture.md promises: its module table, read from the bottom up, by layer."""

import ast
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "xpcnn"
BUDGET = 500  # lines: a module that outgrows it is doing more than one job, split it
LONG_MODULES = {"nn": 910, "apps.cli": 640, "functional": 590}  # one contract each; capped near their size
FACES = {"functional", "nn", "optim", "models"}  # the modules users import from the top: xpcnn.nn, ...
MAX_PER_FOLDER = 10  # modules (and subfolders) in one folder: past this a layer is doing more than one job


def table_order() -> list[str]:
    """Module names (dotted, below xpcnn) in the order of the module table under '## Modules' in
    docs/architecture.md, whose rows name each module by its path (`training/train.py`)."""
    text = (ROOT / "docs" / "architecture.md").read_text()
    section = text.split("## Modules", 1)[1].split("\n## ", 1)[0]
    return [path.replace("/", ".") for path in re.findall(r"^\| `([\w/]+)\.py` \|", section, re.M)]


def name_of(path: Path) -> str:
    return ".".join(path.relative_to(PACKAGE).with_suffix("").parts)


def modules() -> dict[str, Path]:
    """Every module of the package, by dotted name below xpcnn (a folder's __init__.py and __main__.py aside)."""
    return {name_of(path): path for path in PACKAGE.rglob("*.py") if path.stem not in ("__init__", "__main__")}


def folders() -> list[Path]:
    return sorted(path.parent for path in PACKAGE.rglob("__init__.py") if path.parent != PACKAGE)


def xpcnn_imports(path: Path, package: str, known: set[str]) -> set[str]:
    """The xpcnn modules (of ``known``) the module at ``path`` in ``package`` (dotted, e.g. "xpcnn.training")
    imports, at the top or inside functions, relative (``from ..ops import fastpath``) or absolute."""
    candidates = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            if node.level:  # from . import x, from ..x.y import z: relative to ``package``
                parts = package.split(".")
                base = ".".join(parts[: len(parts) - node.level + 1])
                module = f"{base}.{node.module}" if node.module else base
            else:
                module = node.module
            candidates += [module, *(f"{module}.{alias.name}" for alias in node.names)]
        elif isinstance(node, ast.Import):
            candidates += [alias.name for alias in node.names]
    found = set()
    for candidate in candidates:
        parts = candidate.split(".")
        if parts[0] == "xpcnn":  # each dotted prefix that names a module: xpcnn.data.data.load -> data.data
            found.update(".".join(parts[1:end]) for end in range(2, len(parts) + 1))
    return found & known


def test_the_table_lists_every_module_once():
    order = table_order()
    assert len(order) == len(set(order))
    assert sorted(order) == sorted(modules())


@pytest.mark.parametrize("name", sorted(modules()))
def test_a_module_imports_only_modules_listed_above_it(name):
    order = table_order()
    above = set(order[: order.index(name)])
    package = ".".join(["xpcnn", *name.split(".")[:-1]])
    below = xpcnn_imports(modules()[name], package, set(modules())) - above
    assert not below, f"{name} imports {sorted(below)}, listed after it in docs/architecture.md"


@pytest.mark.parametrize("folder", [name_of(path) for path in folders()])
def test_a_folder_is_one_block_of_the_table(folder):
    """So that the folders are layers: each imports only from itself and the folders (and faces) above it."""
    rows = [i for i, name in enumerate(table_order()) if name.startswith(folder + ".")]
    assert rows and rows == list(range(rows[0], rows[-1] + 1)), f"{folder}/'s modules are not together"


@pytest.mark.parametrize("folder", folders(), ids=name_of)
def test_a_folder_holds_few_modules(folder):
    entries = [path for path in folder.glob("*.py") if path.name != "__init__.py"]
    entries += [path for path in folder.iterdir() if (path / "__init__.py").exists()]
    assert len(entries) <= MAX_PER_FOLDER, f"{name_of(folder)}/ holds {len(entries)}: split it by job"


@pytest.mark.parametrize("folder", folders(), ids=name_of)
def test_a_folder_package_holds_only_its_docstring(folder):
    """No re-exports: a module is imported by its path, and the import check above sees every import."""
    body = ast.parse((folder / "__init__.py").read_text()).body
    assert len(body) == 1 and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant)


def test_only_the_faces_are_at_the_top_and_every_folder_is_a_package():
    assert {path.stem for path in PACKAGE.glob("*.py")} == FACES | {"__init__", "__main__"}
    holding_modules = {path.parent for path in PACKAGE.rglob("*.py")}
    assert not [path for path in holding_modules if not (path / "__init__.py").exists()]


@pytest.mark.parametrize("name", sorted(modules()))
def test_a_module_keeps_to_its_size_budget(name):
    lines = len(modules()[name].read_text().splitlines())
    budget = LONG_MODULES.get(name, BUDGET)
    assert lines <= budget, f"{name} has {lines} lines, over its budget of {budget}: split what is a second job"


def test_the_import_reader_sees_relative_absolute_and_lazy_imports(tmp_path):
    source = tmp_path / "sample.py"
    source.write_text(
        "from . import config, step as S\nfrom .. import __version__, nn\nfrom ..backends.backend import x\n"
        "import xpcnn.data.data\nfrom xpcnn.base import errors\n"
        "def f():\n    from xpcnn.apps.cli import main\n    from ..ops import fastpath\n    from xpcnn import optim\n"
    )
    found = {"training.config", "training.step", "nn", "backends.backend", "data.data", "base.errors", "apps.cli"}
    found |= {"ops.fastpath", "optim"}
    others = {"training.train", "data.config", "config", "step", "backend", "functional"}
    assert xpcnn_imports(source, "xpcnn.training", found | others) == found
