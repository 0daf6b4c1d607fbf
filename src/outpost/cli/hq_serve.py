"""`outpost hq serve` and `outpost hq admin …`."""

from __future__ import annotations

import click


def register_serve_commands(group: click.Group) -> None:
    """Add serve and admin to the `hq` group."""
