"""What `outpost … --help` shows: every driver's options with the defaults users know."""

from __future__ import annotations

import pytest
from click.testing import CliRunner

from outpost.cli.main import cli
from outpost.drivers import driver_names


@pytest.mark.parametrize(
    ("driver", "expected"),
    [
        ("postgres", ["--host TEXT", "[default: localhost]", "[default: 5432]", "[default: 30]"]),
        ("redshift", ["[default: 5439]", "[default: require]"]),
        ("mysql", ["[default: 3306]", "[default: 60]"]),
        ("mssql", ["[default: 1433]", "[default: sa]", "[default: verify]"]),
        ("sqlite", ["--source-url TEXT", "[required]"]),
        ("csv", ["--time-format TEXT"]),
    ],
)
def test_driver_help_shows_defaults(driver: str, expected: list[str]) -> None:
    result = CliRunner().invoke(cli, ["connections", "add", driver, "--help"], terminal_width=200)
    assert result.exit_code == 0
    for text in expected:
        assert text in result.output
    assert "[default: (" not in result.output


def test_add_lists_every_driver() -> None:
    result = CliRunner().invoke(cli, ["connections", "add", "--help"])
    assert result.exit_code == 0
    for name in driver_names():
        assert f"  {name} " in result.output


def test_completion_script() -> None:
    result = CliRunner().invoke(cli, ["completion", "bash"])
    assert result.exit_code == 0
    assert "_OUTPOST_COMPLETE" in result.output


def test_tables_keep_brackets(capsys: pytest.CaptureFixture[str]) -> None:
    from outpost.cli.output import print_table

    print_table(["ERROR"], [["Secret [projects/p/secrets/s] not found [bold]x[/bold]"]])
    assert "Secret [projects/p/secrets/s] not found [bold]x[/bold]" in capsys.readouterr().out
