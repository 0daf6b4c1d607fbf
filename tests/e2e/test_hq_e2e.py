"""HQ and agents as real processes, real PostgreSQL and MariaDB, both HQ database backends:
query and inspect through HQ match the driver; faults (HQ killed mid-job, agent restarted,
token revoked, a job signed by another key); no secret reaches HQ."""

from __future__ import annotations

import signal
import subprocess
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psycopg
import pymysql
import pytest

from outpost.drivers.mysql import MySQLDriver
from outpost.drivers.postgres import PostgresDriver
from outpost.schema.inspect import inspect_driver
from tests.conftest import MariaUser
from tests.helpers import Agent, wait_for
from tests.hq_helpers import HQ, enrol, running_hq

pytestmark = pytest.mark.integration


@pytest.fixture(params=["sqlite", "postgresql"])
def hq(request: pytest.FixtureRequest, tmp_path: Path, pg_dsn: str) -> Iterator[HQ]:
    """A running HQ on each database backend."""
    with running_hq(tmp_path / "hq", request.param, pg_dsn) as server:
        yield server


@pytest.fixture
def sqlite_hq(tmp_path: Path) -> Iterator[HQ]:
    with HQ(tmp_path / "hq", args=["--heartbeat-interval", "1"]).running() as server:
        yield server


@pytest.fixture
def pg_schema(pg_dsn: str) -> Iterator[str]:
    """A throwaway schema with two related tables, a view, an index and a comment."""
    schema = f"e2e_{uuid.uuid4().hex[:8]}"
    with psycopg.connect(pg_dsn, autocommit=True) as conn:
        conn.execute(f"CREATE SCHEMA {schema}")
        conn.execute(
            f"CREATE TABLE {schema}.customers (id serial PRIMARY KEY, name text NOT NULL,"
            " email text UNIQUE, created date DEFAULT current_date)"
        )
        conn.execute(
            f"CREATE TABLE {schema}.orders (id bigserial PRIMARY KEY,"
            f" customer_id int NOT NULL REFERENCES {schema}.customers(id),"
            " total numeric(10,2), note text)"
        )
        conn.execute(f"CREATE INDEX orders_customer ON {schema}.orders (customer_id)")
        conn.execute(f"COMMENT ON TABLE {schema}.orders IS 'one row per order'")
        conn.execute(
            f"CREATE VIEW {schema}.big_orders AS SELECT * FROM {schema}.orders WHERE total > 100"
        )
        conn.execute(
            f"INSERT INTO {schema}.customers (name, email) "
            "SELECT 'customer ' || g, 'c' || g || '@example.test' FROM generate_series(1, 50) g"
        )
        conn.execute(
            f"INSERT INTO {schema}.orders (customer_id, total, note) "
            "SELECT 1 + g % 50, g * 1.5, NULL FROM generate_series(1, 2500) g"
        )
        conn.execute(
            f"CREATE TABLE {schema}.runs (tag text NOT NULL, at timestamptz DEFAULT now())"
        )
    try:
        yield schema
    finally:
        with psycopg.connect(pg_dsn, autocommit=True) as conn:
            conn.execute(f"DROP SCHEMA {schema} CASCADE")


def _agent(tmp_path: Path, name: str = "agent") -> Agent:
    return Agent(tmp_path / name, config={"checks": {"interval": 2}}).with_key()


def _add_pg(agent: Agent, pg_params: dict[str, object], name: str = "Warehouse") -> None:
    agent.ok(
        "connections", "add", "postgres", "--name", name,
        "--host", str(pg_params["host"]), "--port", str(pg_params["port"]),
        "--user", str(pg_params["user"]), "--database", str(pg_params["database"]),
    )  # fmt: skip


def _connected(agent: Agent, name: str) -> bool:
    return f"connected to HQ as {name}" in agent.log()


def _run(hq: HQ, **body: Any) -> dict[str, Any]:
    job = hq.run_job(**body)
    assert job["state"] == "succeeded", job
    return job


def test_query_and_inspect_through_hq_match_the_driver(
    hq: HQ,
    tmp_path: Path,
    pg_params: dict[str, object],
    pg_dsn: str,
    pg_schema: str,
    mysql_params: dict[str, object],
) -> None:
    agent = _agent(tmp_path)
    _add_pg(agent, pg_params)
    agent.ok(
        "connections", "add", "mysql", "--name", "Shop",
        "--host", str(mysql_params["host"]), "--port", str(mysql_params["port"]),
        "--user", str(mysql_params["user"]), "--database", str(mysql_params["database"]),
    )  # fmt: skip
    enrol(hq, agent, "site-a")
    with agent.serving():
        wait_for(lambda: _connected(agent, "site-a"), 30, "the agent to connect")

        # connections reported: names, drivers, UP
        def reported() -> list[dict[str, Any]]:
            with hq.api() as api:
                data = api.get("/api/v1/connections", params={"agent": "site-a"}).json()
            return list(data["connections"])

        wait_for(lambda: len(reported()) == 2, 30, "two connections at HQ")
        by_slug = {c["slug"]: c for c in reported()}
        assert by_slug["warehouse"]["driver"] == "postgres"
        assert by_slug["shop"]["driver"] == "mysql"
        assert all(c["on_agent"] for c in by_slug.values())

        # query: the same rows as psycopg, every one of 2500 (paged)
        sql = f"SELECT id, customer_id, total, note FROM {pg_schema}.orders ORDER BY id"
        job = _run(hq, agent="site-a", connection="warehouse", kind="query", sql=sql,
                   max_rows=10000)  # fmt: skip
        assert job["result"]["columns"] == ["id", "customer_id", "total", "note"]
        assert job["result"]["row_count"] == 2500
        with psycopg.connect(pg_dsn) as conn:
            direct = conn.execute(sql).fetchall()
        through_hq = hq.rows(job["id"])
        assert len(through_hq) == 2500
        assert [[r[0], r[1], str(r[2]), r[3]] for r in direct] == through_hq

        # parameters
        sql = f"SELECT name FROM {pg_schema}.customers WHERE id = %s"
        job = _run(hq, agent="site-a", connection="warehouse", kind="query", sql=sql, params=[7])
        assert hq.rows(job["id"]) == [["customer 7"]]

        # inspect: the same document as the driver gives in-process
        job = _run(hq, agent="site-a", connection="warehouse", kind="inspect",
                   schemas=[pg_schema])  # fmt: skip
        driver = PostgresDriver(PostgresDriver.parse_options(dict(pg_params)))
        try:
            direct_doc = inspect_driver(driver, schemas=[pg_schema])
        finally:
            driver.close()
        assert job["result"] == direct_doc
        tables = {t["name"]: t for t in job["result"]["schemas"][0]["tables"]}
        assert set(tables) == {"customers", "orders", "runs"}
        assert tables["orders"]["foreign_keys"][0]["referred_table"] == "customers"
        assert [v["name"] for v in job["result"]["schemas"][0]["views"]] == ["big_orders"]

        # MariaDB: query and inspect
        table = f"e2e_{uuid.uuid4().hex[:8]}"
        mconn = pymysql.connect(
            host=str(mysql_params["host"]), port=int(str(mysql_params["port"])),
            user=str(mysql_params["user"]), password=str(mysql_params["password"]),
            database=str(mysql_params["database"]), autocommit=True,
        )  # fmt: skip
        try:
            with mconn.cursor() as cur:
                cur.execute(f"CREATE TABLE {table} (id INT PRIMARY KEY, label VARCHAR(20) NULL)")
                cur.execute(f"INSERT INTO {table} VALUES (1, 'one'), (2, NULL)")
            job = _run(hq, agent="site-a", connection="shop", kind="query",
                       sql=f"SELECT id, label FROM {table} ORDER BY id")  # fmt: skip
            assert hq.rows(job["id"]) == [[1, "one"], [2, None]]
            job = _run(hq, agent="site-a", connection="shop", kind="inspect")
            mdriver = MySQLDriver(MySQLDriver.parse_options(dict(mysql_params)))
            try:
                assert job["result"] == inspect_driver(mdriver)
            finally:
                mdriver.close()
            names = [t["name"] for s in job["result"]["schemas"] for t in s["tables"]]
            assert table in names
        finally:
            with mconn.cursor() as cur:
                cur.execute(f"DROP TABLE {table}")
            mconn.close()


def test_no_password_or_option_reaches_hq(
    sqlite_hq: HQ, tmp_path: Path, maria_user: MariaUser, mysql_params: dict[str, object]
) -> None:
    hq = sqlite_hq
    password = f"pw-{uuid.uuid4().hex}"
    maria_user.set_password(password)
    agent = _agent(tmp_path)
    agent.ok(
        "connections", "add", "mysql", "--name", "Secret shop",
        "--host", str(mysql_params["host"]), "--port", str(mysql_params["port"]),
        "--user", maria_user.name, "--password-env", "OUTPOST_TEST_DB_PASSWORD",
        env={"OUTPOST_TEST_DB_PASSWORD": password},
    )  # fmt: skip
    enrol(sqlite_hq, agent, "vault-room")
    with agent.serving():
        wait_for(lambda: _connected(agent, "vault-room"), 30, "the agent to connect")
        job = _run(hq, agent="vault-room", connection="secret-shop", kind="test")
        assert job["result"]["up"] is True
        job = _run(hq, agent="vault-room", connection="secret-shop", kind="query", sql="SELECT 1")
        _run(hq, agent="vault-room", connection="secret-shop", kind="inspect")
        outputs = []
        with hq.api() as api:
            for path in ["/api/v1/agents", "/api/v1/connections", "/api/v1/jobs",
                         f"/api/v1/jobs/{job['id']}", "/api/v1/hq", "/metrics"]:  # fmt: skip
                outputs.append(api.get(path).text)
        for command in (["agents", "list"], ["connections", "list"], ["jobs", "list"]):
            for fmt in ("table", "json"):
                proc = hq.cli(*command, "--format", fmt)
                assert proc.returncode == 0, proc.stderr
                outputs.append(proc.stdout + proc.stderr)
    hq.stop()
    stored = b"".join(p.read_bytes() for p in hq.data_dir.rglob("*") if p.is_file())
    for secret in (password, maria_user.name):
        assert secret.encode() not in stored, f"{secret!r} found in HQ's data dir"
        assert secret not in hq.log(), f"{secret!r} found in HQ's log"
        for text in outputs:
            assert secret not in text, f"{secret!r} found in HQ's API or CLI output"


def test_hq_killed_mid_job_every_job_ends_once(
    sqlite_hq: HQ, tmp_path: Path, pg_params: dict[str, object], pg_dsn: str, pg_schema: str
) -> None:
    hq = sqlite_hq
    agent = _agent(tmp_path)
    _add_pg(agent, pg_params)
    enrol(hq, agent, "crashy")
    tags = [f"t{i}-{uuid.uuid4().hex[:6]}" for i in range(6)]
    with agent.serving():
        wait_for(lambda: _connected(agent, "crashy"), 30, "the agent to connect")
        ids = []
        with hq.api() as api:
            for tag in tags:
                sql = f"INSERT INTO {pg_schema}.runs (tag) SELECT %s FROM pg_sleep(1.5)"
                response = api.post("/api/v1/jobs", json={
                    "agent": "crashy", "connection": "warehouse", "kind": "query", "sql": sql,
                    "params": [tag], "allow_writes": True, "timeout": 60, "expires_in": 600,
                })  # fmt: skip
                assert response.status_code == 201, response.text
                ids.append(response.json()["id"])

        def some_running() -> bool:
            with hq.api() as api:
                return any(api.get(f"/api/v1/jobs/{i}").json()["state"] == "running" for i in ids)

        wait_for(some_running, 30, "a job to be running")
        hq.kill()
        hq.start()
        jobs = [hq.wait_job(i, 120) for i in ids]
    states = [j["state"] for j in jobs]
    assert set(states) <= {"succeeded", "failed"}, states
    with psycopg.connect(pg_dsn) as conn:
        counts: dict[str, int] = dict(
            conn.execute(f"SELECT tag, count(*) FROM {pg_schema}.runs GROUP BY tag").fetchall()
        )
    for tag, job in zip(tags, jobs, strict=True):
        assert counts.get(tag, 0) <= 1, f"job {job['id']} ran {counts[tag]} times"
        if job["state"] == "succeeded":
            assert counts.get(tag) == 1, f"job {job['id']} succeeded but did not run"


def test_jobs_for_an_agent_that_was_down_run_when_it_returns(
    sqlite_hq: HQ, tmp_path: Path, pg_params: dict[str, object]
) -> None:
    hq = sqlite_hq
    agent = _agent(tmp_path)
    _add_pg(agent, pg_params)
    enrol(hq, agent, "sleepy")
    with agent.serving() as proc:
        wait_for(lambda: _connected(agent, "sleepy"), 30, "the agent to connect")
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    with hq.api() as api:
        wait_for(
            lambda: api.get("/api/v1/agents/sleepy").json()["online"] is False,
            30,
            "HQ to see the agent offline",
        )
        ids = []
        for n in range(3):
            response = api.post("/api/v1/jobs", json={
                "agent": "sleepy", "connection": "warehouse", "kind": "query",
                "sql": f"SELECT {n} AS n", "expires_in": 300,
            })  # fmt: skip
            assert response.status_code == 201, response.text
            ids.append(response.json()["id"])
        assert all(api.get(f"/api/v1/jobs/{i}").json()["state"] == "queued" for i in ids)
    with agent.serving():
        jobs = [hq.wait_job(i, 60) for i in ids]
    assert [j["state"] for j in jobs] == ["succeeded"] * 3
    assert [hq.rows(j["id"]) for j in jobs] == [[[0]], [[1]], [[2]]]


def test_revoked_token_cuts_the_agent_off(sqlite_hq: HQ, tmp_path: Path) -> None:
    hq = sqlite_hq
    agent = _agent(tmp_path)
    enrol(hq, agent, "leaver")
    with agent.serving() as proc:
        wait_for(lambda: _connected(agent, "leaver"), 30, "the agent to connect")
        proc_result = hq.cli("agents", "revoke", "leaver")
        assert proc_result.returncode == 0, proc_result.stderr
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            pytest.fail(f"the agent kept running after its token was revoked: {agent.log()}")
        assert proc.returncode == 1
    assert "revoked" in agent.log()
    with hq.api() as api:
        assert api.get("/api/v1/agents/leaver").json()["online"] is False


def test_a_job_signed_by_another_key_is_rejected(sqlite_hq: HQ, tmp_path: Path) -> None:
    hq = sqlite_hq
    agent = _agent(tmp_path)
    sample = tmp_path / "sample.sqlite"
    from outpost.sample_data import create_sample_database

    create_sample_database(sample)
    agent.ok("connections", "add", "sqlite", "--name", "Sample", "--source-url", str(sample))
    enrol(hq, agent, "pinned")
    # HQ loses its signing key and makes a new one: the agent pinned the old one at login
    hq.stop()
    (hq.data_dir / "signing.key").unlink()
    hq.start()
    with agent.serving():
        wait_for(lambda: _connected(agent, "pinned"), 30, "the agent to connect")
        job = hq.run_job(agent="pinned", connection="sample", kind="query", sql="SELECT 1")
    assert job["state"] == "failed"
    assert "rejected by agent" in job["error"]
    assert "signature" in job["error"]
