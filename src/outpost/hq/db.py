"""HQ's database: the tables (SQLAlchemy Core) and ``Store``, the only code that touches them.

``Store`` is synchronous; the app calls it from a bounded thread pool (``Database.run``) so the
event loop never waits on the database. State changes of a job are guarded updates
(``... WHERE state IN (...)``), so two writers racing on one job cannot both win.
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import anyio
import anyio.to_thread
from sqlalchemy import (
    Boolean,
    Column,
    Engine,
    Float,
    ForeignKey,
    Index,
    Integer,
    MetaData,
    String,
    Table,
    Text,
    and_,
    create_engine,
    delete,
    event,
    func,
    insert,
    select,
    text,
    update,
)
from sqlalchemy.engine import URL, Connection, RowMapping
from sqlalchemy.exc import IntegrityError

from outpost.errors import ConflictError, NotFoundError
from outpost.protocol import FINAL_STATES, ConnectionMeta

T = TypeVar("T")

ACTIVE_STATES = ("sent", "running")
WAITING_STATES = ("queued", "sent")

metadata = MetaData()

hq_meta = Table(
    "hq_meta",
    metadata,
    Column("key", String(64), primary_key=True),
    Column("value", Text, nullable=False),
)

admins = Table(
    "admins",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("name", Text, nullable=False),
    Column("token_hash", String(64), nullable=False, unique=True),
    Column("created_at", Float, nullable=False),
)

agents = Table(
    "agents",
    metadata,
    Column("name", String(63), primary_key=True),
    Column("token_hash", String(64), nullable=False, unique=True),
    Column("revoked", Boolean, nullable=False),
    Column("created_at", Float, nullable=False),
    Column("last_seen", Float),
    Column("version", Text),
    Column("read_only", Boolean),
    Column("transport", String(16)),
)

connections = Table(
    "connections",
    metadata,
    Column("agent", String(63), ForeignKey("agents.name", ondelete="CASCADE"), primary_key=True),
    Column("slug", String(200), primary_key=True),
    Column("name", Text, nullable=False),
    Column("driver", Text, nullable=False),
    Column("up", Boolean),
    Column("checked_at", Float),
    Column("on_agent", Boolean, nullable=False),
    Column("declared", Boolean, nullable=False),
)

jobs = Table(
    "jobs",
    metadata,
    Column("id", String(36), primary_key=True),
    Column("agent", String(63), ForeignKey("agents.name", ondelete="CASCADE"), nullable=False),
    Column("connection", String(200), nullable=False),
    Column("kind", String(16), nullable=False),
    Column("state", String(16), nullable=False),
    Column("params", Text, nullable=False),
    Column("body", Text, nullable=False),
    Column("signature", Text, nullable=False),
    Column("created_at", Float, nullable=False),
    Column("sent_at", Float),
    Column("started_at", Float),
    Column("finished_at", Float),
    Column("expires_at", Float, nullable=False),
    Column("timeout", Float, nullable=False),
    Column("error", Text),
    Column("result", Text),
    Column("attempts", Integer, nullable=False),
    Column("row_count", Integer),
    Column("duration_seconds", Float),
    Index("ix_jobs_agent_state", "agent", "state"),
    Index("ix_jobs_state", "state"),
    Index("ix_jobs_created_at", "created_at"),
    Index("ix_jobs_finished_at", "finished_at"),
)

job_pages = Table(
    "job_pages",
    metadata,
    Column("job_id", String(36), ForeignKey("jobs.id", ondelete="CASCADE"), primary_key=True),
    Column("seq", Integer, primary_key=True),
    Column("first_row", Integer, nullable=False),
    Column("row_count", Integer, nullable=False),
    Column("data", Text, nullable=False),  # JSON array of rows
)


def dumps(value: Any) -> str:
    """JSON for a text column: ASCII only, so any string survives any backend."""
    return json.dumps(value, separators=(",", ":"))


def make_engine(url: URL) -> Engine:
    if url.get_backend_name() == "sqlite":
        engine = create_engine(url, connect_args={"timeout": 30})

        @event.listens_for(engine, "connect")
        def _pragmas(dbapi_conn: Any, _record: Any) -> None:
            cur = dbapi_conn.cursor()
            cur.execute("PRAGMA journal_mode=WAL")
            cur.execute("PRAGMA synchronous=NORMAL")
            cur.execute("PRAGMA busy_timeout=30000")
            cur.execute("PRAGMA foreign_keys=ON")
            cur.close()

        return engine
    return create_engine(
        url, pool_size=8, max_overflow=4, pool_pre_ping=True, connect_args={"connect_timeout": 10}
    )


@dataclass(frozen=True)
class AgentRow:
    name: str
    revoked: bool
    created_at: float
    last_seen: float | None
    version: str | None
    read_only: bool | None
    transport: str | None
    connections: int


@dataclass(frozen=True)
class Dispatch:
    """A job on its way to an agent: the stored signed body, sent as is on every attempt."""

    id: str
    kind: str
    state: str
    body: str
    signature: str


@dataclass(frozen=True)
class Ended:
    """A job that reached a final state (for metrics and waiters)."""

    id: str
    agent: str
    kind: str
    state: str
    previous: str
    duration: float | None


class Store:
    """Every read and write HQ does. Methods are blocking: call them through ``Database.run``."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine

    # -- meta and admins ---------------------------------------------------------------------

    def ping(self) -> None:
        with self.engine.connect() as conn:
            conn.execute(text("SELECT 1"))

    def hq_id(self) -> str:
        with self.engine.connect() as conn:
            value = conn.execute(select(hq_meta.c.value).where(hq_meta.c.key == "hq_id")).scalar()
        if value is None:  # pragma: no cover - the first migration writes it
            raise NotFoundError("HQ's database has no hq_id; run the migrations again.")
        return str(value)

    def create_admin(self, name: str, token_hash: str) -> None:
        with self.engine.begin() as conn:
            conn.execute(
                insert(admins).values(name=name, token_hash=token_hash, created_at=time.time())
            )

    def admin_exists(self, token_hash: str) -> bool:
        with self.engine.connect() as conn:
            found = conn.execute(
                select(admins.c.id).where(admins.c.token_hash == token_hash)
            ).first()
        return found is not None

    # -- agents ------------------------------------------------------------------------------

    def _agent_rows(self, conn: Connection, name: str | None = None) -> list[AgentRow]:
        count = (
            select(func.count())
            .where(and_(connections.c.agent == agents.c.name, connections.c.on_agent))
            .scalar_subquery()
        )
        query = select(agents, count.label("n")).order_by(agents.c.name)
        if name is not None:
            query = query.where(agents.c.name == name)
        return [
            AgentRow(
                name=r["name"],
                revoked=bool(r["revoked"]),
                created_at=r["created_at"],
                last_seen=r["last_seen"],
                version=r["version"],
                read_only=r["read_only"],
                transport=r["transport"],
                connections=int(r["n"] or 0),
            )
            for r in conn.execute(query).mappings()
        ]

    def list_agents(self) -> list[AgentRow]:
        with self.engine.connect() as conn:
            return self._agent_rows(conn)

    def get_agent(self, name: str) -> AgentRow:
        with self.engine.connect() as conn:
            rows = self._agent_rows(conn, name)
        if not rows:
            raise NotFoundError(f"There is no agent {name!r}; list them with GET /api/v1/agents.")
        return rows[0]

    def create_agent(self, name: str, token_hash: str) -> AgentRow:
        try:
            with self.engine.begin() as conn:
                conn.execute(
                    insert(agents).values(
                        name=name, token_hash=token_hash, revoked=False, created_at=time.time()
                    )
                )
        except IntegrityError:
            raise ConflictError(
                f"Agent {name!r} already exists; re-issue its token "
                f"(`outpost hq agents token {name}`, or POST /api/v1/agents/{name}/token)."
            ) from None
        return self.get_agent(name)

    def agent_by_token(self, token_hash: str) -> tuple[str, bool] | None:
        """(name, revoked) of the agent holding this token, or None."""
        with self.engine.connect() as conn:
            row = conn.execute(
                select(agents.c.name, agents.c.revoked).where(agents.c.token_hash == token_hash)
            ).first()
        return None if row is None else (str(row[0]), bool(row[1]))

    def set_revoked(self, name: str, token_hash: str | None = None) -> AgentRow:
        """Revoke the agent's token, or (``token_hash`` given) replace it and un-revoke."""
        values: dict[str, Any] = {"revoked": token_hash is None}
        if token_hash is not None:
            values["token_hash"] = token_hash
        with self.engine.begin() as conn:
            done = conn.execute(update(agents).where(agents.c.name == name).values(**values))
        if done.rowcount == 0:
            raise NotFoundError(f"There is no agent {name!r}; list them with GET /api/v1/agents.")
        return self.get_agent(name)

    def agent_seen(
        self,
        name: str,
        *,
        last_seen: float,
        version: str | None = None,
        read_only: bool | None = None,
        transport: str | None = None,
    ) -> None:
        values: dict[str, Any] = {"last_seen": last_seen}
        if version is not None:
            values.update(version=version, read_only=read_only, transport=transport)
        with self.engine.begin() as conn:
            conn.execute(update(agents).where(agents.c.name == name).values(**values))

    # -- connections -------------------------------------------------------------------------

    def report_connections(self, agent: str, metas: Sequence[ConnectionMeta]) -> None:
        """The agent's full list: what it reports is on_agent; declared-only ones stay."""
        reported = {m.slug: m for m in metas}
        with self.engine.begin() as conn:
            existing = {
                r["slug"]: r
                for r in conn.execute(
                    select(connections).where(connections.c.agent == agent)
                ).mappings()
            }
            for slug, row in existing.items():
                if slug in reported:
                    continue
                if row["declared"]:
                    if row["on_agent"]:
                        conn.execute(
                            update(connections)
                            .where(connections.c.agent == agent, connections.c.slug == slug)
                            .values(on_agent=False, up=None, checked_at=None)
                        )
                else:
                    conn.execute(
                        delete(connections).where(
                            connections.c.agent == agent, connections.c.slug == slug
                        )
                    )
            for slug, meta in reported.items():
                values = {
                    "name": meta.name,
                    "driver": meta.driver,
                    "up": meta.up,
                    "checked_at": meta.checked_at,
                    "on_agent": True,
                }
                if slug in existing:
                    conn.execute(
                        update(connections)
                        .where(connections.c.agent == agent, connections.c.slug == slug)
                        .values(**values)
                    )
                else:
                    conn.execute(
                        insert(connections).values(agent=agent, slug=slug, declared=False, **values)
                    )

    def list_connections(self, agent: str | None = None) -> list[RowMapping]:
        query = select(connections).order_by(connections.c.agent, connections.c.slug)
        if agent is not None:
            query = query.where(connections.c.agent == agent)
        with self.engine.connect() as conn:
            return list(conn.execute(query).mappings())

    def declare_connection(self, agent: str, slug: str, name: str, driver: str) -> RowMapping:
        self.get_agent(agent)
        where = and_(connections.c.agent == agent, connections.c.slug == slug)
        with self.engine.begin() as conn:
            row = conn.execute(select(connections).where(where)).mappings().first()
            if row is None:
                conn.execute(
                    insert(connections).values(
                        agent=agent,
                        slug=slug,
                        name=name,
                        driver=driver,
                        on_agent=False,
                        declared=True,
                    )
                )
            elif row["on_agent"]:  # the agent's own name and driver win
                conn.execute(update(connections).where(where).values(declared=True))
            else:
                conn.execute(
                    update(connections).where(where).values(name=name, driver=driver, declared=True)
                )
            found = conn.execute(select(connections).where(where)).mappings().first()
        assert found is not None
        return found

    def undeclare_connection(self, agent: str, slug: str) -> None:
        where = and_(connections.c.agent == agent, connections.c.slug == slug)
        with self.engine.begin() as conn:
            row = conn.execute(select(connections).where(where)).mappings().first()
            if row is None or not row["declared"]:
                raise NotFoundError(
                    f"Agent {agent!r} has no connection {slug!r} declared at HQ; "
                    "list them with GET /api/v1/connections."
                )
            if row["on_agent"]:
                conn.execute(update(connections).where(where).values(declared=False))
            else:
                conn.execute(delete(connections).where(where))

    # -- jobs: the API side ------------------------------------------------------------------

    def create_job(
        self,
        *,
        job_id: str,
        agent: str,
        connection: str,
        kind: str,
        params: dict[str, Any],
        body: str,
        signature: str,
        created_at: float,
        expires_at: float,
        timeout: float,
    ) -> RowMapping:
        with self.engine.begin() as conn:
            conn.execute(
                insert(jobs).values(
                    id=job_id,
                    agent=agent,
                    connection=connection,
                    kind=kind,
                    state="queued",
                    params=dumps(params),
                    body=body,
                    signature=signature,
                    created_at=created_at,
                    expires_at=expires_at,
                    timeout=timeout,
                    attempts=0,
                )
            )
        return self.get_job(job_id)

    def get_job(self, job_id: str) -> RowMapping:
        with self.engine.connect() as conn:
            row = conn.execute(select(jobs).where(jobs.c.id == job_id)).mappings().first()
        if row is None:
            raise NotFoundError(f"There is no job {job_id!r}; list jobs with GET /api/v1/jobs.")
        return row

    def list_jobs(
        self,
        *,
        agent: str | None = None,
        connection: str | None = None,
        state: str | None = None,
        kind: str | None = None,
        before: float | None = None,
        limit: int = 50,
    ) -> list[RowMapping]:
        query = select(jobs).order_by(jobs.c.created_at.desc(), jobs.c.id.desc()).limit(limit)
        for column, value in (
            (jobs.c.agent, agent),
            (jobs.c.connection, connection),
            (jobs.c.state, state),
            (jobs.c.kind, kind),
        ):
            if value is not None:
                query = query.where(column == value)
        if before is not None:
            query = query.where(jobs.c.created_at < before)
        with self.engine.connect() as conn:
            return list(conn.execute(query).mappings())

    def pages(self, job_id: str, offset: int, limit: int) -> list[tuple[int, str]]:
        """(first_row, JSON rows) of the pages overlapping rows [offset, offset + limit)."""
        query = (
            select(job_pages.c.first_row, job_pages.c.data)
            .where(
                job_pages.c.job_id == job_id,
                job_pages.c.first_row < offset + limit,
                job_pages.c.first_row + job_pages.c.row_count > offset,
            )
            .order_by(job_pages.c.seq)
        )
        with self.engine.connect() as conn:
            return [(int(r[0]), str(r[1])) for r in conn.execute(query)]

    def stored_rows(self, job_id: str) -> int:
        query = select(func.coalesce(func.max(job_pages.c.first_row + job_pages.c.row_count), 0))
        with self.engine.connect() as conn:
            return int(conn.execute(query.where(job_pages.c.job_id == job_id)).scalar() or 0)

    def cancel_waiting(self, job_id: str, now: float) -> Ended | None:
        """queued/sent -> cancelled; None when the job was not waiting."""
        return self._end(job_id, None, WAITING_STATES, "cancelled", now, "cancelled by an admin")

    def cancel_running(self, job_id: str, now: float) -> Ended | None:
        """running -> cancelled, for a job whose agent is offline."""
        return self._end(
            job_id, None, ("running",), "cancelled", now, "cancelled by an admin while offline"
        )

    # -- jobs: the agent side ----------------------------------------------------------------

    def count_active(self, agent: str) -> int:
        query = select(func.count()).where(jobs.c.agent == agent, jobs.c.state.in_(ACTIVE_STATES))
        with self.engine.connect() as conn:
            return int(conn.execute(query).scalar() or 0)

    def claim_queued(self, agent: str, limit: int, now: float) -> list[Dispatch]:
        """Up to ``limit`` of the agent's oldest queued jobs, moved to sent."""
        if limit <= 0:
            return []
        claimed: list[Dispatch] = []
        with self.engine.begin() as conn:
            rows = conn.execute(
                select(jobs.c.id, jobs.c.kind, jobs.c.body, jobs.c.signature)
                .where(jobs.c.agent == agent, jobs.c.state == "queued", jobs.c.expires_at > now)
                .order_by(jobs.c.created_at, jobs.c.id)
                .limit(limit)
            ).all()
            for job_id, kind, body, signature in rows:
                done = conn.execute(
                    update(jobs)
                    .where(jobs.c.id == job_id, jobs.c.state == "queued")
                    .values(state="sent", sent_at=now, attempts=jobs.c.attempts + 1)
                )
                if done.rowcount:
                    claimed.append(Dispatch(job_id, kind, "sent", body, signature))
        return claimed

    def resend_active(self, agent: str, now: float) -> list[Dispatch]:
        """The agent's sent/running jobs, to send again on a new link (attempts + 1)."""
        with self.engine.begin() as conn:
            rows = conn.execute(
                select(jobs.c.id, jobs.c.kind, jobs.c.state, jobs.c.body, jobs.c.signature)
                .where(jobs.c.agent == agent, jobs.c.state.in_(ACTIVE_STATES))
                .order_by(jobs.c.created_at, jobs.c.id)
            ).all()
            if rows:
                conn.execute(
                    update(jobs)
                    .where(jobs.c.id.in_([r[0] for r in rows]), jobs.c.state.in_(ACTIVE_STATES))
                    .values(sent_at=now, attempts=jobs.c.attempts + 1)
                )
        return [Dispatch(r[0], r[1], r[2], r[3], r[4]) for r in rows]

    def job_state(self, agent: str, job_id: str) -> str | None:
        with self.engine.connect() as conn:
            value = conn.execute(
                select(jobs.c.state).where(jobs.c.id == job_id, jobs.c.agent == agent)
            ).scalar()
        return None if value is None else str(value)

    def mark_running(self, agent: str, job_id: str, now: float) -> str | None:
        """sent -> running. Returns the job's state before (None: not this agent's job)."""
        where = and_(jobs.c.id == job_id, jobs.c.agent == agent)
        with self.engine.begin() as conn:
            state = conn.execute(select(jobs.c.state).where(where)).scalar()
            if state == "sent":
                conn.execute(
                    update(jobs)
                    .where(where, jobs.c.state == "sent")
                    .values(state="running", started_at=func.coalesce(jobs.c.started_at, now))
                )
        return None if state is None else str(state)

    def store_page(self, agent: str, job_id: str, seq: int, data: str, count: int) -> bool:
        """Keep one chunk of rows; False when the job is not this agent's active job."""
        return self.store_pages(agent, [(job_id, seq, data, count)]) == 1

    def store_pages(self, agent: str, chunks: Sequence[tuple[str, int, str, int]]) -> int:
        """Keep chunks (job_id, seq, JSON rows, row count) in one transaction; returns how many
        were kept (chunks of jobs that are not this agent's active jobs are dropped). A chunk
        with seq 0 starts the job's result again: the pages stored before it go."""
        by_job: dict[str, list[tuple[int, str, int]]] = {}
        for job_id, seq, data, count in chunks:
            by_job.setdefault(job_id, []).append((seq, data, count))
        kept = 0
        with self.engine.begin() as conn:
            for job_id, items in by_job.items():
                state = conn.execute(
                    select(jobs.c.state).where(jobs.c.id == job_id, jobs.c.agent == agent)
                ).scalar()
                if state not in ACTIVE_STATES:
                    continue
                ends: dict[int, int] = {}  # seq -> first row after it
                pages: dict[int, dict[str, Any]] = {}
                for seq, data, count in items:
                    if seq == 0:
                        conn.execute(delete(job_pages).where(job_pages.c.job_id == job_id))
                        ends.clear()
                        pages.clear()
                        first = 0
                    elif seq - 1 in ends:
                        first = ends[seq - 1]
                    else:
                        first = self._end_of_page(conn, job_id, seq - 1)
                    ends[seq] = first + count
                    pages[seq] = {
                        "job_id": job_id,
                        "seq": seq,
                        "first_row": first,
                        "row_count": count,
                        "data": data,
                    }
                conn.execute(
                    delete(job_pages).where(
                        job_pages.c.job_id == job_id, job_pages.c.seq.in_(list(pages))
                    )
                )
                conn.execute(insert(job_pages), list(pages.values()))
                kept += len(pages)
        return kept

    @staticmethod
    def _end_of_page(conn: Connection, job_id: str, seq: int) -> int:
        end = conn.execute(
            select(job_pages.c.first_row + job_pages.c.row_count).where(
                job_pages.c.job_id == job_id, job_pages.c.seq == seq
            )
        ).scalar()
        if end is None:  # a gap: count what is there
            end = conn.execute(
                select(func.coalesce(func.sum(job_pages.c.row_count), 0)).where(
                    job_pages.c.job_id == job_id, job_pages.c.seq < seq
                )
            ).scalar()
        return int(end or 0)

    def finish(
        self,
        agent: str,
        job_id: str,
        *,
        state: str,
        now: float,
        result: dict[str, Any] | None,
        error: str | None,
        duration: float | None,
    ) -> Ended | None:
        """sent/running -> the agent's final state, with its result. None: not active."""
        return self._end(
            job_id, agent, ACTIVE_STATES, state, now, error, result=result, duration=duration
        )

    def reject(self, agent: str, job_id: str, reason: str, now: float) -> Ended | None:
        return self._end(
            job_id, agent, ACTIVE_STATES, "failed", now, f"rejected by agent: {reason}"
        )

    def _end(
        self,
        job_id: str,
        agent: str | None,
        from_states: Iterable[str],
        state: str,
        now: float,
        error: str | None,
        *,
        result: dict[str, Any] | None = None,
        duration: float | None = None,
    ) -> Ended | None:
        where = jobs.c.id == job_id
        if agent is not None:
            where = and_(where, jobs.c.agent == agent)
        allowed = tuple(from_states)
        with self.engine.begin() as conn:
            row = conn.execute(select(jobs.c.agent, jobs.c.kind, jobs.c.state).where(where)).first()
            if row is None or row[2] not in allowed:
                return None
            rows: int | None = None
            if state == "succeeded" or result is not None:
                rows = int(
                    conn.execute(
                        select(func.coalesce(func.sum(job_pages.c.row_count), 0)).where(
                            job_pages.c.job_id == job_id
                        )
                    ).scalar()
                    or 0
                )
            done = conn.execute(
                update(jobs)
                .where(where, jobs.c.state == row[2])
                .values(
                    state=state,
                    finished_at=now,
                    error=error,
                    result=None if result is None else dumps(result),
                    row_count=rows,
                    duration_seconds=duration,
                )
            )
            if not done.rowcount:
                return None
        return Ended(job_id, str(row[0]), str(row[1]), state, str(row[2]), duration)

    # -- the sweeper -------------------------------------------------------------------------

    def expire_due(self, now: float) -> list[Ended]:
        """queued/sent jobs past expires_at -> expired."""
        with self.engine.connect() as conn:
            ids = conn.execute(
                select(jobs.c.id).where(jobs.c.state.in_(WAITING_STATES), jobs.c.expires_at <= now)
            ).scalars()
            due = list(ids)
        ended = (
            self._end(j, None, WAITING_STATES, "expired", now, "not started before it expired")
            for j in due
        )
        return [e for e in ended if e is not None]

    def time_out_due(self, now: float, grace: float) -> list[Ended]:
        """running jobs past started_at + timeout + grace -> failed "timed out"."""
        with self.engine.connect() as conn:
            due = list(
                conn.execute(
                    select(jobs.c.id).where(
                        jobs.c.state == "running",
                        jobs.c.started_at + jobs.c.timeout + grace <= now,
                    )
                ).scalars()
            )
        ended = (self._end(j, None, ("running",), "failed", now, "timed out") for j in due)
        return [e for e in ended if e is not None]

    def delete_finished_before(self, cutoff: float) -> int:
        """Retention: delete final jobs (and their rows) that finished before ``cutoff``."""
        old = and_(jobs.c.state.in_(sorted(FINAL_STATES)), jobs.c.finished_at < cutoff)
        with self.engine.begin() as conn:
            ids = list(conn.execute(select(jobs.c.id).where(old)).scalars())
            for start in range(0, len(ids), 500):
                batch = ids[start : start + 500]
                conn.execute(delete(job_pages).where(job_pages.c.job_id.in_(batch)))
                conn.execute(delete(jobs).where(jobs.c.id.in_(batch)))
        return len(ids)


class Database:
    """The engine, the store, and the bounded thread pool the app calls the store through."""

    def __init__(self, url: URL) -> None:
        self.url = url
        self.engine = make_engine(url)
        self.store = Store(self.engine)
        # SQLite has one writer at a time: one thread avoids lock waits inside the process.
        workers = 1 if url.get_backend_name() == "sqlite" else 8
        self.limiter = anyio.CapacityLimiter(workers)

    async def run(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        return await anyio.to_thread.run_sync(lambda: fn(*args, **kwargs), limiter=self.limiter)

    def dispose(self) -> None:
        self.engine.dispose()


def new_job_id() -> str:
    return str(uuid.uuid4())
