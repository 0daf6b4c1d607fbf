"""`outpost pooler …`: the PostgreSQL pooler (serve, routes, hash-password, encrypt-password)."""

from __future__ import annotations

import click


@click.group()
def pooler() -> None:
    """The PostgreSQL connection pooler."""
