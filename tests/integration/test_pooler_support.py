"""Shared pieces of the pooler tests: a pooler running in a thread, a throwaway database with
tenant schemas, raw protocol clients. (No tests in this module.)"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import struct
import threading
import uuid
from collections.abc import Iterator
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlparse

import pytest

from outpost.config import PoolerConfig
from outpost.pooler.passwords import make_client_secret
from outpost.pooler.routes import Destination, Route, RouteSource
from outpost.pooler.server import PoolerServer, bind_listeners

PASSWORD = "tenant-pw-1"
USER = "app_user"
TENANTS = ("tenant_a", "tenant_b", "tenant_c")


@dataclass
class RunningPooler:
    """A PoolerServer on its own event loop in a thread, on a free port. LOOP_KIND: "engine"
    (asyncio on the engine's epoll set, as `outpost pooler serve` runs it), "uvloop" (the
    engine as one file descriptor of uvloop's, as inside `outpost serve`) or "asyncio" (the
    same on the standard library's loop, without the `speed` extra)."""

    config: PoolerConfig
    routes: RouteSource
    loop_kind: str = "engine"
    port: int = 0
    server: PoolerServer | None = None
    loop: asyncio.AbstractEventLoop | None = None
    _thread: threading.Thread | None = None
    _stop: asyncio.Event | None = None
    _ready: threading.Event = field(default_factory=threading.Event)
    _error: BaseException | None = None

    def start(self) -> RunningPooler:
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        if not self._ready.wait(20):
            raise AssertionError("the pooler did not start within 20s")
        if self._error is not None:
            raise self._error
        return self

    def _run(self) -> None:
        import uvloop

        from outpost.pooler.loop import EngineLoop

        loop: asyncio.AbstractEventLoop
        if self.loop_kind == "engine":
            loop = EngineLoop()
        elif self.loop_kind == "uvloop":
            loop = uvloop.new_event_loop()
        else:
            loop = asyncio.new_event_loop()
        self.loop = loop
        asyncio.set_event_loop(loop)
        try:
            loop.run_until_complete(self._main())
        except BaseException as exc:
            self._error = exc
            self._ready.set()
        finally:
            loop.close()

    async def _main(self) -> None:
        self._stop = asyncio.Event()
        sockets = bind_listeners(["127.0.0.1:0"])
        self.port = int(sockets[0].getsockname()[1])
        self.server = PoolerServer(self.config, self.routes)
        await self.server.start(sockets)
        self._ready.set()
        await self._stop.wait()
        await self.server.close()
        for sock in sockets:
            sock.close()

    def call(self, coro: Any, timeout: float = 30) -> Any:
        """Run a coroutine on the pooler's loop and wait for its result."""
        assert self.loop is not None
        future: Future[Any] = asyncio.run_coroutine_threadsafe(coro, self.loop)
        return future.result(timeout)

    def stop(self) -> None:
        if self.loop is not None and self._stop is not None:
            self.loop.call_soon_threadsafe(self._stop.set)
        if self._thread is not None:
            self._thread.join(20)

    def conninfo(self, **kw: Any) -> dict[str, Any]:
        out: dict[str, Any] = {
            "host": "127.0.0.1",
            "port": self.port,
            "user": USER,
            "password": PASSWORD,
            "dbname": "app",
            "sslmode": "disable",
            "connect_timeout": 10,
        }
        out.update(kw)
        return out

    def dsn(self, **kw: Any) -> str:
        return " ".join(f"{k}={v}" for k, v in self.conninfo(**kw).items())

    def pool_stats(self) -> list[tuple[int, int]]:
        """(active, idle) of each pool, read on the pooler's loop."""

        async def read() -> list[tuple[int, int]]:
            assert self.server is not None
            return [(len(p.active), len(p.idle)) for p in self.server.pools.values()]

        result: list[tuple[int, int]] = self.call(read())
        return result


@contextlib.contextmanager
def running_pooler(
    config: PoolerConfig, routes: RouteSource, *, loop_kind: str = "engine"
) -> Iterator[RunningPooler]:
    pooler = RunningPooler(config, routes, loop_kind=loop_kind).start()
    try:
        yield pooler
    finally:
        pooler.stop()


@dataclass(frozen=True)
class TenantDb:
    """A throwaway database on the shared server with one schema (and table) per tenant."""

    host: str
    port: int
    user: str
    name: str

    def destination(self, **kw: Any) -> Destination:
        return Destination(self.host, self.port, self.name, self.user, None, **kw)

    def routes(self, database: str = "app", *, user: str = USER) -> list[Route]:
        secret = make_client_secret(PASSWORD, user)
        dest = self.destination(sslmode="disable")
        return [Route(database, schema, user, secret, dest) for schema in ("public", *TENANTS)]

    def admin(self) -> Any:
        import psycopg

        return psycopg.connect(
            host=self.host, port=self.port, user=self.user, dbname=self.name, autocommit=True
        )


def create_tenant_db(pg_params: dict[str, object]) -> TenantDb:
    import psycopg

    host, port, user = str(pg_params["host"]), int(str(pg_params["port"])), str(pg_params["user"])
    name = f"outpost_pooler_{uuid.uuid4().hex[:10]}"
    with psycopg.connect(
        host=host, port=port, user=user, dbname=str(pg_params["database"]), autocommit=True
    ) as conn:
        conn.execute(f'CREATE DATABASE "{name}"'.encode())
    db = TenantDb(host, port, user, name)
    with db.admin() as conn:
        conn.execute("CREATE TABLE public.whoami (name text)")
        conn.execute("INSERT INTO public.whoami VALUES ('public')")
        for tenant in TENANTS:
            conn.execute(f"CREATE SCHEMA {tenant}".encode())
            conn.execute(f"CREATE TABLE {tenant}.whoami (name text)".encode())
            conn.execute(f"INSERT INTO {tenant}.whoami VALUES ('{tenant}')".encode())
    return db


def drop_tenant_db(pg_params: dict[str, object], db: TenantDb) -> None:
    import psycopg

    with psycopg.connect(
        host=db.host, port=db.port, user=db.user, dbname=str(pg_params["database"]), autocommit=True
    ) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{db.name}" WITH (FORCE)'.encode())


@pytest.fixture(scope="module")
def tenant_db(pg_params: dict[str, object]) -> Iterator[TenantDb]:
    db = create_tenant_db(pg_params)
    try:
        yield db
    finally:
        drop_tenant_db(pg_params, db)


def cancel_a_slow_query(conn: Any, other: Any) -> None:
    """Start `SELECT pg_sleep(30)` on CONN (autocommit) in a thread, wait until OTHER sees it
    run, cancel it through the pooler: it must end with QueryCanceled, and CONN go on."""
    import psycopg

    from tests.helpers import wait_for

    result: dict[str, str] = {}

    def slow() -> None:
        try:
            conn.execute("SELECT pg_sleep(30)")
            result["outcome"] = "finished"
        except psycopg.errors.QueryCanceled:
            result["outcome"] = "canceled"

    thread = threading.Thread(target=slow)
    thread.start()
    wait_for(
        lambda: (
            other.execute(
                "SELECT count(*) FROM pg_stat_activity WHERE query = 'SELECT pg_sleep(30)'"
                " AND state = 'active'"
            ).fetchone()
            == (1,)
        ),
        what="the slow query to start",
    )
    conn.cancel_safe()
    thread.join(30)
    assert result["outcome"] == "canceled"
    assert conn.execute("SELECT 1").fetchone() == (1,)


# --- raw protocol clients ---------------------------------------------------------------------


def raw_connect(port: int) -> socket.socket:
    return socket.create_connection(("127.0.0.1", port), timeout=10)


def read_messages_until(sock: socket.socket, kinds: bytes) -> list[tuple[bytes, bytes]]:
    """Read messages until one whose type is in KINDS (or EOF)."""
    out: list[tuple[bytes, bytes]] = []
    buf = b""
    while True:
        while len(buf) >= 5:
            kind = buf[:1]
            (length,) = struct.unpack("!i", buf[1:5])
            if len(buf) < length + 1:
                break
            out.append((kind, buf[5 : length + 1]))
            buf = buf[length + 1 :]
            if kind in kinds:
                return out
        chunk = sock.recv(65536)
        if not chunk:
            return out
        buf += chunk


def error_of(messages: list[tuple[bytes, bytes]]) -> dict[str, str]:
    """The fields of the first ErrorResponse in MESSAGES ({} when none)."""
    for kind, body in messages:
        if kind == b"E":
            fields: dict[str, str] = {}
            for part in body.split(b"\0"):
                if part:
                    fields[chr(part[0])] = part[1:].decode()
            return fields
    return {}


def startup_bytes(**params: str) -> bytes:
    body = struct.pack("!i", 196608)
    for k, v in params.items():
        body += k.encode() + b"\0" + v.encode() + b"\0"
    body += b"\0"
    return struct.pack("!i", len(body) + 4) + body


def pg_url_params(dsn: str) -> dict[str, object]:
    u = urlparse(dsn)
    return {
        "host": u.hostname or "127.0.0.1",
        "port": u.port or 5432,
        "user": u.username or "postgres",
        "database": (u.path or "/test").lstrip("/") or "test",
    }
