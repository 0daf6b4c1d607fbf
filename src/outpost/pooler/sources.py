"""Where the pooler's routes come from: the agent's store, a Perseus ``perseus_auth`` table, or
both (store first, then table). ``open_route_source`` picks them from the configuration.

``StoreRoutes`` reads ``data_dir/agent.db`` through a read-only SQLite connection, without the
data dir lock, so `outpost pooler serve` runs beside `outpost serve`. It re-reads when the
store changed (checked at most once a second, on a lookup) and on ``reload()``.

``TableRoutes`` asks ``pooler.auth_db_dsn`` with ``SELECT … FROM perseus_auth WHERE source_db
= $1 AND source_schema = $2`` within ``pooler.auth_query_timeout`` and keeps each answer for
``TABLE_CACHE_SECONDS`` (a missing route for ``TABLE_MISS_CACHE_SECONDS``); ``reload()`` forgets
them. ``dest_pass_enc`` is opened with the agent key when it is an agent envelope (base64 of a
sealed envelope, what `outpost pooler encrypt-password` prints), else with AWS KMS when
``pooler.aws_kms_key_arn`` is set.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import logging
import math
import re
import sqlite3
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, cast

from outpost.config import AWSCredentialsConfig, CredentialsConfig, LoadedConfig, PoolerConfig
from outpost.credentials import parse_reference
from outpost.credentials.base import CredentialContext, CredentialSource
from outpost.credentials.cache import CredentialCache
from outpost.crypto import Key, is_sealed, open_sealed
from outpost.drivers import get_driver
from outpost.errors import OutpostError
from outpost.pooler.kms import kms_decrypt
from outpost.pooler.passwords import PasswordFormatError, check_scrypt_hash
from outpost.pooler.route_admin import decode_secret
from outpost.pooler.routes import (
    WOULD_BLOCK,
    ClientSecret,
    Destination,
    Route,
    RouteError,
    RouteSource,
    SslMode,
    WouldBlock,
)
from outpost.state.codec import decode_options
from outpost.state.commands import StoredConnection, StoredRoute
from outpost.state.store import (
    DB_NAME,
    ROUTE_DRIVERS,
    connection_from_row,
    route_from_row,
    route_label,
)

log = logging.getLogger("outpost.pooler")

#: How often a lookup checks whether the store changed (seconds).
STORE_RECHECK_SECONDS = 1.0
#: How long a perseus_auth row (or its absence) is reused before the table is asked again.
TABLE_CACHE_SECONDS = 5.0
TABLE_MISS_CACHE_SECONDS = 1.0
_TABLE_CACHE_MAX = 10_000

#: The connection's ``ssl`` option as a libpq sslmode.
_SSLMODE: dict[str, SslMode] = {
    "disable": "disable",
    "require": "require",
    "verify-ca": "verify-ca",
    "require-ca": "verify-ca",
    "verify-full": "verify-full",
}


# --- the store ------------------------------------------------------------------------------


@dataclass(frozen=True)
class _StoreEntry:
    """One store route, ready to hand out; or why it cannot be used."""

    route: Route | None
    source: CredentialSource | None = None  # password fetched at lookup
    context: CredentialContext | None = None
    error: str | None = None


def destination_of(
    stored: StoredConnection, key: Key | None, credentials: CredentialsConfig
) -> tuple[Destination, CredentialSource | None, CredentialContext | None]:
    """The destination of a postgres/redshift connection; its password source when it has one.

    Raises OutpostError (a clear sentence) when the connection does not fit.
    """
    if stored.driver not in ROUTE_DRIVERS:
        raise OutpostError(
            f"connection {stored.slug!r} is a {stored.driver} connection, not "
            f"{' or '.join(ROUTE_DRIVERS)}"
        )
    cls = get_driver(stored.driver)
    raw = decode_options(stored, key)
    reference = raw.pop("password_from", None)
    opts: Any = cls.parse_options(raw, connection=stored.name)
    user = opts.user
    if not user:
        raise OutpostError(
            f"connection {stored.slug!r} has no user; set one with "
            f"`outpost connections edit {stored.slug} --user USER`"
        )
    source = None
    context = None
    if reference is not None:
        source = parse_reference(str(reference), credentials)
        context = CredentialContext(
            connection=stored.name,
            driver=stored.driver,
            host=opts.host,
            port=opts.port,
            user=user,
            options={k: v for k, v in raw.items() if k != "password"},
        )
    password = opts.password.get_secret_value() if opts.password is not None else None
    destination = Destination(
        host=opts.host,
        port=opts.port,
        database=opts.database or user,
        user=user,
        password=password,
        sslmode=_SSLMODE.get(opts.ssl, "prefer"),
        sslrootcert=opts.ssl_root_cert,
        sslcert=opts.ssl_cert,
        sslkey=opts.ssl_key,
    )
    return destination, source, context


class StoreRoutes(RouteSource):
    """Routes kept in the agent's store (`outpost pooler routes add`), read without its lock."""

    def __init__(
        self,
        data_dir: Path,
        key: Key | None,
        credentials: CredentialsConfig,
        *,
        recheck_seconds: float = STORE_RECHECK_SECONDS,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.path = Path(data_dir).expanduser() / DB_NAME
        self.key = key
        self.credentials = credentials
        self.cache = CredentialCache(credentials)
        self.recheck_seconds = recheck_seconds
        self.clock = clock
        self._db: sqlite3.Connection | None = None
        self._entries: dict[tuple[str, str], _StoreEntry] = {}
        self._version: int | None = None
        self._checked_at = -math.inf
        self._load()

    # reading

    def _connect(self) -> sqlite3.Connection | None:
        if self._db is not None:
            return self._db
        if not self.path.exists():
            return None
        try:
            db = sqlite3.connect(
                f"{self.path.as_uri()}?mode=ro", uri=True, check_same_thread=False, timeout=5
            )
            db.row_factory = sqlite3.Row
        except sqlite3.Error as exc:
            raise RouteError(f"Cannot read the agent's store {self.path}: {exc}.") from None
        self._db = db
        return db

    def _applied_index(self) -> int | None:
        db = self._connect()
        if db is None:
            return None
        try:
            row = db.execute("SELECT value FROM meta WHERE key = 'applied_index'").fetchone()
        except sqlite3.Error:
            return None
        return None if row is None else int(row[0])

    def _read(self) -> tuple[int | None, list[StoredRoute], dict[str, StoredConnection]]:
        db = self._connect()
        if db is None:
            return None, [], {}
        try:
            db.execute("BEGIN")  # one snapshot for all three reads
            try:
                row = db.execute("SELECT value FROM meta WHERE key = 'applied_index'").fetchone()
                routes = [route_from_row(r) for r in db.execute("SELECT * FROM routes")]
                slugs = {r.to for r in routes}
                connections = {
                    c.slug: c
                    for c in map(connection_from_row, db.execute("SELECT * FROM connections"))
                    if c.slug in slugs
                }
            finally:
                db.execute("COMMIT")
        except sqlite3.OperationalError as exc:
            if "no such table" in str(exc):  # a store written before routes existed
                return None, [], {}
            raise RouteError(f"Cannot read the pooler routes in {self.path}: {exc}.") from None
        except sqlite3.Error as exc:
            raise RouteError(f"Cannot read the pooler routes in {self.path}: {exc}.") from None
        return (None if row is None else int(row[0])), routes, connections

    def _entry(self, route: StoredRoute, target: StoredConnection | None) -> _StoreEntry:
        label = route_label(route.database, route.schema_name)
        if target is None:
            return _StoreEntry(None, error=f"connection {route.to!r} no longer exists")
        try:
            secret = decode_secret(route, self.key)
            destination, source, context = destination_of(target, self.key, self.credentials)
        except OutpostError as exc:
            log.warning("Pooler route %s cannot be used: %s", label, exc)
            return _StoreEntry(None, error=str(exc).rstrip("."))
        built = Route(
            database=route.database,
            schema=route.schema_name,
            user=route.user,
            secret=secret,
            destination=destination,
            origin="store",
        )
        return _StoreEntry(built, source, context)

    def _load(self) -> None:
        version, routes, connections = self._read()
        self._entries = {
            (r.database, r.schema_name): self._entry(r, connections.get(r.to)) for r in routes
        }
        self._version = version
        self._checked_at = self.clock()

    def _maybe_reload(self) -> None:
        now = self.clock()
        if now - self._checked_at < self.recheck_seconds:
            return
        self._checked_at = now
        if self._applied_index() != self._version:
            self._load()
            self.changed()

    def _with_password(self, entry: _StoreEntry) -> Route:
        assert entry.route is not None and entry.source is not None and entry.context is not None
        credential, _ = self.cache.get(entry.source, entry.context)
        destination = replace(
            entry.route.destination,
            password=credential.password,
            user=credential.username or entry.route.destination.user,
        )
        return replace(entry.route, destination=destination)

    # RouteSource

    def lookup_nowait(self, database: str, schema: str) -> Route | WouldBlock | None:
        self._maybe_reload()
        entry = self._entries.get((database, schema))
        if entry is None:
            return None
        if entry.route is None:
            raise RouteError(
                f"The pooler route {route_label(database, schema)} cannot be used: {entry.error}."
            )
        if entry.source is None:
            return entry.route
        return WOULD_BLOCK  # the destination password comes from a credential source

    def fresh_for(self, database: str, schema: str) -> float:
        return max(0.0, self._checked_at + self.recheck_seconds - self.clock())

    async def lookup(self, database: str, schema: str) -> Route | None:
        found = self.lookup_nowait(database, schema)
        if found is not WOULD_BLOCK:
            return found
        entry = self._entries[(database, schema)]
        try:
            return await asyncio.to_thread(self._with_password, entry)
        except OutpostError as exc:
            raise RouteError(
                f"The pooler route {route_label(database, schema)} has no destination "
                f"password: {str(exc).rstrip('.')}."
            ) from None

    async def routes(self) -> list[Route]:
        self._maybe_reload()
        found = [e.route for e in self._entries.values() if e.route is not None]
        return sorted(found, key=lambda r: (r.database, r.schema))

    async def reload(self) -> None:
        await asyncio.to_thread(self._load)
        self.changed()  # (here, on the loop: not from the thread that read the store)

    async def close(self) -> None:
        if self._db is not None:
            self._db.close()
            self._db = None
        self.cache.close()


# --- the perseus_auth table -----------------------------------------------------------------

_COLUMNS = (
    "source_user",
    "source_pass_hashed",
    "dest_host",
    "dest_db",
    "dest_pass_enc",
    "dest_user",
)
_SELECT = f"SELECT source_db, source_schema, {', '.join(_COLUMNS)} FROM perseus_auth"


def split_dest_host(value: str, default_port: int = 5432) -> tuple[str, int]:
    """``host``, ``host:port``, ``[v6]`` or ``[v6]:port`` -> (host, port)."""
    value = value.strip()
    match = re.fullmatch(r"\[([0-9A-Fa-f:.]+)\](?::(\d+))?", value)
    if match:
        host, port = match.group(1), match.group(2)
    elif value.count(":") == 1:
        host, port = value.split(":")
    else:
        host, port = value, None
    if not host:
        raise ValueError("no host")
    number = int(port) if port else default_port
    if not 1 <= number <= 65535:
        raise ValueError("port out of range")
    return host, number


def describe_dsn(dsn: str) -> str:
    """user@host:port/dbname of a DSN, for messages (never its password)."""
    from psycopg.conninfo import conninfo_to_dict

    try:
        params = conninfo_to_dict(dsn)
    except Exception:
        return "pooler.auth_db_dsn"
    host = params.get("host") or "localhost"
    port = params.get("port") or 5432
    where = f"{host}:{port}/{params.get('dbname') or params.get('user') or ''}"
    return f"{params['user']}@{where}" if params.get("user") else where


class TableRoutes(RouteSource):
    """Routes from a Perseus-compatible ``perseus_auth`` table (pooler.auth_db_dsn)."""

    def __init__(
        self,
        dsn: str,
        *,
        timeout: float = 5.0,
        key: Key | None = None,
        kms_key_arn: str | None = None,
        aws: AWSCredentialsConfig | None = None,
        sslmode: SslMode = "prefer",
        sslrootcert: str | None = None,
        cache_seconds: float = TABLE_CACHE_SECONDS,
        miss_cache_seconds: float = TABLE_MISS_CACHE_SECONDS,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.dsn = dsn
        self.where = describe_dsn(dsn)
        self.timeout = timeout
        self.key = key
        self.kms_key_arn = kms_key_arn
        self.aws = aws or AWSCredentialsConfig()
        self.sslmode = sslmode
        self.sslrootcert = sslrootcert
        self.cache_seconds = cache_seconds
        self.miss_cache_seconds = miss_cache_seconds
        self.clock = clock
        self._conn: Any = None  # psycopg.AsyncConnection
        self._lock: asyncio.Lock | None = None
        self._cache: dict[tuple[str, str], tuple[float, Route | None]] = {}
        self._inflight: dict[tuple[str, str], asyncio.Future[Route | None]] = {}
        self._plain: dict[str, str] = {}  # dest_pass_enc -> password, until reload

    # the auth database

    async def _connection(self) -> Any:
        import psycopg

        if self._conn is not None and not self._conn.closed:
            return self._conn
        self._conn = await psycopg.AsyncConnection.connect(
            self.dsn,
            autocommit=True,
            connect_timeout=math.ceil(self.timeout) + 1,  # our own timeout answers first
            application_name="outpost-pooler",
        )
        return self._conn

    async def _drop_connection(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            try:
                await conn.close()
            except Exception:
                log.debug("closing the auth db connection failed", exc_info=True)

    async def _query(self, sql: str, params: Sequence[Any] = ()) -> list[tuple[Any, ...]]:
        import psycopg
        from psycopg import errors as pg_errors

        if self._lock is None:
            self._lock = asyncio.Lock()
        holding = False
        try:
            async with asyncio.timeout(self.timeout):
                async with self._lock:
                    holding = True
                    conn = await self._connection()
                    cursor = await conn.execute(sql, params)
                    return cast(list[tuple[Any, ...]], await cursor.fetchall())
        except TimeoutError:
            if holding:  # the connection is mid-query: throw it away
                await self._drop_connection()
            raise RouteError(
                f"The routing table at {self.where} did not answer within "
                f"pooler.auth_query_timeout ({self.timeout:g} s)."
            ) from None
        except pg_errors.UndefinedTable:
            raise RouteError(
                f"The routing table perseus_auth does not exist at {self.where}; create it "
                "(see the README) or fix pooler.auth_db_dsn."
            ) from None
        except pg_errors.UndefinedColumn as exc:
            raise RouteError(
                f"The routing table perseus_auth at {self.where} lacks a column Perseus has "
                f"({exc.diag.message_primary})."
            ) from None
        except psycopg.OperationalError as exc:
            await self._drop_connection()
            reason = str(exc).strip().splitlines()[-1] if str(exc).strip() else type(exc).__name__
            raise RouteError(
                f"Cannot reach the routing table at {self.where} (pooler.auth_db_dsn): "
                f"{reason.rstrip('.')}."
            ) from None
        except psycopg.Error as exc:
            await self._drop_connection()
            raise RouteError(
                f"The routing table query at {self.where} failed: "
                f"{getattr(exc.diag, 'message_primary', None) or type(exc).__name__}."
            ) from None

    # rows to routes

    async def _password(self, encrypted: str, label: str) -> str:
        cached = self._plain.get(encrypted)
        if cached is not None:
            return cached
        what = f"dest_pass_enc of perseus_auth row {label}"
        try:
            raw: bytes | None = base64.b64decode(encrypted.strip(), validate=True)
        except (binascii.Error, ValueError):
            raw = None
        if raw is not None and is_sealed(raw):
            if self.key is None:
                raise RouteError(
                    f"The {what} is sealed with an agent key but no key_path is set; set "
                    "key_path to the key that encrypted it."
                )
            try:
                password = open_sealed(self.key, raw, what=what).decode()
            except (OutpostError, UnicodeDecodeError) as exc:
                raise RouteError(f"Cannot decrypt: {str(exc).rstrip('.')}.") from None
        elif self.kms_key_arn:
            try:
                password = await asyncio.to_thread(
                    kms_decrypt, encrypted, self.aws, self.kms_key_arn
                )
            except OutpostError as exc:
                raise RouteError(f"Cannot decrypt the {what}: {str(exc).rstrip('.')}.") from None
        else:
            raise RouteError(
                f"The {what} is not sealed with the agent key and pooler.aws_kms_key_arn is "
                "not set, so it cannot be decrypted; make it with `outpost pooler "
                "encrypt-password` or set the KMS key."
            )
        if len(self._plain) >= _TABLE_CACHE_MAX:
            self._plain.clear()
        self._plain[encrypted] = password
        return password

    def _destination(
        self, row: tuple[Any, ...], label: str, password: str | None
    ) -> tuple[str, ClientSecret, Destination]:
        values = dict(zip(("source_db", "source_schema", *_COLUMNS), row, strict=True))
        required = ("source_user", "source_pass_hashed", "dest_host", "dest_db", "dest_user")
        for column in required:
            if not values[column]:
                raise RouteError(f"The perseus_auth row {label} has no {column}; fill it in.")
        try:
            host, port = split_dest_host(str(values["dest_host"]))
        except ValueError:
            raise RouteError(
                f"The perseus_auth row {label} has dest_host {values['dest_host']!r}, which is "
                "not HOST or HOST:PORT."
            ) from None
        destination = Destination(
            host=host,
            port=port,
            database=str(values["dest_db"]),
            user=str(values["dest_user"]),
            password=password,
            sslmode=self.sslmode,
            sslrootcert=self.sslrootcert,
        )
        return (
            str(values["source_user"]),
            ClientSecret(scrypt=values["source_pass_hashed"]),
            (destination),
        )

    async def _fetch(self, database: str, schema: str) -> Route | None:
        rows = await self._query(
            _SELECT + " WHERE source_db = %s AND source_schema = %s", (database, schema)
        )
        if not rows:
            return None
        row = rows[0]
        label = route_label(database, schema)
        user, secret, _ = self._destination(row, label, None)
        assert secret.scrypt is not None
        try:
            check_scrypt_hash(secret.scrypt)
        except PasswordFormatError as exc:
            raise RouteError(
                f"The source_pass_hashed of perseus_auth row {label} is unusable ({exc}); make "
                "it with `outpost pooler hash-password`."
            ) from None
        encrypted = row[2 + _COLUMNS.index("dest_pass_enc")]
        password = await self._password(str(encrypted), label) if encrypted else None
        _, _, destination = self._destination(row, label, password)
        return Route(database, schema, user, secret, destination, origin="table")

    # RouteSource

    def lookup_nowait(self, database: str, schema: str) -> Route | WouldBlock | None:
        cached = self._cache.get((database, schema))
        now = self.clock()
        if cached is not None and cached[0] > now:
            return cached[1]
        return WOULD_BLOCK

    async def lookup(self, database: str, schema: str) -> Route | None:
        key = (database, schema)
        found = self.lookup_nowait(database, schema)
        if found is not WOULD_BLOCK:
            return found
        pending = self._inflight.get(key)
        if pending is not None:  # one query per key at a time; the others wait for it
            return await asyncio.shield(pending)
        future: asyncio.Future[Route | None] = asyncio.get_running_loop().create_future()
        self._inflight[key] = future
        try:
            route = await self._fetch(database, schema)
        except BaseException as exc:
            if not future.done():
                future.set_exception(exc)
                future.exception()  # retrieved: no "never retrieved" warning without waiters
            raise
        else:
            ttl = self.cache_seconds if route is not None else self.miss_cache_seconds
            if len(self._cache) >= _TABLE_CACHE_MAX:
                self._cache.clear()
            self._cache[key] = (self.clock() + ttl, route)
            future.set_result(route)
            return route
        finally:
            self._inflight.pop(key, None)

    async def routes(self) -> list[Route]:
        rows = await self._query(_SELECT + " ORDER BY source_db, source_schema")
        found = []
        for row in rows:
            label = route_label(str(row[0]), str(row[1]))
            try:
                user, secret, destination = self._destination(row, label, None)
            except RouteError as exc:
                log.warning("%s", exc)
                continue
            found.append(Route(str(row[0]), str(row[1]), user, secret, destination, "table"))
        return found

    def fresh_for(self, database: str, schema: str) -> float:
        cached = self._cache.get((database, schema))
        return 0.0 if cached is None else max(0.0, cached[0] - self.clock())

    async def reload(self) -> None:
        self._cache.clear()
        self._plain.clear()
        self.changed()

    async def close(self) -> None:
        await self._drop_connection()


# --- both -------------------------------------------------------------------------------------


class ChainedRoutes(RouteSource):
    """Several sources asked in order; the first that knows (database, schema) answers."""

    def __init__(self, sources: Sequence[RouteSource]) -> None:
        self.sources = list(sources)
        for source in self.sources:
            source.on_change = self.changed

    async def lookup(self, database: str, schema: str) -> Route | None:
        for source in self.sources:
            route = await source.lookup(database, schema)
            if route is not None:
                return route
        return None

    def lookup_nowait(self, database: str, schema: str) -> Route | WouldBlock | None:
        for source in self.sources:
            route = source.lookup_nowait(database, schema)
            if route is not None:  # a route, or WOULD_BLOCK: ``lookup`` asks again
                return route
        return None

    def fresh_for(self, database: str, schema: str) -> float:
        fresh = math.inf
        for source in self.sources:  # as long as the first that answers, and those before it
            fresh = min(fresh, source.fresh_for(database, schema))
            if source.lookup_nowait(database, schema) is not None:
                break
        return fresh

    async def routes(self) -> list[Route]:
        seen: dict[tuple[str, str], Route] = {}
        for source in self.sources:
            for route in await source.routes():
                seen.setdefault((route.database, route.schema), route)
        return sorted(seen.values(), key=lambda r: (r.database, r.schema))

    async def reload(self) -> None:
        for source in self.sources:
            await source.reload()

    async def close(self) -> None:
        for source in self.sources:
            await source.close()


def open_route_source(loaded: LoadedConfig, *, key: Key | None) -> RouteSource:
    """The store's routes; with pooler.auth_db_dsn also the perseus_auth table (store first)."""
    config = loaded.config
    pooler = config.pooler or PoolerConfig()
    store = StoreRoutes(config.data_dir, key, config.credentials)
    if pooler.auth_db_dsn is None:
        return store
    table = TableRoutes(
        pooler.auth_db_dsn.get_secret_value(),
        timeout=pooler.auth_query_timeout,
        key=key,
        kms_key_arn=pooler.aws_kms_key_arn,
        aws=config.credentials.aws,
        sslmode=pooler.dest_sslmode,
        sslrootcert=pooler.dest_sslrootcert,
        cache_seconds=pooler.auth_cache_seconds,
    )
    return ChainedRoutes([store, table])
