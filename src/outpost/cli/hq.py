"""`outpost hq …`: run Outpost HQ (serve, admin) and talk to it (agents, connections, jobs)."""

from __future__ import annotations

import click

from outpost.cli.hq_client import register_client_commands
from outpost.cli.hq_serve import register_serve_commands


@click.group()
def hq() -> None:
    """Outpost HQ: run the control plane, or manage agents and jobs through its API."""


register_serve_commands(hq)
register_client_commands(hq)
