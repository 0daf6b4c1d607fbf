"""Clients the engine accepts and logs in alone (no Python session until one is needed), through
the real pooler and PostgreSQL: they are served, counted, listed by the console, reached by a
cancel request, timed out mid-login, and told when the pooler shuts down."""

from __future__ import annotations

import hashlib
import os
import socket
import struct
from collections.abc import Iterator
from typing import Any

import psycopg
import pytest

from outpost.config import PoolerConfig
from outpost.pooler.routes import StaticRoutes
from outpost.pooler.server import PoolerServer
from tests.helpers import wait_for
from tests.integration.test_pooler_support import (
    PASSWORD,
    USER,
    RunningPooler,
    TenantDb,
    cancel_a_slow_query,
    error_of,
    raw_connect,
    read_messages_until,
    running_pooler,
    startup_bytes,
    tenant_db,  # noqa: F401 - fixture
)

pytestmark = pytest.mark.integration


@pytest.fixture
def pooler(tenant_db: TenantDb) -> Iterator[RunningPooler]:  # noqa: F811
    config = PoolerConfig(pool_size=2, client_auth="md5", admin_users=["admin"])
    with running_pooler(config, StaticRoutes(tenant_db.routes())) as running:
        yield running


def warm_up(pooler: RunningPooler) -> None:
    """Two logins with psycopg's startup packet, which Python runs: the first to a destination
    learns its settings, the second is remembered (the engine runs the next ones)."""
    for _ in range(2):
        with psycopg.connect(**pooler.conninfo()) as conn:
            assert conn.execute("SELECT name FROM whoami").fetchone() == ("public",)


def server_of(pooler: RunningPooler) -> PoolerServer:
    assert pooler.server is not None
    return pooler.server


def unowned(pooler: RunningPooler) -> int:
    """Clients the engine runs alone now (read on the pooler's loop)."""

    async def read() -> int:
        engine = server_of(pooler).engine
        return engine.unowned if engine is not None else -1

    count: int = pooler.call(read())
    return count


def md5_login(pooler: RunningPooler, **params: str) -> tuple[Any, list[tuple[bytes, bytes]]]:
    """A raw client through the md5 exchange: its socket and what the pooler answered."""
    sock = raw_connect(pooler.port)
    sock.sendall(startup_bytes(user=USER, database="app", **params))
    [(kind, body)] = read_messages_until(sock, b"R")
    assert kind == b"R" and body[:4] == struct.pack("!i", 5), body
    inner = hashlib.md5((PASSWORD + USER).encode(), usedforsecurity=False).hexdigest()
    outer = hashlib.md5(inner.encode() + body[4:8], usedforsecurity=False).hexdigest()
    answer = b"md5" + outer.encode() + b"\0"
    sock.sendall(b"p" + struct.pack("!i", len(answer) + 4) + answer)
    return sock, read_messages_until(sock, b"ZE")


def local_port(conn: psycopg.Connection[Any]) -> int:
    with socket.socket(fileno=os.dup(conn.fileno())) as sock:
        return int(sock.getsockname()[1])


def test_logins_the_engine_runs_are_served_counted_and_listed(pooler: RunningPooler) -> None:
    """Once Python has logged in a startup packet, the engine runs the next logins with it
    alone: each client gets its own backend key and is served; the console lists every one of
    them with its address, user and database."""
    warm_up(pooler)
    conns = [psycopg.connect(**pooler.conninfo(), autocommit=True) for _ in range(3)]
    try:
        assert unowned(pooler) == 3
        for conn in conns:
            assert conn.execute("SELECT name FROM whoami").fetchone() == ("public",)
        assert unowned(pooler) == 3  # (served without a session)
        keys = {conn.pgconn.backend_pid for conn in conns}
        assert len(keys) == 3 and all(pid & 0x800000 for pid in keys)  # the engine's pids
        with psycopg.connect(
            host="127.0.0.1",
            port=pooler.port,
            user="admin",
            dbname="outpost",
            sslmode="disable",
            autocommit=True,
        ) as console:
            result = console.pgconn.exec_(b"SHOW CLIENTS")
            columns = [(result.fname(i) or b"").decode() for i in range(result.nfields)]
            rows = [
                {
                    columns[c]: (result.get_value(r, c) or b"").decode()
                    for c in range(result.nfields)
                }
                for r in range(result.ntuples)
            ]
        ours = {
            int(row["port"])
            for row in rows
            if row["user"] == USER and row["database"] == "app/public"
        }
        assert ours == {local_port(conn) for conn in conns}
        assert unowned(pooler) == 0  # the listing gave each its session
        for conn in conns:  # and they go on as before
            assert conn.execute("SELECT 1").fetchone() == (1,)
    finally:
        for conn in conns:
            conn.close()
    wait_for(lambda: server_of(pooler).client_count == 0, what="the clients to go")


def test_a_cancel_request_reaches_a_client_the_engine_runs(pooler: RunningPooler) -> None:
    warm_up(pooler)
    with psycopg.connect(**pooler.conninfo(), autocommit=True) as conn:
        assert unowned(pooler) == 1
        with psycopg.connect(**pooler.conninfo(), autocommit=True) as other:
            cancel_a_slow_query(conn, other)


def test_a_login_the_engine_runs_times_out(
    pooler: RunningPooler, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A client that stops answering in the middle of a login the engine runs gets the same
    one-sentence error as one Python logs in; the others are served meanwhile."""
    from outpost.pooler import server

    for _ in range(2):  # Python's logins: the second is remembered
        sock, answered = md5_login(pooler)
        assert answered[-1][0] == b"Z", answered
        sock.close()
    monkeypatch.setattr(server, "LOGIN_TIMEOUT", 0.5)
    with raw_connect(pooler.port) as stalled:
        stalled.sendall(startup_bytes(user=USER, database="app"))
        [(kind, _)] = read_messages_until(stalled, b"R")  # the engine's md5 request
        assert kind == b"R" and unowned(pooler) == 1
        ok, answered = md5_login(pooler)  # meanwhile another is served
        assert answered[-1][0] == b"Z"
        ok.close()
        error = error_of(read_messages_until(stalled, b"E"))
        assert error["C"] == "08P01"
        assert error["M"] == "the login took longer than 0.5s"
        assert stalled.recv(100) == b""


def test_clients_the_engine_runs_are_told_when_the_pooler_stops(tenant_db: TenantDb) -> None:  # noqa: F811
    config = PoolerConfig(client_auth="md5")
    pooler = RunningPooler(config, StaticRoutes(tenant_db.routes())).start()
    try:
        for _ in range(2):
            sock, _ = md5_login(pooler)
            sock.close()
        idle, answered = md5_login(pooler)
        assert answered[-1][0] == b"Z" and unowned(pooler) == 1
    finally:
        pooler.stop()
    with idle:
        error = error_of(read_messages_until(idle, b"E"))
        assert error["C"] == "57P01"
        assert error["M"] == "the pooler is shutting down"
