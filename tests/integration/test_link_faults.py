"""Faults on the link to a real HQ: a revoked token stops the agent, HQ killed and restarted
is reconnected to, a silent HQ is noticed within two heartbeat intervals."""

from __future__ import annotations

import signal
import sqlite3
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.helpers import Agent, wait_for
from tests.hq_helpers import HQ, enrol

pytestmark = pytest.mark.integration


@pytest.fixture
def hq(tmp_path: Path) -> Iterator[HQ]:
    server = HQ(tmp_path / "hq", args=["--heartbeat-interval", "1"])
    server.create_admin()
    server.start()
    yield server
    server.stop()


@pytest.fixture
def agent(tmp_path: Path, request: pytest.FixtureRequest) -> Agent:
    db = tmp_path / "shop.db"
    with sqlite3.connect(db) as conn:
        conn.execute("CREATE TABLE t (n INTEGER)")
        conn.execute("INSERT INTO t VALUES (42)")
    transport = getattr(request, "param", "auto")
    agent = Agent(tmp_path / "agent", config={"hq": {"transport": transport}})
    agent.ok("connections", "add", "sqlite", "--name", "Shop", "--source-url", str(db))
    return agent


def connected(agent: Agent, name: str, times: int = 1) -> None:
    line = f"connected to HQ as {name}"
    wait_for(lambda: agent.log().count(line) >= times, 60, f"{line!r} {times}x in the agent log")


@pytest.mark.parametrize("agent", ["websocket", "poll"], indirect=True)
def test_revoked_token_stops_the_agent_with_one_clear_line(hq: HQ, agent: Agent) -> None:
    enrol(hq, agent, "edge-rev")
    proc = agent.start()
    try:
        connected(agent, "edge-rev")
        with hq.api() as api:
            assert api.post("/api/v1/agents/edge-rev/revoke").status_code == 200
        assert proc.wait(timeout=30) == 1
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    log = agent.log()
    assert log.count("rejected this agent's token (token_revoked)") == 1, log
    assert "Traceback" not in log
    # started again with the revoked token, it stops at once instead of retrying
    assert agent.start().wait(timeout=30) == 1
    assert agent.log().count("rejected this agent's token (token_revoked)") == 2


def test_hq_killed_and_restarted_is_reconnected_to(hq: HQ, agent: Agent) -> None:
    enrol(hq, agent, "edge-crash")
    with agent.serving():
        connected(agent, "edge-crash")
        hq.kill()
        wait_for(lambda: "link to HQ down" in agent.log(), 30, "the agent to notice")
        hq.start()
        connected(agent, "edge-crash", times=2)
        job = hq.run_job(agent="edge-crash", connection="shop", kind="query", sql="SELECT n FROM t")
        assert job["state"] == "succeeded", job
        assert hq.rows(job["id"]) == [[42]]


def test_a_silent_hq_is_noticed_and_reconnected_to(hq: HQ, agent: Agent) -> None:
    enrol(hq, agent, "edge-silent")
    assert hq.proc is not None
    with agent.serving():
        connected(agent, "edge-silent")
        hq.proc.send_signal(signal.SIGSTOP)  # the TCP connection stays open, nothing comes
        try:
            wait_for(lambda: "no word from HQ" in agent.log(), 30, "the dead link to be noticed")
        finally:
            hq.proc.send_signal(signal.SIGCONT)
        connected(agent, "edge-silent", times=2)


def test_no_token_no_link_and_a_clear_warning(tmp_path: Path) -> None:
    agent = Agent(tmp_path / "agent", config={"hq": {"url": "http://127.0.0.1:9"}})
    with agent.serving():
        wait_for(lambda: "has no HQ token" in agent.log(), 20, "the warning")


def test_plain_http_to_a_remote_hq_is_refused_at_start(tmp_path: Path) -> None:
    agent = Agent(tmp_path / "agent", config={"hq": {"url": "http://hq.example.com"}})
    proc = agent.start(env={"OUTPOST_HQ_TOKEN": "opt_x"})
    try:
        assert proc.wait(timeout=30) == 1
    except subprocess.TimeoutExpired:
        proc.kill()
        raise
    log = agent.log()
    assert "plain HTTP" in log and "hq.allow_insecure" in log
    assert "Traceback" not in log and "opt_x" not in log


def test_hq_killed_mid_job_the_job_ends_once(hq: HQ, agent: Agent, tmp_path: Path) -> None:
    enrol(hq, agent, "edge-mid")
    slow_insert = (
        "INSERT INTO t (n) WITH RECURSIVE c(i) AS "
        "(SELECT 1 UNION ALL SELECT i + 1 FROM c WHERE i < 20000000) SELECT count(*) FROM c"
    )
    with agent.serving():
        connected(agent, "edge-mid")
        with hq.api() as api:
            created = api.post(
                "/api/v1/jobs",
                json={
                    "agent": "edge-mid",
                    "connection": "shop",
                    "kind": "query",
                    "sql": slow_insert,
                    "allow_writes": True,
                    "timeout": 120,
                },
            )
            assert created.status_code == 201, created.text
            job_id = created.json()["id"]

            def running() -> bool:
                state = api.get(f"/api/v1/jobs/{job_id}").json()["state"]
                assert state in ("queued", "sent", "running"), state
                return bool(state == "running")

            wait_for(running, 30, "the job to run")
        hq.kill()
        hq.start()
        job = hq.wait_job(job_id, 120)
        assert job["state"] == "succeeded", job
        assert connected_times(agent, "edge-mid") >= 2
    with sqlite3.connect(tmp_path / "shop.db") as conn:
        assert conn.execute("SELECT count(*) FROM t WHERE n = 20000000").fetchone()[0] == 1


def connected_times(agent: Agent, name: str) -> int:
    return agent.log().count(f"connected to HQ as {name}")
