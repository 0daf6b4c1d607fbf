"""Shared fixtures: real servers (PostgreSQL, MariaDB) with skip-or-fail semantics.

Where a server is missing a test skips with its reason; OUTPOST_REQUIRE_SERVICES=1 (set by
.ci/run) turns such a skip into a failure.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import pytest

from tests import helpers

PG_DSN = os.environ.get("OUTPOST_TEST_PG_DSN", "postgresql://postgres@127.0.0.1:5432/test")
MYSQL_DSN = os.environ.get("OUTPOST_TEST_MYSQL_DSN", "mysql://root@127.0.0.1:3306/test")


def require_services() -> bool:
    return os.environ.get("OUTPOST_REQUIRE_SERVICES") == "1"


def service_missing(reason: str) -> None:
    """Skip the test, or fail it when OUTPOST_REQUIRE_SERVICES=1."""
    if require_services():
        pytest.fail(f"required service missing: {reason}")
    pytest.skip(reason)


@pytest.fixture(scope="session")
def pg_dsn() -> str:
    """DSN of the real PostgreSQL server (trust auth)."""
    import psycopg

    try:
        with psycopg.connect(PG_DSN, connect_timeout=5) as conn:
            conn.execute("SELECT 1")
    except psycopg.Error as exc:
        service_missing(f"PostgreSQL at {PG_DSN} is not reachable: {exc}")
    return PG_DSN


@pytest.fixture(scope="session")
def pg_params(pg_dsn: str) -> dict[str, object]:
    """The PostgreSQL DSN as driver options (host, port, user, database)."""
    u = urlparse(pg_dsn)
    return {
        "host": u.hostname or "127.0.0.1",
        "port": u.port or 5432,
        "user": u.username or "postgres",
        "database": (u.path or "/test").lstrip("/") or "test",
    }


@pytest.fixture(scope="session")
def mysql_dsn() -> str:
    """DSN of the real MariaDB/MySQL server (root, empty password)."""
    import pymysql

    params = _mysql_params(MYSQL_DSN)
    try:
        conn = pymysql.connect(
            host=str(params["host"]),
            port=int(str(params["port"])),
            user=str(params["user"]),
            password=str(params["password"]),
            database=str(params["database"]),
            connect_timeout=5,
        )
        conn.close()
    except pymysql.MySQLError as exc:
        service_missing(f"MariaDB/MySQL at {MYSQL_DSN} is not reachable: {exc}")
    return MYSQL_DSN


def _mysql_params(dsn: str) -> dict[str, object]:
    u = urlparse(dsn)
    return {
        "host": u.hostname or "127.0.0.1",
        "port": u.port or 3306,
        "user": u.username or "root",
        "password": u.password or "",
        "database": (u.path or "/test").lstrip("/") or "test",
    }


@pytest.fixture(scope="session")
def mysql_params(mysql_dsn: str) -> dict[str, object]:
    """The MariaDB DSN as driver options (host, port, user, password, database)."""
    return _mysql_params(mysql_dsn)


def mysql_admin(params: dict[str, object]) -> Any:
    """A root (autocommit) PyMySQL connection to the test server."""
    import pymysql

    return pymysql.connect(
        host=str(params["host"]),
        port=int(str(params["port"])),
        user=str(params["user"]),
        password=str(params["password"]),
        autocommit=True,
    )


class MariaUser:
    """A MariaDB user with a password, created for one test and dropped after it."""

    def __init__(self, params: dict[str, object]) -> None:
        self.params = params
        self.name = f"outpost_t_{uuid.uuid4().hex[:8]}"
        self.password = "Maria-Pw-" + uuid.uuid4().hex[:8]
        self._run("CREATE USER '{user}'@'{host}' IDENTIFIED BY %s", self.password)

    def _run(self, statement: str, *args: object) -> None:
        admin = mysql_admin(self.params)
        try:
            with admin.cursor() as cur:
                for host in ("%%", "localhost"):
                    cur.execute(statement.format(user=self.name, host=host), args or None)
        finally:
            admin.close()

    def set_password(self, password: str) -> None:
        self._run("ALTER USER '{user}'@'{host}' IDENTIFIED BY %s", password)
        self.password = password

    def drop(self) -> None:
        self._run("DROP USER IF EXISTS '{user}'@'{host}'")


@pytest.fixture
def maria_user(mysql_params: dict[str, object]) -> Iterator[MariaUser]:
    user = MariaUser(mysql_params)
    yield user
    user.drop()


@pytest.fixture
def clean_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Iterator[Path]:
    """No OUTPOST_* variables and a private HOME/XDG dirs, so no real config is found."""
    for name in list(os.environ):
        if (
            name.startswith("OUTPOST_")
            and not name.startswith("OUTPOST_TEST_")
            and (name != "OUTPOST_REQUIRE_SERVICES")
        ):
            monkeypatch.delenv(name)
    home = tmp_path / "home"
    home.mkdir()
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.setenv("XDG_CONFIG_HOME", str(home / ".config"))
    monkeypatch.setenv("XDG_DATA_HOME", str(home / ".local" / "share"))
    yield home


@pytest.fixture
def silent_listener() -> Iterator[int]:
    """A TCP port on 127.0.0.1 that accepts connections and never answers (for timeouts)."""
    with helpers.silent_listener() as port:
        yield port


@pytest.fixture
def cache_dir(tmp_path: Path) -> Path:
    """Where a driver keeps downloaded copies (not created in advance)."""
    return tmp_path / "cache"
