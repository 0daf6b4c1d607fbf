"""A download progress bar for drivers that fetch their source (sqlite, csv)."""

from __future__ import annotations

import os

from rich.progress import (
    BarColumn,
    DownloadColumn,
    Progress,
    TaskID,
    TextColumn,
    TransferSpeedColumn,
)

from outpost.cli.output import console


class DownloadProgress:
    """Called as progress(done, total); draws a bar on a terminal, nothing otherwise."""

    def __init__(self, label: str = "download") -> None:
        self.label = label
        self.enabled = os.isatty(2)
        self._progress: Progress | None = None
        self._task: TaskID | None = None

    def __call__(self, done: int, total: int | None) -> None:
        if not self.enabled:
            return
        if self._progress is None:
            self._progress = Progress(
                TextColumn(self.label),
                BarColumn(),
                DownloadColumn(),
                TransferSpeedColumn(),
                console=console(stderr=True),
                transient=True,
            )
            self._progress.start()
            self._task = self._progress.add_task(self.label, total=total)
        assert self._task is not None
        self._progress.update(self._task, completed=done, total=total)
        if total is not None and done >= total:
            self.close()

    def close(self) -> None:
        if self._progress is not None:
            self._progress.stop()
            self._progress = None
            self._task = None
