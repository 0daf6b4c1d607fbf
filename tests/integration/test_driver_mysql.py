"""The MySQL/MariaDB driver against the real MariaDB server (root, empty password, db test)."""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable, Iterator
from typing import Any

import pymysql
import pytest

from outpost.drivers import get_driver
from outpost.drivers.base import DriverContext
from outpost.drivers.mysql import MySQLDriver, MySQLOptions, read_only_refusal
from outpost.errors import DriverError, ReadOnlyError, UsageError
from tests.helpers import refused_port, silent_listener

pytestmark = pytest.mark.integration

#: Slack allowed on top of a timeout before a call counts as hanging.
MARGIN = 3.0

MakeDriver = Callable[..., MySQLDriver]


@pytest.fixture
def make(mysql_params: dict[str, object]) -> MakeDriver:
    """Build a driver for the real server; keyword arguments override its options."""

    def build(**overrides: Any) -> MySQLDriver:
        raw = {**mysql_params, **overrides}
        options = MySQLDriver.parse_options(raw)
        return MySQLDriver(options, DriverContext(connection="shop-db"))

    return build


@pytest.fixture
def admin(mysql_params: dict[str, object]) -> Iterator[pymysql.cursors.Cursor]:
    """A plain autocommit PyMySQL cursor (root) for setting up and checking."""
    conn = pymysql.connect(
        host=str(mysql_params["host"]),
        port=int(str(mysql_params["port"])),
        user=str(mysql_params["user"]),
        password=str(mysql_params["password"]),
        database=str(mysql_params["database"]),
        autocommit=True,
        connect_timeout=5,
    )
    try:
        with conn.cursor() as cur:
            yield cur
    finally:
        conn.close()


@pytest.fixture
def table(admin: pymysql.cursors.Cursor) -> Iterator[str]:
    """A fresh table ``(n INT, label VARCHAR)`` with the rows 1..10, dropped afterwards."""
    name = f"outpost_t_{uuid.uuid4().hex[:12]}"
    admin.execute(f"CREATE TABLE {name} (n INT PRIMARY KEY, label VARCHAR(20))")
    admin.execute(
        f"INSERT INTO {name} VALUES " + ", ".join(f"({i}, 'row {i}')" for i in range(1, 11))
    )
    try:
        yield name
    finally:
        admin.execute(f"DROP TABLE IF EXISTS {name}")


def count(admin: pymysql.cursors.Cursor, table: str) -> int:
    admin.execute(f"SELECT COUNT(*) FROM {table}")
    row = admin.fetchone()
    assert row is not None
    return int(row[0])


def table_exists(admin: pymysql.cursors.Cursor, name: str) -> bool:
    admin.execute(
        "SELECT COUNT(*) FROM information_schema.tables "
        "WHERE table_schema = DATABASE() AND table_name = %s",
        (name,),
    )
    row = admin.fetchone()
    return bool(row and row[0])


# --- options --------------------------------------------------------------------------------


def test_registered_under_mysql() -> None:
    assert get_driver("mysql") is MySQLDriver
    assert MySQLDriver.display_name == "MySQL"


def test_option_defaults_match_the_documented_ones() -> None:
    options = MySQLDriver.parse_options({})
    assert isinstance(options, MySQLOptions)
    assert (options.host, options.port, options.timeout, options.ssl) == (
        "localhost",
        3306,
        60,
        "disable",
    )
    assert options.user is None and options.password is None and options.database is None
    for name, field in MySQLOptions.model_fields.items():
        assert field.description, f"option {name} has no description"


@pytest.mark.parametrize(
    ("raw", "flag"),
    [
        ({"port": 70000}, "--port"),
        ({"port": 0}, "--port"),
        ({"timeout": 0}, "--timeout"),
        ({"ssl": "prefer"}, "--ssl"),
        ({"sslmode": "require"}, "--sslmode"),
    ],
)
def test_bad_options_name_the_flag(raw: dict[str, Any], flag: str) -> None:
    with pytest.raises(UsageError) as info:
        MySQLDriver.parse_options(raw, connection="shop-db")
    assert flag in str(info.value)
    assert "shop-db" in str(info.value)


# --- test() --------------------------------------------------------------------------------


def test_test_returns_the_server_version(make: MakeDriver, admin: pymysql.cursors.Cursor) -> None:
    admin.execute("SELECT VERSION()")
    row = admin.fetchone()
    assert row is not None
    result = make().test()
    assert result.server_version == row[0]
    assert result.server_version[0].isdigit()
    assert result.duration_seconds >= 0


# --- query() -------------------------------------------------------------------------------


def test_query_returns_columns_and_json_values(
    make: MakeDriver, admin: pymysql.cursors.Cursor
) -> None:
    name = f"outpost_t_{uuid.uuid4().hex[:12]}"
    admin.execute(
        f"CREATE TABLE {name} (id INT, price DECIMAL(8,2), born DATE, seen DATETIME, "
        "raw VARBINARY(4), note TEXT)"
    )
    try:
        admin.execute(
            f"INSERT INTO {name} VALUES (1, 12.50, '2024-02-29', '2024-03-01 10:20:30', "
            "x'00ff', 'héllo'), (2, NULL, NULL, NULL, NULL, NULL)"
        )
        result = make().query(f"SELECT id, price, born, seen, raw, note FROM {name} ORDER BY id")
    finally:
        admin.execute(f"DROP TABLE IF EXISTS {name}")
    assert result.columns == ["id", "price", "born", "seen", "raw", "note"]
    assert result.rows == [
        [1, "12.50", "2024-02-29", "2024-03-01T10:20:30", "\\x00ff", "héllo"],
        [2, None, None, None, None, None],
    ]
    assert result.row_count == 2
    assert result.truncated is False


def test_max_rows_truncates(make: MakeDriver, table: str) -> None:
    driver = make()
    cut = driver.query(f"SELECT n FROM {table} ORDER BY n", max_rows=3)
    assert cut.rows == [[1], [2], [3]]
    assert cut.row_count == 3
    assert cut.truncated is True

    exact = driver.query(f"SELECT n FROM {table} ORDER BY n", max_rows=10)
    assert exact.row_count == 10
    assert exact.truncated is False

    # An explicit LIMIT above max_rows is still cut at max_rows.
    limited = driver.query(f"SELECT n FROM {table} ORDER BY n LIMIT 8", max_rows=5)
    assert [r[0] for r in limited.rows] == [1, 2, 3, 4, 5]
    assert limited.truncated is True


def test_a_huge_result_is_cut_without_reading_it_all(make: MakeDriver, table: str) -> None:
    # 10^6 rows: only max_rows + 1 are read; the rest is left to the closed connection.
    sql = f"SELECT a.n FROM {table} a, {table} b, {table} c, {table} d, {table} e, {table} f"
    result = make().query(sql + " LIMIT 1000000", max_rows=5, timeout=20)
    assert result.row_count == 5
    assert result.truncated is True


def test_params_use_percent_s(make: MakeDriver, table: str) -> None:
    driver = make()
    result = driver.query(
        f"SELECT n, label FROM {table} WHERE n > %s AND label <> %s ORDER BY n", [8, "row 10"]
    )
    assert result.rows == [[9, "row 9"]]

    hostile = "x'; DROP TABLE " + table + "; --"
    echoed = driver.query("SELECT %s AS v", [hostile])
    assert echoed.rows == [[hostile]]


def test_params_that_do_not_match_the_placeholders(make: MakeDriver) -> None:
    with pytest.raises(DriverError) as info:
        make().query("SELECT %s AS a", [1, 2])
    assert "placeholders" in str(info.value)
    assert "shop-db" in str(info.value)


def test_sql_error_is_a_driver_error(make: MakeDriver, table: str) -> None:
    with pytest.raises(DriverError) as info:
        make().query(f"SELECT no_such_column FROM {table}")
    message = str(info.value)
    assert "shop-db" in message
    assert "no_such_column" in message


# --- read-only -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "statement",
    [
        "INSERT INTO {t} VALUES (99, 'x')",
        "UPDATE {t} SET label = 'changed'",
        "DELETE FROM {t}",
        "REPLACE INTO {t} VALUES (1, 'x')",
        "TRUNCATE TABLE {t}",
        "DROP TABLE {t}",
        "ALTER TABLE {t} ADD COLUMN extra INT",
        "CREATE TABLE {t}_new (a INT)",
        "CREATE TABLE {t}_copy AS SELECT * FROM {t}",
        "CREATE TEMPORARY TABLE {t}_tmp (a INT)",
        "RENAME TABLE {t} TO {t}_renamed",
        "GRANT SELECT ON test.* TO 'nobody_outpost'@'%'",
        "SET GLOBAL max_connections = 151",
        "FLUSH TABLES",
        "SELECT * FROM {t} INTO OUTFILE '/tmp/outpost-probe-out'",
        "/*!50000 SET GLOBAL max_connections = 151 */",
        "/*!99999 SELECT */ SET GLOBAL max_connections = 151",
        "  -- a comment first\n  INSERT INTO {t} VALUES (98, 'x')",
    ],
)
def test_read_only_refuses_writes(
    make: MakeDriver, admin: pymysql.cursors.Cursor, table: str, statement: str
) -> None:
    admin.execute("SELECT @@GLOBAL.max_connections")
    row = admin.fetchone()
    assert row is not None
    max_connections = row[0]
    with pytest.raises(ReadOnlyError) as info:
        make().query(statement.format(t=table))
    message = str(info.value)
    assert "shop-db" in message and "read-only" in message
    # Nothing changed.
    assert count(admin, table) == 10
    admin.execute(f"SELECT label FROM {table} WHERE n = 1")
    assert admin.fetchone() == ("row 1",)
    for suffix in ("_new", "_copy", "_renamed"):
        assert not table_exists(admin, table + suffix)
    admin.execute(f"SHOW COLUMNS FROM {table}")
    assert [r[0] for r in admin.fetchall()] == ["n", "label"]
    admin.execute("SELECT @@GLOBAL.max_connections")
    assert admin.fetchone() == (max_connections,)


def test_read_only_server_refuses_writes_hidden_in_routines(
    make: MakeDriver, admin: pymysql.cursors.Cursor, table: str
) -> None:
    """Writes behind a read statement (CALL, a function in SELECT) are refused by the server,
    DDL included (MySQL/MariaDB commit before DDL; the session is read-only too)."""
    suffix = uuid.uuid4().hex[:8]
    insert_proc = f"outpost_p_ins_{suffix}"
    ddl_proc = f"outpost_p_ddl_{suffix}"
    commit_proc = f"outpost_p_commit_{suffix}"
    func = f"outpost_f_{suffix}"
    created = f"{table}_by_proc"
    driver = make()
    driver.query(
        f"CREATE PROCEDURE {insert_proc}() INSERT INTO {table} VALUES (50, 'p')", allow_writes=True
    )
    driver.query(f"CREATE PROCEDURE {ddl_proc}() CREATE TABLE {created} (a INT)", allow_writes=True)
    driver.query(
        f"CREATE PROCEDURE {commit_proc}() BEGIN COMMIT; INSERT INTO {table} VALUES (51, 'c'); END",
        allow_writes=True,
    )
    driver.query(
        f"CREATE FUNCTION {func}() RETURNS INT MODIFIES SQL DATA "
        f"BEGIN INSERT INTO {table} VALUES (52, 'f'); RETURN 1; END",
        allow_writes=True,
    )
    try:
        for sql in (
            f"CALL {insert_proc}()",
            f"CALL {ddl_proc}()",
            f"CALL {commit_proc}()",
            f"SELECT {func}()",
        ):
            with pytest.raises(ReadOnlyError) as info:
                driver.query(sql)
            assert "allow writes" in str(info.value)
        assert count(admin, table) == 10
        assert not table_exists(admin, created)
    finally:
        admin.execute(f"DROP PROCEDURE IF EXISTS {insert_proc}")
        admin.execute(f"DROP PROCEDURE IF EXISTS {ddl_proc}")
        admin.execute(f"DROP PROCEDURE IF EXISTS {commit_proc}")
        admin.execute(f"DROP FUNCTION IF EXISTS {func}")
        admin.execute(f"DROP TABLE IF EXISTS {created}")


def test_read_only_allows_reading_statements(make: MakeDriver, table: str) -> None:
    driver = make()
    assert driver.query(f"SHOW COLUMNS FROM {table}").row_count == 2
    assert driver.query(f"EXPLAIN SELECT * FROM {table}").columns
    assert driver.query(f"DESCRIBE {table}").row_count == 2
    assert driver.query("WITH x AS (SELECT 1 AS a) SELECT a FROM x").rows == [[1]]
    assert driver.query(f"(SELECT n FROM {table} WHERE n = 1) UNION (SELECT 2)").row_count == 2
    assert driver.query("/* why */ SELECT 1 AS one").rows == [[1]]


def test_read_only_refusal_reading_of_sql() -> None:
    assert read_only_refusal("select 1") is None
    assert read_only_refusal("  ((SELECT 1))") is None
    assert read_only_refusal("# c\n-- c\n/* c */ SHOW TABLES") is None
    assert read_only_refusal("/*!40101 SELECT 1 */") is None
    assert read_only_refusal("SELECT /*!40001 SQL_NO_CACHE */ 1") is None
    refusal = read_only_refusal("/*M!100000 DELETE FROM t */")
    assert refusal is not None and "DELETE" in refusal
    refusal = read_only_refusal("SELECT 1 INTO DUMPFILE '/tmp/x'")
    assert refusal is not None and "file" in refusal


# --- allow_writes --------------------------------------------------------------------------


def test_allow_writes_commits(make: MakeDriver, admin: pymysql.cursors.Cursor, table: str) -> None:
    driver = make()
    inserted = driver.query(
        f"INSERT INTO {table} VALUES (11, %s), (12, %s)", ["a", "b"], allow_writes=True
    )
    assert inserted.columns == [] and inserted.rows == []
    assert inserted.row_count == 2
    assert count(admin, table) == 12

    updated = driver.query(f"UPDATE {table} SET label = 'z' WHERE n > 10", allow_writes=True)
    assert updated.row_count == 2

    created = f"{table}_new"
    try:
        driver.query(f"CREATE TABLE {created} (a INT)", allow_writes=True)
        assert table_exists(admin, created)
        driver.query(f"DROP TABLE {created}", allow_writes=True)
        assert not table_exists(admin, created)
    finally:
        admin.execute(f"DROP TABLE IF EXISTS {created}")

    # A truncated result with writes allowed still commits.
    returned = driver.query(
        f"DELETE FROM {table} WHERE n > 10 RETURNING n", max_rows=1, allow_writes=True
    )
    assert returned.row_count == 1 and returned.truncated is True
    assert count(admin, table) == 10


# --- timeouts ------------------------------------------------------------------------------


@pytest.mark.parametrize("allow_writes", [False, True])
def test_statement_timeout(make: MakeDriver, allow_writes: bool) -> None:
    start = time.monotonic()
    with pytest.raises(DriverError) as info:
        make().query("SELECT SLEEP(5)", timeout=1, allow_writes=allow_writes)
    assert time.monotonic() - start < 1 + MARGIN
    message = str(info.value)
    assert "timeout" in message and "1 second" in message
    assert "shop-db" in message


def test_statement_timeout_backstop_kills_the_query(
    make: MakeDriver, admin: pymysql.cursors.Cursor, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A server that does not time the statement out itself (MySQL for non-SELECTs, old
    servers): the socket read timeout fires and the statement is killed on the server."""
    monkeypatch.setattr(MySQLDriver, "_try_set", staticmethod(lambda cur, statement, value: None))
    marker = f"outpost_backstop_{uuid.uuid4().hex[:8]}"
    start = time.monotonic()
    with pytest.raises(DriverError) as info:
        make().query(f"SELECT SLEEP(60) AS {marker}", timeout=1)
    # The backstop fires a little after the timeout (timeout + 2 s here).
    assert time.monotonic() - start < 1 + 2 + MARGIN
    assert "timeout" in str(info.value)

    def still_running() -> bool:
        admin.execute(
            "SELECT COUNT(*) FROM information_schema.processlist "
            "WHERE info LIKE %s AND id <> CONNECTION_ID()",
            (f"%{marker}%",),
        )
        row = admin.fetchone()
        return bool(row and row[0])

    deadline = time.monotonic() + 15  # far below the 60 s the statement would sleep
    while still_running():
        assert time.monotonic() < deadline, "the timed-out statement is still running"
        time.sleep(0.1)


# --- connection errors ---------------------------------------------------------------------


def test_wrong_password_is_access_denied_without_the_password(
    make: MakeDriver, admin: pymysql.cursors.Cursor
) -> None:
    user = f"outpost_t_{uuid.uuid4().hex[:12]}"
    password = "Right-" + uuid.uuid4().hex
    wrong = "Wrong-" + uuid.uuid4().hex
    hosts = ("%", "localhost")
    for host in hosts:
        pattern = host.replace("%", "%%")
        admin.execute(f"CREATE USER '{user}'@'{pattern}' IDENTIFIED BY %s", (password,))
        admin.execute(f"GRANT SELECT ON test.* TO '{user}'@'{host}'")
    try:
        assert make(user=user, password=password).test().server_version
        with pytest.raises(DriverError) as info:
            make(user=user, password=wrong).test()
        message = str(info.value)
        assert "access denied" in message.lower()
        assert user in message and "shop-db" in message
        assert wrong not in message and password not in message

        with pytest.raises(DriverError) as info:
            make(user=user, password=wrong).query("SELECT 1")
        assert "access denied" in str(info.value).lower()
        assert wrong not in str(info.value)
    finally:
        for host in hosts:
            admin.execute(f"DROP USER IF EXISTS '{user}'@'{host}'")


def test_unknown_database(make: MakeDriver) -> None:
    database = f"outpost_nodb_{uuid.uuid4().hex[:8]}"
    with pytest.raises(DriverError) as info:
        make(database=database).test()
    assert f"unknown database {database!r}" in str(info.value)


def test_silent_server_honours_the_connect_timeout(make: MakeDriver) -> None:
    with silent_listener() as port:
        for call in ("test", "query"):
            driver = make(host="127.0.0.1", port=port, timeout=2, password="Secret-pw-1")
            start = time.monotonic()
            with pytest.raises(DriverError) as info:
                if call == "test":
                    driver.test()
                else:
                    driver.query("SELECT 1")
            assert time.monotonic() - start < 2 + MARGIN
            message = str(info.value)
            assert f"127.0.0.1:{port}" in message
            assert "2 seconds" in message
            assert "Secret-pw-1" not in message


def test_refused_port(make: MakeDriver) -> None:
    port = refused_port()
    start = time.monotonic()
    with pytest.raises(DriverError) as info:
        make(host="127.0.0.1", port=port, timeout=2).test()
    assert time.monotonic() - start < 2 + MARGIN
    message = str(info.value)
    assert f"127.0.0.1:{port}" in message
    assert "refused" in message


def test_ssl_required_but_not_offered(make: MakeDriver, admin: pymysql.cursors.Cursor) -> None:
    admin.execute("SHOW VARIABLES LIKE 'have_ssl'")
    row = admin.fetchone()
    if row is not None and row[1] == "YES":
        pytest.skip("this server offers TLS; the refusal needs one that does not")
    for mode in ("require", "verify-ca", "verify-full"):
        with pytest.raises(DriverError) as info:
            make(ssl=mode).test()
        message = str(info.value)
        assert "SSL" in message and f"--ssl {mode}" in message


def test_unreadable_ca_file(make: MakeDriver, tmp_path: Any) -> None:
    missing = str(tmp_path / "no-such-ca.pem")
    with pytest.raises(DriverError) as info:
        make(ssl="verify-full", ssl_ca=missing).test()
    assert missing in str(info.value) and "--ssl-ca" in str(info.value)
