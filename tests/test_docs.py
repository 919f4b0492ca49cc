"""The documentation runs as written: every Python block of README.md and docs/library.md, every xpcnn command."""

import re
import shlex
import textwrap
from pathlib import Path

import click
import pytest

from xpcnn.cli import main

ROOT = Path(__file__).resolve().parents[1]
DOCUMENTS = ["README.md", "docs/library.md"]
FENCE = re.compile(r"^[ \t]*```(\w*)\n(.*?)^[ \t]*```", re.DOTALL | re.MULTILINE)  # list items indent theirs


def blocks(path: Path, language: str) -> list[str]:
    return [textwrap.dedent(body) for lang, body in FENCE.findall(path.read_text()) if lang == language]


@pytest.mark.parametrize("document", DOCUMENTS)
def test_python_blocks_run_in_order(document, tmp_path, monkeypatch):
    """Each file's blocks run one after the other in one fresh namespace, in an empty working directory."""
    code = blocks(ROOT / document, "python")
    assert code, f"{document} has no python blocks"
    monkeypatch.chdir(tmp_path)
    namespace = {"__name__": "__docs__"}
    for index, body in enumerate(code):
        exec(compile(body, f"{document}, python block {index + 1}", "exec"), namespace)


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
