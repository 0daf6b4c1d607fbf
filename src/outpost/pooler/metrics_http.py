"""``/metrics``, ``/healthz`` and ``/readyz`` of ``outpost pooler serve`` (pooler.metrics_listen).

With one worker, the endpoint shows that process's pooler metrics (``PoolerCollector``). With
``workers = N``, worker 0 serves HTTP and asks the other workers for theirs over unix sockets in
the runtime dir (``metrics-<id>.sock``: connect, read the text exposition, done), giving every
sample a ``worker`` label and reporting ``outpost_pooler_worker_up{worker=…}``. Inside
``outpost serve`` the agent's own ``/metrics`` carries the pooler's metrics instead.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
from pathlib import Path
from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.exposition import CONTENT_TYPE_LATEST
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.registry import Collector

from outpost import __version__
from outpost.config import split_host_port
from outpost.errors import OutpostError
from outpost.httpserve import EmbeddedServer
from outpost.pooler.admin import PoolerCollector

if TYPE_CHECKING:
    from collections.abc import Iterator

    from starlette.requests import Request
    from starlette.responses import Response

    from outpost.pooler.server import PoolerServer

log = logging.getLogger("outpost.pooler")
#: How long worker 0 waits for another worker's metrics before reporting it down.
WORKER_TIMEOUT = 2.0


def metrics_socket_path(runtime_dir: Path, worker: int) -> Path:
    return runtime_dir / f"metrics-{worker}.sock"


class _Families(Collector):
    """Already-built metric families, yielded as they are."""

    def __init__(self, families: list[Metric]) -> None:
        self.families = families

    def collect(self) -> Iterator[Metric]:
        yield from self.families


def _build_info() -> Metric:
    info = GaugeMetricFamily("outpost_build_info", "Outpost build information", labels=["version"])
    info.add_metric([__version__], 1)
    return info


def worker_text(srv: PoolerServer) -> bytes:
    """One process's pooler metrics in the text exposition format."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(PoolerCollector(srv))
    return generate_latest(registry)


def merge(texts: list[tuple[int, str | None]]) -> bytes:
    """The expositions of several workers (None: no answer) as one, labelled by worker."""
    families: dict[str, Metric] = {}
    up = GaugeMetricFamily(
        "outpost_pooler_worker_up", "1 when the worker answered this scrape", labels=["worker"]
    )
    for worker, text in texts:
        up.add_metric([str(worker)], 0 if text is None else 1)
        if text is None:
            continue
        for family in text_string_to_metric_families(text):
            merged = families.get(family.name)
            if merged is None:
                merged = Metric(family.name, family.documentation, family.type, family.unit)
                families[family.name] = merged
            for sample in family.samples:
                labels = {**sample.labels, "worker": str(worker)}
                merged.samples.append(sample._replace(labels=labels))
    registry = CollectorRegistry(auto_describe=False)
    registry.register(_Families([_build_info(), up, *families.values()]))
    return generate_latest(registry)


class MetricsEndpoint:
    """The HTTP endpoint (worker 0, when pooler.metrics_listen is set) or a worker's socket."""

    def __init__(
        self,
        srv: PoolerServer,
        listen: str | None,
        *,
        worker_id: int = 0,
        workers: int = 1,
        runtime_dir: Path | None = None,
    ) -> None:
        self.srv = srv
        self.listen = listen
        self.worker_id = worker_id
        self.workers = workers
        self.runtime_dir = runtime_dir
        self._task: asyncio.Task[None] | None = None
        self._http: EmbeddedServer | None = None
        self._unix: asyncio.AbstractServer | None = None

    async def start(self) -> None:
        if self.listen is None:
            return
        if self.worker_id == 0:
            self._start_http(self.listen)
        elif self.runtime_dir is not None:
            path = metrics_socket_path(self.runtime_dir, self.worker_id)
            with contextlib.suppress(FileNotFoundError):
                path.unlink()
            self._unix = await asyncio.start_unix_server(self._answer, str(path))

    async def close(self) -> None:
        if self._unix is not None:
            self._unix.close()
            if self.runtime_dir is not None:
                with contextlib.suppress(OSError):
                    metrics_socket_path(self.runtime_dir, self.worker_id).unlink()
        if self._http is not None:
            self._http.should_exit = True
        if self._task is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._task, 5)

    # --- worker 0: HTTP --------------------------------------------------------------------

    def _start_http(self, listen: str) -> None:
        import uvicorn
        from starlette.applications import Starlette
        from starlette.routing import Route

        sock = _bind(listen)
        app = Starlette(
            routes=[
                Route("/metrics", self._metrics),
                Route("/healthz", self._healthz),
                Route("/readyz", self._readyz),
            ]
        )
        config = uvicorn.Config(app, log_config=None, lifespan="off", access_log=False)
        server = EmbeddedServer(config)
        self._http = server
        self._task = asyncio.get_running_loop().create_task(server.serve(sockets=[sock]))
        log.info("pooler metrics on http://%s/metrics", listen)

    async def scrape(self) -> bytes:
        """What GET /metrics answers."""
        if self.workers == 1 or self.runtime_dir is None:
            registry = CollectorRegistry(auto_describe=False)
            registry.register(_Families([_build_info()]))
            registry.register(PoolerCollector(self.srv))
            return generate_latest(registry)
        ids = range(1, self.workers)
        others = await asyncio.gather(*(self._ask(worker) for worker in ids))
        return merge([(0, worker_text(self.srv).decode()), *zip(ids, others, strict=True)])

    async def _ask(self, worker: int) -> str | None:
        assert self.runtime_dir is not None
        path = metrics_socket_path(self.runtime_dir, worker)
        try:
            async with asyncio.timeout(WORKER_TIMEOUT):
                reader, writer = await asyncio.open_unix_connection(str(path))
                try:
                    data = await reader.read()
                finally:
                    writer.close()
        except (OSError, TimeoutError) as exc:
            log.warning("pooler worker %d gave no metrics: %s", worker, exc)
            return None
        return data.decode()

    async def _metrics(self, _request: Request) -> Response:
        from starlette.responses import Response

        return Response(await self.scrape(), media_type=CONTENT_TYPE_LATEST)

    async def _healthz(self, _request: Request) -> Response:
        from starlette.responses import PlainTextResponse

        return PlainTextResponse("ok\n")

    async def _readyz(self, _request: Request) -> Response:
        from starlette.responses import PlainTextResponse

        if self.srv.engine is None:  # not started, or closing
            return PlainTextResponse("not ready\n", status_code=503)
        return PlainTextResponse("ready\n")

    # --- workers 1..N-1: their own metrics over a unix socket ------------------------------

    async def _answer(self, _reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            writer.write(worker_text(self.srv))
            await writer.drain()
        except OSError:
            pass
        finally:
            writer.close()


def _bind(listen: str) -> socket.socket:
    host, port = split_host_port(listen)
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        raise OutpostError(
            f"Cannot listen on {listen} (pooler.metrics_listen): {exc.strerror}; stop the other "
            "process or change pooler.metrics_listen."
        ) from None
    sock.listen(64)
    sock.setblocking(False)
    return sock
