"""The job executor on a real agent store and a real SQLite database: results in chunks,
at most once per job id (also across a restart), refusals, timeout, cancel."""

from __future__ import annotations

import asyncio
import sqlite3
import time
import uuid
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from outpost.api.service import AgentService
from outpost.config import AgentConfig, LoadedConfig
from outpost.jobs.executor import INTERRUPTED, Executor
from outpost.jobs.ledger import JobLedger
from outpost.protocol import (
    AgentMessage,
    JobAccepted,
    JobBody,
    JobFinished,
    JobRejected,
    ResultChunk,
)

SLOW_SQL = (
    "WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM n) "
    "SELECT count(*) FROM n WHERE i < 10000000000"
)


@pytest.fixture
def service(tmp_path: Path) -> Iterator[AgentService]:
    db = tmp_path / "shop.db"
    with sqlite3.connect(db) as conn:
        conn.execute("CREATE TABLE events (id INTEGER PRIMARY KEY, what TEXT)")
    loaded = LoadedConfig(config=AgentConfig(data_dir=tmp_path / "data"), source=None)
    svc = AgentService.open(loaded, owner="serve")
    svc.add_connection("sqlite", "Shop", {"source_url": str(db)}, verify=False)
    yield svc
    svc.close()


def job(kind: str = "query", **changes: Any) -> JobBody:
    now = time.time()
    data: dict[str, Any] = {
        "job_id": str(uuid.uuid4()),
        "agent": "edge-1",
        "connection": "shop",
        "kind": kind,
        "params": {},
        "issued_at": now,
        "expires_at": now + 300,
        "timeout": 20.0,
        "nonce": uuid.uuid4().hex,
    }
    data.update(changes)
    return JobBody(**data)


class Harness:
    """An executor whose messages land in ``sent``; ``restart`` opens a new one on the same
    data dir, as `outpost serve` does after a restart."""

    def __init__(self, service: AgentService) -> None:
        self.service = service
        self.sent: list[AgentMessage] = []
        self.ledger = JobLedger(service.store.data_dir)
        self.executor = self._new()

    def _new(self) -> Executor:
        executor = Executor(self.service, self.ledger, workers=2)
        executor.recover()

        async def send(message: AgentMessage) -> None:
            self.sent.append(message)

        executor.send = send
        return executor

    async def restart(self) -> None:
        await self.executor.close()
        self.ledger.close()
        self.ledger = JobLedger(self.service.store.data_dir)
        self.executor = self._new()

    async def finished(self, job_id: str, timeout: float = 20) -> JobFinished:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for message in self.sent:
                if isinstance(message, JobFinished) and message.job_id == job_id:
                    return message
            await asyncio.sleep(0.02)
        raise AssertionError(f"job {job_id} did not finish; sent: {self.sent}")

    def of(self, job_id: str) -> list[AgentMessage]:
        return [m for m in self.sent if getattr(m, "job_id", None) == job_id]


def run(service: AgentService, scenario: Callable[[Harness], Awaitable[None]]) -> None:
    async def main() -> None:
        harness = Harness(service)
        try:
            await scenario(harness)
        finally:
            await harness.executor.close()
            harness.ledger.close()

    asyncio.run(main())


def count_events(service: AgentService) -> int:
    report = service.query("shop", "SELECT count(*) FROM events")
    return int(report.rows[0][0])


def test_query_rows_come_in_chunks_then_the_result(service: AgentService) -> None:
    sql = (
        "WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM n WHERE i < 2500) "
        "SELECT i, 'row ' || i AS label FROM n"
    )
    body = job(params={"sql": sql, "max_rows": 5000})

    async def scenario(h: Harness) -> None:
        await h.executor.submit(body)
        finished = await h.finished(body.job_id)
        messages = h.of(body.job_id)
        assert isinstance(messages[0], JobAccepted)
        chunks = [m for m in messages if isinstance(m, ResultChunk)]
        assert [len(c.rows) for c in chunks] == [1000, 1000, 500]
        assert [c.seq for c in chunks] == [0, 1, 2]
        assert chunks[0].rows[0] == [1, "row 1"] and chunks[2].rows[-1] == [2500, "row 2500"]
        assert finished.state == "succeeded" and finished.chunks == 3
        assert finished.result is not None
        assert finished.result["columns"] == ["i", "label"]
        assert finished.result["row_count"] == 2500
        assert finished.result["truncated"] is False
        assert messages[-1] == finished

    run(service, scenario)


def test_a_job_delivered_again_after_a_restart_is_answered_not_run(
    service: AgentService,
) -> None:
    insert = job(params={"sql": "INSERT INTO events (what) VALUES ('x')", "allow_writes": True})

    async def scenario(h: Harness) -> None:
        await h.executor.submit(insert)
        first = await h.finished(insert.job_id)
        assert first.state == "succeeded"
        await h.restart()
        h.sent.clear()
        await h.executor.submit(insert)  # HQ re-sends the same signed job
        assert h.of(insert.job_id) == [first]  # the stored result, no JobAccepted
        assert h.executor.pending() == [insert.job_id]

    run(service, scenario)
    assert count_events(service) == 1


def test_after_the_ack_a_redelivery_gets_nothing(service: AgentService) -> None:
    body = job(kind="test")

    async def scenario(h: Harness) -> None:
        await h.executor.submit(body)
        finished = await h.finished(body.job_id)
        assert finished.state == "succeeded"
        assert finished.result is not None and finished.result["up"] is True
        await h.executor.ack(body.job_id)
        assert h.executor.pending() == []
        h.sent.clear()
        await h.executor.submit(body)
        assert h.sent == []

    run(service, scenario)


def test_a_replayed_nonce_under_a_new_job_id_is_rejected(service: AgentService) -> None:
    first = job(kind="test")
    replay = job(kind="test", nonce=first.nonce)

    async def scenario(h: Harness) -> None:
        await h.executor.submit(first)
        await h.finished(first.job_id)
        await h.executor.submit(replay)
        [rejected] = h.of(replay.job_id)
        assert isinstance(rejected, JobRejected)
        assert "nonce was already used" in rejected.reason

    run(service, scenario)


def test_a_rejected_job_is_rejected_again_after_a_restart(service: AgentService) -> None:
    expired = job(kind="test", expires_at=time.time() - 5)

    async def scenario(h: Harness) -> None:
        await h.executor.submit(expired)
        await h.restart()
        await h.executor.submit(expired)
        messages = h.of(expired.job_id)
        assert len(messages) == 2
        assert all(isinstance(m, JobRejected) and "expired" in m.reason for m in messages)

    run(service, scenario)


def test_read_only_agent_rejects_writes(service: AgentService) -> None:
    service.config.read_only = True
    body = job(params={"sql": "DELETE FROM events", "allow_writes": True})

    async def scenario(h: Harness) -> None:
        await h.executor.submit(body)
        [rejected] = h.of(body.job_id)
        assert isinstance(rejected, JobRejected)
        assert "read-only" in rejected.reason

    run(service, scenario)


def test_query_errors_fail_the_job_with_the_drivers_message(service: AgentService) -> None:
    body = job(params={"sql": "SELECT * FROM nowhere"})

    async def scenario(h: Harness) -> None:
        await h.executor.submit(body)
        finished = await h.finished(body.job_id)
        assert finished.state == "failed"
        assert finished.error is not None and "nowhere" in finished.error

    run(service, scenario)


def test_a_job_over_its_timeout_fails(service: AgentService) -> None:
    body = job(params={"sql": SLOW_SQL}, timeout=0.5)

    async def scenario(h: Harness) -> None:
        await h.executor.submit(body)
        finished = await h.finished(body.job_id)
        assert finished.state == "failed"
        assert finished.error is not None and "0.5" in finished.error

    run(service, scenario)


def test_cancel_ends_a_running_job_cancelled(service: AgentService) -> None:
    body = job(params={"sql": SLOW_SQL}, timeout=3)

    async def scenario(h: Harness) -> None:
        await h.executor.submit(body)
        assert isinstance(h.of(body.job_id)[0], JobAccepted)
        await h.executor.cancel(body.job_id)
        finished = await h.finished(body.job_id)
        assert finished.state == "cancelled"

    run(service, scenario)


def test_a_job_interrupted_by_a_stop_is_failed_not_rerun(service: AgentService) -> None:
    body = job(params={"sql": SLOW_SQL}, timeout=3)

    async def scenario(h: Harness) -> None:
        await h.executor.submit(body)
        await h.restart()  # the old executor is closed while the job runs
        h.sent.clear()
        await h.executor.submit(body)
        [finished] = h.of(body.job_id)
        assert isinstance(finished, JobFinished)
        assert finished.state == "failed" and finished.error == INTERRUPTED

    run(service, scenario)


def test_a_job_left_running_by_a_crash_is_reported_failed(service: AgentService) -> None:
    body = job(kind="test")
    ledger = JobLedger(service.store.data_dir)
    ledger.record(body.job_id, body.nonce, "running", expires_at=body.expires_at, timeout=30)
    ledger.close()

    async def scenario(h: Harness) -> None:
        assert h.executor.pending() == [body.job_id]
        await h.executor.submit(body)
        [finished] = h.of(body.job_id)
        assert isinstance(finished, JobFinished) and finished.error == INTERRUPTED

    run(service, scenario)


def test_unknown_connection_fails_the_job(service: AgentService) -> None:
    body = job(kind="test", connection="nope")

    async def scenario(h: Harness) -> None:
        await h.executor.submit(body)
        finished = await h.finished(body.job_id)
        assert finished.state == "failed"
        assert finished.error is not None and "nope" in finished.error

    run(service, scenario)
