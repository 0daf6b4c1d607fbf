"""The README is kept honest by these tests: its driver tables are the drivers' own options,
and every command it names exists."""

from __future__ import annotations

import re
from pathlib import Path

import click
import pytest

from outpost.cli.main import cli
from outpost.drivers import driver_names, get_driver
from outpost.drivers.base import Driver

README = (Path(__file__).parents[2] / "README.md").read_text()


def options_table(cls: type[Driver]) -> str:
    """The markdown table of a driver's options, as the README shows it."""
    lines = ["| Flag | Description | Default |", "|---|---|---|"]
    for name, info in cls.options_model.model_fields.items():
        if info.is_required():
            default = "(required)"
        elif info.default is None:
            default = ""
        else:
            default = f"`{info.default}`"
        flag = "--" + name.replace("_", "-")
        lines.append(f"| `{flag}` | {info.description} | {default} |")
    return "\n".join(lines)


@pytest.mark.parametrize("name", driver_names())
def test_driver_table_matches_the_driver(name: str) -> None:
    cls = get_driver(name)
    table = options_table(cls)
    assert table in README, f"README's table for {name} is out of date; it should be:\n{table}"


def _commands(group: click.Group, prefix: str = "outpost") -> set[str]:
    found = set()
    ctx = click.Context(group)
    for sub in group.list_commands(ctx):
        command = group.get_command(ctx, sub)
        assert command is not None
        found.add(f"{prefix} {sub}")
        if isinstance(command, click.Group):
            found |= _commands(command, f"{prefix} {sub}")
    return found


def test_every_command_is_documented() -> None:
    for command in sorted(_commands(cli)):
        if command.startswith("outpost connections add "):
            continue  # one per driver, documented in the driver tables
        assert f"`{command}" in README, f"{command} is not in the README"


def test_readme_commands_exist() -> None:
    known = _commands(cli)
    for match in re.finditer(r"`(outpost(?: [a-z][a-z-]*)+)", README):
        words = match.group(1).split()
        while len(words) > 1 and " ".join(words) not in known:
            words.pop()
        assert len(words) > 1, f"README names a command that does not exist: {match.group(1)}"
