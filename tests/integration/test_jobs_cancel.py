"""Cancelling a running job stops its statement on the database server: real PostgreSQL
(``pg_sleep``), MariaDB (``SLEEP``) and SQLite (a recursive CTE that would run for hours), through
the drivers, the job executor, and a real HQ + agent (`POST /api/v1/jobs/{id}/cancel`, SIGTERM).

The statements would run for 30 s; every check waits for a condition with a deadline well
under that, so a cancel that did not reach the server fails the test."""

from __future__ import annotations

import asyncio
import signal
import sqlite3
import threading
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager
from pathlib import Path

import psycopg
import pytest

from outpost.api.service import AgentService
from outpost.config import AgentConfig, LoadedConfig
from outpost.drivers.base import Driver, QueryCancelled
from outpost.jobs.executor import INTERRUPTED, Executor
from outpost.jobs.ledger import JobLedger
from outpost.protocol import AgentMessage, JobBody, JobFinished
from tests.conftest import mysql_admin
from tests.helpers import Agent, wait_for
from tests.hq_helpers import HQ, enrol

pytestmark = pytest.mark.integration

#: Long enough that a statement still running after a cancel is plainly not cancelled.
SLEEP_SECONDS = 30
#: How long a cancelled statement may take to leave the server (well under SLEEP_SECONDS).
GONE_WITHIN = 10.0

SQLITE_SLOW = (
    "WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM n) "
    "SELECT count(*) FROM n WHERE i < 10000000000"
)


def marker() -> str:
    return f"cancel_{uuid.uuid4().hex[:12]}"


# --- what the servers are running ---


def pg_running(pg_dsn: str, mark: str) -> int:
    """Backends running a statement that carries MARK (other than this probe)."""
    with psycopg.connect(pg_dsn, autocommit=True) as conn:
        row = conn.execute(
            "SELECT count(*) FROM pg_stat_activity WHERE state = 'active' "
            "AND pid <> pg_backend_pid() AND query LIKE %s",
            (f"%{mark}%",),
        ).fetchone()
    return int(row[0]) if row else 0


def mysql_running(params: dict[str, object], mark: str) -> int:
    """Threads of SHOW PROCESSLIST running a statement that carries MARK (not this probe)."""
    conn = mysql_admin(params)
    try:
        with conn.cursor() as cur:
            cur.execute("SHOW FULL PROCESSLIST")
            rows = cur.fetchall()
            cur.execute("SELECT CONNECTION_ID()")
            me = cur.fetchone()[0]
    finally:
        conn.close()
    return sum(1 for row in rows if row[0] != me and row[7] and mark in str(row[7]))


# --- an agent service and an executor on it ---


@pytest.fixture
def service(tmp_path: Path) -> Iterator[AgentService]:
    loaded = LoadedConfig(config=AgentConfig(data_dir=tmp_path / "data"), source=None)
    svc = AgentService.open(loaded, owner="serve")
    yield svc
    svc.close()


def add_pg(service: AgentService, pg_params: dict[str, object]) -> str:
    options = {k: pg_params[k] for k in ("host", "port", "user", "database")}
    return service.add_connection("postgres", "Warehouse", options, verify=False).slug


def add_mysql(service: AgentService, mysql_params: dict[str, object]) -> str:
    options = {k: mysql_params[k] for k in ("host", "port", "user", "database")}
    if mysql_params.get("password"):
        options["password"] = mysql_params["password"]
    return service.add_connection("mysql", "Shop", options, verify=False).slug


def add_sqlite(service: AgentService, tmp_path: Path) -> str:
    db = tmp_path / "big.db"
    with sqlite3.connect(db) as conn:
        conn.execute("CREATE TABLE t (id INTEGER PRIMARY KEY)")
    return service.add_connection("sqlite", "Big", {"source_url": str(db)}, verify=False).slug


def job(connection: str, sql: str, kind: str = "query", timeout: float = 60.0) -> JobBody:
    now = time.time()
    return JobBody(
        job_id=str(uuid.uuid4()),
        agent="edge-1",
        connection=connection,
        kind=kind,
        params={"sql": sql} if kind == "query" else {},
        issued_at=now,
        expires_at=now + 300,
        timeout=timeout,
        nonce=uuid.uuid4().hex,
    )


class Harness:
    """An executor with ONE worker thread whose messages land in ``sent``."""

    def __init__(self, service: AgentService) -> None:
        self.sent: list[AgentMessage] = []
        self.ledger = JobLedger(service.store.data_dir)
        self.executor = Executor(service, self.ledger, workers=1)

        async def send(message: AgentMessage) -> None:
            self.sent.append(message)

        self.executor.send = send

    def finished_message(self, job_id: str) -> JobFinished | None:
        for message in self.sent:
            if isinstance(message, JobFinished) and message.job_id == job_id:
                return message
        return None

    async def finished(self, job_id: str, within: float = 20.0) -> JobFinished:
        await until(lambda: self.finished_message(job_id) is not None, within, f"job {job_id}")
        message = self.finished_message(job_id)
        assert message is not None
        return message


@asynccontextmanager
async def harness(service: AgentService) -> AsyncIterator[Harness]:
    h = Harness(service)
    try:
        yield h
    finally:
        await h.executor.close()
        h.ledger.close()


async def until(condition: Callable[[], bool], within: float, what: str) -> None:
    """Wait (without blocking the event loop) until CONDITION holds, at most WITHIN seconds."""
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        if await asyncio.to_thread(condition):
            return
        await asyncio.sleep(0.05)
    raise AssertionError(f"timed out after {within}s waiting for {what}")


# --- the executor: CancelJob stops the statement on the server ---


def cancel_running_job(
    service: AgentService, slug: str, sql: str, running: Callable[[], int] | None
) -> None:
    """Run SQL as a job, cancel it once it runs, and check what a user would see: the job
    ends ``cancelled``, the server no longer runs the statement, and the single worker is
    free for the next job at once."""

    async def scenario() -> None:
        async with harness(service) as h:
            body = job(slug, sql)
            await h.executor.submit(body)
            if running is not None:
                await until(lambda: running() == 1, 20, "the statement to run on the server")
            else:
                await until(lambda: h.executor.running == 1, 20, "the job to run")
            await h.executor.cancel(body.job_id)
            finished = await h.finished(body.job_id)
            assert finished.state == "cancelled"
            assert finished.error == "cancelled at HQ's request"
            if running is not None:
                await until(lambda: running() == 0, GONE_WITHIN, "the statement to end")
            # one worker: the next job runs only once the cancelled call gave its thread back
            follow = job(slug, "SELECT 42")
            await h.executor.submit(follow)
            done = await h.finished(follow.job_id, within=GONE_WITHIN + 5)
            assert done.state == "succeeded", done.error

    asyncio.run(scenario())


def test_cancel_stops_pg_sleep_on_postgres(
    service: AgentService, pg_dsn: str, pg_params: dict[str, object]
) -> None:
    slug = add_pg(service, pg_params)
    mark = marker()
    sql = f"SELECT pg_sleep({SLEEP_SECONDS}) AS {mark}"
    cancel_running_job(service, slug, sql, lambda: pg_running(pg_dsn, mark))


def test_cancel_stops_sleep_on_mariadb(
    service: AgentService, mysql_params: dict[str, object]
) -> None:
    slug = add_mysql(service, mysql_params)
    mark = marker()
    sql = f"SELECT SLEEP({SLEEP_SECONDS}) AS {mark}"
    cancel_running_job(service, slug, sql, lambda: mysql_running(mysql_params, mark))


def test_cancel_interrupts_a_long_sqlite_statement(service: AgentService, tmp_path: Path) -> None:
    slug = add_sqlite(service, tmp_path)
    cancel_running_job(service, slug, SQLITE_SLOW, None)


def test_stopping_the_executor_cancels_running_statements(
    service: AgentService, pg_dsn: str, pg_params: dict[str, object]
) -> None:
    slug = add_pg(service, pg_params)
    mark = marker()
    body = job(slug, f"SELECT pg_sleep({SLEEP_SECONDS}) AS {mark}")

    async def scenario() -> None:
        h = Harness(service)
        try:
            await h.executor.submit(body)
            await until(lambda: pg_running(pg_dsn, mark) == 1, 20, "the statement to run")
            await h.executor.close()
            await until(lambda: pg_running(pg_dsn, mark) == 0, GONE_WITHIN, "the statement")
            entry = h.ledger.get(body.job_id)
            assert entry is not None and entry.state == "finished"
            [data] = h.ledger.messages(body.job_id)
            finished = JobFinished.model_validate_json(data)
            assert finished.state == "failed" and finished.error == INTERRUPTED
        finally:
            h.ledger.close()

    asyncio.run(scenario())


def test_a_cancel_before_the_driver_runs_stops_it_from_starting(
    service: AgentService, pg_dsn: str, pg_params: dict[str, object]
) -> None:
    """With the only worker busy, a second job waits; cancelled while it waits, it never
    reaches the server."""
    slug = add_pg(service, pg_params)
    first, second = marker(), marker()

    async def scenario() -> None:
        async with harness(service) as h:
            busy = job(slug, f"SELECT pg_sleep({SLEEP_SECONDS}) AS {first}")
            queued = job(slug, f"SELECT pg_sleep({SLEEP_SECONDS}) AS {second}")
            await h.executor.submit(busy)
            await h.executor.submit(queued)
            await until(lambda: pg_running(pg_dsn, first) == 1, 20, "the first statement")
            await h.executor.cancel(queued.job_id)
            assert (await h.finished(queued.job_id)).state == "cancelled"
            await h.executor.cancel(busy.job_id)
            assert (await h.finished(busy.job_id)).state == "cancelled"
            await until(lambda: pg_running(pg_dsn, first) == 0, GONE_WITHIN, "the statement")
            follow = job(slug, "SELECT 1")
            await h.executor.submit(follow)
            assert (await h.finished(follow.job_id)).state == "succeeded"
            assert pg_running(pg_dsn, second) == 0

    asyncio.run(scenario())


# --- the drivers: cancel() from another thread ---


def run_and_cancel(driver: Driver, sql: str, running: Callable[[], bool]) -> BaseException | None:
    """Run SQL on DRIVER in a thread, cancel it from this one once RUNNING; the thread's error."""
    outcome: list[BaseException | None] = []

    def work() -> None:
        try:
            driver.query(sql, timeout=60)
        except BaseException as exc:
            outcome.append(exc)
        else:
            outcome.append(None)

    thread = threading.Thread(target=work)
    thread.start()
    try:
        wait_for(running, 20, "the statement to run")
        assert driver.cancel() is True
        wait_for(lambda: bool(outcome), GONE_WITHIN, "the query to return")
    finally:
        thread.join(timeout=SLEEP_SECONDS + 10)
    return outcome[0]


def test_postgres_driver_cancel(
    service: AgentService, pg_dsn: str, pg_params: dict[str, object]
) -> None:
    slug = add_pg(service, pg_params)
    driver, *_ = service._build(service.store.connection(slug))
    mark = marker()
    error = run_and_cancel(
        driver, f"SELECT pg_sleep({SLEEP_SECONDS}) AS {mark}", lambda: pg_running(pg_dsn, mark) > 0
    )
    assert isinstance(error, QueryCancelled)
    assert str(error) == "The operation on connection 'Warehouse' was cancelled before it finished."
    assert pg_running(pg_dsn, mark) == 0
    # cancelling is sticky: the driver runs nothing more, and cancelling again is harmless
    with pytest.raises(QueryCancelled):
        driver.query("SELECT 1")
    assert driver.cancel() is False


def test_mysql_driver_cancel(service: AgentService, mysql_params: dict[str, object]) -> None:
    slug = add_mysql(service, mysql_params)
    driver, *_ = service._build(service.store.connection(slug))
    mark = marker()
    error = run_and_cancel(
        driver,
        f"SELECT SLEEP({SLEEP_SECONDS}) AS {mark}",
        lambda: mysql_running(mysql_params, mark) > 0,
    )
    assert isinstance(error, QueryCancelled)
    wait_for(lambda: mysql_running(mysql_params, mark) == 0, GONE_WITHIN, "the thread to end")


def test_sqlite_driver_cancel(service: AgentService, tmp_path: Path) -> None:
    slug = add_sqlite(service, tmp_path)
    driver, *_ = service._build(service.store.connection(slug))
    started = threading.Event()
    original = driver.watch

    def watch(canceller: Callable[[], object]) -> int:
        key = original(canceller)
        started.set()
        return key

    driver.watch = watch  # type: ignore[method-assign]
    error = run_and_cancel(driver, SQLITE_SLOW, started.is_set)
    assert isinstance(error, QueryCancelled)


def test_inspect_on_a_cancelled_driver_does_not_connect(
    service: AgentService, pg_params: dict[str, object]
) -> None:
    slug = add_pg(service, pg_params)
    seen: list[Driver] = []

    def on_driver(driver: Driver) -> None:
        seen.append(driver)
        driver.cancel()

    with pytest.raises(QueryCancelled):
        service.inspect(slug, on_driver=on_driver)
    assert len(seen) == 1


# --- a real HQ and agent ---


@pytest.fixture(scope="module")
def hq(tmp_path_factory: pytest.TempPathFactory) -> Iterator[HQ]:
    server = HQ(tmp_path_factory.mktemp("hq"))
    server.create_admin()
    server.start()
    yield server
    server.stop()


def pg_agent(root: Path, pg_params: dict[str, object]) -> Agent:
    agent = Agent(root)
    agent.ok(
        "connections",
        "add",
        "postgres",
        "--name",
        "Warehouse",
        "--host",
        str(pg_params["host"]),
        "--port",
        str(pg_params["port"]),
        "--user",
        str(pg_params["user"]),
        "--database",
        str(pg_params["database"]),
        "--no-verify",
    )
    return agent


def job_state(hq: HQ, job_id: str) -> str:
    with hq.api() as api:
        state = api.get(f"/api/v1/jobs/{job_id}").json()["state"]
    assert isinstance(state, str)
    return state


def start_sleep_job(hq: HQ, agent: str, mark: str) -> str:
    with hq.api() as api:
        response = api.post(
            "/api/v1/jobs",
            json={
                "agent": agent,
                "connection": "warehouse",
                "kind": "query",
                "sql": f"SELECT pg_sleep({SLEEP_SECONDS}) AS {mark}",
                "timeout": 120,
            },
        )
    assert response.status_code == 201, response.text
    job_id = response.json()["id"]
    assert isinstance(job_id, str)
    return job_id


def test_hq_cancel_stops_the_statement(
    hq: HQ, tmp_path: Path, pg_dsn: str, pg_params: dict[str, object]
) -> None:
    agent = pg_agent(tmp_path / "agent", pg_params)
    enrol(hq, agent, "edge-cancel")
    mark = marker()
    with agent.serving():
        wait_for(lambda: "connected to HQ as edge-cancel" in agent.log(), 30, "the link")
        job_id = start_sleep_job(hq, "edge-cancel", mark)
        wait_for(lambda: pg_running(pg_dsn, mark) == 1, 30, "the statement to run")
        wait_for(lambda: job_state(hq, job_id) == "running", 20, "HQ to see the job running")
        with hq.api() as api:
            response = api.post(f"/api/v1/jobs/{job_id}/cancel")
        assert response.status_code == 200, response.text
        job = hq.wait_job(job_id, wait=GONE_WITHIN)
        assert job["state"] == "cancelled"
        wait_for(lambda: pg_running(pg_dsn, mark) == 0, GONE_WITHIN, "the backend to end")
        # the agent's worker is free again: the next job runs at once
        quick = hq.run_job(
            agent="edge-cancel", connection="warehouse", kind="query", sql="SELECT 7", wait=20
        )
        assert quick["state"] == "succeeded", quick


def test_sigterm_with_a_running_query_stops_quickly(
    hq: HQ, tmp_path: Path, pg_dsn: str, pg_params: dict[str, object]
) -> None:
    agent = pg_agent(tmp_path / "agent", pg_params)
    enrol(hq, agent, "edge-term")
    mark = marker()
    proc = agent.start()
    try:
        wait_for(lambda: agent.ready() or proc.poll() is not None, 30, "the agent to be ready")
        wait_for(lambda: "connected to HQ as edge-term" in agent.log(), 30, "the link")
        start_sleep_job(hq, "edge-term", mark)
        wait_for(lambda: pg_running(pg_dsn, mark) == 1, 30, "the statement to run")
        proc.send_signal(signal.SIGTERM)
        # the agent exits well before the 30 s statement would have ended
        code = proc.wait(timeout=GONE_WITHIN + 5)
        assert code == 0, agent.log()
        assert pg_running(pg_dsn, mark) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
