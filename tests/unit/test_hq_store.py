"""HQ's Store on a real SQLite database (migrated with Alembic): job states, pages, sweeps."""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext

from outpost.errors import ConflictError, NotFoundError
from outpost.hq.db import Database, Store, metadata
from outpost.hq.migrations import current_revision, upgrade
from outpost.hq.settings import database_url
from outpost.protocol import ConnectionMeta


@pytest.fixture
def db(tmp_path: Path) -> Iterator[Database]:
    database = Database(database_url(None, tmp_path))
    upgrade(database.engine)
    yield database
    database.dispose()


def add_job(store: Store, agent: str, *, expires_in: float = 300, timeout: float = 30) -> str:
    job_id = str(uuid.uuid4())
    now = time.time()
    store.create_job(
        job_id=job_id,
        agent=agent,
        connection="pg",
        kind="query",
        params={"sql": "SELECT 1"},
        body="{}",
        signature="sig",
        created_at=now,
        expires_at=now + expires_in,
        timeout=timeout,
    )
    return job_id


def test_migrations_match_the_tables_and_run_twice(db: Database) -> None:
    hq_id = db.store.hq_id()
    upgrade(db.engine)
    assert db.store.hq_id() == hq_id and uuid.UUID(hq_id)
    assert current_revision(db.engine) == "0001"
    with db.engine.connect() as conn:
        assert compare_metadata(MigrationContext.configure(conn), metadata) == []


def test_agents_are_unique_and_tokens_replaceable(db: Database) -> None:
    store = db.store
    store.create_agent("a1", "h1")
    with pytest.raises(ConflictError, match="Agent 'a1' already exists"):
        store.create_agent("a1", "h2")
    assert store.agent_by_token("h1") == ("a1", False)
    store.set_revoked("a1")
    assert store.agent_by_token("h1") == ("a1", True)
    store.set_revoked("a1", "h3")
    assert store.agent_by_token("h1") is None
    assert store.agent_by_token("h3") == ("a1", False)
    with pytest.raises(NotFoundError, match="no agent 'nope'"):
        store.get_agent("nope")


def test_reported_and_declared_connections(db: Database) -> None:
    store = db.store
    store.create_agent("a1", "h1")
    store.declare_connection("a1", "wh", "Warehouse", "redshift")
    store.report_connections(
        "a1", [ConnectionMeta(slug="pg", name="PG", driver="postgres", up=True, checked_at=5.0)]
    )
    rows = {r["slug"]: dict(r) for r in store.list_connections("a1")}
    assert rows["pg"]["on_agent"] and rows["pg"]["up"] is True
    assert rows["wh"]["on_agent"] is False and rows["wh"]["declared"]
    assert store.get_agent("a1").connections == 1
    store.report_connections("a1", [ConnectionMeta(slug="wh", name="WH", driver="redshift")])
    rows = {r["slug"]: dict(r) for r in store.list_connections("a1")}
    assert set(rows) == {"wh"} and rows["wh"]["on_agent"] and rows["wh"]["name"] == "WH"
    store.undeclare_connection("a1", "wh")  # the agent still reports it: it stays
    assert [r["slug"] for r in store.list_connections("a1")] == ["wh"]
    with pytest.raises(NotFoundError):
        store.undeclare_connection("a1", "wh")


def test_claim_respects_the_limit_and_order(db: Database) -> None:
    store = db.store
    store.create_agent("a1", "h1")
    ids = [add_job(store, "a1") for _ in range(3)]
    first = store.claim_queued("a1", 2, time.time())
    assert [d.id for d in first] == ids[:2]
    assert store.count_active("a1") == 2
    assert [d.id for d in store.claim_queued("a1", 5, time.time())] == ids[2:]
    again = store.resend_active("a1", time.time())
    assert {d.id for d in again} == set(ids)
    assert {store.get_job(i)["attempts"] for i in ids} == {2}


def test_pages_give_any_row_range(db: Database) -> None:
    store = db.store
    store.create_agent("a1", "h1")
    job = add_job(store, "a1")
    store.claim_queued("a1", 1, time.time())
    assert store.mark_running("a1", job, time.time()) == "sent"
    rows = [[i] for i in range(25)]
    for seq, start in enumerate(range(0, 25, 10)):
        data = json.dumps(rows[start : start + 10])
        assert store.store_page("a1", job, seq, data, len(rows[start : start + 10]))
    assert not store.store_page("other", job, 3, "[]", 0)
    got = [
        row
        for first, data in store.pages(job, 8, 5)
        for row in json.loads(data)[max(0, 8 - first) : 13 - first]
    ]
    assert got == rows[8:13]
    ended = store.finish(
        "a1",
        job,
        state="succeeded",
        now=time.time(),
        result={"columns": []},
        error=None,
        duration=1.0,
    )
    assert ended is not None and ended.previous == "running"
    assert store.get_job(job)["row_count"] == 25
    assert (
        store.finish(
            "a1", job, state="failed", now=time.time(), result=None, error="x", duration=None
        )
        is None
    )  # already final: a late duplicate changes nothing
    # a result re-sent for a job that is already final is not stored again
    assert not store.store_page("a1", job, 0, "[[1]]", 1)


def test_sweeps_expire_and_time_out(db: Database) -> None:
    store = db.store
    store.create_agent("a1", "h1")
    waiting = add_job(store, "a1", expires_in=10)
    running = add_job(store, "a1", timeout=5)
    now = time.time()
    store.claim_queued("a1", 1, now)  # the older one: `waiting` -> sent
    assert store.get_job(waiting)["state"] == "sent"
    store.claim_queued("a1", 1, now)
    store.mark_running("a1", running, now)
    assert store.expire_due(now + 5) == []
    expired = store.expire_due(now + 11)
    assert [(e.id, e.state, e.previous) for e in expired] == [(waiting, "expired", "sent")]
    assert store.time_out_due(now + 14, grace=10) == []
    timed_out = store.time_out_due(now + 16, grace=10)
    assert [(e.id, e.state) for e in timed_out] == [(running, "failed")]
    assert store.get_job(running)["error"] == "timed out"


def test_retention_deletes_only_old_finished_jobs(db: Database) -> None:
    store = db.store
    store.create_agent("a1", "h1")
    old, fresh, queued = (add_job(store, "a1") for _ in range(3))
    assert store.cancel_waiting(old, time.time() - 100) is not None
    assert store.cancel_waiting(fresh, time.time()) is not None
    assert store.delete_finished_before(time.time() - 50) == 1
    with pytest.raises(NotFoundError):
        store.get_job(old)
    assert store.get_job(fresh)["state"] == "cancelled"
    assert store.get_job(queued)["state"] == "queued"


def test_a_batch_of_chunks_and_a_restart_at_seq_zero(db: Database) -> None:
    store = db.store
    store.create_agent("a1", "h1")
    job = add_job(store, "a1")
    store.claim_queued("a1", 1, time.time())
    batch = [(job, seq, json.dumps([[seq, i] for i in range(3)]), 3) for seq in range(4)]
    assert store.store_pages("a1", batch) == 4
    assert store.stored_rows(job) == 12
    # the agent sends the result again from the start (after a reconnect): it replaces
    again = [(job, 0, json.dumps([["x"]]), 1), (job, 1, json.dumps([["y"], ["z"]]), 2)]
    assert store.store_pages("a1", again) == 2
    assert store.stored_rows(job) == 3
    assert [json.loads(d) for _, d in store.pages(job, 0, 100)] == [[["x"]], [["y"], ["z"]]]
