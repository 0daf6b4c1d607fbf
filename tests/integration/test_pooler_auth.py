"""Passwords and TLS on both sides of the pooler: clients (SCRAM, md5, cleartext, TLS with a
test CA) and servers (the throwaway scram + TLS cluster: SCRAM, md5, cleartext, verify-full);
a server restarted mid-query."""

from __future__ import annotations

import base64
import hashlib
import hmac
import os
import socket
import struct
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest

from outpost.config import PoolerConfig
from outpost.pooler.passwords import make_client_secret, scrypt_hash
from outpost.pooler.routes import ClientSecret, Destination, Route, StaticRoutes
from tests.helpers import wait_for
from tests.integration.conftest import PgCluster, _Runner
from tests.integration.test_pooler_support import (
    PASSWORD,
    USER,
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
def certs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    import trustme

    base = tmp_path_factory.mktemp("pooler-tls")
    ca = trustme.CA()
    cert = ca.issue_cert("127.0.0.1", "localhost")
    paths = {"ca": base / "ca.pem", "cert": base / "cert.pem", "key": base / "key.pem"}
    ca.cert_pem.write_to_path(str(paths["ca"]))
    cert.private_key_pem.write_to_path(str(paths["key"]))
    cert.cert_chain_pems[0].write_to_path(str(paths["cert"]))
    for extra in cert.cert_chain_pems[1:]:
        extra.write_to_path(str(paths["cert"]), append=True)
    # client certificates: the route's user, another user, and the route's user from another CA
    for name, issuer, common_name in (
        ("client", ca, USER),
        ("other", ca, "someone-else"),
        ("stranger", trustme.CA(), USER),
    ):
        leaf = issuer.issue_cert("client.example", common_name=common_name)
        leaf.cert_chain_pems[0].write_to_path(str(base / f"{name}.pem"))
        leaf.private_key_pem.write_to_path(str(base / f"{name}.key"))
        (base / f"{name}.key").chmod(0o600)  # libpq refuses a key others can read
        paths[f"{name}_cert"] = base / f"{name}.pem"
        paths[f"{name}_key"] = base / f"{name}.key"
    return {k: str(v) for k, v in paths.items()}


def _conninfo(port: int, **kw: Any) -> dict[str, Any]:
    out: dict[str, Any] = {
        "host": "127.0.0.1",
        "port": port,
        "user": USER,
        "password": PASSWORD,
        "dbname": "app",
        "sslmode": "disable",
        "connect_timeout": 10,
    }
    out.update(kw)
    return out


def test_md5_client_auth(tenant_db: TenantDb) -> None:  # noqa: F811
    config = PoolerConfig(client_auth="md5")
    with running_pooler(config, StaticRoutes(tenant_db.routes())) as pooler:
        with psycopg.connect(**_conninfo(pooler.port)) as conn:
            assert conn.execute("SELECT name FROM whoami").fetchone() == ("public",)
        with pytest.raises(psycopg.OperationalError, match="password authentication failed"):
            psycopg.connect(**_conninfo(pooler.port, password="wrong"))


@pytest.mark.parametrize("auth", ["md5", "scram-sha-256"])
def test_logins_the_engine_runs_follow_route_changes_at_once(
    tenant_db: TenantDb,  # noqa: F811
    auth: str,
) -> None:
    """After a first md5 or SCRAM login the engine answers the next ones with the same startup
    packet itself: they work, a wrong password gets the same error, and a changed or removed
    route counts from the next login on, not a second later."""
    routes = StaticRoutes(tenant_db.routes())
    config = PoolerConfig(client_auth=auth)
    with running_pooler(config, routes) as pooler:
        assert pooler.server is not None and pooler.server.engine is not None
        logins = pooler.server.engine.logins
        for _ in range(3):
            with psycopg.connect(**_conninfo(pooler.port)) as conn:
                assert conn.execute("SELECT name FROM whoami").fetchone() == ("public",)
        assert len(logins) == 1  # the packet the engine now answers for
        with pytest.raises(psycopg.OperationalError, match="password authentication failed"):
            psycopg.connect(**_conninfo(pooler.port, password="wrong"))
        changed = [
            Route(r.database, r.schema, r.user, make_client_secret("new-pw", r.user), r.destination)
            for r in tenant_db.routes()
        ]
        routes.replace(changed)
        assert logins == {}
        with pytest.raises(psycopg.OperationalError, match="password authentication failed"):
            psycopg.connect(**_conninfo(pooler.port))
        for _ in range(2):
            with psycopg.connect(**_conninfo(pooler.port, password="new-pw")) as conn:
                assert conn.execute("SELECT name FROM whoami").fetchone() == ("public",)
        routes.replace([])
        with pytest.raises(psycopg.OperationalError, match='no route for database "app"'):
            psycopg.connect(**_conninfo(pooler.port, password="new-pw"))


def _scram_login(
    port: int,
    password: str = PASSWORD,
    *,
    gs2: str = "n,,",
    first_extra: str = "",
    final_extra: str = "",
) -> list[tuple[bytes, bytes]]:
    """A SCRAM login over a raw socket, with the client-first and client-final in the shape
    given (RFC 5802 allows an authzid and extensions that libpq never sends); the messages
    after the proof, the server's signature checked."""
    with raw_connect(port) as sock:
        sock.sendall(startup_bytes(user=USER, database="app"))
        [(kind, body)] = read_messages_until(sock, b"R")
        assert (kind, body[:4]) == (b"R", struct.pack("!I", 10))
        bare = f"n={USER},r={base64.b64encode(os.urandom(18)).decode()}{first_extra}"
        first = (gs2 + bare).encode()
        initial = b"SCRAM-SHA-256\0" + struct.pack("!I", len(first)) + first
        sock.sendall(b"p" + struct.pack("!I", len(initial) + 4) + initial)
        messages = read_messages_until(sock, b"RE")
        if messages[-1][0] == b"E":
            return messages
        server_first = messages[-1][1][4:].decode()
        attrs = dict(item.split("=", 1) for item in server_first.split(","))
        salted = hashlib.pbkdf2_hmac(
            "sha256", password.encode(), base64.b64decode(attrs["s"]), int(attrs["i"])
        )
        client_key = hmac.digest(salted, b"Client Key", "sha256")
        binding = base64.b64encode(gs2.encode()).decode()
        without_proof = f"c={binding},r={attrs['r']}{final_extra}"
        auth_message = f"{bare},{server_first},{without_proof}".encode()
        signature = hmac.digest(hashlib.sha256(client_key).digest(), auth_message, "sha256")
        proof = bytes(a ^ b for a, b in zip(client_key, signature, strict=True))
        final = f"{without_proof},p={base64.b64encode(proof).decode()}".encode()
        sock.sendall(b"p" + struct.pack("!I", len(final) + 4) + final)
        messages = read_messages_until(sock, b"ZE")
        if messages[0][0] == b"R":
            server_key = hmac.digest(salted, b"Server Key", "sha256")
            expected = hmac.digest(server_key, auth_message, "sha256")
            assert messages[0][1] == struct.pack("!I", 12) + b"v=" + base64.b64encode(expected)
        return messages


@pytest.mark.parametrize(
    "shape",
    [
        {},  # libpq's: the engine runs it
        {"gs2": "y,,"},  # a client that could bind a channel, thinking the server cannot
        {"gs2": f"n,a={USER},"},  # an authzid: Python takes it on at client-first
        {"first_extra": ",x=extension"},  # the same
        {"final_extra": ",x=extension"},  # Python takes it on at client-final
    ],
)
def test_scram_logins_in_every_shape_the_rfc_allows(
    tenant_db: TenantDb,  # noqa: F811
    shape: dict[str, str],
) -> None:
    """Once the engine runs a startup packet's SCRAM logins, a client whose messages it leaves
    to Python (ScramServer takes the exchange on where it is) logs in, or is refused, the same."""
    with running_pooler(PoolerConfig(), StaticRoutes(tenant_db.routes())) as pooler:
        assert pooler.server is not None and pooler.server.engine is not None
        for _ in range(2):  # (the first learns the server's settings, the second is remembered)
            assert _scram_login(pooler.port)[-1][0] == b"Z"
        assert len(pooler.server.engine.logins) == 1
        for _ in range(2):
            messages = _scram_login(pooler.port, **shape)
            # SASLFinal (its signature checked), AuthenticationOk, ..., BackendKeyData, ready
            assert messages[1] == (b"R", struct.pack("!I", 0))
            assert [kind for kind, _ in messages][-2:] == [b"K", b"Z"]
        refused = error_of(_scram_login(pooler.port, "wrong", **shape))
        assert refused["C"] == "28P01"
        assert refused["M"] == f'password authentication failed for user "{USER}"'


def test_perseus_scrypt_route_needs_tls_for_its_cleartext_password(
    tenant_db: TenantDb,  # noqa: F811
    certs: dict[str, str],
) -> None:
    dest = tenant_db.destination(sslmode="disable")
    perseus = ClientSecret(scrypt=scrypt_hash(PASSWORD))
    routes = StaticRoutes([Route("app", "public", USER, perseus, dest, origin="table")])
    plain = PoolerConfig()
    refused = pytest.raises(psycopg.OperationalError, match="refuses cleartext passwords without")
    with running_pooler(plain, routes) as pooler, refused:
        psycopg.connect(**_conninfo(pooler.port))
    tls = PoolerConfig(tls_cert_file=certs["cert"], tls_key_file=certs["key"])
    with running_pooler(tls, routes) as pooler:
        info = _conninfo(pooler.port, sslmode="verify-full", sslrootcert=certs["ca"])
        with psycopg.connect(**info) as conn:
            assert conn.pgconn.ssl_in_use
            assert conn.execute("SELECT name FROM whoami").fetchone() == ("public",)
        with pytest.raises(psycopg.OperationalError, match="password authentication failed"):
            psycopg.connect(**{**info, "password": "nope"})


def test_tls_to_clients_with_scram(tenant_db: TenantDb, certs: dict[str, str]) -> None:  # noqa: F811
    config = PoolerConfig(tls_cert_file=certs["cert"], tls_key_file=certs["key"])
    with running_pooler(config, StaticRoutes(tenant_db.routes())) as pooler:
        info = _conninfo(pooler.port, sslmode="verify-full", sslrootcert=certs["ca"])
        with psycopg.connect(**info, options="-csearch_path=tenant_b") as conn:
            assert conn.pgconn.ssl_in_use
            assert conn.execute("SELECT name FROM whoami").fetchone() == ("tenant_b",)
        with psycopg.connect(**_conninfo(pooler.port)) as conn:  # TLS is offered, not forced
            assert not conn.pgconn.ssl_in_use


def _tls_config(certs: dict[str, str], mode: str) -> PoolerConfig:
    return PoolerConfig(
        tls_cert_file=certs["cert"],
        tls_key_file=certs["key"],
        tls_ca_file=certs["ca"],
        client_tls_sslmode=mode,
    )


def test_client_tls_sslmode_require_refuses_plain_connections(
    tenant_db: TenantDb,  # noqa: F811
    certs: dict[str, str],
) -> None:
    with running_pooler(_tls_config(certs, "require"), StaticRoutes(tenant_db.routes())) as pooler:
        with pytest.raises(psycopg.OperationalError) as caught:
            psycopg.connect(**_conninfo(pooler.port))  # sslmode=disable
        assert (
            "the pooler accepts only TLS connections (pooler.client_tls_sslmode require); "
            "connect with sslmode=require or stricter"
        ) in str(caught.value)
        with psycopg.connect(**_conninfo(pooler.port, sslmode="require")) as conn:
            assert conn.pgconn.ssl_in_use  # no client certificate needed
            assert conn.execute("SELECT name FROM whoami").fetchone() == ("public",)
            conn.commit()
            # cancel requests: libpq's new API sends them in TLS; its old PQcancel in plain text
            # (sent here by hand: PQcancel holds the GIL, and this pooler runs in a thread)
            assert pooler.server is not None
            key = pooler.server.by_pid[conn.info.backend_pid].key

            def plain_cancel() -> None:
                with socket.create_connection(("127.0.0.1", pooler.port), timeout=10) as sock:
                    sock.sendall(struct.pack("!iiii", 16, 80877102, conn.info.backend_pid, key))
                    assert sock.recv(1) == b""  # answered by closing, as PostgreSQL does

            for cancel in (conn.cancel_safe, plain_cancel):
                _cancel_a_slow_query(conn, cancel)


def _cancel_a_slow_query(conn: psycopg.Connection[Any], cancel: Any) -> None:
    outcome: list[str] = []

    def slow() -> None:
        try:
            conn.execute("SELECT pg_sleep(30)")
            outcome.append("finished")
        except psycopg.errors.QueryCanceled:
            outcome.append("canceled")
        conn.rollback()

    thread = threading.Thread(target=slow)
    thread.start()
    try:
        wait_for(lambda: conn.info.transaction_status == 1, what="the slow query to start")
        attempts = 0
        while not outcome and attempts < 100:  # a cancel that lands before the query is lost
            cancel()
            thread.join(0.3)
            attempts += 1
    finally:
        thread.join(30)
    assert outcome == ["canceled"]


def test_client_tls_sslmode_verify_ca_needs_a_certificate_from_the_ca(
    tenant_db: TenantDb,  # noqa: F811
    certs: dict[str, str],
) -> None:
    routes = StaticRoutes(tenant_db.routes())
    with running_pooler(_tls_config(certs, "verify-ca"), routes) as pooler:
        info = _conninfo(pooler.port, sslmode="verify-full", sslrootcert=certs["ca"])
        with pytest.raises(psycopg.OperationalError):  # the handshake fails: no certificate
            psycopg.connect(**info)
        with pytest.raises(psycopg.OperationalError):  # signed by another CA
            psycopg.connect(**info, sslcert=certs["stranger_cert"], sslkey=certs["stranger_key"])
        with pytest.raises(psycopg.OperationalError, match="password authentication failed"):
            # the certificate does not replace the password
            psycopg.connect(**{**info, "password": "nope"}, sslcert=certs["client_cert"],
                            sslkey=certs["client_key"])  # fmt: skip
        # verify-ca does not compare the certificate's name with the user
        with psycopg.connect(**info, sslcert=certs["other_cert"], sslkey=certs["other_key"]) as c:
            assert c.execute("SELECT name FROM whoami").fetchone() == ("public",)


def test_client_tls_sslmode_verify_full_wants_the_user_as_common_name(
    tenant_db: TenantDb,  # noqa: F811
    certs: dict[str, str],
) -> None:
    routes = StaticRoutes(tenant_db.routes())
    with running_pooler(_tls_config(certs, "verify-full"), routes) as pooler:
        info = _conninfo(pooler.port, sslmode="verify-full", sslrootcert=certs["ca"])
        with pytest.raises(psycopg.OperationalError) as caught:
            psycopg.connect(**info, sslcert=certs["other_cert"], sslkey=certs["other_key"])
        assert (
            f'the client certificate\'s common name (someone-else) is not the user "{USER}" '
            "(pooler.client_tls_sslmode verify-full)"
        ) in str(caught.value)
        with psycopg.connect(
            **info, sslcert=certs["client_cert"], sslkey=certs["client_key"],
            options="-csearch_path=tenant_b",
        ) as conn:  # fmt: skip
            assert conn.pgconn.ssl_in_use
            assert conn.execute("SELECT name FROM whoami").fetchone() == ("tenant_b",)


@pytest.mark.parametrize(
    ("settings", "expected"),
    [
        ({"client_tls_sslmode": "require"}, "client_tls_sslmode require needs tls_cert_file"),
        (
            {"client_tls_sslmode": "verify-ca", "tls_cert_file": "/c.pem"},
            "client_tls_sslmode verify-ca needs tls_ca_file",
        ),
        ({"client_tls_sslmode": "sometimes"}, "client_tls_sslmode"),
    ],
)
def test_client_tls_sslmode_settings_are_checked(settings: dict[str, str], expected: str) -> None:
    from pydantic import ValidationError

    with pytest.raises(ValidationError, match=expected):
        PoolerConfig(**settings)


def test_bad_certificate_file_is_a_clear_error(tmp_path: Path) -> None:
    from outpost.errors import ConfigError
    from outpost.pooler.server import PoolerServer

    config = PoolerConfig(tls_cert_file=str(tmp_path / "missing.pem"))
    with pytest.raises(ConfigError, match="cannot load the TLS certificate"):
        PoolerServer(config, StaticRoutes())


# --- the pooler logging in to a scram + TLS server --------------------------------------------


def _server_routes(cluster: PgCluster, user: str, password: str, **dest: Any) -> StaticRoutes:
    fields: dict[str, Any] = {
        "host": cluster.host,
        "port": cluster.port,
        "database": cluster.database,
        "user": user,
        "password": password,
        "sslmode": "verify-full",
        "sslrootcert": str(cluster.ca_path),
    }
    destination = Destination(**{**fields, **dest})
    secret = make_client_secret(PASSWORD, USER)
    return StaticRoutes([Route("app", "public", USER, secret, destination)])


def test_server_login_scram_over_verified_tls(pg_tls_cluster: PgCluster) -> None:
    routes = _server_routes(pg_tls_cluster, pg_tls_cluster.user, pg_tls_cluster.password)
    with (
        running_pooler(PoolerConfig(), routes) as pooler,
        psycopg.connect(**_conninfo(pooler.port)) as conn,
    ):
        row = conn.execute(
            "SELECT ssl, current_user FROM pg_stat_ssl WHERE pid = pg_backend_pid()"
        ).fetchone()
        assert row == (True, pg_tls_cluster.user)


def test_server_login_failures_are_clear(pg_tls_cluster: PgCluster) -> None:
    wrong = _server_routes(pg_tls_cluster, pg_tls_cluster.user, "wrong-password")
    failed = pytest.raises(psycopg.OperationalError, match=r"login to .* failed: password auth")
    with running_pooler(PoolerConfig(), wrong) as pooler, failed:
        psycopg.connect(**_conninfo(pooler.port))
    badca = _server_routes(
        pg_tls_cluster,
        pg_tls_cluster.user,
        pg_tls_cluster.password,
        host="127.0.0.1",  # the certificate is for "localhost" only
    )
    tls_failed = pytest.raises(psycopg.OperationalError, match=r"TLS with 127\.0\.0\.1")
    with running_pooler(PoolerConfig(), badca) as pooler, tls_failed:
        psycopg.connect(**_conninfo(pooler.port))


@pytest.fixture(scope="module")
def md5_and_cleartext_roles(pg_tls_cluster: PgCluster) -> Iterator[dict[str, str]]:
    """Two roles whose pg_hba lines ask for md5 and for a cleartext password."""
    hba = pg_tls_cluster.data_dir / "pg_hba.conf"
    original = hba.read_text()
    roles = {"outpost_md5": "md5-pw-1", "outpost_clear": "clear-pw-1"}
    pg_tls_cluster.superuser_execute(
        "SET password_encryption = 'md5'",
        "DROP ROLE IF EXISTS outpost_md5",
        "CREATE ROLE outpost_md5 LOGIN PASSWORD 'md5-pw-1'",
        "DROP ROLE IF EXISTS outpost_clear",
        "CREATE ROLE outpost_clear LOGIN PASSWORD 'clear-pw-1'",
        f"GRANT CONNECT ON DATABASE {pg_tls_cluster.database} TO outpost_md5, outpost_clear",
    )
    hba.write_text("host all outpost_md5 all md5\nhost all outpost_clear all password\n" + original)
    pg_tls_cluster.superuser_execute("SELECT pg_reload_conf()")
    try:
        yield roles
    finally:
        hba.write_text(original)
        pg_tls_cluster.superuser_execute("SELECT pg_reload_conf()")


@pytest.mark.parametrize("role", ["outpost_md5", "outpost_clear"])
def test_server_login_md5_and_cleartext(
    pg_tls_cluster: PgCluster, md5_and_cleartext_roles: dict[str, str], role: str
) -> None:
    routes = _server_routes(pg_tls_cluster, role, md5_and_cleartext_roles[role], sslmode="disable")
    with (
        running_pooler(PoolerConfig(), routes) as pooler,
        psycopg.connect(**_conninfo(pooler.port)) as conn,
    ):
        assert conn.execute("SELECT current_user").fetchone() == (role,)


def test_server_restarted_mid_query(pg_tls_cluster: PgCluster) -> None:
    routes = _server_routes(pg_tls_cluster, pg_tls_cluster.user, pg_tls_cluster.password)
    with running_pooler(PoolerConfig(pool_size=2), routes) as pooler:
        conn = psycopg.connect(**_conninfo(pooler.port), autocommit=True)
        outcome: dict[str, BaseException] = {}

        def slow() -> None:
            try:
                conn.execute("SELECT pg_sleep(60)")
            except psycopg.Error as exc:
                outcome["error"] = exc

        thread = threading.Thread(target=slow)
        thread.start()
        wait_for(lambda: pooler.pool_stats() == [(1, 0)], what="the slow query to hold a server")
        _Runner(pg_tls_cluster.bin_dir, pg_tls_cluster.data_dir.parent).run(
            "pg_ctl",
            "-D",
            str(pg_tls_cluster.data_dir),
            "-m",
            "fast",
            "-w",
            "restart",
            "-l",
            str(pg_tls_cluster.log_path),
        )
        thread.join(30)
        assert isinstance(outcome.get("error"), psycopg.OperationalError)
        assert "terminating connection" in str(outcome["error"]) or "lost" in str(outcome["error"])
        conn.close()
        # the pool recovers: a new client gets a fresh server connection
        with psycopg.connect(**_conninfo(pooler.port)) as again:
            assert again.execute("SELECT 1").fetchone() == (1,)
