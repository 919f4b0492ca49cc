"""The documentation runs as written: every Python block of README.md and docs/library.md, every xpcnn command,
the README's test command."""

import os
import re
import shlex
import subprocess
import sys
import textwrap
import tomllib
from pathlib import Path

import click
import pytest

from xpcnn.apps.cli import main
from xpcnn.data.data import DATASETS

ROOT = Path(__file__).resolve().parents[1]
DOCUMENTS = ["README.md", "docs/library.md"]
FENCE = re.compile(r"^[ \t]*```(\w*)\n(.*?)^[ \t]*```", re.DOTALL | re.MULTILINE)  # list items indent theirs


def blocks(path: Path, language: str) -> list[str]:
    return [textwrap.dedent(body) for lang, body in FENCE.findall(path.read_text()) if lang == language]


# Packages of the optional extras and the backends: a block that needs one that is missing here skips, as the
# other tests do (the README's test command installs them all, see the test below).
OPTIONAL_MODULES = {"onnx", "onnxruntime", "safetensors", "matplotlib", "selenium", "torch", "jax", "cupy"}


def reader_scripts() -> list:
    """Each python block of README.md on its own, as a reader copies one; docs/library.md's blocks all together,
    in order, as that page says they run."""
    readme = blocks(ROOT / "README.md", "python")
    scripts = [pytest.param(code, id=f"README.md block {i + 1}") for i, code in enumerate(readme)]
    for document in DOCUMENTS[1:]:
        code = blocks(ROOT / document, "python")
        assert code, f"{document} has no python blocks"
        scripts.append(pytest.param("\n".join(code), id=f"{document} blocks 1-{len(code)} in order"))
    return scripts


@pytest.mark.parametrize("code", reader_scripts())
def test_python_blocks_run_as_a_reader_copies_them(code, tmp_path, synthetic_dir, request):
    """In a fresh interpreter and an empty working directory; "mnist" and "fashion-mnist" name a small generated
    look-alike, so that a block that trains on a dataset name needs no download."""
    data_root = tmp_path / "data"
    data_root.mkdir()
    for dataset in DATASETS:
        (data_root / dataset).symlink_to(synthetic_dir, target_is_directory=True)
    work = tmp_path / "work"
    work.mkdir()
    (work / "block.py").write_text(code)
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
        "XPCNN_DATA_DIR": str(data_root),
        "XDG_CACHE_HOME": str(tmp_path / "cache"),
        "MPLBACKEND": "Agg",
    }
    result = subprocess.run(
        [sys.executable, "block.py"], cwd=work, env=env, capture_output=True, text=True, timeout=300
    )
    missing = re.search(r"ModuleNotFoundError: No module named '([\w.]+)'", result.stderr)
    if result.returncode and missing and missing[1].split(".")[0] in OPTIONAL_MODULES:
        pytest.skip(f"{request.node.callspec.id} needs {missing[1]}, which is not installed here")
    assert result.returncode == 0, f"{request.node.callspec.id} fails as a reader copies it:\n{result.stderr[-4000:]}"


def test_the_readme_test_command_installs_every_extra_or_says_why_not():
    """The one command CI runs (.ci/run reads it from the README) installs every optional part, or the README
    names the ones it leaves out, and why."""
    text = (ROOT / "README.md").read_text()
    command = text.split("<!-- test-command -->")[1].split("<!-- /test-command -->")[0]
    installed = set(re.search(r"\.\[([\w,-]+)\]", command)[1].split(","))
    extras = set(tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"])
    left_out = re.search(r"installs every extra but ([^:]*):", " ".join(text.split()))
    named = set(re.findall(r"`([\w-]+)`", left_out[1])) if left_out else set()
    assert installed <= extras, f"the test command installs unknown extras {sorted(installed - extras)}"
    assert named == extras - installed, "the README must name (and explain) exactly the extras its command leaves out"


def readme_commands() -> list[str]:
    """The ``xpcnn ...`` commands of README.md's plain code blocks (continuation lines joined) and code spans."""
    text = (ROOT / "README.md").read_text()
    commands = []
    for body in blocks(ROOT / "README.md", ""):
        for line in body.splitlines():
            line = line.split("  #")[0].rstrip()
            if line[:1].isspace() and commands and commands[-1] is not None:
                commands[-1] += " " + line.strip()
            elif "xpcnn " in line:
                commands.append(line[line.index("xpcnn ") :])
            else:
                commands.append(None)
    commands += re.findall(r"`(xpcnn [^`]*)`", text)
    return [command for command in commands if command]


def option_names(command: click.Command) -> set[str]:
    return {name for param in command.params for name in (*param.opts, *param.secondary_opts)} | {"--help"}


@pytest.mark.parametrize("line", readme_commands())
def test_readme_names_only_commands_and_options_that_exist(line):
    """Synopses ([--flag VALUE]), bare command names and placeholders (DIR, runs/<run>) have their flags checked;
    whole commands are parsed."""
    name, *args = shlex.split(line)[1:]
    command = main.get_command(click.Context(main), name)
    assert command is not None, f"no command {name!r}"
    unknown = sorted(set(re.findall(r"--[a-z0-9][a-z0-9-]*", line)) - option_names(command))
    assert not unknown, f"{line}: no such options {unknown}"
    if args and "[" not in line and "<" not in line and not any(arg.isupper() for arg in args):
        command.make_context(name, args)  # raises click.UsageError on a bad value
