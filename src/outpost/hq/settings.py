"""HQ's run-time settings: where its data lives, how it listens, its limits."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from sqlalchemy.engine import URL, make_url
from sqlalchemy.exc import ArgumentError

from outpost.errors import UsageError

DEFAULT_DATA_DIR = "./outpost-hq"
SIGNING_KEY_FILE = "signing.key"
SQLITE_FILE = "hq.sqlite"


def database_url(database: str | None, data_dir: Path) -> URL:
    """The SQLAlchemy URL for ``--database`` (default: SQLite in the data dir).

    ``postgresql://`` (and ``postgres://``) map to psycopg 3; ``sqlite:///PATH`` stays as is.
    """
    if not database:
        return URL.create("sqlite", database=str(data_dir / SQLITE_FILE))
    try:
        url = make_url(database)
    except ArgumentError:
        raise UsageError(
            "--database is not a database URL; use sqlite:///PATH or "
            "postgresql://USER@HOST:PORT/DB."
        ) from None
    backend = url.get_backend_name()
    if backend in ("postgresql", "postgres"):
        return url.set(drivername="postgresql+psycopg")
    if backend == "sqlite":
        if not url.database or url.database == ":memory:":
            raise UsageError("--database sqlite:// needs a file path: sqlite:///PATH.")
        return url.set(drivername="sqlite")
    raise UsageError(
        f"--database scheme {backend!r} is not supported; use sqlite:///PATH or postgresql://..."
    )


@dataclass
class HQSettings:
    data_dir: Path = Path(DEFAULT_DATA_DIR)
    database: str | None = None  # as given; None: SQLite in data_dir
    host: str = "127.0.0.1"
    port: int = 9700
    tls_cert: Path | None = None
    tls_key: Path | None = None
    retention_days: float = 30.0
    heartbeat_interval: float = 5.0
    max_concurrent_jobs: int = 4
    #: how long a running job may outlive started_at + timeout before it fails "timed out"
    timeout_grace: float = 10.0
    #: how often the sweeper looks for expired and timed-out jobs and silent agents
    sweep_interval: float = 1.0

    @property
    def url(self) -> URL:
        return database_url(self.database, self.data_dir)

    @property
    def signing_key_path(self) -> Path:
        return self.data_dir / SIGNING_KEY_FILE

    @property
    def retention_seconds(self) -> float:
        return self.retention_days * 86_400.0

    @property
    def dead_after(self) -> float:
        """A peer silent this long is dead (two heartbeat intervals)."""
        return 2.0 * self.heartbeat_interval
