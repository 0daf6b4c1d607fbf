"""Running the pooler: one process, or N worker processes sharing the listen port.

With ``workers = N > 1`` the parent forks N workers; each binds the listen addresses with
SO_REUSEPORT (the kernel spreads new connections across them) and a unix socket
``cancel-<id>.sock`` in a private runtime dir. A client's BackendKeyData carries its worker's id
in the top bits of the pid, so a CancelRequest that the kernel hands to another worker is
forwarded to the right one. The parent forwards SIGHUP/SIGTERM/SIGINT to the workers and
restarts a worker that dies unexpectedly.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import shutil
import signal
import tempfile
import time
from pathlib import Path

from outpost.config import LoadedConfig, PoolerConfig
from outpost.crypto import load_key_file
from outpost.errors import OutpostError
from outpost.logs import setup_logging
from outpost.pooler.routes import RouteSource
from outpost.pooler.sources import open_route_source

log = logging.getLogger("outpost.pooler")


def open_routes(loaded: LoadedConfig) -> RouteSource:
    """The route source from the configuration (the agent's store and/or perseus_auth)."""
    key = load_key_file(loaded.config.key_path) if loaded.config.key_path else None
    return open_route_source(loaded, key=key)


def command_line_overrides(listen: list[str] | None, workers: int | None) -> dict[str, object]:
    update: dict[str, object] = {}
    if listen:
        update["listen_addresses"] = list(listen)
    if workers is not None:
        update["workers"] = workers
    return update


def with_overrides(loaded: LoadedConfig, overrides: dict[str, object]) -> LoadedConfig:
    """LOADED with the pooler section present and --listen/--workers applied (validated)."""
    cfg = loaded.config.pooler or PoolerConfig()
    if overrides:
        cfg = PoolerConfig.model_validate({**cfg.model_dump(by_alias=False), **overrides})
    loaded.config.pooler = cfg
    return loaded


async def _worker_main(
    loaded: LoadedConfig,
    config_arg: str | None,
    worker_id: int,
    workers: int,
    runtime_dir: Path | None,
    overrides: dict[str, object],
) -> int:
    from outpost.pooler.server import bind_listeners, install_signals, serve_pooler

    cfg = loaded.config.pooler
    assert cfg is not None
    stop = asyncio.Event()
    reload = asyncio.Event()
    install_signals(stop, reload)
    sockets = bind_listeners(cfg.listen_addresses, reuse_port=workers > 1)
    routes = open_routes(loaded)
    try:
        await serve_pooler(
            loaded,
            routes,
            stop=stop,
            reload=reload,
            config_arg=config_arg,
            sockets=sockets,
            worker_id=worker_id,
            workers=workers,
            runtime_dir=runtime_dir,
            overrides=overrides,
            serve_metrics=True,
        )
    finally:
        for sock in sockets:
            sock.close()
    return 0


def _run_loop(coro_factory: object) -> int:
    import inspect

    assert callable(coro_factory)
    coro = coro_factory()
    assert inspect.iscoroutine(coro)
    from outpost.pooler.loop import EngineLoop

    # asyncio on the engine's epoll set: one epoll_wait per wake-up (see outpost.pooler.loop)
    with asyncio.Runner(loop_factory=EngineLoop) as runner:
        return int(runner.run(coro))


def run_pooler(
    loaded: LoadedConfig,
    *,
    config_arg: str | None = None,
    overrides: dict[str, object] | None = None,
) -> int:
    """`outpost pooler serve`: run until SIGTERM/SIGINT; exit code 0, or 1 on failure."""
    setup_logging(loaded.config.log.format, loaded.config.log.level)
    cfg = loaded.config.pooler
    assert cfg is not None
    extra = overrides or {}
    if cfg.workers == 1:
        return _run_loop(lambda: _worker_main(loaded, config_arg, 0, 1, None, extra))
    return _supervise(loaded, config_arg, cfg.workers, extra)


def _supervise(
    loaded: LoadedConfig, config_arg: str | None, workers: int, overrides: dict[str, object]
) -> int:
    # Fail early (in the parent) when an address cannot be bound at all.
    from outpost.pooler.server import bind_listeners

    cfg = loaded.config.pooler
    assert cfg is not None
    for sock in bind_listeners(cfg.listen_addresses, reuse_port=True):
        sock.close()
    runtime_dir = Path(tempfile.mkdtemp(prefix="outpost-pooler-"))
    children: dict[int, int] = {}  # pid -> worker id
    stopping = False

    def start(worker_id: int) -> None:
        pid = os.fork()
        if pid == 0:  # the worker
            code = 1
            try:
                for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
                    signal.signal(sig, signal.SIG_DFL)
                code = _run_loop(
                    lambda: _worker_main(
                        loaded, config_arg, worker_id, workers, runtime_dir, overrides
                    )
                )
            except OutpostError as exc:
                log.error("worker %d: %s", worker_id, exc)
            except BaseException:
                log.exception("worker %d failed", worker_id)
            finally:
                os._exit(code)
        children[pid] = worker_id

    def forward(signum: int, _frame: object) -> None:
        nonlocal stopping
        if signum in (signal.SIGTERM, signal.SIGINT):
            stopping = True
        for pid in list(children):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signum)

    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(sig, forward)
    for worker_id in range(workers):
        start(worker_id)
    log.info("pooler supervisor %d started %d workers", os.getpid(), workers)
    failures: list[float] = []
    code = 0
    try:
        while children:
            try:
                pid, status = os.wait()
            except ChildProcessError:
                break
            worker_id = children.pop(pid, -1)
            if worker_id < 0 or stopping:
                continue
            exit_code = os.waitstatus_to_exitcode(status)
            log.error("pooler worker %d (pid %d) exited with %d", worker_id, pid, exit_code)
            now = time.monotonic()
            failures = [t for t in failures if now - t < 60] + [now]
            if len(failures) > 5 * workers:
                log.error("pooler workers keep failing; stopping")
                code = 1
                forward(signal.SIGTERM, None)
                continue
            start(worker_id)
    finally:
        shutil.rmtree(runtime_dir, ignore_errors=True)
    return code
