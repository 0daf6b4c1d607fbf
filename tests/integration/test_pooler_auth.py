"""Passwords and TLS on both sides of the pooler: clients (SCRAM, md5, cleartext, TLS with a
test CA) and servers (the throwaway scram + TLS cluster: SCRAM, md5, cleartext, verify-full);
a server restarted mid-query."""

from __future__ import annotations

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
    running_pooler,
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
