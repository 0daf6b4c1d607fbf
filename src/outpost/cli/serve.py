"""`outpost serve`."""

from __future__ import annotations

import click

from outpost.cli.context import CliContext, pass_cli


@click.command()
@click.option(
    "--restore-path",
    metavar="FILE",
    help="Restore this backup first; only into a data dir that was never started "
    "(otherwise the restore is ignored, and the log says why).",
)
@pass_cli
def serve(cli: CliContext, restore_path: str | None) -> int:
    """Run the agent: the store, the local API, health, metrics, connection checks."""
    from outpost.api.runtime import run_agent

    return run_agent(cli.loaded(), config_arg=cli.config_arg, restore_path=restore_path)
