"""Every `layerwise ...` command in the README parses with the current command line (options renamed or
removed would fail here before a reader finds out)."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import click
import pytest
import typer

from layerwise.cli import app

README = Path(__file__).resolve().parents[1] / "README.md"


def _commands() -> list[str]:
    commands = []
    for block in re.findall(r"```bash\n(.*?)```", README.read_text(encoding="utf-8"), re.S):
        for line in block.replace("\\\n", " ").splitlines():
            line = line.split("#")[0].strip()
            if line.startswith("layerwise "):
                commands.append(re.sub(r"\[([^\]]*)\]", r"\1", line))  # optional parts, as written [--x y]
    return commands


def test_the_readme_shows_commands():
    assert len(_commands()) >= 20


@pytest.mark.parametrize("line", _commands())
def test_every_readme_command_parses(line):
    command, name, args = typer.main.get_command(app), "layerwise", shlex.split(line)[1:]
    while isinstance(command, click.Group):
        name, args = args[0], args[1:]
        command = command.commands[name]
    command.make_context(name, list(args))  # raises on an unknown option or a bad value
