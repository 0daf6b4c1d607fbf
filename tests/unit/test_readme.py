"""The README is kept honest by these tests: its driver tables are the drivers' own options,
every command it names exists, its HQ tables name every option, setting and default of
`outpost hq serve`, `outpost hq admin create`, `outpost login` and the `hq` config section, and
its pooler chapter names every `pooler` setting with its default and Perseus-style alias, every
option of the `outpost pooler` commands, every console command and every pooler metric."""

from __future__ import annotations

import json
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


def _command(*path: str) -> click.Command:
    command: click.Command = cli
    for name in path:
        assert isinstance(command, click.Group)
        sub = command.get_command(click.Context(command), name)
        assert sub is not None, f"no command {' '.join(path)}"
        command = sub
    return command


@pytest.mark.parametrize(
    "path",
    [
        ("hq", "serve"),
        ("hq", "admin", "create"),
        ("login",),
        ("pooler", "serve"),
        ("pooler", "routes", "add"),
        ("pooler", "routes", "list"),
        ("pooler", "routes", "remove"),
        ("pooler", "hash-password"),
        ("pooler", "encrypt-password"),
    ],
)
def test_every_option_is_documented(path: tuple[str, ...]) -> None:
    for param in _command(*path).params:
        flags = [*param.opts, *param.secondary_opts] if isinstance(param, click.Option) else []
        for flag in flags:
            if flag.startswith("--"):
                assert f"`{flag}" in README, f"outpost {' '.join(path)} {flag} is not in the README"


def test_hq_serve_table_shows_the_defaults() -> None:
    section = README.split("### Running HQ\n", 1)[1].split("\n### ", 1)[0]
    rows = [line for line in section.splitlines() if line.startswith("| `--")]
    for param in _command("hq", "serve").params:
        default = param.default
        if not isinstance(param, click.Option) or not isinstance(default, str | int | float):
            continue  # no default (click's UNSET), or a flag
        if isinstance(default, bool):
            continue
        flag = param.opts[0]
        row = next((r for r in rows if r.startswith(f"| `{flag}")), None)
        assert row is not None, f"the README has no table row for outpost hq serve {flag}"
        assert f"`{default}`" in row, f"README: {flag} should default to {default}"


def test_every_hq_setting_is_documented() -> None:
    from outpost.config import HQConfig

    for key, info in HQConfig.model_fields.items():
        row = next((r for r in README.splitlines() if r.startswith(f"| `hq.{key}` |")), None)
        assert row is not None, f"hq.{key} has no row in the README's hq table"
        if info.default not in (None, False):
            default = info.default if not isinstance(info.default, float) else f"{info.default:g}"
            assert f"`{default}`" in row, f"README: hq.{key} should default to {default}"


def _pooler_rows() -> dict[str, str]:
    """The rows of the README's pooler settings table, by the keys named in their first cell."""
    rows: dict[str, str] = {}
    for line in README.splitlines():
        if not line.startswith("| `pooler."):
            continue
        for key in re.findall(r"`pooler\.([a-z_]+)`", line.split("|")[1]):
            rows[key] = line
    return rows


def _shown_default(value: object) -> str | None:
    """A default as the README's table shows it (None: the table says "unset")."""
    if value is None:
        return None
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, list):
        return json.dumps(value)
    if isinstance(value, float):
        return f"{value:g}"
    return str(value)


def test_every_pooler_setting_is_documented() -> None:
    from outpost.config import PoolerConfig

    rows = _pooler_rows()
    for key, info in PoolerConfig.model_fields.items():
        row = rows.get(key)
        assert row is not None, f"pooler.{key} has no row in the README's pooler table"
        default = _shown_default(info.get_default(call_default_factory=True))
        if default is not None:
            assert f"`{default}`" in row, f"README: pooler.{key} should default to {default}"
        if info.alias:
            alias = info.alias
            assert f"`{alias}`" in row, f"README: pooler.{key} is also accepted as {alias}"


def test_pooler_table_names_only_real_settings() -> None:
    from outpost.config import PoolerConfig

    unknown = set(_pooler_rows()) - set(PoolerConfig.model_fields)
    assert not unknown, f"the README's pooler table names settings that do not exist: {unknown}"


def test_every_console_command_is_documented() -> None:
    from outpost.pooler.admin import HELP

    section = README.split("### The console\n", 1)[1].split("\n### ", 1)[0]
    commands = HELP.split(": ", 1)[1].split(", ")
    assert "SHOW POOLS" in commands
    for command in commands:
        assert f"| `{command}` |" in section, f"console command {command} is not in the README"


def test_every_pooler_metric_is_documented() -> None:
    from outpost.config import PoolerConfig
    from outpost.pooler.admin import PoolerCollector
    from outpost.pooler.routes import StaticRoutes
    from outpost.pooler.server import PoolerServer

    section = README.split("### Metrics\n", 1)[1].split("\n### ", 1)[0]
    metrics = list(PoolerCollector(PoolerServer(PoolerConfig(), StaticRoutes())).collect())
    assert metrics
    for metric in metrics:
        name = metric.name + ("_total" if metric.type == "counter" else "")
        assert f"`{name}" in section, f"the pooler metric {name} is not in the README"
