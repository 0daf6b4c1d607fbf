"""`outpost serve`: the agent process.

Opens and locks the store, checks the key, restores a backup into a new data dir when asked,
serves the local API, keeps every connection's UP current, runs the link to HQ (when the agent
is logged in, or hq.url and hq.token are set) and the jobs HQ sends, and handles signals:
SIGTERM and SIGINT drain and exit 0, SIGHUP reloads what can be reloaded (and reconnects to HQ
when `outpost login` changed the association meanwhile). A token HQ rejects stops the agent
with exit code 1.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import secrets
import signal
import socket
import time
from collections.abc import Callable
from pathlib import Path

import uvicorn

from outpost import __version__
from outpost.api.app import AgentState, create_app
from outpost.api.service import AgentService
from outpost.config import AgentConfig, LoadedConfig, load_config, split_host_port
from outpost.errors import BackupError, ConfigError, OutpostError
from outpost.httpserve import EmbeddedServer
from outpost.jobs.executor import Executor
from outpost.jobs.ledger import JobLedger
from outpost.link.errors import TokenRejected
from outpost.link.session import HQLink, check_config, link_wanted
from outpost.logs import setup_logging
from outpost.pooler.admin import PoolerCollector
from outpost.pooler.server import PoolerServer, serve_pooler
from outpost.pooler.workers import open_routes

log = logging.getLogger("outpost.agent")

TOKEN_FILE = "api.token"  # noqa: S105 - a file name
API_FILE = "agent.api.json"


def bind_sockets(addresses: list[str]) -> list[socket.socket]:
    sockets: list[socket.socket] = []
    for address in addresses:
        host, port = split_host_port(address)
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        # proto=IPPROTO_TCP so asyncio sets TCP_NODELAY on accepted connections (it checks the
        # protocol number); without it every response waits ~40 ms for a delayed ACK.
        sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        try:
            sock.bind((host, port))
        except OSError as exc:
            sock.close()
            for s in sockets:
                s.close()
            raise OutpostError(
                f"Cannot listen on {address} (api.client_bind_addresses): {exc.strerror}; "
                "stop the other process or change api.client_bind_addresses."
            ) from None
        sock.listen(128)
        sock.setblocking(False)
        sockets.append(sock)
    return sockets


def _url_of(sock: socket.socket) -> str:
    host, port = sock.getsockname()[:2]
    if host in ("0.0.0.0", "::"):  # noqa: S104 - mapping a wildcard bind to loopback
        host = "127.0.0.1"
    if ":" in host:
        host = f"[{host}]"
    return f"http://{host}:{port}"


def _write_private(path: Path, text: str) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as fh:
        fh.write(text)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


class AgentRuntime:
    def __init__(
        self,
        loaded: LoadedConfig,
        *,
        config_arg: str | None = None,
        restore_path: str | None = None,
    ) -> None:
        self.loaded = loaded
        self.config_arg = config_arg
        self.restore_path = restore_path
        self.stop_event = asyncio.Event()
        self.reload_requested = asyncio.Event()
        self.exit_code = 0
        self.link: HQLink | None = None
        self.link_task: asyncio.Task[None] | None = None
        self.executor: Executor | None = None
        self.ledger: JobLedger | None = None
        self.pooler_task: asyncio.Task[None] | None = None
        self.pooler_reload = asyncio.Event()

    # --- startup ------------------------------------------------------------------------

    def _restore(self, service: AgentService) -> None:
        assert self.restore_path is not None
        path = Path(self.restore_path).expanduser()
        store = service.store
        if store.started_at is not None or store.connections():
            when = (
                time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(store.started_at))
                if store.started_at
                else None
            )
            reason = f"it was first started at {when}" if when else "it already holds connections"
            log.warning(
                "restore from %s ignored: data dir %s is not new (%s); a backup is only "
                "restored into a data dir that has never been started",
                path,
                store.data_dir,
                reason,
            )
            return
        try:
            data = path.read_bytes()
        except OSError as exc:
            raise BackupError(f"Cannot read backup {path}: {exc.strerror}.") from None
        count = service.restore(data, str(path))
        log.info("restored %d connection(s) from %s", count, path)

    async def main(self) -> int:
        cfg = self.loaded.config
        service = AgentService.open(self.loaded, owner="serve")
        try:
            return await self._serve(service, cfg)
        finally:
            for name in (API_FILE, TOKEN_FILE):
                with contextlib.suppress(OSError):
                    (service.store.data_dir / name).unlink()
            service.close()

    async def _serve(self, service: AgentService, cfg: AgentConfig) -> int:
        for warning in service.warnings:
            log.warning("%s", warning)
        if self.restore_path:
            self._restore(service)
        if link_wanted(service):
            check_config(service)
        elif cfg.hq.url is not None:
            log.warning(
                "hq.url is set but this agent has no HQ token; run `outpost login --hq %s "
                "--token-file FILE` or set hq.token (OUTPOST_HQ_TOKEN) to connect",
                cfg.hq.url,
            )
        sockets = bind_sockets(cfg.api.client_bind_addresses)
        token = secrets.token_urlsafe(32)
        data_dir = service.store.data_dir
        _write_private(data_dir / TOKEN_FILE, token + "\n")
        urls = [_url_of(s) for s in sockets]
        service.api_url = urls[0]
        _write_private(
            data_dir / API_FILE,
            json.dumps({"url": urls[0], "urls": urls, "pid": os.getpid(), "version": __version__}),
        )
        service.mark_started()
        state = AgentState(service, token, cfg.query.workers)
        app = create_app(state)
        server = EmbeddedServer(
            uvicorn.Config(
                app,
                log_config=None,
                lifespan="off",
                timeout_graceful_shutdown=10,
                access_log=False,
            )
        )
        loop = asyncio.get_running_loop()
        loop.add_signal_handler(signal.SIGTERM, self.stop_event.set)
        loop.add_signal_handler(signal.SIGINT, self.stop_event.set)
        loop.add_signal_handler(signal.SIGHUP, self.reload_requested.set)
        server_task = asyncio.create_task(server.serve(sockets=sockets))
        while not server.started and not server_task.done():
            await asyncio.sleep(0.01)
        if server_task.done():
            server_task.result()
            return 1
        state.ready = True
        log.info(
            "Outpost agent %s serving data dir %s on %s (%d connection(s))",
            __version__,
            data_dir,
            ", ".join(urls),
            len(service.store.slugs()),
        )
        checker = asyncio.create_task(self._check_loop(state))
        reloader = asyncio.create_task(self._reload_loop(state))
        if link_wanted(service):
            self._start_link(service)
        if cfg.pooler is not None:
            self._start_pooler(state)
        await self.stop_event.wait()
        log.info("stopping: draining requests")
        state.draining = True
        checker.cancel()
        reloader.cancel()
        await self._stop_link()
        if self.pooler_task is not None:
            with contextlib.suppress(asyncio.CancelledError):
                await self.pooler_task
        server.should_exit = True
        await server_task
        with contextlib.suppress(asyncio.CancelledError):
            await checker
        log.info("stopped")
        return self.exit_code

    # --- the link to HQ ------------------------------------------------------------------------

    def _start_link(self, service: AgentService) -> None:
        self.ledger = JobLedger(service.store.data_dir)
        self.executor = Executor(service, self.ledger, workers=self.loaded.config.query.workers)
        self.executor.recover()
        self.link = HQLink(service, self.executor)
        self.link_task = asyncio.create_task(self._run_link(self.link), name="hq-link")

    async def _run_link(self, link: HQLink) -> None:
        try:
            await link.run()
        except TokenRejected as exc:
            log.error("%s Stopping the agent.", exc.message)
            self.exit_code = 1
            self.stop_event.set()

    async def _stop_link(self) -> None:
        if self.link_task is not None:
            self.link_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self.link_task
        if self.executor is not None:
            await self.executor.close()
        if self.ledger is not None:
            self.ledger.close()

    # --- the pooler (when the config has a pooler section; one process: workers is ignored) -----

    def _start_pooler(self, state: AgentState) -> None:
        def started(srv: PoolerServer) -> None:
            state.metrics.registry.register(PoolerCollector(srv))

        self.pooler_task = asyncio.create_task(self._run_pooler(started), name="pooler")

    async def _run_pooler(self, started: Callable[[PoolerServer], None]) -> None:
        try:
            await serve_pooler(
                self.loaded,
                open_routes(self.loaded),
                stop=self.stop_event,
                reload=self.pooler_reload,
                config_arg=self.config_arg,
                on_started=started,
            )
        except OutpostError as exc:
            log.error("the pooler stopped: %s Stopping the agent.", exc.message)
            self.exit_code = 1
            self.stop_event.set()

    # --- background loops --------------------------------------------------------------------

    async def _check_loop(self, state: AgentState) -> None:
        while True:
            try:
                reports = await state.run(state.service.check_all)
                drivers = {c.slug: c.driver for c in state.service.store.connections()}
                for report in reports:
                    driver = drivers.get(report.slug, "unknown")
                    state.metrics.check_duration.labels(driver).observe(report.duration_seconds)
                    state.metrics.checks.labels(driver, "up" if report.up else "down").inc()
                    if not report.up:
                        log.warning("connection %s is down: %s", report.slug, report.error)
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("connection check failed")
            await asyncio.sleep(self.loaded.config.checks.interval)

    async def _reload_loop(self, state: AgentState) -> None:
        while True:
            await self.reload_requested.wait()
            self.reload_requested.clear()
            self.reload(state)
            self.pooler_reload.set()
            try:
                if self.link is not None:
                    await self.link.refresh()
                elif link_wanted(state.service):
                    check_config(state.service)
                    self._start_link(state.service)
            except OutpostError as exc:
                log.error("cannot start the link to HQ: %s", exc.message)

    def reload(self, state: AgentState) -> None:
        """SIGHUP: re-read the config, apply what can change without a restart."""
        try:
            new = load_config(self.config_arg)
        except ConfigError as exc:
            log.error("reload failed, keeping the running configuration: %s", exc)
            return
        old = self.loaded.config
        cfg = new.config
        for what, before, after in (
            ("data_dir", old.data_dir, cfg.data_dir),
            ("key_path", old.key_path, cfg.key_path),
            (
                "api.client_bind_addresses",
                old.api.client_bind_addresses,
                cfg.api.client_bind_addresses,
            ),
            ("query.workers", old.query.workers, cfg.query.workers),
        ):
            if before != after:
                log.warning("%s changed; restart the agent to apply it", what)
        cfg.data_dir, cfg.key_path = old.data_dir, old.key_path
        cfg.api = old.api
        cfg.query.workers = old.query.workers
        setup_logging(cfg.log.format, cfg.log.level)
        self.loaded = new
        state.service.loaded = new
        state.service.config = cfg
        log.info(
            "configuration reloaded from %s (log %s/%s, read_only %s, check interval %ss)",
            new.source or "built-in defaults",
            cfg.log.format,
            cfg.log.level,
            cfg.read_only,
            cfg.checks.interval,
        )


def run_agent(
    loaded: LoadedConfig, *, config_arg: str | None = None, restore_path: str | None = None
) -> int:
    setup_logging(loaded.config.log.format, loaded.config.log.level)
    runtime = AgentRuntime(loaded, config_arg=config_arg, restore_path=restore_path)
    try:
        import uvloop
    except ImportError:
        return asyncio.run(runtime.main())
    return int(uvloop.run(runtime.main()))
