"""The agent's memory of jobs: ``DATA_DIR/jobs.sqlite``.

It remembers every job id and nonce it accepted or refused, and the final messages of every
finished job until HQ acknowledges them (``ResultAck``), so that a job HQ delivers again is
never run twice: a finished one is answered with its stored result, a refused one is refused
again. Entries are kept until the job's expiry (or its end, whichever is later) plus a margin,
after which an old job would be refused as expired anyway.
"""

from __future__ import annotations

import contextlib
import sqlite3
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from outpost.errors import OutpostError

LEDGER_FILE = "jobs.sqlite"
#: seconds an id is remembered past the job's expiry (or its end)
KEEP_MARGIN = 24 * 3600.0

EntryState = Literal["running", "finished", "rejected"]

_SCHEMA = """
CREATE TABLE IF NOT EXISTS jobs (
    job_id TEXT PRIMARY KEY,
    nonce TEXT NOT NULL UNIQUE,
    state TEXT NOT NULL,
    reason TEXT,
    acked INTEGER NOT NULL DEFAULT 0,
    keep_until REAL NOT NULL,
    updated_at REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS messages (
    job_id TEXT NOT NULL REFERENCES jobs(job_id) ON DELETE CASCADE,
    seq INTEGER NOT NULL,
    body TEXT NOT NULL,
    PRIMARY KEY (job_id, seq)
);
"""


@dataclass(frozen=True)
class Entry:
    job_id: str
    state: EntryState
    reason: str | None
    acked: bool


class JobLedger:
    """Thread-safe; each call is one short transaction."""

    def __init__(self, data_dir: Path) -> None:
        self.path = data_dir / LEDGER_FILE
        self._lock = threading.Lock()
        try:
            self._db = sqlite3.connect(
                self.path, isolation_level=None, check_same_thread=False, timeout=10
            )
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=NORMAL")
            self._db.execute("PRAGMA foreign_keys=ON")
            self._db.executescript(_SCHEMA)
        except sqlite3.DatabaseError as exc:
            raise OutpostError(
                f"The job memory {self.path} cannot be opened ({exc}); stop the agent, move the "
                "file away and start it again (HQ may then deliver unfinished jobs once more)."
            ) from None
        self.path.chmod(0o600)

    def close(self) -> None:
        with self._lock, contextlib.suppress(sqlite3.Error):
            self._db.close()

    @contextlib.contextmanager
    def _tx(self) -> Iterator[sqlite3.Connection]:
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                yield self._db
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            self._db.execute("COMMIT")

    # --- reads ------------------------------------------------------------------------------

    def get(self, job_id: str) -> Entry | None:
        with self._lock:
            row = self._db.execute(
                "SELECT state, reason, acked FROM jobs WHERE job_id = ?", (job_id,)
            ).fetchone()
        if row is None:
            return None
        return Entry(job_id, row[0], row[1], bool(row[2]))

    def nonce_used(self, nonce: str) -> bool:
        with self._lock:
            row = self._db.execute("SELECT 1 FROM jobs WHERE nonce = ?", (nonce,)).fetchone()
        return row is not None

    def messages(self, job_id: str) -> list[str]:
        """The stored final messages (JSON) of a finished, unacknowledged job, in order."""
        with self._lock:
            rows = self._db.execute(
                "SELECT body FROM messages WHERE job_id = ? ORDER BY seq", (job_id,)
            ).fetchall()
        return [str(r[0]) for r in rows]

    def pending(self) -> list[str]:
        """Ids of jobs running, or finished with a result HQ has not acknowledged."""
        with self._lock:
            rows = self._db.execute(
                "SELECT job_id FROM jobs WHERE state = 'running' "
                "OR (state = 'finished' AND acked = 0) ORDER BY updated_at"
            ).fetchall()
        return [r[0] for r in rows]

    # --- writes -----------------------------------------------------------------------------

    def record(
        self,
        job_id: str,
        nonce: str,
        state: EntryState,
        *,
        expires_at: float,
        timeout: float,
        reason: str | None = None,
    ) -> None:
        """Remember a job the agent accepted (``running``) or refused (``rejected``)."""
        now = time.time()
        keep_until = max(expires_at, now + timeout) + KEEP_MARGIN
        with self._tx() as db:
            db.execute(
                "INSERT INTO jobs (job_id, nonce, state, reason, keep_until, updated_at) "
                "VALUES (?, ?, ?, ?, ?, ?)",
                (job_id, nonce, state, reason, keep_until, now),
            )

    def finish(self, job_id: str, messages: list[str]) -> None:
        """Store a job's final messages as JSON (result chunks, then ``job_finished``)."""
        now = time.time()
        with self._tx() as db:
            db.execute(
                "UPDATE jobs SET state = 'finished', acked = 0, updated_at = ?, "
                "keep_until = MAX(keep_until, ?) WHERE job_id = ?",
                (now, now + KEEP_MARGIN, job_id),
            )
            db.execute("DELETE FROM messages WHERE job_id = ?", (job_id,))
            db.executemany(
                "INSERT INTO messages (job_id, seq, body) VALUES (?, ?, ?)",
                ((job_id, i, m) for i, m in enumerate(messages)),
            )

    def ack(self, job_id: str) -> None:
        """HQ stored the result: forget it, keep the id."""
        with self._tx() as db:
            db.execute(
                "UPDATE jobs SET acked = 1, updated_at = ? WHERE job_id = ? AND state = 'finished'",
                (time.time(), job_id),
            )
            db.execute("DELETE FROM messages WHERE job_id = ?", (job_id,))

    def interrupted(self) -> list[str]:
        """Ids left ``running`` by an agent that stopped mid-job (to be failed, not re-run)."""
        with self._lock:
            rows = self._db.execute("SELECT job_id FROM jobs WHERE state = 'running'").fetchall()
        return [r[0] for r in rows]

    def purge(self, now: float | None = None) -> int:
        """Forget jobs past their keep time; returns how many."""
        now = time.time() if now is None else now
        with self._tx() as db:
            cursor = db.execute("DELETE FROM jobs WHERE keep_until < ?", (now,))
            return cursor.rowcount
