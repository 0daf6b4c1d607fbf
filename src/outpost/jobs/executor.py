"""The job executor: runs ``test``, ``query`` and ``inspect`` jobs from HQ through the agent's
operations (``AgentService``), at most once per job id.

Blocking driver calls run in a bounded thread pool (``query.workers``). Each job has a time
limit (the job's ``timeout``, also handed to the driver as the statement timeout). The job
memory (``JobLedger``) survives restarts: a job delivered again is answered from it and never
run twice.

Stopping a running job. The service hands the executor every driver a job builds
(``on_driver``), collected in a :class:`JobDrivers`. When a job is stopped before its driver
call returns (``CancelJob`` from HQ, the job's timeout, or the agent stopping), the job ends at
once (``cancelled``, ``failed`` with the timeout, or ``failed`` as interrupted), and the
executor calls ``driver.cancel()`` from another thread: the statement is stopped on the
database server (PostgreSQL/Redshift: a protocol cancel request; MySQL/MariaDB: ``KILL
QUERY``; SQLite/CSV: an interrupt), so the pool thread is free again within moments. The cancel
is repeated every CANCEL_RETRY_SECONDS, at most CANCEL_ATTEMPTS times, while the call still
runs (it may have been between two statements); a driver that cannot cancel (SQL Server, or a
third-party driver keeping the default) runs on to its statement timeout, and its result is
discarded. On stop, ``close`` waits at most CLOSE_GRACE_SECONDS for the cancelled calls to end,
so that SIGTERM is quick.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import logging
import threading
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal

from outpost.errors import OutpostError
from outpost.jobs.checks import JobRefused, check_fresh, check_params
from outpost.jobs.ledger import Entry, JobLedger
from outpost.protocol import (
    CHUNK_ROWS,
    AgentMessage,
    JobAccepted,
    JobBody,
    JobFinished,
    JobRejected,
    ResultChunk,
    agent_message,
)

if TYPE_CHECKING:
    from outpost.api.service import AgentService
    from outpost.drivers.base import Driver

log = logging.getLogger("outpost.jobs")

Send = Callable[[AgentMessage], Awaitable[None]]
FinalState = Literal["succeeded", "failed", "cancelled"]

INTERRUPTED = "the agent stopped while the job ran; it is not run again"

#: Seconds between two cancel requests to a stopped job's driver while its call still runs.
CANCEL_RETRY_SECONDS = 1.0
#: Cancel requests sent to a stopped job's driver before leaving it to its statement timeout.
CANCEL_ATTEMPTS = 10
#: Seconds ``Executor.close`` waits for the driver calls of stopped jobs to end.
CLOSE_GRACE_SECONDS = 5.0


class JobDrivers:
    """The drivers one job's operation builds, so that another thread can stop them.

    Thread-safe: ``attach`` runs in the job's pool thread, ``cancel`` in another one. A driver
    attached after ``cancel`` is cancelled at once, so it starts no statement.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._drivers: list[Driver] = []
        self._cancelled = False

    def attach(self, driver: Driver) -> None:
        with self._lock:
            self._drivers.append(driver)
            cancelled = self._cancelled
        if cancelled:
            driver.cancel()

    def cancel(self) -> bool:
        """Cancel every attached driver; True when a cancel request reached a database."""
        with self._lock:
            self._cancelled = True
            drivers = list(self._drivers)
        sent = [driver.cancel() for driver in drivers]
        return any(sent)


@dataclass
class Outcome:
    """What a job produced: its final state, the non-row result, its rows, an error."""

    state: FinalState
    result: dict[str, Any] | None = None
    rows: list[list[Any]] = field(default_factory=list)
    error: str | None = None


def _consume(future: asyncio.Future[Outcome]) -> None:
    """Retrieve the late result of a stopped job's call (nobody else will)."""
    if not future.cancelled():
        future.exception()


async def discard(message: AgentMessage) -> None:
    """Where messages go while there is no link: nowhere (final results are in the ledger)."""


def final_messages(job_id: str, outcome: Outcome, duration: float) -> list[AgentMessage]:
    """``ResultChunk`` messages of CHUNK_ROWS rows each, then ``JobFinished``."""
    # model_construct: the rows come from a driver, already JSON values; no need to check them
    chunks: list[AgentMessage] = [
        ResultChunk.model_construct(
            type="result_chunk",
            job_id=job_id,
            seq=seq,
            rows=outcome.rows[start : start + CHUNK_ROWS],
        )
        for seq, start in enumerate(range(0, len(outcome.rows), CHUNK_ROWS))
    ]
    finished = JobFinished(
        job_id=job_id,
        state=outcome.state,
        finished_at=time.time(),
        duration_seconds=duration,
        result=outcome.result,
        error=outcome.error,
        chunks=len(chunks),
    )
    return [*chunks, finished]


class Executor:
    """Accepts verified jobs, runs them, and sends what they produce through ``send``."""

    def __init__(self, service: AgentService, ledger: JobLedger, *, workers: int) -> None:
        self.service = service
        self.ledger = ledger
        self.send: Send = discard
        self._pool = concurrent.futures.ThreadPoolExecutor(
            max_workers=workers, thread_name_prefix="outpost-job"
        )
        self._tasks: dict[str, asyncio.Task[None]] = {}
        self._cancels: dict[str, asyncio.Event] = {}
        self._stopping: set[asyncio.Task[None]] = set()
        self._admit = asyncio.Lock()
        self._closing = False

    # --- lifecycle ---------------------------------------------------------------------------

    def recover(self) -> None:
        """At start: fail the jobs a previous run left running (never run them again), and
        forget what has outlived its keep time."""
        for job_id in self.ledger.interrupted():
            outcome = Outcome("failed", error=INTERRUPTED)
            messages = final_messages(job_id, outcome, 0.0)
            self.ledger.finish(job_id, [m.model_dump_json() for m in messages])
            log.warning("job %s was interrupted by a restart; reported as failed", job_id)
        self.ledger.purge()

    async def close(self) -> None:
        """Stop: running jobs end ``failed`` (stored for HQ), their statements are cancelled
        on the database (waiting at most CLOSE_GRACE_SECONDS), the pool is let go."""
        self._closing = True
        tasks = list(self._tasks.values())
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        if self._stopping:
            await asyncio.wait(set(self._stopping), timeout=CLOSE_GRACE_SECONDS)
        self._pool.shutdown(wait=False, cancel_futures=True)

    def pending(self) -> list[str]:
        """Job ids running or holding an unacknowledged result (for ``Hello.running``)."""
        ids = self.ledger.pending()
        return ids + [i for i in self._tasks if i not in ids]

    @property
    def running(self) -> int:
        return len(self._tasks)

    # --- messages from HQ ------------------------------------------------------------------------

    async def submit(self, body: JobBody) -> None:
        """A job whose signature and addressee checked out: answer a known id from memory,
        refuse a stale or forbidden one, or start it."""
        async with self._admit:
            entry = await asyncio.to_thread(self.ledger.get, body.job_id)
            if entry is not None or body.job_id in self._tasks:
                await self._replay(body.job_id, entry)
                return
            nonce_seen = False
            try:
                nonce_seen = await asyncio.to_thread(self.ledger.nonce_used, body.nonce)
                check_fresh(body, time.time(), nonce_seen=nonce_seen)
                check_params(body, read_only=self.service.config.read_only)
            except JobRefused as exc:
                await self.refuse(body, exc.reason, record=not nonce_seen)
                return
            await asyncio.to_thread(
                self.ledger.record,
                body.job_id,
                body.nonce,
                "running",
                expires_at=body.expires_at,
                timeout=body.timeout,
            )
            started = time.time()
            cancel = self._cancels[body.job_id] = asyncio.Event()
            self._tasks[body.job_id] = asyncio.create_task(
                self._run(body, cancel), name=f"job-{body.job_id}"
            )
        log.info("job %s (%s on %s) accepted", body.job_id, body.kind, body.connection)
        await self.send(JobAccepted(job_id=body.job_id, started_at=started))

    async def refuse(
        self, body: JobBody | None, reason: str, *, record: bool = True, job_id: str | None = None
    ) -> None:
        """Send ``JobRejected``; remember the refusal when the body is authentic."""
        job_id = body.job_id if body is not None else job_id
        if job_id is None:
            log.warning("refused a job without a readable id: %s", reason)
            return
        log.warning("job %s refused: %s", job_id, reason)
        if body is not None and record:
            with contextlib.suppress(Exception):
                await asyncio.to_thread(
                    self.ledger.record,
                    body.job_id,
                    body.nonce,
                    "rejected",
                    expires_at=body.expires_at,
                    timeout=0.0,
                    reason=reason,
                )
        await self.send(JobRejected(job_id=job_id, reason=reason))

    async def _replay(self, job_id: str, entry: Entry | None) -> None:
        """HQ delivered a job it had delivered before."""
        if entry is None or entry.state == "running":
            log.info("job %s delivered again while it runs; it keeps running", job_id)
            return
        if entry.state == "rejected":
            await self.send(JobRejected(job_id=job_id, reason=entry.reason or "rejected"))
            return
        if entry.acked:
            log.info("job %s delivered again after HQ acknowledged its result; ignored", job_id)
            return
        log.info("job %s delivered again; sending its stored result", job_id)
        for data in await asyncio.to_thread(self.ledger.messages, job_id):
            await self.send(agent_message.validate_json(data))

    async def cancel(self, job_id: str) -> None:
        cancel = self._cancels.get(job_id)
        if cancel is None:
            log.info("cancel for job %s, which is not running here; nothing to do", job_id)
            return
        log.info("job %s: cancel requested", job_id)
        cancel.set()

    async def ack(self, job_id: str) -> None:
        await asyncio.to_thread(self.ledger.ack, job_id)

    async def resend_unacked(self) -> None:
        """Send every stored, unacknowledged result again (after a reconnect)."""
        for job_id in await asyncio.to_thread(self.ledger.pending):
            if job_id in self._tasks:
                continue
            for data in await asyncio.to_thread(self.ledger.messages, job_id):
                await self.send(agent_message.validate_json(data))

    # --- running -------------------------------------------------------------------------------

    async def _run(self, body: JobBody, cancel: asyncio.Event) -> None:
        clock = time.perf_counter()
        drivers = JobDrivers()
        call = self._pool.submit(self.execute, body, drivers)
        future: asyncio.Future[Outcome] = asyncio.wrap_future(call)
        waiter: asyncio.Future[Any] = asyncio.ensure_future(cancel.wait())
        done: set[asyncio.Future[Any]] = set()
        try:
            done, _ = await asyncio.wait(
                {future, waiter}, timeout=body.timeout, return_when=asyncio.FIRST_COMPLETED
            )
        except asyncio.CancelledError:  # the agent is stopping
            outcome = Outcome("failed", error=INTERRUPTED)
        else:
            if future in done:
                outcome = self._outcome(body, future)
            elif waiter in done:
                outcome = Outcome("cancelled", error="cancelled at HQ's request")
            else:
                outcome = Outcome("failed", error=f"the job timed out after {body.timeout:g}s")
        finally:
            waiter.cancel()
            if future not in done and not call.cancel():  # the call has started: stop it
                self._stop(body.job_id, drivers, future)
        messages = final_messages(body.job_id, outcome, time.perf_counter() - clock)
        try:
            await asyncio.shield(
                asyncio.to_thread(
                    self.ledger.finish, body.job_id, [m.model_dump_json() for m in messages]
                )
            )
        finally:
            self._tasks.pop(body.job_id, None)
            self._cancels.pop(body.job_id, None)
        log.info("job %s %s", body.job_id, outcome.state)
        if not self._closing:
            for message in messages:
                await self.send(message)

    def _stop(self, job_id: str, drivers: JobDrivers, future: asyncio.Future[Outcome]) -> None:
        task = asyncio.create_task(
            self._cancel_call(job_id, drivers, future), name=f"stop-{job_id}"
        )
        self._stopping.add(task)
        task.add_done_callback(self._stopping.discard)

    async def _cancel_call(
        self, job_id: str, drivers: JobDrivers, future: asyncio.Future[Outcome]
    ) -> None:
        """Cancel the job's statements until its driver call returns (see the docstring)."""
        try:
            for attempt in range(CANCEL_ATTEMPTS):
                if future.done():
                    return
                try:
                    sent = await asyncio.to_thread(drivers.cancel)
                except Exception as exc:
                    log.warning("job %s: cancelling its statement failed", job_id, exc_info=exc)
                    sent = False
                if attempt == 0:
                    log.info(
                        "job %s: %s",
                        job_id,
                        "cancel sent to the database"
                        if sent
                        else "nothing to cancel on the database yet (or the driver cannot)",
                    )
                await asyncio.wait({future}, timeout=CANCEL_RETRY_SECONDS)
            if not future.done():
                log.warning(
                    "job %s: its driver call still runs after %d cancel requests; it ends at "
                    "its statement timeout",
                    job_id,
                    CANCEL_ATTEMPTS,
                )
        finally:
            if future.done() and not future.cancelled():
                future.exception()  # retrieved: the job has already ended without it
            else:
                future.add_done_callback(_consume)

    def _outcome(self, body: JobBody, future: asyncio.Future[Outcome]) -> Outcome:
        try:
            return future.result()
        except OutpostError as exc:
            return Outcome("failed", error=exc.message)
        except Exception as exc:
            log.error("job %s failed unexpectedly", body.job_id, exc_info=exc)
            return Outcome("failed", error=f"unexpected {type(exc).__name__} on the agent")

    def execute(self, body: JobBody, drivers: JobDrivers | None = None) -> Outcome:
        """Run one job (blocking, in a pool thread); its drivers are attached to DRIVERS."""
        params = body.params
        svc = self.service
        on_driver = drivers.attach if drivers is not None else None
        if body.kind == "test":
            report = svc.test_connection(body.connection, timeout=body.timeout, on_driver=on_driver)
            result: dict[str, Any] = {
                "up": report.up,
                "server_version": report.server_version,
                "duration_seconds": report.duration_seconds,
                "error": report.error,
            }
            if report.up:
                return Outcome("succeeded", result)
            return Outcome("failed", result, error=report.error)
        if body.kind == "query":
            query = svc.query(
                body.connection,
                str(params["sql"]),
                params.get("params") or None,
                max_rows=params.get("max_rows") or None,
                timeout=body.timeout,
                allow_writes=bool(params.get("allow_writes")),
                on_driver=on_driver,
            )
            result = {
                "columns": query.columns,
                "row_count": query.row_count,
                "truncated": query.truncated,
                "duration_seconds": query.duration_seconds,
                "notices": query.notices,
            }
            return Outcome("succeeded", result, rows=query.rows)
        document = svc.inspect(
            body.connection,
            schemas=params.get("schemas"),
            timeout=body.timeout,
            on_driver=on_driver,
        )
        return Outcome("succeeded", document)
