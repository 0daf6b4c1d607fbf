"""`outpost hq serve` and `outpost hq admin …`."""

from __future__ import annotations

from pathlib import Path

import click

from outpost.errors import UsageError
from outpost.hq.settings import DEFAULT_DATA_DIR, HQSettings

_DATA_DIR = click.option(
    "--data-dir",
    type=click.Path(file_okay=False, path_type=Path),
    default=DEFAULT_DATA_DIR,
    show_default=True,
    envvar="OUTPOST_HQD_DATA_DIR",
    help="HQ's data dir: signing.key and the default SQLite database (env OUTPOST_HQD_DATA_DIR).",
)
_DATABASE = click.option(
    "--database",
    metavar="URL",
    envvar="OUTPOST_HQD_DATABASE",
    help="sqlite:///PATH or postgresql://USER@HOST:PORT/DB (default: sqlite:///DATA_DIR/"
    "hq.sqlite; env OUTPOST_HQD_DATABASE).",
)


@click.command("serve")
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to listen on.")
@click.option(
    "--port", type=click.IntRange(0, 65535), default=9700, show_default=True, help="TCP port."
)
@_DATABASE
@_DATA_DIR
@click.option(
    "--tls-cert",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    help="Serve HTTPS with this PEM certificate (chain); needs --tls-key.",
)
@click.option(
    "--tls-key",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    help="The PEM private key of --tls-cert.",
)
@click.option(
    "--retention-days",
    type=click.FloatRange(min=0, min_open=True),
    default=30,
    show_default=True,
    help="Delete finished jobs and their results after this many days.",
)
@click.option(
    "--heartbeat-interval",
    type=click.FloatRange(min=0.1, max=3600),
    default=5,
    show_default=True,
    help="Seconds between heartbeats; an agent silent for two intervals is offline.",
)
@click.option(
    "--max-concurrent-jobs",
    type=click.IntRange(min=1, max=10_000),
    default=4,
    show_default=True,
    help="Jobs an agent may have sent or running at once; the rest wait in the queue.",
)
@click.option(
    "--log-format",
    type=click.Choice(["text", "json"]),
    default="text",
    show_default=True,
    help="Plain text, or one JSON object per line.",
)
def serve_command(
    host: str,
    port: int,
    database: str | None,
    data_dir: Path,
    tls_cert: Path | None,
    tls_key: Path | None,
    retention_days: float,
    heartbeat_interval: float,
    max_concurrent_jobs: int,
    log_format: str,
) -> int:
    """Run Outpost HQ: the REST API, the agents' link, the dashboard (/ui/), /metrics."""
    from outpost.hq.runtime import run_hq
    from outpost.logs import setup_logging

    if (tls_cert is None) != (tls_key is None):
        raise UsageError("--tls-cert and --tls-key go together; give both or neither.")
    settings = HQSettings(
        data_dir=data_dir,
        database=database or None,
        host=host,
        port=port,
        tls_cert=tls_cert,
        tls_key=tls_key,
        retention_days=retention_days,
        heartbeat_interval=heartbeat_interval,
        max_concurrent_jobs=max_concurrent_jobs,
    )
    settings.url  # noqa: B018 - a bad --database fails here, before anything starts
    setup_logging(log_format, "info")
    return run_hq(settings)


@click.group("admin")
def admin() -> None:
    """HQ administrators: API tokens."""


@admin.command("create")
@click.option("--name", default="admin", show_default=True, help="Who the token is for (a label).")
@_DATABASE
@_DATA_DIR
def admin_create(name: str, database: str | None, data_dir: Path) -> None:
    """Create an admin API token and print it once (HQ keeps only its SHA-256).

    The token goes to stdout alone, so `TOKEN=$(outpost hq admin create)` works.
    """
    from outpost.hq.core import open_database
    from outpost.hq.tokens import ADMIN_PREFIX, new_token, token_hash

    if not name.strip() or len(name) > 200:
        raise UsageError("--name must be 1 to 200 characters.")
    settings = HQSettings(data_dir=data_dir, database=database or None)
    db = open_database(settings)
    try:
        token = new_token(ADMIN_PREFIX)
        db.store.create_admin(name.strip(), token_hash(token))
    finally:
        db.dispose()
    click.echo(token)
    click.echo(
        f"Admin token for {name.strip()!r} created; it is shown only once. Use it as "
        "Authorization: Bearer TOKEN (or OUTPOST_HQ_ADMIN_TOKEN for the CLI).",
        err=True,
    )


def register_serve_commands(group: click.Group) -> None:
    """Add serve and admin to the `hq` group."""
    group.add_command(serve_command)
    group.add_command(admin)
