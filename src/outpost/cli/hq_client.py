"""`outpost hq agents|connections|query|inspect|test|jobs`: the HQ API from the command line."""

from __future__ import annotations

import click


def register_client_commands(group: click.Group) -> None:
    """Add the API client commands to the `hq` group."""
