"""`outpost pooler …`: the PostgreSQL pooler (serve, routes, hash-password, encrypt-password)."""

from __future__ import annotations

import click

from outpost.cli.pooler_routes import register_route_commands


@click.group()
def pooler() -> None:
    """The PostgreSQL connection pooler."""


register_route_commands(pooler)
