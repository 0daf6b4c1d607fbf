"""The Microsoft SQL Server driver (pymssql, which bundles FreeTDS's db-lib).

pymssql is the optional extra ``mssql`` (``pip install 'outpost-agent[mssql]'``); it is imported
only when the driver is used. Each operation opens its own connection and closes it afterwards.

Read-only queries. SQL Server has no read-only transaction (``SET TRANSACTION ISOLATION
LEVEL`` only chooses how reads are isolated). Unless writes are allowed, the driver

1. refuses a batch that contains ``COMMIT`` or ``ROLLBACK`` (outside comments, strings and
   quoted names), since either would end the driver's transaction early;
2. runs the batch inside ``BEGIN TRANSACTION`` and always rolls that transaction back, so
   whatever the batch changed in tables is undone; statements that SQL Server does not allow
   inside a transaction (``CREATE DATABASE``, ``BACKUP``, ``RECONFIGURE``...) fail, and are
   reported as a :class:`~outpost.errors.ReadOnlyError`;
3. checks ``@@TRANCOUNT`` after the batch: if the batch ended the transaction anyway (dynamic
   SQL such as ``EXEC('COMMIT')``), the query fails with a ReadOnlyError saying that its
   changes may have been committed.

With writes allowed the batch runs in autocommit mode (each statement commits itself, as in
``sqlcmd``), and the whole batch is run even when its first result is cut at ``max_rows``.

This is weaker than a real read-only mode: what a rollback cannot undo still happens
(sequence and identity values consumed, ``xp_cmdshell``, mail, linked servers), and a COMMIT
hidden in dynamic SQL is only detected afterwards. For a hard
guarantee, connect as a login that may only read (``db_datareader``).

Timeouts: ``timeout`` (the option) is pymssql's ``login_timeout`` (connection and login); the
query's timeout is pymssql's ``timeout`` (query timeout, whole seconds, at least 1). Note that
FreeTDS's db-lib keeps both as *process-wide* settings (``dbsetlogintime``/``dbsettime``): when
several SQL Server queries run at once with different timeouts, the value set last applies to
all of them. The TDS version is pinned to 7.4 (SQL Server 2012 and later; older servers
answer with their own version): FreeTDS's "auto" would retry a silent server with further
versions and so take several times the login timeout.

Cancel: this driver keeps ``Driver.cancel()``'s default (nothing is sent; its statements end
at the query timeout). pymssql's own ``cancel()`` is db-lib's ``dbcancel``, which sends the
attention packet *and then reads the server's acknowledgement from the connection's socket*,
while the thread running the query reads from that same socket: called from another thread it
races with that read. A ``KILL <spid>`` from a second connection would be safe, but needs
``ALTER ANY CONNECTION``, which a read-only login rarely has, and an extra round trip per query.

TLS (``ssl``), as FreeTDS expresses it with pymssql's ``encryption`` argument:

* ``disable`` -> ``encryption="off"``: no encryption (SQL Server still encrypts the login
  packet when it can);
* ``no-verify`` -> ``encryption="require"``: the whole connection is encrypted, the
  server's certificate is not checked;
* ``verify`` -> ``encryption="require"`` as well. **pymssql cannot ask FreeTDS to check the
  certificate**: FreeTDS checks it only when its configuration file names a CA (``ca file``
  in ``freetds.conf``: ``$FREETDSCONF``, ``~/.freetds.conf`` or the system one; ``ca file =
  system`` uses the system CA store; the host name is checked too unless ``check
  certificate hostname = no``), and pymssql has no argument to pass one. So ``verify``
  encrypts exactly like ``no-verify`` unless the agent's host configures FreeTDS that way
  (and then ``no-verify`` checks too). Both modes fail when the server does not support encryption.
"""

from __future__ import annotations

import contextlib
import math
import re
import socket
from collections.abc import Sequence
from typing import Any, Literal

from pydantic import Field, SecretStr

from outpost.drivers.base import (
    Driver,
    DriverOptions,
    QueryResult,
    TestResult,
    jsonable,
    missing_extra,
)
from outpost.errors import DriverError, ReadOnlyError

SSLMode = Literal["disable", "no-verify", "verify"]

#: pymssql's ``encryption`` argument for each ``ssl`` mode (see the module docstring).
ENCRYPTION: dict[str, str] = {"disable": "off", "no-verify": "require", "verify": "require"}

#: The TDS protocol version asked for (see the module docstring).
TDS_VERSION = "7.4"

# SQL Server and db-lib message numbers.
LOGIN_FAILED = 18456
CANNOT_OPEN_DATABASE = 4060
NOT_IN_TRANSACTION = frozenset({226, 574, 15002})  # "not allowed in a (user) transaction"
DBLIB_TIMEOUT = 20003
DBLIB_CONNECT_FAILED = frozenset({20002, 20009})


class MSSQLOptions(DriverOptions):
    host: str = Field("localhost", description="The DBMS host name")
    port: int = Field(1433, ge=1, le=65535, description="The DBMS port")
    user: str = Field("sa", description="A username for connecting to the database")
    password: SecretStr | None = Field(None, description="The password associated with user")
    database: str | None = Field(None, description="The name of the database to connect to")
    timeout: int = Field(30, gt=0, description="The timeout in seconds for the connection attempt")
    ssl: SSLMode = Field(
        "verify",
        description=(
            "The SSL mode: disable (no encryption), no-verify (encrypted, certificate not "
            "checked), verify (encrypted; FreeTDS checks the certificate only when its "
            "freetds.conf sets 'ca file', pymssql cannot pass one)"
        ),
    )


def _pymssql() -> Any:
    """The pymssql module, or the error saying which extra to install."""
    try:
        import pymssql
    except ImportError:
        raise missing_extra("mssql", "pymssql", "mssql") from None
    return pymssql


def error_parts(exc: BaseException) -> tuple[int | None, str]:
    """(message number, readable text) of a pymssql error.

    pymssql errors carry ``(number, b"text")``; db-lib adds "DB-Lib error message N,
    severity S:" headers and repeats lines, which are dropped here.
    """
    args: Any = exc.args
    if len(args) == 1 and isinstance(args[0], tuple):
        args = args[0]
    code = args[0] if args and isinstance(args[0], int) else None
    raw = args[1] if code is not None and len(args) > 1 else (args[0] if args else "")
    text = raw.decode("utf-8", "replace") if isinstance(raw, bytes | bytearray) else str(raw)
    lines: list[str] = []
    for part in re.split(r"DB-Lib error message \d+, severity \d+:|\n", text):
        line = part.strip().rstrip(".").strip()
        if line and line not in lines and not line.startswith("General SQL Server error"):
            lines.append(line)
    return code, "; ".join(lines) or type(exc).__name__


def _skip_quoted(sql: str, i: int, close: str) -> int:
    """Index after the quoted run starting at I (a doubled CLOSE is an escaped one)."""
    n = len(sql)
    i += 1
    while i < n:
        if sql[i] == close:
            if i + 1 < n and sql[i + 1] == close:
                i += 2
                continue
            return i + 1
        i += 1
    return n


_WORD = re.compile(r"[\w@#$]+")


def code_words(sql: str) -> list[str]:
    """The words of a T-SQL batch outside comments (nested ``/* */``), strings and quoted
    names, upper-cased."""
    words: list[str] = []
    i, n = 0, len(sql)
    while i < n:
        c = sql[i]
        if sql.startswith("--", i):
            end = sql.find("\n", i)
            i = n if end < 0 else end + 1
        elif sql.startswith("/*", i):
            depth, i = 1, i + 2
            while i < n and depth:
                if sql.startswith("/*", i):
                    depth, i = depth + 1, i + 2
                elif sql.startswith("*/", i):
                    depth, i = depth - 1, i + 2
                else:
                    i += 1
        elif c == "'":
            i = _skip_quoted(sql, i, "'")
        elif c == '"':
            i = _skip_quoted(sql, i, '"')
        elif c == "[":
            i = _skip_quoted(sql, i, "]")
        elif c.isalpha() or c in "_@#":
            match = _WORD.match(sql, i)
            assert match is not None
            words.append(match.group(0).upper())
            i = match.end()
        else:
            i += 1
    return words


def read_only_refusal(sql: str) -> str | None:
    """Why the batch may not run read-only (a sentence fragment), or None."""
    for word in code_words(sql):
        if word in ("COMMIT", "ROLLBACK"):
            return (
                f"it contains {word}, which would end the transaction that is rolled back to "
                "keep the query read-only"
            )
    return None


def seconds(value: float) -> str:
    return f"{value:g} second" + ("" if value == 1 else "s")


class MSSQLDriver(Driver):
    name = "mssql"
    display_name = "Microsoft SQL Server"
    options_model = MSSQLOptions
    sqlalchemy_dialect = "mssql+pymssql"

    options: MSSQLOptions

    # --- connecting -----------------------------------------------------------------------

    def _where(self) -> str:
        return f"{self.options.host}:{self.options.port}"

    def _connect_error(self, exc: BaseException, login_timeout: int) -> DriverError:
        o = self.options
        code, text = error_parts(exc)
        lower = text.lower()
        prefix = (
            f"Cannot connect to SQL Server at {self._where()} for connection "
            f"{self.context.connection!r}: "
        )
        if code == CANNOT_OPEN_DATABASE or "cannot open database" in lower:
            reason = (
                f"cannot open database {o.database!r} (it does not exist or the user may "
                "not use it)"
            )
        elif code == LOGIN_FAILED or "login failed" in lower:
            reason = f"login failed for user {o.user!r} (check the user and the password)"
        elif "connection refused" in lower:
            reason = "connection refused"
        elif code == DBLIB_TIMEOUT or "timed out" in lower:
            reason = f"the server did not answer within {seconds(login_timeout)}"
        elif "encrypt" in lower or "tls" in lower or "ssl" in lower:
            reason = f"encryption failed with --ssl {o.ssl} ({text})"
        elif "unknown reason" in lower or lower == "unknown error":
            # db-lib gives no reason for some failures (an unknown host among them).
            reason = self._diagnose()
        elif code in DBLIB_CONNECT_FAILED:
            reason = f"the server is unreachable or does not exist ({text})"
        else:
            reason = f"{text} (error {code})" if code else text
        return DriverError(self.scrub(prefix + reason.rstrip(".") + "."))

    def _diagnose(self) -> str:
        """A reason for a connection failure that db-lib did not explain."""
        try:
            socket.getaddrinfo(self.options.host, self.options.port, type=socket.SOCK_STREAM)
        except OSError as exc:
            return f"the host name {self.options.host!r} cannot be resolved ({exc})"
        return "the connection failed and FreeTDS gave no reason"

    def _connect(self, login_timeout: int, query_timeout: int = 0) -> Any:
        pymssql = _pymssql()
        o = self.options
        try:
            return pymssql.connect(
                server=o.host,
                port=str(o.port),
                user=o.user,
                password=o.password.get_secret_value() if o.password else None,
                database=o.database or "",
                login_timeout=login_timeout,
                timeout=query_timeout,
                encryption=ENCRYPTION[o.ssl],
                tds_version=TDS_VERSION,
                appname="outpost-agent",
                autocommit=True,  # the driver opens and ends its transaction itself
            )
        except pymssql.Error as exc:
            raise self._connect_error(exc, login_timeout) from None

    # --- the driver API -------------------------------------------------------------------

    def test(self, timeout: float | None = None) -> TestResult:
        pymssql = _pymssql()
        elapsed = self.timer()
        login_timeout = max(1, math.ceil(timeout)) if timeout else self.options.timeout
        conn = self._connect(login_timeout, query_timeout=login_timeout)
        try:
            cur = conn.cursor()
            cur.execute("SELECT @@VERSION")
            row = cur.fetchone()
        except pymssql.Error as exc:
            raise self.error("Cannot run a test query", error_parts(exc)[1]) from None
        finally:
            with contextlib.suppress(Exception):
                conn.close()
        version = str(row[0]).strip().splitlines()[0].strip() if row and row[0] else ""
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
        pymssql = _pymssql()
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
        query_timeout = max(1, math.ceil(timeout)) if timeout > 0 else 0
        elapsed = self.timer()
        conn = self._connect(self.options.timeout, query_timeout)
        try:
            cur = conn.cursor()
            if not allow_writes:
                cur.execute("BEGIN TRANSACTION")
            if params:
                cur.execute(sql, tuple(params))
            else:
                cur.execute(sql)
            if cur.description is None:
                result = QueryResult(columns=[], rows=[], row_count=max(int(cur.rowcount), 0))
            else:
                columns = [str(d[0]) for d in cur.description]
                fetched = list(cur.fetchmany(max_rows + 1))
                truncated = len(fetched) > max_rows
                rows = [[jsonable(v) for v in row] for row in fetched[:max_rows]]
                result = QueryResult(
                    columns=columns, rows=rows, row_count=len(rows), truncated=truncated
                )
            if allow_writes:
                self._drain(cur)  # let the whole batch run (autocommit)
            elif not result.truncated:
                self._drain(cur)
                cur.execute("SELECT @@TRANCOUNT")
                row = cur.fetchone()
                if not row or not row[0]:
                    raise ReadOnlyError(
                        self.scrub(
                            f"Connection {name!r} ran this query read-only, but the batch "
                            "ended the driver's transaction itself (a COMMIT or ROLLBACK, "
                            "perhaps in dynamic SQL), so what it changed may have been "
                            "committed; use a login that may only read."
                        )
                    )
            # A truncated read-only result is not read further: the ROLLBACK below cancels
            # the rest of the batch.
        except pymssql.Error as exc:
            raise self._query_error(exc, timeout, allow_writes) from None
        except (TypeError, ValueError) as exc:
            if not params:
                raise
            # pymssql formats the parameters into the SQL with %: they disagree.
            raise self.error(
                "Query failed",
                f"the parameters do not match the %s placeholders of the SQL ({exc}; with "
                "parameters a literal % is written %%)",
            ) from None
        finally:
            with contextlib.suppress(Exception):
                conn.cursor().execute("IF @@TRANCOUNT > 0 ROLLBACK TRANSACTION")
            with contextlib.suppress(Exception):
                conn.close()
        result.duration_seconds = elapsed()
        return result

    def dbapi_connect(self, timeout: float | None = None) -> Any:
        """A pymssql connection for schema inspection; with a TIMEOUT (seconds, > 0) it also
        bounds the login and each statement (pymssql's query timeout, whole seconds)."""
        login_timeout = self.options.timeout
        query_timeout = 0
        if timeout is not None and timeout > 0:
            query_timeout = max(1, math.ceil(timeout))
            login_timeout = min(login_timeout, query_timeout)
        return self._connect(login_timeout, query_timeout)

    # --- query helpers --------------------------------------------------------------------

    @staticmethod
    def _drain(cur: Any) -> None:
        """Run the rest of the batch, dropping its rows."""
        while True:
            if cur.description is not None:
                while cur.fetchmany(1000):
                    pass
            if not cur.nextset():
                return

    def _query_error(
        self, exc: BaseException, timeout: float, allow_writes: bool
    ) -> DriverError | ReadOnlyError:
        code, text = error_parts(exc)
        name = self.context.connection
        if code in NOT_IN_TRANSACTION and not allow_writes:
            return ReadOnlyError(
                self.scrub(
                    f"Connection {name!r} runs this query read-only inside a transaction that "
                    f"is rolled back, and SQL Server does not allow this statement in a "
                    f"transaction ({text.rstrip('.')}, error {code}); allow writes to run it."
                )
            )
        if code == DBLIB_TIMEOUT or "timed out" in text.lower():
            return DriverError(
                self.scrub(
                    f"Query on connection {name!r} exceeded the statement timeout of "
                    f"{seconds(max(1, math.ceil(timeout)))} and was cancelled."
                )
            )
        return self.error("Query failed", f"{text} (error {code})" if code else text)
