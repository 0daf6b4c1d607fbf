"""Connected agents and the jobs on their way to them.

One ``Session`` per connected agent, whatever the transport: HQ's messages for the agent go
into its queue; the WebSocket handler writes them out as they come, the long-poll handler hands
them over with the next poll. The ``Dispatcher`` sends queued jobs while the agent has fewer than
``max_concurrent_jobs`` sent/running, re-sends sent/running jobs on a new link (the same signed
body: the agent dedups by job id), applies the agent's messages to the jobs, and runs the
sweeper: heartbeats, dead links, expiry, run-time limits, retention.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
import uuid
from collections.abc import Awaitable, Callable

from outpost.hq.db import Database, Dispatch, Ended, dumps
from outpost.hq.metrics import HQMetrics
from outpost.hq.settings import HQSettings
from outpost.protocol import (
    FINAL_STATES,
    AgentMessage,
    CancelJob,
    ConnectionsReport,
    Disconnect,
    Error,
    Heartbeat,
    Hello,
    HQMessage,
    JobAccepted,
    JobFinished,
    JobRejected,
    ResultAck,
    ResultChunk,
    SignedJob,
    Welcome,
)

log = logging.getLogger("outpost.hq.dispatch")

#: WebSocket close codes HQ uses (4401 and its Error reason are part of the protocol)
CLOSE_UNAUTHORIZED = 4401
CLOSE_REPLACED = 4409
CLOSE_DEAD = 4408
CLOSE_GOING_AWAY = 1001

#: result chunks written to the database in one transaction (or this many bytes of rows)
CHUNK_BATCH = 25
CHUNK_BATCH_BYTES = 8 * 1024 * 1024


class Session:
    """One live link to one agent."""

    def __init__(self, agent: str, transport: str) -> None:
        self.id = uuid.uuid4().hex
        self.agent = agent
        self.transport = transport
        self.queue: asyncio.Queue[HQMessage | None] = asyncio.Queue()
        self.last_seen = time.monotonic()
        self.last_seen_wall = time.time()
        self.polls = 0  # long-polls being held right now
        self.closed = False
        #: result chunks not written yet: (job_id, seq, JSON rows, row count)
        self.chunks: list[tuple[str, int, str, int]] = []
        self.chunk_bytes = 0
        self.close_code = 1000
        self.close_reason = ""

    def touch(self) -> None:
        self.last_seen = time.monotonic()
        self.last_seen_wall = time.time()

    def send(self, message: HQMessage) -> None:
        if not self.closed:
            self.queue.put_nowait(message)

    def close(self, code: int = 1000, reason: str = "") -> None:
        """No more messages; the transport closes once what is queued is out."""
        if not self.closed:
            self.closed = True
            self.close_code, self.close_reason = code, reason
            self.queue.put_nowait(None)

    def drain(self) -> list[HQMessage]:
        """Everything queued right now (the long-poll's answer)."""
        out: list[HQMessage] = []
        while not self.queue.empty():
            item = self.queue.get_nowait()
            if item is None:
                self.queue.put_nowait(None)  # keep the end mark for any other poll
                break
            out.append(item)
        return out


def error_reason(code: str, message: str) -> str:
    """An ``Error`` as a WebSocket close reason (at most 123 bytes)."""
    text = Error(code=code, message=message).model_dump_json()
    return text if len(text.encode()) <= 123 else Error(code=code, message="").model_dump_json()


class Dispatcher:
    def __init__(self, db: Database, settings: HQSettings) -> None:
        self.db = db
        self.store = db.store
        self.settings = settings
        self.sessions: dict[str, Session] = {}
        self.metrics = HQMetrics(lambda: len(self.sessions))
        self._locks: dict[str, asyncio.Lock] = {}
        self._watchers: dict[str, set[asyncio.Event]] = {}
        self._cancel_requested: set[str] = set()
        self._tasks: list[asyncio.Task[None]] = []
        self.stopping = asyncio.Event()

    # -- presence ----------------------------------------------------------------------------

    def session(self, agent: str) -> Session | None:
        session = self.sessions.get(agent)
        return session if session is not None and not session.closed else None

    def welcome(self, agent: str) -> Welcome:
        return Welcome(
            agent_name=agent,
            heartbeat_interval=self.settings.heartbeat_interval,
            max_concurrent_jobs=self.settings.max_concurrent_jobs,
        )

    async def open_session(self, agent: str, transport: str, hello: Hello | None) -> Session:
        """A new link: replaces the agent's old one, sends Welcome, re-sends its active jobs."""
        old = self.sessions.get(agent)
        if old is not None:
            old.close(CLOSE_REPLACED, error_reason("replaced", "a newer link took over"))
        session = Session(agent, transport)
        self.sessions[agent] = session
        session.send(self.welcome(agent))
        now = time.time()
        if hello is not None:
            await self.db.run(
                self.store.agent_seen,
                agent,
                last_seen=now,
                version=hello.agent_version,
                read_only=hello.read_only,
                transport=transport,
            )
            await self.db.run(self.store.report_connections, agent, hello.connections)
        else:
            await self.db.run(self.store.agent_seen, agent, last_seen=now)
        async with self._lock(agent):
            resent = await self.db.run(self.store.resend_active, agent, now)
            for job in resent:
                session.send(SignedJob(body=job.body, signature=job.signature))
                if job.id in self._cancel_requested:
                    session.send(CancelJob(job_id=job.id))
        if hello is not None:
            active = {job.id for job in resent}
            for job_id in hello.running:
                if job_id not in active:
                    # HQ has ended it (finished, cancelled, timed out) or never knew it: stop it
                    # if it still runs, and forget a result HQ has already stored
                    session.send(CancelJob(job_id=job_id))
                    session.send(ResultAck(job_id=job_id))
        log.info(
            "agent %s connected over %s (%d job(s) re-sent)",
            agent,
            transport,
            len(resent),
            extra={"agent": agent, "transport": transport},
        )
        await self.pump(agent)
        return session

    async def close_session(self, session: Session, code: int = 1000, reason: str = "") -> None:
        """The link is gone (or HQ cuts it): the agent is offline unless a newer link exists."""
        session.close(code, reason)
        with contextlib.suppress(Exception):
            await self.flush(session)
        if self.sessions.get(session.agent) is session:
            del self.sessions[session.agent]
            log.info("agent %s disconnected", session.agent, extra={"agent": session.agent})
            with contextlib.suppress(Exception):
                await self.db.run(
                    self.store.agent_seen, session.agent, last_seen=session.last_seen_wall
                )

    async def disconnect(self, agent: str, code: str, reason: str) -> None:
        """Cut the agent off for good: it gets Disconnect, then the link closes."""
        session = self.sessions.get(agent)
        if session is None:
            return
        session.send(Disconnect(code=code, reason=reason))
        await self.close_session(session, CLOSE_UNAUTHORIZED, error_reason(code, reason))

    # -- jobs --------------------------------------------------------------------------------

    def _lock(self, agent: str) -> asyncio.Lock:
        lock = self._locks.get(agent)
        if lock is None:
            lock = self._locks[agent] = asyncio.Lock()
        return lock

    async def pump(self, agent: str) -> None:
        """Send the agent queued jobs while it has room (max_concurrent_jobs)."""
        if self.session(agent) is None:
            return
        async with self._lock(agent):
            session = self.session(agent)
            if session is None:
                return
            active = await self.db.run(self.store.count_active, agent)
            room = self.settings.max_concurrent_jobs - active
            if room <= 0:
                return
            claimed: list[Dispatch] = await self.db.run(
                self.store.claim_queued, agent, room, time.time()
            )
            for job in claimed:
                session.send(SignedJob(body=job.body, signature=job.signature))
                self.metrics.job_state(job.kind, "sent")
                self.notify(job.id)

    def job_created(self, job_id: str, kind: str) -> None:
        self.metrics.job_state(kind, "queued")
        self.notify(job_id)

    def ended(self, ended: Ended) -> None:
        self.metrics.job_state(ended.kind, ended.state)
        if ended.duration is not None and ended.state == "succeeded":
            self.metrics.job_duration.labels(ended.kind).observe(ended.duration)
        self._cancel_requested.discard(ended.id)
        self.notify(ended.id)

    async def cancel(self, job_id: str) -> bool:
        """Cancel a job that is not final. False when it already was (the API says 409)."""
        for _ in range(3):  # the state can move under us; try again with the new one
            row = await self.db.run(self.store.get_job, job_id)
            state, agent = row["state"], row["agent"]
            if state in FINAL_STATES:
                return False
            now = time.time()
            if state in ("queued", "sent"):
                ended = await self.db.run(self.store.cancel_waiting, job_id, now)
                if ended is None:
                    continue
                self.ended(ended)
                session = self.session(agent)
                if ended.previous == "sent" and session is not None:
                    session.send(CancelJob(job_id=job_id))
                await self.pump(agent)
                return True
            session = self.session(agent)
            if session is not None:
                self._cancel_requested.add(job_id)
                session.send(CancelJob(job_id=job_id))
                return True
            ended = await self.db.run(self.store.cancel_running, job_id, now)
            if ended is not None:
                self.ended(ended)
                return True
        return True

    # -- waiting for a job -------------------------------------------------------------------

    def notify(self, job_id: str) -> None:
        for event in self._watchers.pop(job_id, set()):
            event.set()

    async def wait_change(
        self, job_id: str, timeout: float, check: Callable[[], Awaitable[bool]]
    ) -> None:
        """Return once ``check()`` is true or ``timeout`` has passed; checks after every change."""
        deadline = time.monotonic() + timeout
        while True:
            event = asyncio.Event()
            self._watchers.setdefault(job_id, set()).add(event)
            try:
                if await check():
                    return
                remaining = deadline - time.monotonic()
                if remaining <= 0 or self.stopping.is_set():
                    return
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(event.wait(), min(remaining, 5.0))
            finally:
                watchers = self._watchers.get(job_id)
                if watchers is not None:
                    watchers.discard(event)
                    if not watchers:
                        del self._watchers[job_id]

    # -- the agent's messages ----------------------------------------------------------------

    async def flush(self, session: Session) -> None:
        """Write the result chunks received so far (one transaction)."""
        if session.chunks:
            chunks, session.chunks, session.chunk_bytes = session.chunks, [], 0
            await self.db.run(self.store.store_pages, session.agent, chunks)

    async def handle(self, session: Session, message: AgentMessage) -> None:
        session.touch()
        agent = session.agent
        now = time.time()
        if isinstance(message, Heartbeat):
            return
        if isinstance(message, ResultChunk):
            # Chunks are written in batches: one transaction per CHUNK_BATCH chunks, and
            # always before the next message of another kind (JobFinished reads them).
            data = dumps(message.rows)
            session.chunks.append((message.job_id, message.seq, data, len(message.rows)))
            session.chunk_bytes += len(data)
            if len(session.chunks) >= CHUNK_BATCH or session.chunk_bytes >= CHUNK_BATCH_BYTES:
                await self.flush(session)
            return
        await self.flush(session)
        if isinstance(message, JobFinished):
            ended = await self.db.run(
                self.store.finish,
                agent,
                message.job_id,
                state=message.state,
                now=now,
                result=message.result,
                error=message.error,
                duration=message.duration_seconds,
            )
            session.send(ResultAck(job_id=message.job_id))
            if ended is not None:
                self.ended(ended)
                await self.pump(agent)
            return
        if isinstance(message, JobAccepted):
            previous = await self.db.run(self.store.mark_running, agent, message.job_id, now)
            if previous is None:
                log.warning("agent %s accepted unknown job %s", agent, message.job_id)
            elif previous in FINAL_STATES:
                session.send(CancelJob(job_id=message.job_id))
            elif previous == "sent":
                row = await self.db.run(self.store.get_job, message.job_id)
                self.metrics.job_state(row["kind"], "running")
                self.notify(message.job_id)
                if message.job_id in self._cancel_requested:
                    session.send(CancelJob(job_id=message.job_id))
            return
        if isinstance(message, JobRejected):
            ended = await self.db.run(self.store.reject, agent, message.job_id, message.reason, now)
            if ended is not None:
                self.ended(ended)
                await self.pump(agent)
            return
        if isinstance(message, ConnectionsReport):
            await self.db.run(self.store.report_connections, agent, message.connections)
            return
        if isinstance(message, Hello):  # a second Hello on a live link: new metadata
            await self.db.run(
                self.store.agent_seen,
                agent,
                last_seen=now,
                version=message.agent_version,
                read_only=message.read_only,
                transport=session.transport,
            )
            await self.db.run(self.store.report_connections, agent, message.connections)

    # -- background work ---------------------------------------------------------------------

    def start(self) -> None:
        self._tasks = [
            asyncio.create_task(self._loop(self.settings.sweep_interval, self.sweep)),
            asyncio.create_task(self._loop(self.settings.heartbeat_interval, self.heartbeat)),
            asyncio.create_task(self._loop(self._retention_interval(), self.retention)),
        ]

    def _retention_interval(self) -> float:
        return min(3600.0, max(1.0, self.settings.retention_seconds / 10))

    async def stop(self) -> None:
        self.stopping.set()
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        for session in list(self.sessions.values()):
            await self.close_session(session, CLOSE_GOING_AWAY, "HQ is shutting down")
        for events in self._watchers.values():
            for event in events:
                event.set()

    async def _loop(self, interval: float, step: Callable[[], Awaitable[None]]) -> None:
        while True:
            try:
                await step()
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("HQ background task %s failed; retrying", step.__name__)
            await asyncio.sleep(interval)

    async def heartbeat(self) -> None:
        now = time.time()
        for session in list(self.sessions.values()):
            if session.transport == "websocket":
                session.send(Heartbeat(sent_at=now))

    async def sweep(self) -> None:
        """Dead links, expired jobs, jobs past their run-time limit."""
        dead_after = self.settings.dead_after
        mono = time.monotonic()
        for link in list(self.sessions.values()):
            held = link.transport == "poll" and link.polls > 0
            if not held and mono - link.last_seen > dead_after:
                log.warning(
                    "agent %s silent for more than %.0f s: marking it offline",
                    link.agent,
                    dead_after,
                    extra={"agent": link.agent},
                )
                await self.close_session(
                    link, CLOSE_DEAD, error_reason("heartbeat_timeout", "no heartbeat")
                )
        now = time.time()
        touched: set[str] = set()
        for ended in await self.db.run(self.store.expire_due, now):
            self.ended(ended)
            touched.add(ended.agent)
            session = self.session(ended.agent)
            if ended.previous == "sent" and session is not None:
                session.send(CancelJob(job_id=ended.id))
        timed_out = await self.db.run(self.store.time_out_due, now, self.settings.timeout_grace)
        for ended in timed_out:
            self.ended(ended)
            touched.add(ended.agent)
            session = self.session(ended.agent)
            if session is not None:
                session.send(CancelJob(job_id=ended.id))
        for agent in touched:
            await self.pump(agent)

    async def retention(self) -> None:
        cutoff = time.time() - self.settings.retention_seconds
        deleted = await self.db.run(self.store.delete_finished_before, cutoff)
        if deleted:
            log.info("retention: deleted %d finished job(s) and their results", deleted)


def parse_agent_message(text: str | bytes) -> AgentMessage | None:
    """One agent frame, or None (logged) when it is not a message HQ knows."""
    from outpost.protocol import agent_message

    try:
        return agent_message.validate_json(text)
    except ValueError as exc:
        try:
            kind = json.loads(text).get("type")
        except (ValueError, AttributeError):
            kind = None
        log.warning("ignored a bad message from an agent (type %r): %s", kind, str(exc)[:200])
        return None
