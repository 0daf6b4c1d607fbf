"""`outpost pooler routes …`, `hash-password`, `encrypt-password`."""

from __future__ import annotations

import click


def register_route_commands(group: click.Group) -> None:
    """Add routes, hash-password and encrypt-password to the `pooler` group."""
