"""What every command shares: the config, and the way to reach the agent's operations."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import click

from outpost.api.service import AgentService
from outpost.cli.progress import DownloadProgress
from outpost.config import LoadedConfig, load_config
from outpost.state.store import AgentRunningError

if TYPE_CHECKING:
    from outpost.api.client import AgentClient
    from outpost.pooler.route_admin import RouteAdmin


@dataclass
class CliContext:
    config_arg: str | None = None
    debug: bool = False
    _loaded: LoadedConfig | None = field(default=None, repr=False)

    def loaded(self) -> LoadedConfig:
        if self._loaded is None:
            self._loaded = load_config(self.config_arg)
        return self._loaded

    @contextlib.contextmanager
    def backend(self) -> Iterator[AgentService | AgentClient]:
        """The running agent's API when `outpost serve` owns the data dir, else the store.

        Never two writers: the store is locked while a command holds it, and a running agent
        is asked through its API instead of opening the store a second time.
        """
        loaded = self.loaded()
        backend: AgentService | AgentClient
        try:
            service = AgentService.open(loaded, owner="cli")
        except AgentRunningError:
            from outpost.api.client import AgentClient

            backend = AgentClient.from_data_dir(loaded.config.data_dir)
        else:
            backend = service
            progress = DownloadProgress()
            service.progress = progress
            for warning in service.cli_warnings:
                click.echo(f"Warning: {warning}", err=True)
        try:
            yield backend
        finally:
            if isinstance(backend, AgentService) and isinstance(backend.progress, DownloadProgress):
                backend.progress.close()
            backend.close()

    @contextlib.contextmanager
    def route_admin(self) -> Iterator[RouteAdmin]:
        """Pooler route changes: on the store here, or through the running agent's API."""
        from outpost.pooler.route_admin import LocalRouteAdmin

        with self.backend() as backend:
            if isinstance(backend, AgentService):
                yield LocalRouteAdmin(backend.store, backend.key)
            else:
                yield backend


pass_cli = click.make_pass_decorator(CliContext, ensure=True)
