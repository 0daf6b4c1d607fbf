"""The agent's SQLite store and the one function that changes it: ``apply``.

The database lives in ``data_dir/agent.db`` (WAL, ``synchronous=FULL``). Each command is
applied inside one ``BEGIN IMMEDIATE`` transaction, so a process killed mid-write leaves the
old state or the new one. One process owns a data dir at a time: ``agent.lock`` is held with
``flock`` for as long as the store is open, and says who holds it.
"""

from __future__ import annotations

import base64
import contextlib
import fcntl
import json
import os
import sqlite3
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from outpost.errors import ConflictError, DataDirLockedError, NotFoundError, OutpostError
from outpost.state.commands import (
    AddConnection,
    AddRoute,
    Command,
    DeleteConnection,
    MarkStarted,
    RekeyConnections,
    RemoveRoute,
    RenameConnection,
    RestoreConnections,
    StoredConnection,
    StoredRoute,
    UpdateConnectionOptions,
    b64,
)

SCHEMA_VERSION = 1
DB_NAME = "agent.db"
LOCK_NAME = "agent.lock"
Owner = Literal["serve", "cli"]
#: The drivers a pooler route may lead to (they speak the PostgreSQL protocol).
ROUTE_DRIVERS = ("postgres", "redshift")

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (
    key   TEXT PRIMARY KEY,
    value TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS connections (
    slug       TEXT PRIMARY KEY,
    name       TEXT NOT NULL,
    driver     TEXT NOT NULL,
    options    BLOB NOT NULL,
    encrypted  INTEGER NOT NULL,
    created_at REAL NOT NULL,
    updated_at REAL NOT NULL
);
CREATE UNIQUE INDEX IF NOT EXISTS connections_name ON connections (lower(name));
-- Pooler routes: (database, schema) -> connection; the client's password verifiers sealed.
CREATE TABLE IF NOT EXISTS routes (
    database    TEXT NOT NULL,
    schema_name TEXT NOT NULL,
    user        TEXT NOT NULL,
    target      TEXT NOT NULL,
    secret      BLOB NOT NULL,
    encrypted   INTEGER NOT NULL,
    created_at  REAL NOT NULL,
    PRIMARY KEY (database, schema_name)
);
-- Local observations (last check of each connection): not replicated, not backed up.
CREATE TABLE IF NOT EXISTS connection_status (
    slug             TEXT PRIMARY KEY,
    up               INTEGER NOT NULL,
    checked_at       REAL NOT NULL,
    error            TEXT,
    server_version   TEXT,
    duration_seconds REAL
);
"""


@dataclass(frozen=True)
class ConnectionStatus:
    """The last check of one connection, as this agent saw it."""

    up: bool
    checked_at: float
    error: str | None
    server_version: str | None
    duration_seconds: float | None


class AgentRunningError(DataDirLockedError):
    """`outpost serve` owns the data dir: CLI commands go through its API instead."""


@dataclass(frozen=True)
class LockHolder:
    pid: int
    owner: str
    since: float


class DataDirLock:
    """An exclusive ``flock`` on ``data_dir/agent.lock`` naming its holder."""

    def __init__(self, data_dir: Path, owner: Owner) -> None:
        self.path = data_dir / LOCK_NAME
        self.owner = owner
        self._fd: int | None = None

    def read_holder(self) -> LockHolder | None:
        try:
            data = json.loads(self.path.read_text() or "{}")
            return LockHolder(int(data["pid"]), str(data["owner"]), float(data["since"]))
        except (OSError, ValueError, KeyError, TypeError):
            return None

    def try_acquire(self) -> bool:
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            return False
        info = json.dumps({"pid": os.getpid(), "owner": self.owner, "since": time.time()})
        os.ftruncate(fd, 0)
        os.pwrite(fd, info.encode(), 0)
        self._fd = fd
        return True

    def acquire(self, wait_for_cli: float = 10.0) -> None:
        """Take the lock; wait a little for a short CLI command, never for another agent."""
        deadline = time.monotonic() + wait_for_cli
        while not self.try_acquire():
            holder = self.read_holder()
            if holder is not None and holder.owner == "serve":
                raise AgentRunningError(
                    f"Another Outpost agent (pid {holder.pid}) is already running on data dir "
                    f"{self.path.parent}; stop it first or give this one another data_dir."
                )
            if time.monotonic() >= deadline:
                who = f"pid {holder.pid}" if holder else "another process"
                raise DataDirLockedError(
                    f"Data dir {self.path.parent} is in use by {who}; try again when it is done."
                )
            time.sleep(0.05)

    def release(self) -> None:
        if self._fd is not None:
            with contextlib.suppress(OSError):
                os.ftruncate(self._fd, 0)
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None


def prepare_data_dir(data_dir: Path) -> Path:
    """Create the data dir with mode 0700 if needed, with a clear error if impossible."""
    data_dir = data_dir.expanduser()
    try:
        data_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    except OSError as exc:
        raise OutpostError(
            f"Cannot create data dir {data_dir}: {exc.strerror}; fix data_dir or its permissions."
        ) from None
    if not os.access(data_dir, os.W_OK | os.X_OK):
        raise OutpostError(f"Data dir {data_dir} is not writable by this user; fix its owner.")
    return data_dir


def _row_to_connection(row: sqlite3.Row) -> StoredConnection:
    return StoredConnection(
        slug=row["slug"],
        name=row["name"],
        driver=row["driver"],
        options_b64=b64(row["options"]),
        encrypted=bool(row["encrypted"]),
        created_at=row["created_at"],
        updated_at=row["updated_at"],
    )


def _row_to_route(row: sqlite3.Row) -> StoredRoute:
    return StoredRoute(
        database=row["database"],
        schema_name=row["schema_name"],
        user=row["user"],
        to=row["target"],
        secret_b64=b64(row["secret"]),
        encrypted=bool(row["encrypted"]),
        created_at=row["created_at"],
    )


def _insert_route(db: sqlite3.Connection, route: StoredRoute) -> None:
    db.execute(
        "INSERT INTO routes (database, schema_name, user, target, secret, encrypted, created_at)"
        " VALUES (?, ?, ?, ?, ?, ?, ?)",
        (
            route.database,
            route.schema_name,
            route.user,
            route.to,
            route.secret_blob,
            int(route.encrypted),
            route.created_at,
        ),
    )


def route_label(database: str, schema_name: str) -> str:
    """How a route is named in messages: database/schema."""
    return f"{database}/{schema_name}"


def _routes_to(db: sqlite3.Connection, slug: str) -> list[str]:
    rows = db.execute(
        "SELECT database, schema_name FROM routes WHERE target = ? ORDER BY database, schema_name",
        (slug,),
    ).fetchall()
    return [route_label(r[0], r[1]) for r in rows]


#: Public names for readers of the store file that do not hold the lock (the pooler).
connection_from_row = _row_to_connection
route_from_row = _row_to_route


def _get_meta(db: sqlite3.Connection, key: str) -> str | None:
    row = db.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
    return None if row is None else str(row[0])


def _set_meta(db: sqlite3.Connection, key: str, value: str | None) -> None:
    if value is None:
        db.execute("DELETE FROM meta WHERE key = ?", (key,))
    else:
        db.execute(
            "INSERT INTO meta (key, value) VALUES (?, ?) "
            "ON CONFLICT (key) DO UPDATE SET value = excluded.value",
            (key, value),
        )


def _require(db: sqlite3.Connection, slug: str) -> sqlite3.Row:
    row = db.execute("SELECT * FROM connections WHERE slug = ?", (slug,)).fetchone()
    if row is None:
        raise NotFoundError(
            f"No connection with slug {slug!r}; `outpost connections list` shows the slugs."
        )
    return row  # type: ignore[no-any-return]


def _check_name_free(db: sqlite3.Connection, name: str, slug: str | None = None) -> None:
    row = db.execute(
        "SELECT slug FROM connections WHERE lower(name) = lower(?)", (name,)
    ).fetchone()
    if row is not None and row[0] != slug:
        raise ConflictError(
            f"A connection named {name!r} already exists (slug {row[0]!r}); choose another name."
        )


def apply(db: sqlite3.Connection, command: Command) -> None:
    """Apply one command to the database. Deterministic: same state + command, same result.

    Runs inside the caller's transaction; raises before changing anything when the command
    does not fit the current state.
    """
    if isinstance(command, AddConnection):
        _check_name_free(db, command.name)
        if db.execute("SELECT 1 FROM connections WHERE slug = ?", (command.slug,)).fetchone():
            raise ConflictError(f"A connection with slug {command.slug!r} already exists.")
        db.execute(
            "INSERT INTO connections (slug, name, driver, options, encrypted, created_at,"
            " updated_at) VALUES (?, ?, ?, ?, ?, ?, ?)",
            (
                command.slug,
                command.name,
                command.driver,
                _blob(command.options_b64),
                int(command.encrypted),
                command.at,
                command.at,
            ),
        )
        if command.encrypted and command.key_id:
            _set_meta(db, "key_id", command.key_id)
    elif isinstance(command, RenameConnection):
        _require(db, command.slug)
        _check_name_free(db, command.name, command.slug)
        db.execute(
            "UPDATE connections SET name = ?, updated_at = ? WHERE slug = ?",
            (command.name, command.at, command.slug),
        )
    elif isinstance(command, UpdateConnectionOptions):
        _require(db, command.slug)
        db.execute(
            "UPDATE connections SET options = ?, encrypted = ?, updated_at = ? WHERE slug = ?",
            (_blob(command.options_b64), int(command.encrypted), command.at, command.slug),
        )
        if command.encrypted and command.key_id:
            _set_meta(db, "key_id", command.key_id)
    elif isinstance(command, DeleteConnection):
        _require(db, command.slug)
        routes = _routes_to(db, command.slug)
        if routes:
            shown = ", ".join(routes[:5]) + (
                f" and {len(routes) - 5} more" if len(routes) > 5 else ""
            )
            raise ConflictError(
                f"Connection {command.slug!r} is the destination of {len(routes)} pooler "
                f"route(s) ({shown}); remove them first with `outpost pooler routes remove "
                "--database D --schema S`."
            )
        db.execute("DELETE FROM connections WHERE slug = ?", (command.slug,))
        db.execute("DELETE FROM connection_status WHERE slug = ?", (command.slug,))
    elif isinstance(command, RekeyConnections):
        stored = {r[0] for r in db.execute("SELECT slug FROM connections")}
        given = {item.slug for item in command.items}
        if stored != given:
            raise ConflictError(
                "The connections changed while the key rotation was prepared; run it again."
            )
        stored_routes = {
            (r[0], r[1]) for r in db.execute("SELECT database, schema_name FROM routes")
        }
        if command.routes is None:
            if stored_routes:
                raise ConflictError(
                    f"{len(stored_routes)} pooler route(s) are stored and this key rotation "
                    "does not re-seal them; upgrade Outpost before rotating the key."
                )
        elif stored_routes != {(r.database, r.schema_name) for r in command.routes}:
            raise ConflictError(
                "The pooler routes changed while the key rotation was prepared; run it again."
            )
        for item in command.items:
            db.execute(
                "UPDATE connections SET options = ?, encrypted = ?, updated_at = ? WHERE slug = ?",
                (_blob(item.options_b64), int(item.encrypted), command.at, item.slug),
            )
        for route_item in command.routes or []:
            db.execute(
                "UPDATE routes SET secret = ?, encrypted = ?"
                " WHERE database = ? AND schema_name = ?",
                (
                    _blob(route_item.secret_b64),
                    int(route_item.encrypted),
                    route_item.database,
                    route_item.schema_name,
                ),
            )
        _set_meta(db, "key_id", command.key_id)
    elif isinstance(command, RestoreConnections):
        if _get_meta(db, "started_at") is not None:
            raise ConflictError(
                "This data dir has already been started; a restore needs a new one."
            )
        if (
            db.execute("SELECT count(*) FROM connections").fetchone()[0]
            or db.execute("SELECT count(*) FROM routes").fetchone()[0]
        ):
            raise ConflictError(
                "This data dir already holds connections; a restore needs a new one."
            )
        slugs = {c.slug for c in command.connections}
        for route in command.routes:
            if route.to not in slugs:
                raise ConflictError(
                    f"The backup's pooler route {route_label(route.database, route.schema_name)} "
                    f"leads to connection {route.to!r}, which the backup lacks; nothing was "
                    "restored."
                )
        for c in command.connections:
            db.execute(
                "INSERT INTO connections (slug, name, driver, options, encrypted, created_at,"
                " updated_at) VALUES (?, ?, ?, ?, ?, ?, ?)",
                (
                    c.slug,
                    c.name,
                    c.driver,
                    c.options_blob,
                    int(c.encrypted),
                    c.created_at,
                    c.updated_at,
                ),
            )
        for route in command.routes:
            _insert_route(db, route)
        _set_meta(db, "key_id", command.key_id)
        _set_meta(db, "restored_at", repr(command.at))
    elif isinstance(command, AddRoute):
        route = command.route
        label = route_label(route.database, route.schema_name)
        target = db.execute("SELECT driver FROM connections WHERE slug = ?", (route.to,)).fetchone()
        if target is None:
            raise NotFoundError(
                f"No connection with slug {route.to!r} for pooler route {label}; "
                "`outpost connections list` shows the slugs."
            )
        if target[0] not in ROUTE_DRIVERS:
            raise ConflictError(
                f"Connection {route.to!r} is a {target[0]} connection; a pooler route must lead "
                f"to a {' or '.join(ROUTE_DRIVERS)} connection."
            )
        if db.execute(
            "SELECT 1 FROM routes WHERE database = ? AND schema_name = ?",
            (route.database, route.schema_name),
        ).fetchone():
            raise ConflictError(
                f"A pooler route for database {route.database!r} and schema "
                f"{route.schema_name!r} already exists; remove it first to replace it."
            )
        _insert_route(db, route)
        if route.encrypted and command.key_id:
            _set_meta(db, "key_id", command.key_id)
    elif isinstance(command, RemoveRoute):
        if not db.execute(
            "DELETE FROM routes WHERE database = ? AND schema_name = ?",
            (command.database, command.schema_name),
        ).rowcount:
            raise NotFoundError(
                f"No pooler route for database {command.database!r} and schema "
                f"{command.schema_name!r}; `outpost pooler routes list` shows them."
            )
    elif isinstance(command, MarkStarted):
        if _get_meta(db, "started_at") is None:
            _set_meta(db, "started_at", repr(command.at))
    else:  # pragma: no cover - the Command union is closed
        raise TypeError(f"unknown command {command!r}")


def _blob(options_b64: str) -> bytes:
    return base64.b64decode(options_b64)


class Store:
    """The data dir: its lock, its database and the reads the agent needs."""

    def __init__(self, data_dir: Path, *, owner: Owner = "cli", wait_for_cli: float = 10.0):
        self.data_dir = prepare_data_dir(data_dir)
        self.path = self.data_dir / DB_NAME
        self._lock = DataDirLock(self.data_dir, owner)
        self._lock.acquire(wait_for_cli=wait_for_cli)
        self._mutex = threading.RLock()
        try:
            self._db = self._open()
        except BaseException:
            self._lock.release()
            raise

    def _open(self) -> sqlite3.Connection:
        try:
            db = sqlite3.connect(
                self.path, isolation_level=None, check_same_thread=False, timeout=10
            )
            db.row_factory = sqlite3.Row
            db.execute("PRAGMA journal_mode=WAL")
            db.execute("PRAGMA synchronous=FULL")
            db.execute("PRAGMA foreign_keys=ON")
            ok = db.execute("PRAGMA quick_check").fetchone()[0]
            if ok != "ok":
                raise OutpostError(
                    f"The store {self.path} is damaged ({ok}); restore it from a backup."
                )
            db.executescript(_SCHEMA)
        except sqlite3.DatabaseError as exc:
            raise OutpostError(
                f"The store {self.path} cannot be opened ({exc}); restore it from a backup."
            ) from None
        os.chmod(self.path, 0o600)
        version = _get_meta(db, "schema_version")
        if version is None:
            db.execute("BEGIN IMMEDIATE")
            _set_meta(db, "schema_version", str(SCHEMA_VERSION))
            _set_meta(db, "created_at", repr(time.time()))
            _set_meta(db, "applied_index", "0")
            db.execute("COMMIT")
        elif int(version) > SCHEMA_VERSION:
            raise OutpostError(
                f"The store {self.path} was written by a newer Outpost (schema {version}); "
                "upgrade Outpost."
            )
        return db

    def close(self) -> None:
        with self._mutex:
            with contextlib.suppress(sqlite3.Error):
                self._db.close()
            self._lock.release()

    def __enter__(self) -> Store:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @contextlib.contextmanager
    def _transaction(self) -> Iterator[sqlite3.Connection]:
        with self._mutex:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                yield self._db
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            else:
                self._db.execute("COMMIT")

    def apply(self, command: Command) -> int:
        """Apply COMMAND in its own transaction; returns the new applied index."""
        with self._transaction() as db:
            apply(db, command)
            index = int(_get_meta(db, "applied_index") or 0) + 1
            _set_meta(db, "applied_index", str(index))
            return index

    # --- reads -------------------------------------------------------------------------

    def connections(self) -> list[StoredConnection]:
        with self._mutex:
            rows = self._db.execute("SELECT * FROM connections ORDER BY lower(name)").fetchall()
        return [_row_to_connection(r) for r in rows]

    def connection(self, slug: str) -> StoredConnection:
        with self._mutex:
            return _row_to_connection(_require(self._db, slug))

    def routes(self) -> list[StoredRoute]:
        with self._mutex:
            rows = self._db.execute(
                "SELECT * FROM routes ORDER BY database, schema_name"
            ).fetchall()
        return [_row_to_route(r) for r in rows]

    def slugs(self) -> set[str]:
        with self._mutex:
            return {r[0] for r in self._db.execute("SELECT slug FROM connections")}

    def status(self, slug: str) -> ConnectionStatus | None:
        with self._mutex:
            row = self._db.execute(
                "SELECT * FROM connection_status WHERE slug = ?", (slug,)
            ).fetchone()
        if row is None:
            return None
        return ConnectionStatus(
            up=bool(row["up"]),
            checked_at=row["checked_at"],
            error=row["error"],
            server_version=row["server_version"],
            duration_seconds=row["duration_seconds"],
        )

    def record_status(
        self,
        slug: str,
        *,
        up: bool,
        checked_at: float,
        error: str | None,
        server_version: str | None,
        duration_seconds: float | None,
    ) -> None:
        """Remember the last check of SLUG (a local observation, not a replicated command)."""
        with self._transaction() as db:
            if db.execute("SELECT 1 FROM connections WHERE slug = ?", (slug,)).fetchone():
                db.execute(
                    "INSERT OR REPLACE INTO connection_status VALUES (?, ?, ?, ?, ?, ?)",
                    (slug, int(up), checked_at, error, server_version, duration_seconds),
                )

    def meta(self, key: str) -> str | None:
        with self._mutex:
            return _get_meta(self._db, key)

    @property
    def key_id(self) -> str | None:
        return self.meta("key_id")

    @property
    def started_at(self) -> float | None:
        value = self.meta("started_at")
        return None if value is None else float(value)

    @property
    def applied_index(self) -> int:
        return int(self.meta("applied_index") or 0)
