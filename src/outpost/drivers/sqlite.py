"""The SQLite driver: a database file downloaded from an http(s) URL, or a local file.

``source_url`` is downloaded into the agent's cache (see :mod:`outpost.drivers.download`:
a test always downloads again, queries reuse a copy younger than 60 s), or, for a
``file://`` URL or a plain path, used in place.

Queries run read-only (the file is opened with ``mode=ro`` and ``PRAGMA query_only=ON``)
unless writes are allowed for the query. Writes are only ever applied to a local file: a
downloaded database is the agent's private copy of someone else's file, replaced at the next
download, so a write to it is refused with a ReadOnlyError even when writes are allowed.

``ATTACH`` (and ``VACUUM INTO``, which attaches) are always refused: they would reach other
files on the agent's host, such as its own state store. The statement timeout is enforced with
a progress handler that interrupts the statement.

``cancel()`` (from another thread) interrupts the running statement
(``sqlite3.Connection.interrupt()``), and the progress handler also stops any statement of a
cancelled driver; the operation raises QueryCancelled. A download in progress is not cut
short by a cancel.
"""

from __future__ import annotations

import dataclasses
import sqlite3
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Annotated, Any
from urllib.parse import quote

from pydantic import Field, field_validator

from outpost.drivers.base import (
    Driver,
    DriverContext,
    DriverOptions,
    QueryResult,
    TestResult,
    jsonable,
)
from outpost.drivers.download import (
    QUERY_MAX_AGE_SECONDS,
    check_source_url,
    fetch_source,
    is_remote,
    local_path,
    safe_url,
)
from outpost.errors import ReadOnlyError

#: The first 16 bytes of every SQLite 3 database file.
SQLITE_MAGIC = b"SQLite format 3\x00"

#: Seconds a connection test may take when the caller gives no timeout.
DEFAULT_TEST_TIMEOUT = 30.0

#: SQLite virtual machine steps between two checks of the statement deadline.
_PROGRESS_STEPS = 1000

DEFAULT_MAX_DOWNLOAD_BYTES = 512 * 1024 * 1024

_SCHEMA_TABLES = frozenset(
    {"sqlite_master", "sqlite_schema", "sqlite_temp_master", "sqlite_temp_schema"}
)

#: Authorizer actions that change a database (refused on a read-only connection).
_WRITE_ACTIONS = frozenset(
    {
        sqlite3.SQLITE_INSERT,
        sqlite3.SQLITE_UPDATE,
        sqlite3.SQLITE_DELETE,
        sqlite3.SQLITE_ALTER_TABLE,
        sqlite3.SQLITE_ANALYZE,
        sqlite3.SQLITE_REINDEX,
        sqlite3.SQLITE_CREATE_INDEX,
        sqlite3.SQLITE_CREATE_TABLE,
        sqlite3.SQLITE_CREATE_TEMP_INDEX,
        sqlite3.SQLITE_CREATE_TEMP_TABLE,
        sqlite3.SQLITE_CREATE_TEMP_TRIGGER,
        sqlite3.SQLITE_CREATE_TEMP_VIEW,
        sqlite3.SQLITE_CREATE_TRIGGER,
        sqlite3.SQLITE_CREATE_VIEW,
        sqlite3.SQLITE_CREATE_VTABLE,
        sqlite3.SQLITE_DROP_INDEX,
        sqlite3.SQLITE_DROP_TABLE,
        sqlite3.SQLITE_DROP_TEMP_INDEX,
        sqlite3.SQLITE_DROP_TEMP_TABLE,
        sqlite3.SQLITE_DROP_TEMP_TRIGGER,
        sqlite3.SQLITE_DROP_TEMP_VIEW,
        sqlite3.SQLITE_DROP_TRIGGER,
        sqlite3.SQLITE_DROP_VIEW,
        sqlite3.SQLITE_DROP_VTABLE,
    }
)


class SQLiteOptions(DriverOptions):
    source_url: Annotated[
        str,
        Field(
            description=(
                "An HTTP(S) URL to download the SQLite database from, or a file:// URL or "
                "local path of a database on the agent's host (used in place)"
            )
        ),
    ]
    max_download_bytes: Annotated[
        int,
        Field(
            gt=0,
            description=(
                "The largest database file the agent downloads, in bytes "
                "(default 512 MiB); a larger download is refused"
            ),
        ),
    ] = DEFAULT_MAX_DOWNLOAD_BYTES

    @field_validator("source_url")
    @classmethod
    def _source_url(cls, value: str) -> str:
        return check_source_url(value)


def describe_source(source_url: str) -> str:
    """SOURCE_URL as shown in messages: a URL without credentials, or the local path."""
    return safe_url(source_url) if is_remote(source_url) else str(local_path(source_url))


def download_context(context: DriverContext, max_download_bytes: int) -> DriverContext:
    """CONTEXT with the smaller of the agent's and the connection's download limits."""
    limit = min(context.max_download_bytes, max_download_bytes)
    return dataclasses.replace(context, max_download_bytes=limit)


class StatementGuard:
    """Authorizer and progress handler for one SQLite connection.

    Refuses ATTACH/DETACH (and so VACUUM INTO), changes to ``query_only`` and, when READ_ONLY,
    every statement that would change the database (so a write is reported as such even where
    SQLite would first complain about something else, such as writing to a view); interrupts a
    statement once its deadline passes, or once CANCELLED says so. Records why, so errors can
    say it.
    """

    def __init__(self, *, read_only: bool, cancelled: Callable[[], bool] | None = None) -> None:
        self.read_only = read_only
        self.cancelled = cancelled
        self.deadline: float | None = None
        self.timed_out = False
        self.denied: str | None = None

    def install(self, conn: sqlite3.Connection) -> None:
        conn.set_authorizer(self._authorize)
        conn.set_progress_handler(self._progress, _PROGRESS_STEPS)

    def arm(self, timeout: float) -> None:
        self.deadline = time.monotonic() + timeout
        self.timed_out = False
        self.denied = None

    def disarm(self) -> None:
        self.deadline = None

    def _authorize(
        self,
        action: int,
        arg1: str | None,
        arg2: str | None,
        _db: str | None,
        _trigger: str | None,
    ) -> int:
        if action in (sqlite3.SQLITE_ATTACH, sqlite3.SQLITE_DETACH):
            self.denied = "attach"
            return sqlite3.SQLITE_DENY
        if (
            action == sqlite3.SQLITE_PRAGMA
            and (arg1 or "").lower() == "query_only"
            and arg2 is not None
        ):
            self.denied = "query_only"
            return sqlite3.SQLITE_DENY
        if self.read_only and action in _WRITE_ACTIONS and arg1 not in _SCHEMA_TABLES:
            # (SQLite itself asks to update the schema table while reading it, e.g. for
            # pragma_table_info(); query_only / mode=ro still stop real writes to it)
            self.denied = "write"
            return sqlite3.SQLITE_DENY
        return sqlite3.SQLITE_OK

    def _progress(self) -> int:
        if self.cancelled is not None and self.cancelled():
            return 1
        if self.deadline is not None and time.monotonic() > self.deadline:
            self.timed_out = True
            return 1
        return 0


def run_statement(
    driver: Driver,
    conn: sqlite3.Connection,
    guard: StatementGuard,
    sql: str,
    params: Sequence[Any] | None,
    *,
    max_rows: int,
    timeout: float,
    read_only_message: str,
) -> QueryResult:
    """Run one statement on CONN (guarded by GUARD) and build the QueryResult.

    A write refused by SQLite's read-only checks raises ReadOnlyError(READ_ONLY_MESSAGE).
    """
    elapsed = driver.timer()
    driver.check_cancelled()
    guard.arm(timeout)
    cursor = conn.cursor()
    try:
        cursor.execute(sql, tuple(params) if params is not None else ())
        if cursor.description is None:
            affected = cursor.rowcount if cursor.rowcount > 0 else 0
            return QueryResult(columns=[], rows=[], row_count=affected, duration_seconds=elapsed())
        columns = [str(d[0]) for d in cursor.description]
        fetched = cursor.fetchmany(max(max_rows, 0) + 1)
        truncated = len(fetched) > max_rows
        rows = [[jsonable(v) for v in row] for row in fetched[: max(max_rows, 0)]]
        return QueryResult(
            columns=columns,
            rows=rows,
            row_count=len(rows),
            truncated=truncated,
            duration_seconds=elapsed(),
        )
    except (sqlite3.Error, sqlite3.Warning) as exc:
        if driver.cancel_requested:
            raise driver.cancelled_error() from None
        if guard.timed_out:
            raise driver.error(
                "Query timed out",
                f"it ran longer than the statement timeout of {timeout:g} s and was stopped",
            ) from None
        if guard.denied == "attach":
            raise driver.error(
                "Query refused",
                "ATTACH, DETACH and VACUUM INTO are not allowed, "
                "because they reach other files on the agent's host",
            ) from None
        if guard.denied in ("query_only", "write") or _is_read_only(exc):
            raise ReadOnlyError(read_only_message) from None
        if _error_code(exc) == sqlite3.SQLITE_NOTADB:
            raise driver.error("Query failed", "the file is not an SQLite database") from None
        raise driver.error("Query failed", exc) from None
    finally:
        guard.disarm()
        cursor.close()


def _error_code(exc: BaseException) -> int | None:
    code = getattr(exc, "sqlite_errorcode", None)
    return code & 0xFF if isinstance(code, int) else None


def _is_read_only(exc: BaseException) -> bool:
    return _error_code(exc) == sqlite3.SQLITE_READONLY


class SQLiteDriver(Driver):
    """SQLite 3 database files (downloaded over HTTP(S), or local)."""

    name = "sqlite"
    display_name = "SQLite"
    options_model = SQLiteOptions
    password_option = None
    sqlalchemy_dialect = "sqlite"

    options: SQLiteOptions

    # --- Driver -------------------------------------------------------------------------

    def test(self, timeout: float | None = None) -> TestResult:
        elapsed = self.timer()
        limit = DEFAULT_TEST_TIMEOUT if timeout is None else timeout
        path = self._fetch(timeout=limit, max_age=0.0)
        conn, guard = self._open(path, writable=False, timeout=limit)
        try:
            with self.cancellable(conn.interrupt):
                run_statement(
                    self,
                    conn,
                    guard,
                    "SELECT count(*) FROM sqlite_master",
                    None,
                    max_rows=1,
                    timeout=limit,
                    read_only_message=self._read_only_message(),
                )
        finally:
            conn.close()
        return TestResult(
            server_version="SQLite " + sqlite3.sqlite_version, duration_seconds=elapsed()
        )

    def query(
        self,
        sql: str,
        params: Sequence[Any] | None = None,
        *,
        max_rows: int = 1000,
        timeout: float = 30.0,
        allow_writes: bool = False,
    ) -> QueryResult:
        elapsed = self.timer()
        path = self._fetch(timeout=timeout, max_age=QUERY_MAX_AGE_SECONDS)
        writable = allow_writes and not is_remote(self.options.source_url)
        conn, guard = self._open(path, writable=writable, timeout=timeout)
        try:
            with self.cancellable(conn.interrupt):
                result = run_statement(
                    self,
                    conn,
                    guard,
                    sql,
                    params,
                    max_rows=max_rows,
                    timeout=timeout,
                    read_only_message=self._read_only_message(allow_writes=allow_writes),
                )
        finally:
            conn.close()
        result.duration_seconds = elapsed()
        return result

    def dbapi_connect(self, timeout: float | None = None) -> sqlite3.Connection:
        """A read-only connection to the database file (downloaded when it is remote) for
        schema inspection; a TIMEOUT (seconds, > 0) stops its statements once it has passed
        since the connection was opened."""
        limit = timeout if timeout is not None and timeout > 0 else None
        wait = DEFAULT_TEST_TIMEOUT if limit is None else limit
        path = self._fetch(timeout=wait, max_age=QUERY_MAX_AGE_SECONDS)
        conn, guard = self._open(path, writable=False, timeout=wait)
        try:
            self.watch(conn.interrupt)  # for as long as the connection is open
        except BaseException:
            conn.close()
            raise
        if limit is not None:
            guard.arm(limit)
        return conn

    # --- helpers --------------------------------------------------------------------------

    def _fetch(self, *, timeout: float, max_age: float) -> Path:
        context = download_context(self.context, self.options.max_download_bytes)
        path = fetch_source(self.options.source_url, context, timeout=timeout, max_age=max_age)
        self._check_header(path)
        return path

    def _check_header(self, path: Path) -> None:
        shown = describe_source(self.options.source_url)
        try:
            with path.open("rb") as f:
                head = f.read(len(SQLITE_MAGIC))
        except OSError as exc:
            raise self.error(f"Cannot read {shown}", exc.strerror or exc) from None
        if head != SQLITE_MAGIC:
            what = "is empty, not an SQLite database" if not head else "is not an SQLite database"
            raise self.error("Cannot open the SQLite database", f"{shown} {what}")

    def _open(
        self, path: Path, *, writable: bool, timeout: float
    ) -> tuple[sqlite3.Connection, StatementGuard]:
        mode = "rw" if writable else "ro"
        uri = f"file:{quote(str(path))}?mode={mode}"
        try:
            conn = sqlite3.connect(
                uri,
                uri=True,
                timeout=max(timeout, 0.0),
                isolation_level=None,
                check_same_thread=False,
            )
        except sqlite3.Error as exc:
            shown = describe_source(self.options.source_url)
            raise self.error(f"Cannot open the SQLite database {shown}", exc) from None
        try:
            if not writable:
                conn.execute("PRAGMA query_only=ON")
        except sqlite3.Error as exc:
            conn.close()
            raise self.error("Cannot open the SQLite database", exc) from None
        guard = StatementGuard(read_only=not writable, cancelled=lambda: self.cancel_requested)
        guard.install(conn)
        return conn, guard

    def _read_only_message(self, *, allow_writes: bool = False) -> str:
        connection = self.context.connection
        if allow_writes and is_remote(self.options.source_url):
            return (
                f"Write refused for connection {connection!r}: the database is the agent's "
                f"downloaded copy of {safe_url(self.options.source_url)}, so a change would "
                "be lost at the next download; SQLite connections accept writes only for a "
                "local file."
            )
        return (
            f"Write refused for connection {connection!r}: the query runs read-only; "
            "allow writes for the query to change the database."
        )
