"""The PostgreSQL driver (psycopg 3).

Every call opens its own connection (keyword arguments, never a DSN holding the password) with
``application_name=outpost`` and closes it afterwards.

``query`` runs in one transaction with ``SET LOCAL statement_timeout``; the transaction is
``BEGIN READ ONLY`` unless writes are allowed. How rows are fetched:

* read-only (the default): the statement is *streamed* (libpq chunked-rows mode, single-row mode
  on an older libpq) and reading stops after ``max_rows + 1`` rows; the rest of the result is
  cancelled, so a ``SELECT *`` on a huge table costs ``max_rows`` rows of memory, not the table.
  A server-side cursor (``DECLARE``) would do the same for plain queries only, and on Redshift it
  materializes the whole result on the leader node; streaming is a client-side libpq feature
  that works with any statement and any server speaking the protocol. Streaming uses the
  extended protocol, so a read-only query is exactly one statement (which also keeps a
  ``COMMIT; ...`` from escaping the read-only transaction).
* writes allowed: the statement runs normally (several statements may be sent; the last result
  is reported) and its result is buffered by the client, because stopping a write's result
  early would cancel the write. ``row_count`` is then the rows affected.

``cancel()`` (from another thread) sends a protocol-level cancel request for every open
connection of the driver (psycopg's ``cancel_safe``, over the connection's own TLS settings
with libpq 17+), as ``pg_cancel_backend`` would; the statement ends with ``57014`` and the
operation raises QueryCancelled.
"""

from __future__ import annotations

import math
import os
import re
import ssl
from collections.abc import Callable, Sequence
from typing import Any, ClassVar, Literal, cast

import psycopg
from psycopg import errors as pg_errors
from psycopg import pq
from psycopg import sql as pg_sql
from psycopg.rows import TupleRow
from pydantic import Field, SecretStr, ValidationInfo, field_validator

from outpost.drivers.base import Driver, DriverOptions, QueryResult, TestResult, jsonable
from outpost.errors import DriverError, OutpostError, ReadOnlyError

SslMode = Literal["disable", "require", "verify-ca", "require-ca", "verify-full"]

#: Our ssl modes as libpq sslmode values (require-ca is Reflect's name for verify-ca).
LIBPQ_SSLMODE: dict[str, str] = {
    "disable": "disable",
    "require": "require",
    "verify-ca": "verify-ca",
    "require-ca": "verify-ca",
    "verify-full": "verify-full",
}

#: Rows per network chunk when streaming a read-only result (bounded by max_rows + 1).
STREAM_CHUNK_ROWS = 1000

#: Seconds a cancel request may take to reach the server.
CANCEL_TIMEOUT = 5.0

_SSL_HELP = (
    "The SSL mode for connecting to the database: disable (no encryption), require "
    "(encrypted, the certificate chain is not checked), verify-ca or require-ca (encrypted, "
    "the certificate chain is checked), verify-full (encrypted, the chain and host name are "
    "checked)"
)


class PostgresOptions(DriverOptions):
    """Options of the postgres driver (the flags of ``connections add postgres``)."""

    host: str = Field("localhost", min_length=1, description="The DBMS host name")
    port: int = Field(5432, ge=1, le=65535, description="The DBMS port")
    user: str | None = Field(None, description="A username for connecting to the database")
    password: SecretStr | None = Field(None, description="The password associated with user")
    database: str | None = Field(None, description="The name of the database to connect to")
    connect_timeout: int = Field(
        30,
        gt=0,
        description="Timeout for establishing a connection to the database, in seconds",
    )
    ssl: SslMode = Field("disable", description=_SSL_HELP)
    ssl_root_cert: str | None = Field(
        None,
        description=(
            "CA certificate file (PEM) that verify-ca/verify-full check the server certificate "
            "against; the system's trusted CAs when unset"
        ),
    )
    ssl_cert: str | None = Field(
        None, description="Client certificate file (PEM) to present to the server"
    )
    ssl_key: str | None = Field(None, description="Private key file of the client certificate")

    @field_validator("ssl_key")
    @classmethod
    def _cert_and_key_together(cls, value: str | None, info: ValidationInfo) -> str | None:
        cert = info.data.get("ssl_cert")
        if cert and not value:
            raise ValueError("a client certificate (--ssl-cert) needs its key file (--ssl-key)")
        if value and not cert and "ssl_cert" in info.data:
            raise ValueError("a client key needs its certificate file (--ssl-cert)")
        return value


def _seconds(value: float) -> str:
    return f"{value:g}"


def _clean_libpq_message(text: str) -> str:
    """libpq's connection failure text without its wrapping, as one line."""
    text = text.replace("connection failed: ", "")
    text = re.sub(r'connection to server at "[^"]*"(?: \([^)]*\))?, port \d+ failed: ', "", text)
    text = re.sub(r'connection to server on socket "[^"]*" failed: ', "", text)
    text = re.sub(r"\b(FATAL|ERROR):\s+", "", text)
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return "; ".join(lines).rstrip(".")


class PostgresDriver(Driver):
    """PostgreSQL 9.0 and later, and anything speaking its protocol."""

    name: ClassVar[str] = "postgres"
    display_name: ClassVar[str] = "PostgreSQL"
    options_model: ClassVar[type[DriverOptions]] = PostgresOptions
    #: the statement whose single value test() reports as the server version
    version_sql: ClassVar[str] = "SHOW server_version"
    sqlalchemy_dialect: ClassVar[str | None] = "postgresql+psycopg"

    @property
    def opts(self) -> PostgresOptions:
        if not isinstance(self.options, PostgresOptions):
            raise TypeError(f"{type(self).__name__} needs PostgresOptions")
        return self.options

    # --- connecting -------------------------------------------------------------------

    @property
    def address(self) -> str:
        host = self.opts.host
        return f"[{host}]:{self.opts.port}" if ":" in host else f"{host}:{self.opts.port}"

    def connect_timeout_seconds(self, timeout: float | None = None) -> int:
        """The connect timeout: the option, or TIMEOUT when that is shorter (at least 1 s)."""
        seconds: float = self.opts.connect_timeout
        if timeout is not None and timeout > 0:
            seconds = min(seconds, timeout)
        return max(1, math.ceil(seconds))

    def connect_kwargs(self, connect_timeout: int) -> dict[str, str | int]:
        """Keyword arguments for psycopg.connect (the password as its own argument)."""
        o = self.opts
        kwargs: dict[str, str | int] = {
            "host": o.host,
            "port": o.port,
            "connect_timeout": connect_timeout,
            "application_name": "outpost",
            "gssencmode": "disable",
            "keepalives": 1,
            "keepalives_idle": 30,
            "keepalives_interval": 10,
            "keepalives_count": 5,
        }
        if o.user:
            kwargs["user"] = o.user
        if o.password is not None:
            kwargs["password"] = o.password.get_secret_value()
        if o.database:
            kwargs["dbname"] = o.database
        kwargs.update(self.ssl_kwargs())
        return kwargs

    def ssl_kwargs(self) -> dict[str, str]:
        """libpq's sslmode and certificate files for the ssl options."""
        o = self.opts
        mode = LIBPQ_SSLMODE[o.ssl]
        kwargs = {"sslmode": mode}
        if mode == "disable":
            return kwargs
        for value, flag, key in (
            (o.ssl_root_cert, "--ssl-root-cert", "sslrootcert"),
            (o.ssl_cert, "--ssl-cert", "sslcert"),
            (o.ssl_key, "--ssl-key", "sslkey"),
        ):
            if value:
                if not os.path.isfile(value):
                    raise self.error(
                        f"Cannot connect to {self.display_name} at {self.address}",
                        f"the file {value!r} given as {flag} does not exist",
                    )
                kwargs[key] = value
        if mode in ("verify-ca", "verify-full") and not o.ssl_root_cert:
            kwargs["sslrootcert"] = self._system_root_cert(mode)
        return kwargs

    def _system_root_cert(self, mode: str) -> str:
        """The system's trusted CAs, for a verifying mode without --ssl-root-cert.

        libpq's own ``sslrootcert=system`` asks *its* OpenSSL for the default trust store; the
        libpq bundled in psycopg's binary wheel looks in a directory of its own that does not
        exist, so the system bundle Python's ssl module finds (which honours SSL_CERT_FILE) is
        passed as a file. ``system`` remains the fallback (libpq 16+, verify-full only).
        """
        paths = ssl.get_default_verify_paths()
        for candidate in (paths.cafile, paths.openssl_cafile):
            if candidate and os.path.isfile(candidate):
                return candidate
        if mode == "verify-full" and pq.version() >= 160000:
            return "system"
        raise self.error(
            f"Cannot connect to {self.display_name} at {self.address}",
            f"--ssl {self.opts.ssl} checks the server certificate but no CA file was found: "
            "set --ssl-root-cert to the CA certificate (PEM) that signed it",
        )

    def connect(
        self, timeout: float | None = None, *, autocommit: bool = False
    ) -> psycopg.Connection[TupleRow]:
        """Open a connection, or raise a DriverError that says why not."""
        seconds = self.connect_timeout_seconds(timeout)
        kwargs = self.connect_kwargs(seconds)
        try:
            return psycopg.connect(autocommit=autocommit, **cast("dict[str, Any]", kwargs))
        except psycopg.Error as exc:
            raise self._connect_error(exc, seconds) from exc

    def _connect_error(self, exc: psycopg.Error, seconds: int) -> DriverError:
        o = self.opts
        text = str(exc)
        low = text.lower()
        user = o.user or "(the default user)"
        if "password authentication failed" in low or "authentication failed for user" in low:
            reason = f"authentication failed for user {user!r}; check the user name and password"
        elif "no password supplied" in low:
            reason = (
                f"the server asks for a password for user {user!r} and none is set (--password)"
            )
        elif "timeout expired" in low or "timed out" in low:
            reason = (
                f"no answer from {self.address} within the connect timeout of {seconds} s; "
                "check the host, the port and any firewall in between"
            )
        elif "connection refused" in low:
            reason = (
                "connection refused; check that the server is running and accepts TCP/IP "
                "connections on that port"
            )
        elif "could not translate host name" in low or "name or service not known" in low:
            reason = f"the host name {o.host!r} could not be resolved"
        elif "does not match host name" in low:
            match = re.search(
                r'server certificate for "[^"]*"[^\n]*?does not match host name'
                r' "[^"]*"',
                text,
            )
            detail = match.group(0) if match else _clean_libpq_message(text)
            reason = (
                f"host name mismatch: {detail}; connect with a host name the certificate is "
                "issued for, or use --ssl verify-ca to check the certificate chain only"
            )
        elif "certificate verify failed" in low:
            reason = (
                "the server certificate could not be verified (certificate verify failed); set "
                "--ssl-root-cert to the CA certificate that signed it"
            )
        elif "does not support ssl" in low:
            reason = (
                f"the server does not accept SSL connections and --ssl {o.ssl} requires "
                "them; use --ssl disable or turn SSL on in the server"
            )
        else:
            reason = _clean_libpq_message(text) or type(exc).__name__
        return self.error(f"Cannot connect to {self.display_name} at {self.address}", reason)

    @staticmethod
    def canceller(conn: psycopg.Connection[TupleRow]) -> Callable[[], None]:
        """What stops CONN's running statement (nothing once CONN is closed)."""

        def cancel() -> None:
            if conn.closed:
                raise psycopg.OperationalError("the connection is closed")
            conn.cancel_safe(timeout=CANCEL_TIMEOUT)

        return cancel

    # --- the driver operations ------------------------------------------------------------

    def test(self, timeout: float | None = None) -> TestResult:
        elapsed = self.timer()
        self.check_cancelled()
        conn = self.connect(timeout, autocommit=True)
        try:
            with self.cancellable(self.canceller(conn)), conn.cursor() as cur:
                cur.execute(self.version_sql)
                row = cur.fetchone()
        except psycopg.Error as exc:
            raise self._query_error(exc, timeout) from exc
        finally:
            conn.close()
        version = str(row[0]) if row else ""
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
        """Run SQL (``%s`` placeholders for PARAMS); TIMEOUT <= 0 means no statement timeout."""
        elapsed = self.timer()
        max_rows = max(0, max_rows)
        args = list(params) if params else None
        notices: list[str] = []
        self.check_cancelled()
        conn = self.connect()
        conn.add_notice_handler(
            lambda diag: notices.append(f"{diag.severity}: {diag.message_primary}")
        )
        try:
            conn.read_only = not allow_writes  # psycopg begins with BEGIN READ ONLY
            with self.cancellable(self.canceller(conn)), conn.cursor() as cur:
                cur.execute(self._statement_timeout_sql(timeout))
                if allow_writes:
                    columns, rows, row_count, truncated = self._run_buffered(
                        cur, sql, args, max_rows
                    )
                    conn.commit()
                else:
                    columns, rows, row_count, truncated = self._run_streamed(
                        conn, cur, sql, args, max_rows
                    )
        except psycopg.Error as exc:
            raise self._query_error(exc, timeout) from exc
        finally:
            conn.close()  # a read-only transaction is simply dropped
        return QueryResult(
            columns=columns,
            rows=rows,
            row_count=row_count,
            truncated=truncated,
            duration_seconds=elapsed(),
            notices=[self.scrub(n) for n in notices],
        )

    def dbapi_connect(self, timeout: float | None = None) -> psycopg.Connection[TupleRow]:
        """A connection for schema inspection: every transaction is ``BEGIN READ ONLY``, the
        session's ``statement_timeout`` is TIMEOUT (none when None or <= 0) and its
        ``search_path`` is ``pg_catalog`` only, so that the catalog names every other schema
        (foreign keys, defaults, view definitions, types) whatever the role's search_path."""
        self.check_cancelled()
        conn = self.connect(timeout, autocommit=True)
        try:
            self.watch(self.canceller(conn))  # for as long as the connection is open
            millis = max(1, round(timeout * 1000)) if timeout and timeout > 0 else 0
            with conn.cursor() as cur:
                cur.execute("SET search_path = pg_catalog")
                cur.execute(pg_sql.SQL("SET statement_timeout = {}").format(pg_sql.Literal(millis)))
            conn.autocommit = False
            conn.read_only = True
        except psycopg.Error as exc:
            conn.close()
            raise self._query_error(exc, timeout) from exc
        except BaseException:
            conn.close()
            raise
        return conn

    # --- query internals ----------------------------------------------------------------

    @staticmethod
    def _statement_timeout_sql(timeout: float) -> pg_sql.Composed:
        millis = max(1, round(timeout * 1000)) if timeout > 0 else 0
        return pg_sql.SQL("SET LOCAL statement_timeout = {}").format(pg_sql.Literal(millis))

    def _run_streamed(
        self,
        conn: psycopg.Connection[TupleRow],
        cur: psycopg.Cursor[TupleRow],
        sql: str,
        args: list[Any] | None,
        max_rows: int,
    ) -> tuple[list[str], list[list[Any]], int, bool]:
        chunked = psycopg.capabilities.has_stream_chunked()
        size = min(max_rows + 1, STREAM_CHUNK_ROWS) if chunked else 1
        rows: list[list[Any]] = []
        columns: list[str] | None = None
        truncated = False
        stream = cur.stream(sql, args, size=size)
        try:
            for row in stream:
                if columns is None:
                    columns = [d.name for d in cur.description or ()]
                if len(rows) >= max_rows:
                    truncated = True
                    break
                rows.append([jsonable(v) for v in row])
        except psycopg.ProgrammingError as exc:
            if exc.sqlstate is not None:
                raise
            # The statement ran and produced no result set (SET, DO, CALL ...); in a
            # read-only transaction it changed no rows.
            return [], [], 0, False
        finally:
            # Closing the generator stops the rest of a truncated result (psycopg cancels it).
            close = getattr(stream, "close", None)
            if close is not None:
                close()
        if columns is None:  # no rows: the stream does not report the columns
            columns = self._describe(conn, sql, args)
        return columns, rows, len(rows), truncated

    @staticmethod
    def _describe(
        conn: psycopg.Connection[TupleRow], sql: str, args: list[Any] | None
    ) -> list[str]:
        """Column names of SQL, asked of the server without running it (Parse + Describe)."""
        try:
            text = psycopg.ClientCursor(conn).mogrify(sql, args) if args else sql
            encoding = conn.info.encoding
            pgconn = conn.pgconn
            res = pgconn.prepare(b"", text.encode(encoding))
            if res.status != pq.ExecStatus.COMMAND_OK:
                return []
            res = pgconn.describe_prepared(b"")
            if res.status != pq.ExecStatus.COMMAND_OK:
                return []
            names = []
            for i in range(res.nfields):
                name = res.fname(i)
                names.append(name.decode(encoding, "replace") if name else "?column?")
            return names
        except (psycopg.Error, UnicodeError, LookupError):
            return []

    @staticmethod
    def _run_buffered(
        cur: psycopg.Cursor[TupleRow], sql: str, args: list[Any] | None, max_rows: int
    ) -> tuple[list[str], list[list[Any]], int, bool]:
        cur.execute(sql, args)
        while cur.nextset():  # several statements: report the last one
            pass
        if cur.description is None:
            return [], [], max(cur.rowcount, 0), False
        fetched = cur.fetchmany(max_rows + 1)
        rows = [[jsonable(v) for v in row] for row in fetched[:max_rows]]
        return [d.name for d in cur.description], rows, len(rows), len(fetched) > max_rows

    def _query_error(self, exc: psycopg.Error, timeout: float | None) -> OutpostError:
        diag = exc.diag
        primary = (diag.message_primary or "").strip() or _clean_libpq_message(str(exc))
        where = f"connection {self.context.connection!r}"
        if exc.sqlstate == "25006" or isinstance(exc, pg_errors.ReadOnlySqlTransaction):
            return ReadOnlyError(
                self.scrub(
                    f"Connection {self.context.connection!r} is read-only; writes are refused "
                    f"({primary}). The query runs in a read-only transaction unless writes are "
                    "allowed."
                )
            )
        if exc.sqlstate == "57014" and self.cancel_requested:
            return self.cancelled_error()
        if exc.sqlstate == "57014":
            limit = f" of {_seconds(timeout)} s" if timeout and timeout > 0 else ""
            return DriverError(
                self.scrub(
                    f"The query on {where} was cancelled: it ran longer than the statement "
                    f"timeout{limit} ({primary})."
                )
            )
        if exc.sqlstate == "42601" and "multiple commands" in primary:
            return DriverError(
                self.scrub(
                    f"The query on {where} holds several statements; read-only queries and "
                    "queries with parameters must be a single statement, so send them one at "
                    "a time."
                )
            )
        if exc.sqlstate is None and isinstance(exc, psycopg.OperationalError):
            return self.error(f"Lost the connection to {self.address}", primary)
        extra = ""
        if diag.message_detail:
            extra += f" ({diag.message_detail.strip().rstrip('.')})"
        if diag.message_hint:
            extra += f"; hint: {diag.message_hint.strip().rstrip('.')}"
        return self.error("The query failed", f"{primary}{extra}")
