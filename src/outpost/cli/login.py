"""`outpost login --hq URL --token TOKEN`: associate this agent with one Outpost HQ."""

from __future__ import annotations

import click


@click.command()
def login() -> None:
    """Associate this agent with an Outpost HQ (once and for good)."""
    raise click.UsageError("not built yet")
