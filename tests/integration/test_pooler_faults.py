"""Bad input and faults: each gets a clear error to that client while the pooler serves others."""

from __future__ import annotations

import os
import socket
import struct
from collections.abc import Iterator

import psycopg
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from outpost.config import PoolerConfig
from outpost.pooler.routes import StaticRoutes
from tests.helpers import wait_for
from tests.integration.test_pooler_support import (
    PASSWORD,
    USER,
    RunningPooler,
    TenantDb,
    error_of,
    raw_connect,
    read_messages_until,
    running_pooler,
    startup_bytes,
    tenant_db,  # noqa: F401 - fixture
)

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def pooler(tenant_db: TenantDb) -> Iterator[RunningPooler]:  # noqa: F811
    # cleartext over loopback so the raw-socket tests can log in without SCRAM
    config = PoolerConfig(
        pool_size=1,
        client_wait_timeout=1.0,
        client_auth="plain",
        allow_cleartext_without_tls=True,
    )
    with running_pooler(config, StaticRoutes(tenant_db.routes())) as running:
        yield running


@pytest.fixture
def bystander(pooler: RunningPooler) -> Iterator[psycopg.Connection[tuple[object, ...]]]:
    """A client that must keep working whatever the others do."""
    with psycopg.connect(
        **pooler.conninfo(options="-csearch_path=tenant_a"), autocommit=True
    ) as conn:
        assert conn.execute("SELECT name FROM whoami").fetchone() == ("tenant_a",)
        yield conn
        assert conn.execute("SELECT name FROM whoami").fetchone() == ("tenant_a",)


def _login(port: int) -> socket.socket:
    sock = raw_connect(port)
    sock.sendall(startup_bytes(user=USER, database="app"))
    messages = read_messages_until(sock, b"RE")
    assert messages[-1][0] == b"R"
    body = PASSWORD.encode() + b"\0"
    sock.sendall(b"p" + struct.pack("!i", len(body) + 4) + body)
    messages = read_messages_until(sock, b"ZE")
    assert messages[-1] == (b"Z", b"I"), messages
    return sock


@pytest.mark.parametrize(
    ("packet", "expected"),
    [
        (struct.pack("!i", 0x7FFFFFFF) + b"\0" * 8, "invalid startup packet length"),
        (struct.pack("!i", 3), "invalid startup packet length"),
        (struct.pack("!ii", 8, 0x00020000), "unsupported frontend protocol 2.0"),
        (startup_bytes(database="app"), "no PostgreSQL user name"),
        (struct.pack("!ii", 12, 196608) + b"user", "not terminated"),
    ],
    ids=["oversized", "too-short", "protocol-2", "no-user", "unterminated"],
)
def test_malformed_startup_packet(
    pooler: RunningPooler,
    bystander: psycopg.Connection[tuple[object, ...]],
    packet: bytes,
    expected: str,
) -> None:
    with raw_connect(pooler.port) as sock:
        sock.sendall(packet)
        error = error_of(read_messages_until(sock, b"E"))
    assert error["C"] == "08P01"
    assert expected in error["M"]


def test_oversized_message_length_after_login(
    pooler: RunningPooler, bystander: psycopg.Connection[tuple[object, ...]]
) -> None:
    with _login(pooler.port) as sock:
        sock.sendall(b"Q" + struct.pack("!I", 0x7FFFFFF0) + b"SELECT 1")
        error = error_of(read_messages_until(sock, b"E"))
        assert error["C"] == "08P01"
        assert "invalid message length" in error["M"]
        assert sock.recv(100) == b""  # and the connection is closed


def test_unknown_database_and_schema(pooler: RunningPooler) -> None:
    with pytest.raises(psycopg.OperationalError, match='no route for database "nope"'):
        psycopg.connect(**pooler.conninfo(dbname="nope"))
    with pytest.raises(psycopg.OperationalError, match='schema "tenant_z"'):
        psycopg.connect(**pooler.conninfo(options="-csearch_path=tenant_z"))


def test_wrong_password_and_wrong_user(pooler: RunningPooler) -> None:
    with pytest.raises(psycopg.OperationalError, match="password authentication failed"):
        psycopg.connect(**pooler.conninfo(password="not-it"))
    with pytest.raises(psycopg.OperationalError, match='failed for user "mallory"'):
        psycopg.connect(**pooler.conninfo(user="mallory"))


def test_ssl_request_when_tls_is_off(pooler: RunningPooler) -> None:
    with pytest.raises(psycopg.OperationalError, match="server does not support SSL"):
        psycopg.connect(**pooler.conninfo(sslmode="require"))
    with psycopg.connect(**pooler.conninfo(sslmode="prefer")) as conn:  # falls back to plain
        assert conn.execute("SELECT 1").fetchone() == (1,)


def test_client_vanishing_mid_message(
    pooler: RunningPooler, bystander: psycopg.Connection[tuple[object, ...]]
) -> None:
    for _ in range(3):  # the single server connection must come back each time
        sock = _login(pooler.port)
        sock.sendall(b"Q" + struct.pack("!I", 1000) + b"SELECT")
        sock.close()
        wait_for(lambda: pooler.pool_stats() == [(0, 1)], what="the server back in the pool")
    assert bystander.execute("SELECT 2").fetchone() == (2,)


def test_pool_exhausted_past_the_wait_timeout(pooler: RunningPooler) -> None:
    with psycopg.connect(**pooler.conninfo()) as holder:
        holder.execute("SELECT 1")  # a transaction is open: the only server connection is held
        timed_out = pytest.raises(psycopg.OperationalError, match="became free within 1s")
        with psycopg.connect(**pooler.conninfo(), autocommit=True) as waiter, timed_out:
            waiter.execute("SELECT 1")
        holder.rollback()
    with psycopg.connect(**pooler.conninfo(), autocommit=True) as later:
        assert later.execute("SELECT 3").fetchone() == (3,)


def test_max_client_conn(tenant_db: TenantDb) -> None:  # noqa: F811
    config = PoolerConfig(max_client_conn=2, client_auth="plain", allow_cleartext_without_tls=True)
    with running_pooler(config, StaticRoutes(tenant_db.routes())) as pooler:
        first = psycopg.connect(**pooler.conninfo())
        second = psycopg.connect(**pooler.conninfo())
        with pytest.raises(psycopg.OperationalError, match=r"max_client_conn 2"):
            psycopg.connect(**pooler.conninfo())
        first.close()
        wait_for(lambda: pooler.call(_count(pooler)) == 1, what="the first client to go")
        with psycopg.connect(**pooler.conninfo()) as third:
            assert third.execute("SELECT 1").fetchone() == (1,)
        second.close()


async def _count(pooler: RunningPooler) -> int:
    assert pooler.server is not None
    return pooler.server.client_count


@settings(
    max_examples=60,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)
@given(junk=st.binary(min_size=1, max_size=300))
def test_random_bytes_never_hurt_the_pooler(pooler: RunningPooler, junk: bytes) -> None:
    with raw_connect(pooler.port) as sock:
        sock.settimeout(5)
        try:
            sock.sendall(junk)
            sock.shutdown(socket.SHUT_WR)
            while sock.recv(4096):
                pass
        except (ConnectionResetError, BrokenPipeError, TimeoutError):
            pass
    with psycopg.connect(**pooler.conninfo(), autocommit=True) as conn:
        assert conn.execute("SELECT 1").fetchone() == (1,)


@pytest.mark.parametrize("client_auth", ["scram-sha-256", "plain"])
def test_a_stalled_login_ends_with_a_reason(
    tenant_db: TenantDb,  # noqa: F811
    monkeypatch: pytest.MonkeyPatch,
    client_auth: str,
) -> None:
    """A client that says nothing, or stops answering the password request, is told the login
    took too long and disconnected (a SCRAM login runs without a task, a cleartext one in a
    task: both are timed), while the pooler logs others in."""
    from outpost.pooler import server

    config = PoolerConfig(client_auth=client_auth, allow_cleartext_without_tls=True)
    with running_pooler(config, StaticRoutes(tenant_db.routes())) as pooler:
        with psycopg.connect(**pooler.conninfo(options="-csearch_path=tenant_a")) as first:
            first.execute("SELECT 1")  # the destination's settings are known from now on
        monkeypatch.setattr(server, "LOGIN_TIMEOUT", 0.5)
        with raw_connect(pooler.port) as silent, raw_connect(pooler.port) as halfway:
            halfway.sendall(startup_bytes(user=USER, database="app"))
            asked = read_messages_until(halfway, b"RE")
            assert asked[-1][0] == b"R", asked  # asked for a password; never answers
            for sock in (silent, halfway):
                error = error_of(read_messages_until(sock, b"E"))
                assert error["C"] == "08P01"
                assert error["M"] == "the login took longer than 0.5s"
                assert sock.recv(100) == b""
            with psycopg.connect(**pooler.conninfo(options="-csearch_path=tenant_b")) as other:
                assert other.execute("SELECT name FROM whoami").fetchone() == ("tenant_b",)


def test_running_out_of_file_descriptors_pauses_accepting_and_recovers(
    tenant_db: TenantDb,  # noqa: F811
    caplog: pytest.LogCaptureFixture,
) -> None:
    """accept() failing with a real EMFILE (RLIMIT_NOFILE lowered to the descriptors in use)
    is logged in one sentence; the pooler tries again a second later, once descriptors are
    there, and the client that waited is served."""
    import logging
    import resource

    caplog.set_level(logging.ERROR, logger="outpost.pooler")
    with running_pooler(PoolerConfig(), StaticRoutes(tenant_db.routes())) as pooler:
        message = (
            f"cannot accept connections on 127.0.0.1:{pooler.port}: Too many open files; "
            "trying again in 1s"
        )
        client = socket.socket()  # (its descriptor before the limit: connect needs none)
        client.settimeout(10)
        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        lowest_free = os.dup(0)
        os.close(lowest_free)
        resource.setrlimit(resource.RLIMIT_NOFILE, (lowest_free, hard))
        try:
            client.connect(("127.0.0.1", pooler.port))
            wait_for(lambda: message in caplog.messages, what="the pooler to hit the limit")
        finally:
            resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
        with client:
            client.sendall(startup_bytes(user=USER, database="nowhere"))
            error = error_of(read_messages_until(client, b"E"))
            assert error["M"].startswith('no route for database "nowhere"'), error
        assert caplog.messages.count(message) == 1
        with psycopg.connect(**pooler.conninfo(options="-csearch_path=tenant_b")) as conn:
            assert conn.execute("SELECT name FROM whoami").fetchone() == ("tenant_b",)
