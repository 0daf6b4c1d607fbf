"""`outpost config validate|show`."""

from __future__ import annotations

import json

import click

from outpost.cli.context import CliContext, pass_cli
from outpost.cli.output import format_option


@click.group()
def config() -> None:
    """Check and show the configuration."""


@config.command()
@pass_cli
def validate(cli: CliContext) -> None:
    """Report every problem in the configuration at once (exit 1 if any)."""
    loaded = cli.loaded()
    where = loaded.source or "built-in defaults (no config file found)"
    click.echo(f"Configuration OK: {where}")


@config.command()
@format_option()
@pass_cli
def show(cli: CliContext, fmt: str) -> None:
    """Print the effective configuration (file, env overrides, defaults), secrets redacted."""
    loaded = cli.loaded()
    data = loaded.redacted()
    if fmt == "json":
        click.echo(json.dumps(data, indent=2))
        return
    click.echo(f"# source: {loaded.source or 'built-in defaults'}")
    for path, var in sorted(loaded.env_keys.items()):
        click.echo(f"# {'.'.join(path)} from {var}")
    click.echo(json.dumps(data, indent=2))
