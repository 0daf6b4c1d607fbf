"""The MySQL / MariaDB driver (PyMySQL).

Each operation opens its own connection and closes it afterwards.

Read-only queries. MySQL and MariaDB only refuse writes inside a ``READ ONLY`` transaction
for DML: a DDL statement (``CREATE TABLE``, ``DROP``, ``GRANT``...) first commits the
transaction implicitly and then runs in autocommit mode, where a transaction-level
``READ ONLY`` no longer applies (checked on MariaDB 10.11: ``START TRANSACTION READ ONLY;
CREATE TABLE t(a int)`` creates the table). So unless writes are allowed the driver

1. sets the *session* access mode (``SET SESSION TRANSACTION READ ONLY``), which also covers
   the transactions that follow an implicit commit, so DML, DDL, temporary tables, users and
   grants, sequences and table maintenance (``OPTIMIZE``) are refused by the server with
   error 1792, which becomes a :class:`~outpost.errors.ReadOnlyError`;
2. runs the statement in ``START TRANSACTION READ ONLY`` and always rolls it back;
3. accepts only statements that read: the first keyword must be one of
   :data:`READ_ONLY_KEYWORDS` (``SELECT``, ``WITH``, ``SHOW``, ``EXPLAIN``, ``CALL``...), and
   ``INTO OUTFILE`` / ``INTO DUMPFILE`` are refused. This shuts out the statements a
   read-only transaction does not stop because they are not transactional: ``SET GLOBAL``,
   ``FLUSH``, ``KILL``, ``PURGE``, ``RESET``, replication control, files written on the
   server. Executable comments (``/*! ... */``, ``/*M! ... */``) are read both as code and as
   comments, so they cannot hide the real first keyword.

What stays possible, as with any SQL client: a stored procedure run with ``CALL`` still has
its data writes refused (the session is read-only) but may do administrative things its
definer is allowed to do. For a hard guarantee, connect as a user with only ``SELECT``.

PyMySQL never enables multi-statements, so a query is exactly one statement.

Statement timeout: MariaDB's ``max_statement_time`` (seconds, every statement) or MySQL's
``max_execution_time`` (milliseconds, ``SELECT`` only) is set for the session, chosen from the
server version. As a backstop, the socket read timeout is set a little above the statement
timeout; when it fires, the statement is killed (``KILL QUERY``) from a second connection.

``cancel()`` (from another thread) kills the running statement the same way: a second, short
connection runs ``KILL QUERY <thread id>`` for every open connection of the driver; the
statement ends with error 1317 and the operation raises QueryCancelled. Killing another
user's statement needs the ``PROCESS``/``CONNECTION ADMIN`` privilege (MariaDB: ``CONNECTION
ADMIN`` or ``SUPER``); a user may always kill its own, which is the case here.

Rows: an unbuffered cursor (``SSCursor``) reads at most ``max_rows + 1`` rows, and
``sql_select_limit`` tells the server not to produce more than that for a top-level
``SELECT``. A read-only connection whose result was cut short is closed without reading the
rest; with writes allowed the rest is read (and dropped) before the commit.

TLS (``ssl``): ``disable``; ``require`` (encrypted, certificate not checked); ``verify-ca``
(chain checked against ``ssl_ca`` or the system's CA store); ``verify-full`` (chain and host
name). Any mode but ``disable`` fails when the server does not offer TLS.
"""

from __future__ import annotations

import contextlib
import re
import ssl
from collections.abc import Callable, Sequence
from typing import Any, Literal

import pymysql
import pymysql.cursors
from pydantic import Field, SecretStr

from outpost.drivers.base import (
    Driver,
    DriverOptions,
    QueryResult,
    TestResult,
    jsonable,
)
from outpost.errors import DriverError, ReadOnlyError

SSLMode = Literal["disable", "require", "verify-ca", "verify-full"]

#: First keywords of the statements a read-only query may run.
READ_ONLY_KEYWORDS = frozenset(
    {
        "SELECT",
        "WITH",
        "SHOW",
        "DESCRIBE",
        "DESC",
        "EXPLAIN",
        "VALUES",
        "TABLE",
        "CALL",
        "HELP",
        "DO",
        "CHECKSUM",
    }
)

# Server error numbers (https://mariadb.com/kb/en/mariadb-error-codes/).
ER_ACCESS_DENIED = 1045
ER_DBACCESS_DENIED = 1044
ER_BAD_DB = 1049
ER_QUERY_INTERRUPTED = 1317
ER_READ_ONLY_TRANSACTION = 1792
ER_STATEMENT_TIMEOUT = 1969  # MariaDB max_statement_time
ER_QUERY_TIMEOUT = 3024  # MySQL max_execution_time
ER_UNKNOWN_SYSTEM_VARIABLE = 1193
ER_PARSE_ERROR = 1064
# Client error numbers.
CR_CONN_HOST_ERROR = 2003
CR_SERVER_GONE = 2006
CR_SERVER_LOST = 2013
CR_SSL_CONNECTION_ERROR = 2026

_TIMEOUT_ERRORS = frozenset({ER_STATEMENT_TIMEOUT, ER_QUERY_TIMEOUT})
_LOST_ERRORS = frozenset({CR_SERVER_GONE, CR_SERVER_LOST})


class MySQLOptions(DriverOptions):
    host: str = Field("localhost", description="The DBMS host name")
    port: int = Field(3306, ge=1, le=65535, description="The DBMS port")
    user: str | None = Field(None, description="A username for connecting to the database")
    password: SecretStr | None = Field(None, description="The password associated with user")
    database: str | None = Field(None, description="The name of the database to connect to")
    timeout: int = Field(
        60,
        gt=0,
        description="Timeout for establishing a connection to the database, in seconds",
    )
    ssl: SSLMode = Field(
        "disable",
        description=(
            "The SSL mode: disable (no encryption), require (encrypted, certificate not "
            "checked), verify-ca (certificate chain checked), verify-full (chain and host "
            "name checked)"
        ),
    )
    ssl_ca: str | None = Field(
        None,
        description=(
            "A PEM file of CA certificates for verify-ca and verify-full "
            "(default: the system's CA store)"
        ),
    )


def _errno(exc: BaseException) -> int | None:
    args = exc.args
    if args and isinstance(args[0], int):
        return args[0]
    return None


def _errmsg(exc: BaseException) -> str:
    args = exc.args
    if len(args) >= 2 and isinstance(args[0], int):
        return str(args[1])
    return str(exc) or type(exc).__name__


def _scan_keywords(sql: str, start: int = 0, depth: int = 0) -> set[str]:
    """The possible first keywords of SQL from START (upper-case; "" when there is none).

    Whitespace, parentheses and comments are skipped. An executable comment (``/*!`` or
    ``/*M!``, with an optional version number) may or may not run depending on the server
    version, so both readings are returned.
    """
    i, n = start, len(sql)
    while i < n:
        c = sql[i]
        if c.isspace() or c == "(":
            i += 1
        elif c == "#" or (sql.startswith("--", i) and (i + 2 >= n or sql[i + 2].isspace())):
            end = sql.find("\n", i)
            i = n if end < 0 else end + 1
        elif sql.startswith("/*", i):
            end = sql.find("*/", i + 2)
            executable = re.match(r"/\*M?!\d*", sql[i:])
            if executable is not None:
                found: set[str] = set()
                if depth < 8:
                    found |= _scan_keywords(sql, i + executable.end(), depth + 1)
                    found |= _scan_keywords(sql, n if end < 0 else end + 2, depth + 1)
                return found or {""}
            i = n if end < 0 else end + 2
        else:
            break
    match = re.match(r"[A-Za-z_]+", sql[i:])
    return {match.group(0).upper() if match else ""}


_FILE_WRITE = re.compile(r"(?<![\w$])(?:OUT|DUMP)FILE(?![\w$])", re.IGNORECASE)


def read_only_refusal(sql: str) -> str | None:
    """Why SQL may not run read-only (a sentence fragment), or None when it may."""
    if _FILE_WRITE.search(sql):
        return "it writes a file on the database server (INTO OUTFILE / INTO DUMPFILE)"
    # "" (no keyword: empty, or not a statement) only gets the server's syntax error.
    bad = sorted(k for k in _scan_keywords(sql) if k and k not in READ_ONLY_KEYWORDS)
    if bad:
        allowed = ", ".join(sorted(READ_ONLY_KEYWORDS))
        return (
            f"{bad[0]} is not a statement that only reads (read-only queries start with one "
            f"of {allowed})"
        )
    return None


def seconds(value: float) -> str:
    """``1 second``, ``2.5 seconds``."""
    return f"{value:g} second" + ("" if value == 1 else "s")


def _mysql_version(server_info: str) -> tuple[bool, tuple[int, ...]]:
    """(is MariaDB, version numbers) from the handshake's server version string."""
    info = server_info.removeprefix("5.5.5-")  # MariaDB < 11 prefixes this for old clients
    is_mariadb = "mariadb" in server_info.lower()
    match = re.match(r"(\d+)\.(\d+)\.(\d+)", info)
    numbers = tuple(int(p) for p in match.groups()) if match else (0, 0, 0)
    return is_mariadb, numbers


def _server_info(conn: pymysql.connections.Connection[Any]) -> str:
    return str(conn.get_server_info())  # type: ignore[no-untyped-call]


def _thread_id(conn: pymysql.connections.Connection[Any]) -> int:
    return int(conn.thread_id())  # type: ignore[no-untyped-call]


def _reason(message: str) -> str:
    """The OS-level reason inside PyMySQL's "Can't connect ... (reason)" message."""
    match = re.search(r"\((?:\[Errno -?\d+\]\s*)?([^()]*)\)\s*$", message)
    reason = match.group(1).strip() if match else message.strip()
    return reason[:1].lower() + reason[1:] if reason else message


class MySQLDriver(Driver):
    name = "mysql"
    display_name = "MySQL"
    options_model = MySQLOptions
    sqlalchemy_dialect = "mysql+pymysql"

    options: MySQLOptions

    # --- connecting -----------------------------------------------------------------------

    def _ssl_arguments(self) -> dict[str, Any]:
        o = self.options
        if o.ssl == "disable":
            return {"ssl_disabled": True}
        if o.ssl == "require":
            ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
            ctx.check_hostname = False
            ctx.verify_mode = ssl.CERT_NONE
            return {"ssl": ctx}
        try:
            ctx = ssl.create_default_context(cafile=o.ssl_ca)
        except (OSError, ssl.SSLError) as exc:
            raise self.error(
                "Cannot connect", f"cannot read the CA file {o.ssl_ca!r} (--ssl-ca): {exc}"
            ) from None
        ctx.check_hostname = o.ssl == "verify-full"
        ctx.verify_mode = ssl.CERT_REQUIRED
        return {"ssl": ctx}

    def _where(self) -> str:
        return f"{self.options.host}:{self.options.port}"

    def _connect_error(self, exc: BaseException, connect_timeout: float) -> DriverError:
        o = self.options
        code = _errno(exc)
        message = _errmsg(exc)
        name = self.context.connection
        if code == ER_ACCESS_DENIED:
            text = (
                f"Cannot connect to MySQL at {self._where()} for connection {name!r}: "
                f"access denied for user {o.user or '(current OS user)'!r} "
                "(check the user and the password)."
            )
        elif code == ER_DBACCESS_DENIED:
            text = (
                f"Cannot connect to MySQL at {self._where()} for connection {name!r}: "
                f"access denied for user {o.user!r} to database {o.database!r}."
            )
        elif code == ER_BAD_DB:
            text = (
                f"Cannot connect to MySQL at {self._where()} for connection {name!r}: "
                f"unknown database {o.database!r}."
            )
        elif code in _LOST_ERRORS and "timed out" in message:
            text = (
                f"Cannot connect to MySQL at {self._where()} for connection {name!r}: "
                f"the server did not answer within {seconds(connect_timeout)}."
            )
        elif code == CR_CONN_HOST_ERROR:
            reason = _reason(message)
            if "timed out" in reason:
                reason = f"no connection within {seconds(connect_timeout)} ({reason})"
            text = f"Cannot connect to MySQL at {self._where()} for connection {name!r}: {reason}."
        elif code == CR_SSL_CONNECTION_ERROR or "SSL" in message:
            text = (
                f"Cannot connect to MySQL at {self._where()} for connection {name!r} with "
                f"--ssl {o.ssl}: {message.rstrip('.')}."
            )
        else:
            detail = f"{message.rstrip('.')} (error {code})" if code else message.rstrip(".")
            text = f"Cannot connect to MySQL at {self._where()} for connection {name!r}: {detail}."
        return DriverError(self.scrub(text))

    def _connect(self, connect_timeout: float) -> pymysql.connections.Connection[Any]:
        """A new connection; the connect timeout bounds the TCP connect and the handshake."""
        o = self.options
        kwargs: dict[str, Any] = {
            "host": o.host,
            "port": o.port,
            "user": o.user,
            "password": o.password.get_secret_value() if o.password else "",
            "database": o.database,
            "connect_timeout": connect_timeout,
            # The handshake and login are socket reads: bound them by the connect timeout.
            "read_timeout": connect_timeout,
            "write_timeout": connect_timeout,
            "charset": "utf8mb4",
            "autocommit": False,
            **self._ssl_arguments(),
        }
        try:
            return pymysql.connect(**kwargs)
        except (pymysql.MySQLError, OSError) as exc:
            raise self._connect_error(exc, connect_timeout) from None

    @staticmethod
    def _set_socket_timeouts(
        conn: pymysql.connections.Connection[Any], value: float | None
    ) -> None:
        # PyMySQL reads these before every socket operation; it has no public setter.
        conn._read_timeout = value  # type: ignore[attr-defined]
        conn._write_timeout = value  # type: ignore[attr-defined]

    def _kill(self, thread_id: int) -> None:
        """Stop the statement running on THREAD_ID, from a second connection."""
        conn = self._connect(min(float(self.options.timeout), 10.0))
        try:
            with conn.cursor() as cur:
                cur.execute("KILL QUERY %s", (thread_id,))
        finally:
            with contextlib.suppress(Exception):
                conn.close()

    def _kill_query(self, thread_id: int) -> None:
        """Best effort: stop the statement running on THREAD_ID (after a lost connection)."""
        with contextlib.suppress(DriverError, pymysql.MySQLError, OSError):
            self._kill(thread_id)

    def canceller(self, conn: pymysql.connections.Connection[Any]) -> Callable[[], None]:
        """What stops CONN's running statement (nothing once CONN is closed)."""
        thread_id = _thread_id(conn)

        def cancel() -> None:
            if not conn.open:
                raise pymysql.err.InterfaceError("the connection is closed")
            self._kill(thread_id)

        return cancel

    # --- the driver API -------------------------------------------------------------------

    def test(self, timeout: float | None = None) -> TestResult:
        elapsed = self.timer()
        connect_timeout = float(timeout) if timeout else float(self.options.timeout)
        self.check_cancelled()
        conn = self._connect(connect_timeout)
        try:
            with self.cancellable(self.canceller(conn)), conn.cursor() as cur:
                cur.execute("SELECT VERSION()")
                row = cur.fetchone()
        except pymysql.MySQLError as exc:
            raise self.error("Cannot run a test query", _errmsg(exc)) from None
        finally:
            with contextlib.suppress(Exception):
                conn.close()
        version = str(row[0]) if row else _server_info(conn)
        return TestResult(server_version=version, duration_seconds=elapsed())

    def query(
        self,
        sql: str,
        params: Sequence[Any] | None = None,
        *,
        max_rows: int = 1000,
        timeout: float = 30.0,
        allow_writes: bool = False,
    ) -> QueryResult:
        name = self.context.connection
        if not allow_writes:
            refusal = read_only_refusal(sql)
            if refusal:
                raise ReadOnlyError(
                    self.scrub(
                        f"Connection {name!r} runs this query read-only and refused it: "
                        f"{refusal}; allow writes to run it."
                    )
                )
        max_rows = max(0, int(max_rows))
        elapsed = self.timer()
        self.check_cancelled()
        conn = self._connect(float(self.options.timeout))
        thread_id = _thread_id(conn)
        cur: pymysql.cursors.SSCursor | None = None
        watched: int | None = None
        try:
            watched = self.watch(self.canceller(conn))
            self._prepare_session(
                conn, timeout=timeout, max_rows=max_rows, allow_writes=allow_writes
            )
            backstop = timeout + max(2.0, timeout / 10) if timeout > 0 else None
            self._set_socket_timeouts(conn, backstop)
            cur = conn.cursor(pymysql.cursors.SSCursor)
            if params:
                cur.execute(sql, tuple(params))
            else:
                cur.execute(sql)
            if cur.description is None:
                affected = int(cur.rowcount) if cur.rowcount is not None else 0
                result = QueryResult(columns=[], rows=[], row_count=max(affected, 0))
            else:
                columns = [str(d[0]) for d in cur.description]
                fetched = list(cur.fetchmany(max_rows + 1))
                truncated = len(fetched) > max_rows
                rows = [[jsonable(v) for v in row] for row in fetched[:max_rows]]
                result = QueryResult(
                    columns=columns, rows=rows, row_count=len(rows), truncated=truncated
                )
            # KILL QUERY ends a lone SLEEP() without an error: still report the cancel (and
            # never commit after one)
            self.check_cancelled()
            if allow_writes:
                cur.close()  # reads (and drops) what is left, so that COMMIT can be sent
                conn.commit()
            # A read-only transaction needs no ROLLBACK: closing the connection ends it.
        except pymysql.MySQLError as exc:
            raise self._query_error(exc, timeout, elapsed(), thread_id) from None
        except (TypeError, ValueError) as exc:
            if not params:
                raise
            # PyMySQL formats the parameters into the SQL with %: they disagree.
            raise self.error(
                "Query failed",
                f"the parameters do not match the %s placeholders of the SQL ({exc}; with "
                "parameters a literal % is written %%)",
            ) from None
        finally:
            if watched is not None:
                self.unwatch(watched)
            self._abandon(conn, cur)
        result.duration_seconds = elapsed()
        return result

    def dbapi_connect(self, timeout: float | None = None) -> pymysql.connections.Connection[Any]:
        """A connection for schema inspection: the session is read-only and, with a TIMEOUT
        (seconds, > 0), each statement is limited to it (MariaDB ``max_statement_time``, MySQL
        ``max_execution_time``), with the socket read timeout a little above as a backstop."""
        limit = timeout if timeout is not None and timeout > 0 else None
        connect_timeout = float(self.options.timeout)
        if limit is not None:
            connect_timeout = min(connect_timeout, limit)
        self.check_cancelled()
        conn = self._connect(connect_timeout)
        try:
            self.watch(self.canceller(conn))  # for as long as the connection is open
            is_mariadb, version = _mysql_version(_server_info(conn))
            with conn.cursor() as cur:
                if limit is not None and is_mariadb:
                    self._try_set(cur, "SET SESSION max_statement_time = %s", limit)
                elif limit is not None and version >= (5, 7, 8):
                    millis = max(1, round(limit * 1000))
                    self._try_set(cur, "SET SESSION max_execution_time = %s", millis)
                try:
                    cur.execute("SET SESSION TRANSACTION READ ONLY")
                except pymysql.MySQLError as exc:
                    if _errno(exc) != ER_PARSE_ERROR:  # older than MySQL 5.6.5 / MariaDB 10.0
                        raise
        except pymysql.MySQLError as exc:
            self._abandon(conn, None)
            raise self.error("Cannot prepare the session", _errmsg(exc)) from None
        except BaseException:
            self._abandon(conn, None)
            raise
        self._set_socket_timeouts(conn, None if limit is None else limit + max(2.0, limit / 10))
        return conn

    # --- query helpers --------------------------------------------------------------------

    def _prepare_session(
        self,
        conn: pymysql.connections.Connection[Any],
        *,
        timeout: float,
        max_rows: int,
        allow_writes: bool,
    ) -> None:
        is_mariadb, version = _mysql_version(_server_info(conn))
        with conn.cursor() as cur:
            if timeout > 0:
                if is_mariadb:
                    self._try_set(cur, "SET SESSION max_statement_time = %s", timeout)
                elif version >= (5, 7, 8):
                    self._try_set(
                        cur, "SET SESSION max_execution_time = %s", max(1, round(timeout * 1000))
                    )
            cur.execute("SET SESSION sql_select_limit = %s", (max_rows + 1,))
            if allow_writes:
                cur.execute("START TRANSACTION")
            else:
                try:
                    cur.execute("SET SESSION TRANSACTION READ ONLY")
                except pymysql.MySQLError as exc:
                    if _errno(exc) != ER_PARSE_ERROR:
                        raise
                    raise DriverError(
                        self.scrub(
                            f"Connection {self.context.connection!r}: this server "
                            f"({_server_info(conn)}) has no read-only transactions (they need "
                            "MySQL 5.6.5 or MariaDB 10.0), so the query cannot run read-only."
                        )
                    ) from None
                cur.execute("START TRANSACTION READ ONLY")

    @staticmethod
    def _try_set(cur: pymysql.cursors.Cursor, statement: str, value: float) -> None:
        """Run a SET; a server without the variable keeps only the socket backstop."""
        try:
            cur.execute(statement, (value,))
        except pymysql.MySQLError as exc:
            if _errno(exc) != ER_UNKNOWN_SYSTEM_VARIABLE:
                raise

    @staticmethod
    def _abandon(
        conn: pymysql.connections.Connection[Any], cur: pymysql.cursors.SSCursor | None
    ) -> None:
        """Close CONN without reading the rest of CUR's unbuffered result, if any.

        PyMySQL would otherwise read every remaining row (on close and on garbage
        collection); the server stops the statement when the socket closes and rolls back the
        open transaction.
        """
        if cur is not None:
            result = getattr(cur, "_result", None)
            if result is not None:
                result.unbuffered_active = False
            cur.connection = None  # type: ignore[assignment]
        with contextlib.suppress(Exception):
            conn.close()

    def _query_error(
        self, exc: pymysql.MySQLError, timeout: float, elapsed: float, thread_id: int
    ) -> DriverError | ReadOnlyError:
        code = _errno(exc)
        message = _errmsg(exc).rstrip(".")
        name = self.context.connection
        if self.cancel_requested and code in (ER_QUERY_INTERRUPTED, *_LOST_ERRORS):
            return self.cancelled_error()
        if code == ER_READ_ONLY_TRANSACTION:
            return ReadOnlyError(
                self.scrub(
                    f"Connection {name!r} runs this query read-only and the server refused "
                    f"the statement because it writes ({message}, error {code}); allow writes "
                    "to run it."
                )
            )
        timed_out = code in _TIMEOUT_ERRORS or (
            timeout > 0 and code in (*_LOST_ERRORS, ER_QUERY_INTERRUPTED) and elapsed >= timeout
        )
        if timed_out:
            if code in _LOST_ERRORS:
                self._kill_query(thread_id)
            return DriverError(
                self.scrub(
                    f"Query on connection {name!r} exceeded the statement timeout of "
                    f"{seconds(timeout)} and was cancelled."
                )
            )
        if code is None and isinstance(exc, pymysql.ProgrammingError):
            # PyMySQL's own check: the %s placeholders and the parameters disagree.
            return self.error(
                "Query failed",
                f"the parameters do not match the %s placeholders of the SQL ({message}; "
                "with parameters a literal % is written %%)",
            )
        if code in _LOST_ERRORS:
            return DriverError(
                self.scrub(
                    f"Query on connection {name!r} lost its connection to MySQL at "
                    f"{self._where()}: {message}."
                )
            )
        return self.error("Query failed", f"{message} (error {code})" if code else message)
