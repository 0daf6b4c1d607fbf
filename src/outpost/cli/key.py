"""`outpost key generate|rotate`."""

from __future__ import annotations

from pathlib import Path

import click

from outpost.api.service import AgentService
from outpost.cli.context import CliContext, pass_cli
from outpost.crypto import Key, generate_key_file, load_key_file
from outpost.errors import KeyError_, OutpostError, UsageError
from outpost.state.store import AgentRunningError, Store


@click.group()
def key() -> None:
    """Create and rotate the key that encrypts connection options."""


@key.command()
@click.argument("path", type=click.Path(dir_okay=False, path_type=Path))
def generate(path: Path) -> None:
    """Write a new 64-byte random key to PATH (mode 0400); never overwrites."""
    new = generate_key_file(path)
    click.echo(f"Wrote a new key to {new.path} (mode 0400, key id {new.id}).")
    click.echo(
        'Set "key_path" to it in the config; if connections are already stored, run '
        "`outpost key rotate` to encrypt them with it."
    )


@key.command()
@click.option(
    "--old-key",
    type=click.Path(dir_okay=False),
    metavar="PATH",
    help="The key the connections are encrypted with now (omit if they are not "
    "encrypted, or already use the new key).",
)
@click.option(
    "--new-key",
    type=click.Path(dir_okay=False),
    metavar="PATH",
    help="The key to encrypt with (default: key_path from the config).",
)
@pass_cli
def rotate(cli: CliContext, old_key: str | None, new_key: str | None) -> None:
    """Encrypt every connection with the new key, in one transaction.

    Encrypts connections stored before a key was set, and moves everything from an old key
    to a new one. Stop the agent first: the rotation needs the store to itself.
    """
    loaded = cli.loaded()
    new_path = new_key or (str(loaded.config.key_path) if loaded.config.key_path else None)
    if new_path is None:
        raise UsageError("No new key: set key_path in the config or give --new-key PATH.")
    new = load_key_file(new_path)
    old: Key | None = load_key_file(old_key) if old_key else None
    try:
        store = Store(loaded.config.data_dir, owner="cli")
    except AgentRunningError as exc:
        raise OutpostError(
            f"{exc.message.split(';')[0]}; stop it before rotating the key "
            "(the rotation needs the store to itself)."
        ) from None
    try:
        encrypted = [c for c in store.connections() if c.encrypted]
        stored_id = store.key_id
        if encrypted and old is None:
            if stored_id == new.id:
                old = new
            else:
                raise UsageError(
                    f"The connections are encrypted with another key (key id {stored_id}); "
                    "give it with --old-key PATH."
                )
        if encrypted and old is not None and stored_id and stored_id != old.id:
            raise KeyError_(
                f"--old-key {old.path} is not the key the connections are encrypted with "
                f"(key id {old.id}, stored data needs {stored_id})."
            )
        service = AgentService(loaded, store, old, check_key=False)
        count = service.rotate_key(old, new)
    finally:
        store.close()
    click.echo(f"Encrypted {count} connection(s) with {new.path} (key id {new.id}).")
    if new_key and loaded.config.key_path and Path(new_key) != loaded.config.key_path:
        click.echo(f'Now set "key_path" to {new_key} in the config.')
