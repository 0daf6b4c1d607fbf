"""The postgres driver against real servers: the shared one on 127.0.0.1:5432 (trust auth, no
TLS) and a throwaway cluster with TLS and scram-sha-256 (``pg_tls_cluster``)."""

from __future__ import annotations

import socket
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest

from outpost.drivers import get_driver
from outpost.drivers.base import DriverContext
from outpost.drivers.postgres import PostgresDriver, PostgresOptions
from outpost.errors import DriverError, ReadOnlyError, UsageError
from tests.integration.conftest import PgCluster

pytestmark = pytest.mark.integration

CONNECTION = "pg-test"


def make_driver(options: dict[str, Any]) -> PostgresDriver:
    return PostgresDriver(
        PostgresDriver.parse_options(options), DriverContext(connection=CONNECTION)
    )


@pytest.fixture
def pg(pg_params: dict[str, object]) -> PostgresDriver:
    return make_driver(dict(pg_params))


@pytest.fixture
def table(pg: PostgresDriver) -> Iterator[str]:
    """A fresh table (id int, note text) on the shared server, dropped afterwards."""
    name = f"outpost_t_{uuid.uuid4().hex[:10]}"
    pg.query(f"CREATE TABLE {name} (id int, note text)", allow_writes=True)
    yield name
    pg.query(f"DROP TABLE IF EXISTS {name}", allow_writes=True)


def table_exists(pg: PostgresDriver, name: str) -> bool:
    result = pg.query("SELECT to_regclass(%s) IS NOT NULL", [name])
    return bool(result.rows[0][0])


# --- test() and query() ----------------------------------------------------------------------


def test_test_returns_server_version(pg: PostgresDriver, pg_dsn: str) -> None:
    with psycopg.connect(pg_dsn) as conn:
        row = conn.execute("SHOW server_version").fetchone()
    assert row is not None
    result = pg.test()
    assert result.server_version == row[0]
    assert result.duration_seconds >= 0


def test_registry_knows_the_driver() -> None:
    assert get_driver("postgres") is PostgresDriver
    assert PostgresDriver.display_name == "PostgreSQL"


def test_query_returns_columns_and_json_values(pg: PostgresDriver) -> None:
    result = pg.query(
        "SELECT 1 AS n, 'a'::text AS t, 1.50::numeric AS d, DATE '2024-02-29' AS day, "
        "NULL::int AS nothing, true AS yes, '\\x0102'::bytea AS raw"
    )
    assert result.columns == ["n", "t", "d", "day", "nothing", "yes", "raw"]
    assert result.rows == [[1, "a", "1.50", "2024-02-29", None, True, "\\x0102"]]
    assert result.row_count == 1
    assert result.truncated is False


def test_query_truncates_at_max_rows(pg: PostgresDriver) -> None:
    result = pg.query("SELECT g FROM generate_series(1, 1000000) AS g", max_rows=5)
    assert result.rows == [[1], [2], [3], [4], [5]]
    assert result.row_count == 5
    assert result.truncated is True

    exact = pg.query("SELECT g FROM generate_series(1, 5) AS g", max_rows=5)
    assert exact.row_count == 5
    assert exact.truncated is False


def test_truncated_query_leaves_the_server_usable(pg: PostgresDriver) -> None:
    for _ in range(3):
        assert pg.query("SELECT g FROM generate_series(1, 100000) g", max_rows=1).truncated
    assert pg.query("SELECT 42").rows == [[42]]


def test_query_with_no_rows_still_has_columns(pg: PostgresDriver) -> None:
    result = pg.query("SELECT 1 AS a, 'x' AS b WHERE false")
    assert result.columns == ["a", "b"]
    assert result.rows == []
    assert result.truncated is False


def test_query_params(pg: PostgresDriver) -> None:
    result = pg.query(
        "SELECT %s::int + 1 AS n, %s AS t, %s::text IS NULL AS missing", [41, "hé", None]
    )
    assert result.rows == [[42, "hé", True]]
    # Without params a % is just a character.
    assert pg.query("SELECT '100%' AS pct").rows == [["100%"]]


def test_statement_without_result_set(pg: PostgresDriver) -> None:
    result = pg.query("SET search_path = public")
    assert result.columns == []
    assert result.rows == []
    assert result.row_count == 0


def test_notices_are_reported(pg: PostgresDriver) -> None:
    result = pg.query("DO $$ BEGIN RAISE NOTICE 'hello from plpgsql'; END $$")
    assert any("hello from plpgsql" in n for n in result.notices)


def test_sql_error_is_a_clear_driver_error(pg: PostgresDriver) -> None:
    with pytest.raises(DriverError) as info:
        pg.query("SELECT * FROM outpost_no_such_table")
    message = str(info.value)
    assert CONNECTION in message
    assert 'relation "outpost_no_such_table" does not exist' in message


# --- read-only and writes ------------------------------------------------------------------


def test_read_only_refuses_insert(pg: PostgresDriver, table: str) -> None:
    with pytest.raises(ReadOnlyError) as info:
        pg.query(f"INSERT INTO {table} VALUES (1, 'x')")
    message = str(info.value)
    assert "is read-only; writes are refused" in message
    assert CONNECTION in message
    assert pg.query(f"SELECT count(*) FROM {table}").rows == [[0]]


def test_read_only_refuses_create(pg: PostgresDriver) -> None:
    name = f"outpost_t_{uuid.uuid4().hex[:10]}"
    with pytest.raises(ReadOnlyError):
        pg.query(f"CREATE TABLE {name} (id int)")
    assert not table_exists(pg, name)


def test_read_only_cannot_be_escaped_with_commit(pg: PostgresDriver) -> None:
    name = f"outpost_t_{uuid.uuid4().hex[:10]}"
    with pytest.raises(DriverError) as info:
        pg.query(f"COMMIT; CREATE TABLE {name} (id int)")
    assert "single statement" in str(info.value)
    assert not table_exists(pg, name)


def test_allow_writes_permits_writes(pg: PostgresDriver, table: str) -> None:
    inserted = pg.query(
        f"INSERT INTO {table} VALUES (%s, %s), (%s, %s)", [1, "a", 2, "b"], allow_writes=True
    )
    assert inserted.columns == []
    assert inserted.row_count == 2
    returning = pg.query(
        f"UPDATE {table} SET note = 'z' RETURNING id", allow_writes=True, max_rows=1
    )
    assert returning.columns == ["id"]
    assert returning.row_count == 1
    assert returning.truncated is True
    # The write was committed as a whole even though only one row was returned.
    assert pg.query(f"SELECT note FROM {table} ORDER BY id").rows == [["z"], ["z"]]


def test_allow_writes_runs_several_statements(pg: PostgresDriver, table: str) -> None:
    result = pg.query(
        f"INSERT INTO {table} VALUES (1, 'a'); SELECT count(*) AS n FROM {table}",
        allow_writes=True,
    )
    assert result.columns == ["n"]
    assert result.rows == [[1]]


def test_statement_timeout(pg: PostgresDriver) -> None:
    start = time.monotonic()
    with pytest.raises(DriverError) as info:
        pg.query("SELECT pg_sleep(5)", timeout=1)
    assert time.monotonic() - start < 1 + 3
    message = str(info.value)
    assert "statement timeout of 1 s" in message
    assert CONNECTION in message


# --- TLS and passwords (throwaway cluster) ------------------------------------------------------


def ssl_in_use(driver: PostgresDriver) -> bool:
    result = driver.query("SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()")
    return bool(result.rows[0][0])


def test_ssl_disable(pg_tls_cluster: PgCluster) -> None:
    driver = make_driver(pg_tls_cluster.options(ssl="disable"))
    assert driver.test().server_version == pg_tls_cluster.server_version
    assert ssl_in_use(driver) is False


def test_ssl_require(pg_tls_cluster: PgCluster) -> None:
    # require does not check the certificate: no CA given, and 127.0.0.1 is not on it.
    driver = make_driver(pg_tls_cluster.options(host="127.0.0.1", ssl="require"))
    assert ssl_in_use(driver) is True


@pytest.mark.parametrize("mode", ["verify-ca", "require-ca"])
def test_ssl_verify_ca_with_the_ca(pg_tls_cluster: PgCluster, mode: str) -> None:
    # verify-ca checks the chain only, so the name on the certificate does not matter.
    driver = make_driver(
        pg_tls_cluster.options(
            host="127.0.0.1", ssl=mode, ssl_root_cert=str(pg_tls_cluster.ca_path)
        )
    )
    assert ssl_in_use(driver) is True


def test_require_ca_is_libpq_verify_ca(pg_tls_cluster: PgCluster) -> None:
    driver = make_driver(
        pg_tls_cluster.options(ssl="require-ca", ssl_root_cert=str(pg_tls_cluster.ca_path))
    )
    assert driver.ssl_kwargs()["sslmode"] == "verify-ca"


def test_ssl_verify_ca_with_another_ca_fails(pg_tls_cluster: PgCluster, tmp_path: Path) -> None:
    import trustme

    other = tmp_path / "other-ca.pem"
    trustme.CA().cert_pem.write_to_path(str(other))
    driver = make_driver(pg_tls_cluster.options(ssl="verify-ca", ssl_root_cert=str(other)))
    with pytest.raises(DriverError) as info:
        driver.test()
    message = str(info.value)
    assert "certificate verify failed" in message
    assert "--ssl-root-cert" in message


def test_ssl_verify_full_to_localhost(pg_tls_cluster: PgCluster) -> None:
    driver = make_driver(
        pg_tls_cluster.options(ssl="verify-full", ssl_root_cert=str(pg_tls_cluster.ca_path))
    )
    assert ssl_in_use(driver) is True


def test_ssl_verify_full_to_ip_is_a_name_mismatch(pg_tls_cluster: PgCluster) -> None:
    driver = make_driver(
        pg_tls_cluster.options(
            host="127.0.0.1", ssl="verify-full", ssl_root_cert=str(pg_tls_cluster.ca_path)
        )
    )
    with pytest.raises(DriverError) as info:
        driver.test()
    message = str(info.value)
    assert "host name mismatch" in message
    assert '"127.0.0.1"' in message
    assert f"127.0.0.1:{pg_tls_cluster.port}" in message
    assert CONNECTION in message


def test_ssl_verify_full_uses_the_system_trust_store(
    pg_tls_cluster: PgCluster, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """Without --ssl-root-cert the system's trusted CAs (SSL_CERT_FILE here) are used."""
    monkeypatch.setenv("SSL_CERT_FILE", str(pg_tls_cluster.ca_path))
    driver = make_driver(pg_tls_cluster.options(ssl="verify-full"))
    assert ssl_in_use(driver) is True

    import trustme

    other = tmp_path / "bundle.pem"
    trustme.CA().cert_pem.write_to_path(str(other))
    monkeypatch.setenv("SSL_CERT_FILE", str(other))
    with pytest.raises(DriverError) as info:
        driver.test()
    assert "certificate verify failed" in str(info.value)


def test_missing_root_cert_file_is_named(pg_tls_cluster: PgCluster, tmp_path: Path) -> None:
    missing = tmp_path / "nope.pem"
    driver = make_driver(pg_tls_cluster.options(ssl="verify-full", ssl_root_cert=str(missing)))
    with pytest.raises(DriverError) as info:
        driver.test()
    assert str(missing) in str(info.value)
    assert "--ssl-root-cert" in str(info.value)


def test_ssl_require_against_a_server_without_ssl(
    pg: PostgresDriver, pg_params: dict[str, object]
) -> None:
    if pg.query("SHOW ssl").rows != [["off"]]:
        pytest.skip("the shared PostgreSQL server has ssl on")
    driver = make_driver({**pg_params, "ssl": "require"})
    with pytest.raises(DriverError) as info:
        driver.test()
    message = str(info.value)
    assert "does not accept SSL connections" in message
    assert "--ssl require" in message


def test_scram_login_with_the_right_password(pg_tls_cluster: PgCluster) -> None:
    driver = make_driver(pg_tls_cluster.options())
    result = driver.query("SELECT current_user, current_database()")
    assert result.rows == [[pg_tls_cluster.user, pg_tls_cluster.database]]


def test_wrong_password_says_authentication_failed(pg_tls_cluster: PgCluster) -> None:
    wrong = "wrong-" + uuid.uuid4().hex
    driver = make_driver(pg_tls_cluster.options(password=wrong))
    with pytest.raises(DriverError) as info:
        driver.test()
    message = str(info.value)
    assert f"authentication failed for user '{pg_tls_cluster.user}'" in message
    assert CONNECTION in message
    assert wrong not in message
    assert pg_tls_cluster.password not in message


def test_missing_password_is_explained(pg_tls_cluster: PgCluster) -> None:
    options = pg_tls_cluster.options()
    del options["password"]
    with pytest.raises(DriverError) as info:
        make_driver(options).test()
    assert "asks for a password" in str(info.value)


def test_password_is_scrubbed_from_server_messages(pg_tls_cluster: PgCluster) -> None:
    driver = make_driver(pg_tls_cluster.options())
    with pytest.raises(DriverError) as info:
        driver.query(f'SELECT * FROM "{pg_tls_cluster.password}"')
    message = str(info.value)
    assert pg_tls_cluster.password not in message
    assert "********" in message


def test_unknown_database(pg_params: dict[str, object]) -> None:
    name = f"outpost_nodb_{uuid.uuid4().hex[:8]}"
    with pytest.raises(DriverError) as info:
        make_driver({**pg_params, "database": name}).test()
    assert f'database "{name}" does not exist' in str(info.value)


# --- unreachable servers ---------------------------------------------------------------------


@pytest.fixture
def refused_port() -> Iterator[int]:
    """A port on 127.0.0.1 that refuses connections (bound, never listening)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        yield int(sock.getsockname()[1])


@pytest.mark.parametrize("call", ["test", "query"])
def test_silent_server_honours_the_connect_timeout(silent_listener: int, call: str) -> None:
    driver = make_driver({"host": "127.0.0.1", "port": silent_listener, "connect_timeout": 2})
    start = time.monotonic()
    with pytest.raises(DriverError) as info:
        if call == "test":
            driver.test()
        else:
            driver.query("SELECT 1")
    assert time.monotonic() - start < 2 + 5
    message = str(info.value)
    assert f"127.0.0.1:{silent_listener}" in message
    assert "connect timeout of 2 s" in message
    assert CONNECTION in message


def test_refused_port(refused_port: int) -> None:
    driver = make_driver({"host": "127.0.0.1", "port": refused_port, "connect_timeout": 5})
    with pytest.raises(DriverError) as info:
        driver.test()
    message = str(info.value)
    assert f"127.0.0.1:{refused_port}" in message
    assert "refused" in message


# --- options --------------------------------------------------------------------------------


def test_option_defaults() -> None:
    options = PostgresDriver.parse_options({})
    assert isinstance(options, PostgresOptions)
    assert options.host == "localhost"
    assert options.port == 5432
    assert options.ssl == "disable"
    assert options.connect_timeout == 30
    assert options.user is None and options.password is None and options.database is None


def test_every_option_has_a_description() -> None:
    for name, info in PostgresOptions.model_fields.items():
        assert info.description, name


def test_password_is_secret() -> None:
    options = PostgresDriver.parse_options({"password": "s3cr3t"})
    assert "s3cr3t" not in repr(options)
    assert options.to_public()["password"] == "********"


@pytest.mark.parametrize(
    ("raw", "flag"),
    [
        ({"bogus": 1}, "--bogus"),
        ({"port": 0}, "--port"),
        ({"port": 65536}, "--port"),
        ({"port": "abc"}, "--port"),
        ({"ssl": "sometimes"}, "--ssl"),
        ({"connect_timeout": 0}, "--connect-timeout"),
        ({"ssl_cert": "/c.pem"}, "--ssl-key"),
    ],
)
def test_bad_options_are_usage_errors_naming_the_flag(raw: dict[str, Any], flag: str) -> None:
    with pytest.raises(UsageError) as info:
        PostgresDriver.parse_options(raw, connection="prod")
    message = str(info.value)
    assert flag in message
    assert "'prod'" in message


def test_truncated_query_over_tls(pg_tls_cluster: PgCluster) -> None:
    driver = make_driver(
        pg_tls_cluster.options(ssl="verify-full", ssl_root_cert=str(pg_tls_cluster.ca_path))
    )
    result = driver.query("SELECT g FROM generate_series(1, 1000000) g", max_rows=2)
    assert result.rows == [[1], [2]]
    assert result.truncated is True
