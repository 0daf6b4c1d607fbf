"""`outpost hq serve`: open the database (migrated), bind, serve with uvicorn, stop on SIGTERM.

SIGTERM and SIGINT stop HQ cleanly (exit 0): agents' links are closed (they reconnect to the
next HQ), held long-polls return, the database is closed.
"""

from __future__ import annotations

import asyncio
import logging
import signal
import socket
import ssl

import uvicorn

from outpost import __version__
from outpost.errors import OutpostError, UsageError
from outpost.hq.app import create_app
from outpost.hq.core import HQCore, safe_url
from outpost.hq.dispatch import CLOSE_GOING_AWAY
from outpost.hq.settings import HQSettings
from outpost.httpserve import EmbeddedServer

log = logging.getLogger("outpost.hq")


def bind(host: str, port: int) -> socket.socket:
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except socket.gaierror as exc:
        raise UsageError(f"--host {host!r} cannot be resolved: {exc.strerror}.") from None
    family, _, _, _, address = infos[0]
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    try:
        sock.bind(address)
    except OSError as exc:
        sock.close()
        raise OutpostError(
            f"Cannot listen on {host}:{port}: {exc.strerror}; stop the other process or "
            "choose another --port."
        ) from None
    sock.listen(1024)
    sock.setblocking(False)
    return sock


def url_of(sock: socket.socket, tls: bool) -> str:
    host, port = sock.getsockname()[:2]
    if ":" in host:
        host = f"[{host}]"
    return f"{'https' if tls else 'http'}://{host}:{port}"


def _config(settings: HQSettings, core: HQCore) -> uvicorn.Config:
    tls = settings.tls_cert is not None
    config = uvicorn.Config(
        create_app(settings, core),
        log_config=None,
        access_log=False,
        lifespan="on",
        ssl_certfile=str(settings.tls_cert) if tls else None,
        ssl_keyfile=str(settings.tls_key) if settings.tls_key else None,
        timeout_graceful_shutdown=5,
        ws_max_size=64 * 1024 * 1024,
        ws_ping_interval=None,  # HQ and agents send their own heartbeats
        ws_per_message_deflate=False,
        backlog=1024,
    )
    try:
        config.load()
    except (ssl.SSLError, OSError) as exc:
        raise OutpostError(
            f"Cannot use --tls-cert {settings.tls_cert} / --tls-key {settings.tls_key}: "
            f"{getattr(exc, 'strerror', None) or exc}; give a PEM certificate and its key."
        ) from None
    return config


async def serve(settings: HQSettings) -> int:
    core = HQCore.open(settings)
    try:
        config = _config(settings, core)
        sock = bind(settings.host, settings.port)
    except BaseException:
        core.close()
        raise
    server = EmbeddedServer(config)
    loop = asyncio.get_running_loop()

    def stop() -> None:
        if not server.should_exit:
            log.info("stopping: closing agent links")
        core.dispatcher.stopping.set()
        for session in list(core.dispatcher.sessions.values()):
            session.close(CLOSE_GOING_AWAY, "HQ is shutting down")  # held polls return now
        server.should_exit = True

    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop)
    task = asyncio.create_task(server.serve(sockets=[sock]))
    while not server.started and not task.done():
        await asyncio.sleep(0.01)
    if task.done():
        task.result()
        return 1
    url = url_of(sock, settings.tls_cert is not None)
    log.info(
        "Outpost HQ %s (id %s) database %s",
        __version__,
        core.hq_id,
        safe_url(core.db),
    )
    log.info("Outpost HQ listening on %s", url, extra={"url": url})
    await task
    log.info("Outpost HQ stopped")
    return 0


def run_hq(settings: HQSettings) -> int:
    try:
        import uvloop
    except ImportError:
        return asyncio.run(serve(settings))
    return int(uvloop.run(serve(settings)))
