"""The CSV driver: a CSV file, queried with SQL.

``source_url`` is downloaded (http/https) or read in place (file:// URL or local path), as
for SQLite (see :mod:`outpost.drivers.download`: a test always downloads again, queries reuse
a copy younger than 60 s). The file is loaded into an in-memory SQLite database:

* one table named after the file's stem, made an SQL identifier (``Sales 2024.csv`` becomes
  ``sales_2024``), also reachable as the view ``csv``;
* the header row names the columns (as written; an empty name becomes ``column_N``, a repeated
  one gets a ``_2`` suffix);
* column types are inferred from every value in the column: ``TIMESTAMP`` when the connection
  has a ``time_format`` and every value matches it (values become ISO-8601 text such as
  ``2024-03-01T14:05:00``, or ``2024-03-01`` for a format without a time of day), else
  ``INTEGER`` (no leading zeros, so codes like ``007`` stay text), else ``REAL``, else
  ``TEXT``; empty cells are NULL.

A CSV connection is always read-only: its data comes from a file the agent only reads, so a
write is refused with a ReadOnlyError even when writes are allowed. The loaded database is
kept by the driver and reloaded when the file changes.

``cancel()`` (from another thread) interrupts the running statement, as for SQLite; loading
the file is not cut short.
"""

from __future__ import annotations

import codecs
import contextlib
import csv as _csv
import datetime as dt
import re
import sqlite3
import threading
import uuid
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, BinaryIO

from pydantic import Field, field_validator

from outpost.drivers.base import Driver, DriverContext, DriverOptions, QueryResult, TestResult
from outpost.drivers.download import (
    QUERY_MAX_AGE_SECONDS,
    check_source_url,
    fetch_source,
    source_name,
)
from outpost.drivers.sqlite import (
    DEFAULT_MAX_DOWNLOAD_BYTES,
    DEFAULT_TEST_TIMEOUT,
    StatementGuard,
    describe_source,
    download_context,
    run_statement,
)

#: The name of the view that always shows the loaded table.
VIEW_NAME = "csv"

_INT_RE = re.compile(r"[+-]?(?:0|[1-9][0-9]*)")
_REAL_RE = re.compile(r"[+-]?(?:(?:0|[1-9][0-9]*)(?:\.[0-9]*)?|\.[0-9]+)(?:[eE][+-]?[0-9]+)?")
_INT64_MIN, _INT64_MAX = -(2**63), 2**63 - 1
_TIME_DIRECTIVES = re.compile(r"%[-#]?[HIMSfpXcTRrz]")
_INSERT_BATCH = 1000


class CSVOptions(DriverOptions):
    source_url: Annotated[
        str,
        Field(
            description=(
                "An HTTP(S) URL to download the CSV file from, or a file:// URL or local "
                "path of a file on the agent's host (read in place)"
            )
        ),
    ]
    time_format: Annotated[
        str | None,
        Field(
            description=(
                "A time format to use when parsing (strftime codes, such as "
                "'%Y-%m-%d %H:%M:%S'); columns whose values all match it become "
                "ISO-8601 timestamps"
            )
        ),
    ] = None
    delimiter: Annotated[
        str,
        Field(description="The character between fields: ',' (default), ';', a pipe, or 'tab'"),
    ] = ","
    encoding: Annotated[
        str,
        Field(description="The text encoding of the file (default utf-8; a BOM is ignored)"),
    ] = "utf-8"
    max_download_bytes: Annotated[
        int,
        Field(
            gt=0,
            description=(
                "The largest file the agent downloads, in bytes (default 512 MiB); "
                "a larger download is refused"
            ),
        ),
    ] = DEFAULT_MAX_DOWNLOAD_BYTES

    @field_validator("source_url")
    @classmethod
    def _source_url(cls, value: str) -> str:
        return check_source_url(value)

    @field_validator("time_format")
    @classmethod
    def _time_format(cls, value: str | None) -> str | None:
        if value is None or not value.strip():
            return None
        if "%" not in value:
            raise ValueError(
                f"{value!r} has no strftime codes; use codes such as '%Y-%m-%d %H:%M:%S'"
            )
        sample = dt.datetime(2001, 2, 3, 4, 5, 6)
        try:
            dt.datetime.strptime(sample.strftime(value), value)
        except ValueError as exc:
            if "directive" in str(exc):
                raise ValueError(f"{value!r} is not a valid time format: {exc}") from None
        return value

    @field_validator("delimiter")
    @classmethod
    def _delimiter(cls, value: str) -> str:
        if value.lower() in ("tab", "\\t"):
            return "\t"
        if len(value) != 1:
            raise ValueError(f"{value!r} is not one character (use 'tab' for a tab)")
        if value in ('"', "\r", "\n"):
            raise ValueError(f"{value!r} cannot be the delimiter")
        return value

    @field_validator("encoding")
    @classmethod
    def _encoding(cls, value: str) -> str:
        try:
            codecs.lookup(value)
        except LookupError:
            raise ValueError(f"unknown encoding {value!r}") from None
        return value


def table_name(source_url: str) -> str:
    """The table a CSV file is loaded as: its stem made a lower-case SQL identifier."""
    stem = Path(source_name(source_url)).stem
    name = re.sub(r"[^0-9a-z_]+", "_", stem.lower()).strip("_")
    if not name:
        return "data"
    if name[0].isdigit() or name.startswith("sqlite_"):
        name = "t_" + name
    return name


def quote_ident(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


@dataclass
class LoadedCSV:
    """A CSV file loaded into an in-memory SQLite database."""

    conn: sqlite3.Connection
    guard: StatementGuard
    table: str
    columns: list[str]
    types: list[str]
    row_count: int
    key: tuple[str, int, int, int]  # path, inode, size, mtime_ns
    lock: threading.Lock

    def close(self) -> None:
        self.conn.close()


class _CSVProblem(Exception):
    """A problem with the file's content; becomes a DriverError naming the connection."""


class _Column:
    """Tracks which types every value seen so far in one column allows."""

    def __init__(self, time_format: str | None) -> None:
        self.time_format = time_format
        self.seen = False
        self.int_ok = True
        self.real_ok = True
        self.time_ok = time_format is not None

    def see(self, value: str) -> None:
        self.seen = True
        if self.time_ok:
            self.time_ok = parse_time(value, self.time_format) is not None
        if self.int_ok:
            self.int_ok = bool(_INT_RE.fullmatch(value)) and (
                _INT64_MIN <= int(value) <= _INT64_MAX
            )
        if self.real_ok and not self.int_ok:
            self.real_ok = bool(_REAL_RE.fullmatch(value)) and abs(float(value)) != float("inf")

    def sql_type(self) -> str:
        if not self.seen:
            return "TEXT"
        if self.time_ok:
            return "TIMESTAMP"
        if self.int_ok:
            return "INTEGER"
        if self.real_ok:
            return "REAL"
        return "TEXT"


def parse_time(value: str, time_format: str | None) -> str | None:
    """VALUE as ISO-8601 text when it matches TIME_FORMAT, else None."""
    if time_format is None:
        return None
    try:
        parsed = dt.datetime.strptime(value, time_format)
    except ValueError:
        return None
    if not _TIME_DIRECTIVES.search(time_format):
        return parsed.date().isoformat()
    return parsed.isoformat()


def _decoded_lines(raw: BinaryIO, encoding: str) -> Iterator[str]:
    """The file's lines as text (with their line ends); a decoding problem names its line."""
    name = codecs.lookup(encoding).name
    if name == "utf-8":
        name = "utf-8-sig"  # ignore a byte order mark
    decoder = codecs.getincrementaldecoder(name)(errors="strict")
    pending = ""
    line_no = 1
    final = False
    while not final:
        chunk = raw.readline(1 << 20)
        final = not chunk
        try:
            pending += decoder.decode(chunk, final=final)
        except UnicodeDecodeError as exc:
            bad = (exc.object[exc.start : exc.end] or b"?")[:4]
            line = line_no + pending.count("\n")
            raise _CSVProblem(
                f"line {line} is not valid {encoding} text (bytes {bad.hex(' ')}); "
                "set the connection's encoding option if the file uses another encoding"
            ) from None
        if "\n" in pending:
            lines = pending.splitlines(keepends=True)
            pending = "" if lines[-1].endswith(("\n", "\r")) else lines.pop()
            for line_text in lines:
                line_no += line_text.count("\n") or 1
                yield line_text
    if pending:
        yield pending


def load_csv(
    path: Path,
    *,
    source_url: str,
    delimiter: str,
    time_format: str | None,
    encoding: str,
) -> LoadedCSV:
    """Load the CSV file at PATH into a new in-memory SQLite database.

    Raises _CSVProblem (a sentence without the connection name) for a bad file.
    """
    st = path.stat()
    key = (str(path), st.st_ino, st.st_size, st.st_mtime_ns)
    table = table_name(source_url)
    conn = sqlite3.connect(":memory:", isolation_level=None, check_same_thread=False)
    try:
        with path.open("rb") as raw:
            columns, types, count = _fill(conn, raw, table, delimiter, time_format, encoding)
        if table != VIEW_NAME:
            conn.execute(
                f"CREATE VIEW {quote_ident(VIEW_NAME)} AS SELECT * FROM {quote_ident(table)}"
            )
        conn.execute("PRAGMA query_only=ON")
    except BaseException:
        conn.close()
        raise
    guard = StatementGuard(read_only=True)
    guard.install(conn)
    return LoadedCSV(
        conn=conn,
        guard=guard,
        table=table,
        columns=columns,
        types=types,
        row_count=count,
        key=key,
        lock=threading.Lock(),
    )


def _unique_names(header: list[str]) -> list[str]:
    names: list[str] = []
    used: set[str] = set()
    for i, cell in enumerate(header, start=1):
        base = cell.strip() or f"column_{i}"
        name, n = base, 1
        while name.lower() in used:
            n += 1
            name = f"{base}_{n}"
        used.add(name.lower())
        names.append(name)
    return names


def _fill(
    conn: sqlite3.Connection,
    raw: BinaryIO,
    table: str,
    delimiter: str,
    time_format: str | None,
    encoding: str,
) -> tuple[list[str], list[str], int]:
    reader = _csv.reader(_decoded_lines(raw, encoding), delimiter=delimiter)
    header: list[str] | None = None
    try:
        for record in reader:
            if any(cell.strip() for cell in record):
                header = record
                break
    except _csv.Error as exc:
        raise _CSVProblem(f"line {reader.line_num}: {exc}") from None
    if header is None:
        raise _CSVProblem("the file has no header row (the first line must name the columns)")
    names = _unique_names(header)
    width = len(names)
    trackers = [_Column(time_format) for _ in names]
    staging = "staging_" + uuid.uuid4().hex
    conn.execute(
        f"CREATE TABLE {quote_ident(staging)} (" + ", ".join(f"c{i}" for i in range(width)) + ")"
    )
    insert = f"INSERT INTO {quote_ident(staging)} VALUES (" + ", ".join("?" * width) + ")"

    def rows() -> Iterator[list[str | None]]:
        line = reader.line_num
        try:
            for record in reader:
                start, line = line + 1, reader.line_num
                if not record or (len(record) == 1 and not record[0].strip() and width > 1):
                    continue  # a blank line
                if len(record) != width:
                    raise _CSVProblem(
                        f"line {start} has {_plural(len(record), 'field')} "
                        f"but the header has {width}"
                    )
                values: list[str | None] = []
                for cell, tracker in zip(record, trackers, strict=True):
                    text = cell.strip()
                    if text:
                        tracker.see(text)
                        values.append(cell)
                    else:
                        values.append(None)
                yield values
        except _csv.Error as exc:
            raise _CSVProblem(f"line {reader.line_num + 1}: {exc}") from None

    count = 0
    for batch in _batches(rows(), _INSERT_BATCH):
        conn.executemany(insert, batch)
        count += len(batch)

    types = [t.sql_type() for t in trackers]
    conn.create_function(
        "outpost_time",
        1,
        lambda v: None if v is None else parse_time(str(v).strip(), time_format),
        deterministic=True,
    )
    exprs = []
    for i, sql_type in enumerate(types):
        col = f"c{i}"
        if sql_type == "INTEGER":
            exprs.append(f"CAST(TRIM({col}) AS INTEGER)")
        elif sql_type == "REAL":
            exprs.append(f"CAST(TRIM({col}) AS REAL)")
        elif sql_type == "TIMESTAMP":
            exprs.append(f"outpost_time({col})")
        else:
            exprs.append(col)
    conn.execute(
        f"CREATE TABLE {quote_ident(table)} ("
        + ", ".join(f"{quote_ident(n)} {t}" for n, t in zip(names, types, strict=True))
        + ")"
    )
    conn.execute(
        f"INSERT INTO {quote_ident(table)} SELECT {', '.join(exprs)} "
        f"FROM {quote_ident(staging)} ORDER BY rowid"
    )
    conn.execute(f"DROP TABLE {quote_ident(staging)}")
    conn.create_function("outpost_time", 1, None)
    return names, types, count


def _batches(items: Iterable[list[str | None]], size: int) -> Iterator[list[list[str | None]]]:
    batch: list[list[str | None]] = []
    for item in items:
        batch.append(item)
        if len(batch) >= size:
            yield batch
            batch = []
    if batch:
        yield batch


class CSVDriver(Driver):
    """CSV files (downloaded over HTTP(S), or local), queried with SQLite's SQL."""

    name = "csv"
    display_name = "CSV"
    options_model = CSVOptions
    password_option = None
    sqlalchemy_dialect = "sqlite"

    options: CSVOptions

    def __init__(self, options: DriverOptions, context: DriverContext | None = None) -> None:
        super().__init__(options, context)
        self._loaded: LoadedCSV | None = None
        self._load_lock = threading.Lock()

    # --- Driver -------------------------------------------------------------------------

    def test(self, timeout: float | None = None) -> TestResult:
        elapsed = self.timer()
        limit = DEFAULT_TEST_TIMEOUT if timeout is None else timeout
        loaded = self.load(timeout=limit, max_age=0.0, force=True)
        return TestResult(
            server_version=f"CSV ({_plural(loaded.row_count, 'row')}, "
            f"{_plural(len(loaded.columns), 'column')})",
            duration_seconds=elapsed(),
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
        loaded = self.load(timeout=timeout, max_age=QUERY_MAX_AGE_SECONDS)
        if not loaded.lock.acquire(timeout=max(timeout, 0.0)):
            raise self.error(
                "Query timed out",
                f"other queries on the file kept it busy for the whole timeout of {timeout:g} s",
            )
        try:
            loaded.guard.cancelled = lambda: self.cancel_requested
            with self.cancellable(loaded.conn.interrupt):
                result = run_statement(
                    self,
                    loaded.conn,
                    loaded.guard,
                    sql,
                    params,
                    max_rows=max_rows,
                    timeout=timeout,
                    read_only_message=self._read_only_message(allow_writes=allow_writes),
                )
        finally:
            loaded.lock.release()
        result.duration_seconds = elapsed()
        return result

    def close(self) -> None:
        with self._load_lock:
            if self._loaded is not None:
                self._loaded.close()
                self._loaded = None

    def dbapi_connect(self, timeout: float | None = None) -> sqlite3.Connection:
        """A read-only in-memory SQLite database holding the loaded file's schema (its table
        and the ``csv`` view, no rows), for schema inspection; a TIMEOUT (seconds, > 0) stops
        its statements once it has passed."""
        limit = timeout if timeout is not None and timeout > 0 else None
        wait = DEFAULT_TEST_TIMEOUT if limit is None else limit
        loaded = self.load(timeout=wait, max_age=QUERY_MAX_AGE_SECONDS)
        if not loaded.lock.acquire(timeout=wait):
            raise self.error(
                "Inspection timed out",
                f"queries on the file kept it busy for the whole timeout of {wait:g} s",
            )
        try:
            ddl = [
                str(row[0])
                for row in loaded.conn.execute(
                    "SELECT sql FROM sqlite_master WHERE sql IS NOT NULL ORDER BY rowid"
                )
            ]
        except sqlite3.Error as exc:
            raise self.error("Cannot read the loaded CSV file's schema", exc) from None
        finally:
            loaded.lock.release()
        conn = sqlite3.connect(":memory:", isolation_level=None, check_same_thread=False)
        try:
            self.watch(conn.interrupt)  # for as long as the connection is open
            for statement in ddl:
                conn.execute(statement)
            conn.execute("PRAGMA query_only=ON")
        except sqlite3.Error as exc:
            conn.close()
            raise self.error("Cannot copy the loaded CSV file's schema", exc) from None
        except BaseException:
            conn.close()
            raise
        guard = StatementGuard(read_only=True, cancelled=lambda: self.cancel_requested)
        guard.install(conn)
        if limit is not None:
            guard.arm(limit)
        return conn

    # --- loading --------------------------------------------------------------------------

    def load(self, *, timeout: float, max_age: float, force: bool = False) -> LoadedCSV:
        """The loaded file, (down)loading and parsing it again when it changed or FORCE."""
        context = download_context(self.context, self.options.max_download_bytes)
        path = fetch_source(self.options.source_url, context, timeout=timeout, max_age=max_age)
        shown = describe_source(self.options.source_url)
        with self._load_lock:
            current = self._loaded
            if current is not None and not force:
                with contextlib.suppress(OSError):
                    st = path.stat()
                    if current.key == (str(path), st.st_ino, st.st_size, st.st_mtime_ns):
                        return current
            try:
                loaded = load_csv(
                    path,
                    source_url=self.options.source_url,
                    delimiter=self.options.delimiter,
                    time_format=self.options.time_format,
                    encoding=self.options.encoding,
                )
            except _CSVProblem as exc:
                raise self.error(f"Cannot load the CSV file {shown}", exc) from None
            except OSError as exc:
                raise self.error(f"Cannot read {shown}", exc.strerror or exc) from None
            except (sqlite3.Error, MemoryError) as exc:
                raise self.error(f"Cannot load the CSV file {shown}", exc) from None
            self._loaded = loaded
            # the previous database is closed when the last query using it lets it go
            return loaded

    def _read_only_message(self, *, allow_writes: bool) -> str:
        connection = self.context.connection
        why = " even though writes are allowed for this query" if allow_writes else ""
        return (
            f"Write refused for connection {connection!r}: CSV connections are read-only, "
            f"because the data comes from a file the agent only reads{why}."
        )


def _plural(n: int, word: str) -> str:
    return f"{n} {word}" + ("" if n == 1 else "s")
