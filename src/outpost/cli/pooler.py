"""`outpost pooler …`: the PostgreSQL pooler (serve, routes, hash-password, encrypt-password)."""

from __future__ import annotations

import click

from outpost.cli.context import CliContext, pass_cli
from outpost.cli.pooler_routes import register_route_commands


@click.group()
def pooler() -> None:
    """The PostgreSQL connection pooler."""


@pooler.command()
@click.option(
    "--listen",
    "listen",
    multiple=True,
    metavar="HOST:PORT",
    help="Listen here instead of pooler.listen_addresses (repeat for several; "
    "default 127.0.0.1:6432).",
)
@click.option(
    "--workers",
    type=click.IntRange(1, 64),
    default=None,
    help="Worker processes sharing the port with SO_REUSEPORT (default pooler.workers, 1).",
)
@pass_cli
def serve(cli: CliContext, listen: tuple[str, ...], workers: int | None) -> int:
    """Run the pooler in the foreground until SIGTERM/SIGINT; SIGHUP reloads settings and
    routes without dropping clients."""
    from pydantic import ValidationError

    from outpost.errors import UsageError
    from outpost.pooler.workers import command_line_overrides, run_pooler, with_overrides

    overrides = command_line_overrides(list(listen), workers)
    try:
        loaded = with_overrides(cli.loaded(), overrides)
    except ValidationError as exc:
        first = exc.errors()[0]
        msg = str(first["msg"]).removeprefix("Value error, ")
        raise UsageError(f"--listen: {msg}.") from None
    return run_pooler(loaded, config_arg=cli.config_arg, overrides=overrides)


register_route_commands(pooler)
