"""The SQL Server driver without a SQL Server: options, unreachable servers (real sockets on
127.0.0.1 and the real pymssql/FreeTDS), the missing extra, and the query flow against a fake
pymssql connection (what a user sees for read-only, truncation, timeouts, login failures)."""

from __future__ import annotations

import builtins
import datetime as dt
import decimal
import importlib
import sys
import time
from typing import Any

import pytest

from outpost.drivers import get_driver
from outpost.drivers.base import DriverContext
from outpost.drivers.mssql import (
    MSSQLDriver,
    MSSQLOptions,
    code_words,
    read_only_refusal,
)
from outpost.errors import DriverError, OutpostError, ReadOnlyError, UsageError
from tests.helpers import refused_port, silent_listener

#: Slack allowed on top of a timeout before a call counts as hanging.
MARGIN = 3.0
PASSWORD = "Sekr3t-Pw-9081"


def driver(**raw: Any) -> MSSQLDriver:
    options = MSSQLDriver.parse_options({"password": PASSWORD, **raw}, connection="erp")
    return MSSQLDriver(options, DriverContext(connection="erp"))


# --- options --------------------------------------------------------------------------------


def test_registered_under_mssql() -> None:
    assert get_driver("mssql") is MSSQLDriver
    assert MSSQLDriver.display_name == "Microsoft SQL Server"


def test_option_defaults_match_the_documented_ones() -> None:
    options = MSSQLDriver.parse_options({})
    assert isinstance(options, MSSQLOptions)
    assert (options.host, options.port, options.user, options.timeout, options.ssl) == (
        "localhost",
        1433,
        "sa",
        30,
        "verify",
    )
    assert options.password is None and options.database is None
    for name, field in MSSQLOptions.model_fields.items():
        assert field.description, f"option {name} has no description"


def test_password_is_secret() -> None:
    options = driver().options
    assert PASSWORD not in repr(options)
    assert options.to_public()["password"] == "********"


@pytest.mark.parametrize(
    ("raw", "flag", "words"),
    [
        ({"ssl": "require"}, "--ssl", ["disable", "no-verify", "verify"]),
        ({"port": 70000}, "--port", ["65535"]),
        ({"port": 0}, "--port", []),
        ({"port": "many"}, "--port", []),
        ({"timeout": 0}, "--timeout", []),
        ({"encrypt": True}, "--encrypt", ["unknown option", "--ssl"]),
    ],
)
def test_bad_options_name_the_flag(raw: dict[str, Any], flag: str, words: list[str]) -> None:
    with pytest.raises(UsageError) as info:
        MSSQLDriver.parse_options(raw, connection="erp")
    message = str(info.value)
    assert flag in message and "erp" in message
    for word in words:
        assert word in message


# --- unreachable servers (real pymssql / FreeTDS) --------------------------------------------


@pytest.mark.parametrize("call", ["test", "query"])
def test_refused_port(call: str) -> None:
    port = refused_port()
    d = driver(host="127.0.0.1", port=port, timeout=2)
    start = time.monotonic()
    with pytest.raises(DriverError) as info:
        d.test() if call == "test" else d.query("SELECT 1")
    assert time.monotonic() - start < 2 + MARGIN
    message = str(info.value)
    assert f"127.0.0.1:{port}" in message and "erp" in message
    assert "refused" in message
    assert PASSWORD not in message


@pytest.mark.parametrize("call", ["test", "query"])
def test_silent_server_honours_the_login_timeout(call: str) -> None:
    with silent_listener() as port:
        d = driver(host="127.0.0.1", port=port, timeout=2)
        start = time.monotonic()
        with pytest.raises(DriverError) as info:
            d.test() if call == "test" else d.query("SELECT 1")
        assert time.monotonic() - start < 2 + MARGIN
    message = str(info.value)
    assert f"127.0.0.1:{port}" in message
    assert "did not answer within 2 seconds" in message
    assert PASSWORD not in message


# --- the missing extra ---------------------------------------------------------------------


def _hide_pymssql_in_sys_modules(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "pymssql", None)


def _hide_pymssql_from_import(monkeypatch: pytest.MonkeyPatch) -> None:
    real_import = builtins.__import__

    def fake_import(name: str, *args: Any, **kwargs: Any) -> Any:
        if name == "pymssql" or name.startswith("pymssql."):
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)
        return real_import(name, *args, **kwargs)

    monkeypatch.delitem(sys.modules, "pymssql", raising=False)
    monkeypatch.setattr(builtins, "__import__", fake_import)


@pytest.mark.parametrize("hide", [_hide_pymssql_in_sys_modules, _hide_pymssql_from_import])
def test_missing_pymssql_names_the_extra(monkeypatch: pytest.MonkeyPatch, hide: Any) -> None:
    hide(monkeypatch)
    # The module and its options work without pymssql (e.g. to add a connection).
    monkeypatch.delitem(sys.modules, "outpost.drivers.mssql")
    module = importlib.import_module("outpost.drivers.mssql")
    options = module.MSSQLDriver.parse_options({"host": "db.internal"})
    d = module.MSSQLDriver(options, DriverContext(connection="erp"))
    for call in (d.test, lambda: d.query("SELECT 1")):
        with pytest.raises(OutpostError) as info:
            call()
        message = str(info.value)
        assert "pymssql" in message
        assert "pip install 'outpost-agent[mssql]'" in message


# --- reading T-SQL for read-only -------------------------------------------------------------


def test_code_words_skip_comments_strings_and_quoted_names() -> None:
    sql = (
        "SELECT 'commit' AS [rollback], \"commit\" -- commit\n"
        "/* outer /* nested commit */ still comment commit */ FROM t WHERE x = N'it''s commit'"
    )
    assert code_words(sql) == ["SELECT", "AS", "FROM", "T", "WHERE", "X", "N"]


@pytest.mark.parametrize(
    "sql",
    [
        "INSERT INTO t VALUES (1); COMMIT",
        "commit transaction",
        "UPDATE t SET a = 1\nROLLBACK TRAN",
        "BEGIN TRAN; DELETE FROM t; COMMIT WORK;",
    ],
)
def test_transaction_control_is_refused_read_only(sql: str) -> None:
    refusal = read_only_refusal(sql)
    assert refusal is not None and ("COMMIT" in refusal or "ROLLBACK" in refusal)


@pytest.mark.parametrize(
    "sql",
    [
        "SELECT * FROM orders",
        "SET TRANSACTION ISOLATION LEVEL READ COMMITTED; SELECT 1",
        "SELECT 'COMMIT' AS word",
        "SELECT [commit] FROM t -- no ROLLBACK here",
    ],
)
def test_reads_are_not_refused(sql: str) -> None:
    assert read_only_refusal(sql) is None


def test_commit_is_refused_before_connecting() -> None:
    d = driver(host="127.0.0.1", port=refused_port())
    with pytest.raises(ReadOnlyError) as info:
        d.query("DELETE FROM orders; COMMIT")
    message = str(info.value)
    assert "erp" in message and "read-only" in message and "allow writes" in message
    # With writes allowed the batch goes to the server (here: nothing listens).
    with pytest.raises(DriverError) as refused:
        d.query("DELETE FROM orders; COMMIT", allow_writes=True)
    assert "refused" in str(refused.value)


# --- the query flow against a fake pymssql ---------------------------------------------------


class FakeError(Exception):
    """Stands in for pymssql.Error (same argument shape)."""


class FakeOperationalError(FakeError):
    pass


ResultSet = tuple[list[str], list[tuple[Any, ...]]]


class FakeConnection:
    def __init__(self, server: FakeServer) -> None:
        self.server = server
        self.closed = False

    def cursor(self) -> FakeCursor:
        return FakeCursor(self.server)

    def close(self) -> None:
        self.closed = True


class FakeCursor:
    def __init__(self, server: FakeServer) -> None:
        self.server = server
        self.description: tuple[tuple[Any, ...], ...] | None = None
        self.rowcount = -1
        self._sets: list[ResultSet] = []
        self._rows: list[tuple[Any, ...]] = []

    def execute(self, sql: str, params: tuple[Any, ...] | None = None) -> None:
        self.server.log.append(sql if params is None else f"{sql} % {params!r}")
        if sql in self.server.errors:
            raise self.server.errors[sql]
        if sql == "SELECT @@TRANCOUNT":
            sets: list[ResultSet] = [(["n"], [(self.server.trancount,)])]
        else:
            sets = list(self.server.results.get(sql, []))
        self.rowcount = self.server.rowcounts.get(sql, -1)
        self._sets = sets
        self._next()

    def _next(self) -> bool:
        if not self._sets:
            self.description, self._rows = None, []
            return False
        columns, rows = self._sets.pop(0)
        self.description = tuple((c, 1, None, None, None, None, None) for c in columns)
        self._rows = list(rows)
        return True

    def fetchmany(self, size: int) -> list[tuple[Any, ...]]:
        taken, self._rows = self._rows[:size], self._rows[size:]
        self.server.fetched += len(taken)
        return taken

    def fetchone(self) -> tuple[Any, ...] | None:
        rows = self.fetchmany(1)
        return rows[0] if rows else None

    def nextset(self) -> int | None:
        return 1 if self._next() else None


class FakeServer:
    """What the fake pymssql module answers; ``log`` records every statement sent."""

    def __init__(self) -> None:
        self.log: list[str] = []
        self.results: dict[str, list[ResultSet]] = {}
        self.rowcounts: dict[str, int] = {}
        self.errors: dict[str, Exception] = {}
        self.trancount = 1
        self.fetched = 0
        self.connect_error: Exception | None = None
        self.connect_kwargs: dict[str, Any] = {}
        self.connections: list[FakeConnection] = []


@pytest.fixture
def fake(monkeypatch: pytest.MonkeyPatch) -> FakeServer:
    server = FakeServer()

    class FakeModule:
        Error = FakeError
        OperationalError = FakeOperationalError

        @staticmethod
        def connect(**kwargs: Any) -> FakeConnection:
            server.connect_kwargs = kwargs
            if server.connect_error is not None:
                raise server.connect_error
            conn = FakeConnection(server)
            server.connections.append(conn)
            return conn

    monkeypatch.setitem(sys.modules, "pymssql", FakeModule)
    return server


def test_connect_arguments(fake: FakeServer) -> None:
    fake.results["SELECT @@VERSION"] = [
        (["v"], [("Microsoft SQL Server 2022 (RTM) - 16.0.1000.6 (X64) \n\tOct  8 2022\n",)])
    ]
    result = driver(host="db.internal", port=14330, database="erp", timeout=7).test()
    assert result.server_version == "Microsoft SQL Server 2022 (RTM) - 16.0.1000.6 (X64)"
    kwargs = fake.connect_kwargs
    assert (kwargs["server"], kwargs["port"], kwargs["user"]) == ("db.internal", "14330", "sa")
    assert (kwargs["database"], kwargs["login_timeout"], kwargs["password"]) == (
        "erp",
        7,
        PASSWORD,
    )
    assert kwargs["encryption"] == "require"  # ssl=verify (see the module docstring)
    assert fake.connections[0].closed


@pytest.mark.parametrize(
    ("mode", "encryption"), [("disable", "off"), ("no-verify", "require"), ("verify", "require")]
)
def test_ssl_modes_map_to_freetds_encryption(fake: FakeServer, mode: str, encryption: str) -> None:
    driver(ssl=mode).query("SELECT 1")
    assert fake.connect_kwargs["encryption"] == encryption


def test_read_only_query_is_rolled_back(fake: FakeServer) -> None:
    fake.results["SELECT * FROM orders"] = [
        (
            ["id", "total", "placed"],
            [(1, decimal.Decimal("9.90"), dt.datetime(2024, 1, 2, 3, 4, 5)), (2, None, None)],
        )
    ]
    result = driver().query("SELECT * FROM orders", max_rows=10, timeout=4.2)
    assert result.columns == ["id", "total", "placed"]
    assert result.rows == [[1, "9.90", "2024-01-02T03:04:05"], [2, None, None]]
    assert result.row_count == 2 and result.truncated is False
    assert fake.log == [
        "BEGIN TRANSACTION",
        "SELECT * FROM orders",
        "SELECT @@TRANCOUNT",
        "IF @@TRANCOUNT > 0 ROLLBACK TRANSACTION",
    ]
    assert fake.connect_kwargs["timeout"] == 5  # whole seconds, rounded up
    assert fake.connections[0].closed


def test_truncated_result_is_not_read_further(fake: FakeServer) -> None:
    fake.results["SELECT n FROM big"] = [(["n"], [(i,) for i in range(1000)])]
    result = driver().query("SELECT n FROM big", max_rows=3)
    assert result.rows == [[0], [1], [2]]
    assert result.truncated is True
    assert fake.fetched == 4
    assert fake.log[-1] == "IF @@TRANCOUNT > 0 ROLLBACK TRANSACTION"


def test_params_are_passed_to_pymssql(fake: FakeServer) -> None:
    driver().query("SELECT * FROM t WHERE a = %s AND b = %s", ["x", 2])
    assert "SELECT * FROM t WHERE a = %s AND b = %s % ('x', 2)" in fake.log


def test_statement_without_result_reports_rows_affected(fake: FakeServer) -> None:
    fake.rowcounts["UPDATE t SET a = 1"] = 7
    result = driver().query("UPDATE t SET a = 1", allow_writes=True)
    assert (result.columns, result.rows, result.row_count) == ([], [], 7)
    # Writes run in autocommit mode: no transaction of the driver's, nothing rolled back
    # (the final ROLLBACK only ends a transaction the batch itself left open).
    assert "BEGIN TRANSACTION" not in fake.log
    assert "SELECT @@TRANCOUNT" not in fake.log


def test_allow_writes_runs_the_whole_batch(fake: FakeServer) -> None:
    fake.results["SELECT a FROM t; DELETE FROM t; SELECT b FROM u"] = [
        (["a"], [(1,), (2,), (3,)]),
        (["b"], [(4,)]),
    ]
    result = driver().query(
        "SELECT a FROM t; DELETE FROM t; SELECT b FROM u", max_rows=1, allow_writes=True
    )
    assert result.rows == [[1]] and result.truncated is True
    assert fake.fetched == 4  # the rest of the batch was read to its end


def test_a_batch_that_ends_the_transaction_is_reported(fake: FakeServer) -> None:
    fake.trancount = 0  # e.g. EXEC('COMMIT'): invisible to the keyword check
    with pytest.raises(ReadOnlyError) as info:
        driver().query("EXEC('COM' + 'MIT')")
    message = str(info.value)
    assert "may have been committed" in message and "erp" in message


def test_statement_not_allowed_in_a_transaction(fake: FakeServer) -> None:
    fake.errors["CREATE DATABASE x"] = FakeOperationalError(
        (
            226,
            b"CREATE DATABASE statement not allowed within multi-statement transaction.\n"
            b"DB-Lib error message 20018, severity 16:\nGeneral SQL Server error: Check "
            b"messages from the SQL Server\n",
        )
    )
    with pytest.raises(ReadOnlyError) as info:
        driver().query("CREATE DATABASE x")
    message = str(info.value)
    assert "CREATE DATABASE statement not allowed" in message and "allow writes" in message
    assert "DB-Lib" not in message


def test_query_timeout_is_a_clear_error(fake: FakeServer) -> None:
    fake.errors["WAITFOR DELAY '00:01:00'"] = FakeOperationalError(
        (
            20003,
            b"DB-Lib error message 20003, severity 6:\n"
            b"Adaptive Server connection timed out (db.internal)\n",
        )
    )
    with pytest.raises(DriverError) as info:
        driver().query("WAITFOR DELAY '00:01:00'", timeout=1)
    assert "exceeded the statement timeout of 1 second" in str(info.value)
    assert fake.connections[0].closed


def test_sql_error_is_readable(fake: FakeServer) -> None:
    fake.errors["SELECT nope FROM t"] = FakeOperationalError(
        (
            207,
            b"Invalid column name 'nope'.DB-Lib error message 20018, severity 16:\n"
            b"General SQL Server error: Check messages from the SQL Server\n",
        )
    )
    with pytest.raises(DriverError) as info:
        driver().query("SELECT nope FROM t")
    assert str(info.value) == (
        "Query failed for connection 'erp': Invalid column name 'nope' (error 207)."
    )


def test_login_failed_names_the_user_not_the_password(fake: FakeServer) -> None:
    fake.connect_error = FakeOperationalError(
        (
            18456,
            b"Login failed for user 'report'.DB-Lib error message 20018, severity 14:\n"
            b"General SQL Server error: Check messages from the SQL Server\n"
            b"DB-Lib error message 20002, severity 9:\nAdaptive Server connection failed\n",
        )
    )
    with pytest.raises(DriverError) as info:
        driver(user="report", host="db.internal").test()
    message = str(info.value)
    assert "login failed for user 'report'" in message
    assert "db.internal:1433" in message and "erp" in message
    assert PASSWORD not in message


def test_unknown_database(fake: FakeServer) -> None:
    fake.connect_error = FakeOperationalError(
        (4060, b'Cannot open database "nope" requested by the login. The login failed.\n')
    )
    with pytest.raises(DriverError) as info:
        driver(database="nope").query("SELECT 1")
    assert "cannot open database 'nope'" in str(info.value)
