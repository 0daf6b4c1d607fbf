"""`outpost backup --path FILE`."""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

import click
from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn

from outpost.cli.context import CliContext, pass_cli
from outpost.cli.output import console
from outpost.errors import BackupError

CHUNK = 64 * 1024


def write_atomically(path: Path, data: bytes, *, show_progress: bool = True) -> None:
    """Write DATA to PATH through a temp file in the same directory, fsync, rename."""
    path = path.expanduser()
    directory = path.parent if str(path.parent) else Path(".")
    if path.is_dir():
        raise BackupError(f"Cannot write backup to {path}: it is a directory; give a file path.")
    if not directory.is_dir():
        raise BackupError(f"Cannot write backup to {path}: directory {directory} does not exist.")
    tmp = directory / f".{path.name}.{os.getpid()}.tmp"
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except OSError as exc:
        raise BackupError(
            f"Cannot write backup to {path}: {exc.strerror}; choose a writable path."
        ) from None
    try:
        with (
            os.fdopen(fd, "wb") as fh,
            Progress(
                TextColumn("backup"),
                BarColumn(),
                DownloadColumn(),
                console=console(stderr=True),
                disable=not show_progress,
                transient=True,
            ) as progress,
        ):
            task = progress.add_task("write", total=len(data))
            for start in range(0, len(data), CHUNK):
                fh.write(data[start : start + CHUNK])
                progress.advance(task, len(data[start : start + CHUNK]))
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except OSError as exc:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise BackupError(f"Cannot write backup to {path}: {exc.strerror}.") from None


@click.command()
@click.option(
    "--path",
    "path",
    required=True,
    type=click.Path(path_type=Path),
    help="The backup file to write.",
)
@pass_cli
def backup(cli: CliContext, path: Path) -> None:
    """Write the connection data (not cluster metadata) to a checked, encrypted file.

    Restore it by starting a new agent with `outpost serve --restore-path FILE`.
    """
    with cli.backend() as backend:
        data = backend.backup_bytes()
    write_atomically(path, data, show_progress=os.isatty(2))
    click.echo(f"Wrote backup {path} ({len(data)} bytes).")
