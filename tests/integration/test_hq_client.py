"""`outpost.client.HQClient` and `outpost hq agents|connections|query|inspect|test|jobs` against a
real HQ (`outpost hq serve` as a subprocess, SQLite).

Jobs that need an agent are run by a real one (`outpost serve`, logged in to that HQ) with a
connection to the local PostgreSQL: paging, waiting, printing, failures and cancelling are seen
as a user sees them, down to the statement on the database server.
"""

from __future__ import annotations

import json
import os
import pty
import signal
import subprocess
import sys
import threading
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import psycopg
import pytest
import trustme
from click.testing import CliRunner

from outpost.cli.main import main
from outpost.client import (
    AuthenticationError,
    HQClient,
    HQUnreachableError,
    JobFailedError,
    JobWaitTimeout,
)
from outpost.errors import ConflictError, NotFoundError, UsageError
from tests.helpers import OUTPOST, Agent, wait_for
from tests.hq_helpers import HQ, enrol, hq_env

pytestmark = pytest.mark.integration

HEARTBEAT = 1.0
BIG_ROWS = 25_500  # three /rows pages of 10,000 and a short one


def cells(line: str) -> list[str]:
    """The cells of one row of a printed table."""
    return [c.strip() for c in line.strip().strip("|").split("|")]


def unique(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:8]}"


@pytest.fixture(scope="module")
def hq(tmp_path_factory: pytest.TempPathFactory) -> Iterator[HQ]:
    args = ["--heartbeat-interval", str(HEARTBEAT)]
    with HQ(tmp_path_factory.mktemp("hq"), args=args).running() as server:
        yield server


@pytest.fixture
def client(hq: HQ) -> Iterator[HQClient]:
    with HQClient(hq.url, hq.admin_token) as c:
        yield c


@dataclass
class Ran:
    returncode: int
    stdout: str
    stderr: str


def run(hq: HQ, *args: str, input: str | None = None, token: str | None = None) -> Ran:
    """`outpost hq ARGS` in this process (HQ is the real subprocess), with HQ's address and admin
    token (or ``token``) in the environment, as a user's shell would have them."""
    env: dict[str, str | None] = {
        "OUTPOST_HQ_URL": hq.url,
        "OUTPOST_HQ_ADMIN_TOKEN": token or hq.admin_token,
        "OUTPOST_HQ_CA_FILE": None,
        "COLUMNS": "200",
    }
    with CliRunner().isolation(input=input, env=env) as (out, err, _):
        try:
            main(["hq", *args])
        except SystemExit as exc:
            code = exc.code if isinstance(exc.code, int) else 1
        else:  # pragma: no cover - main always exits
            code = 0
        sys.stdout.flush()  # csv output is written without a flush, as at process exit
        return Ran(code, out.getvalue().decode(), err.getvalue().decode())


def ok(hq: HQ, *args: str, input: str | None = None) -> Ran:
    proc = run(hq, *args, input=input)
    assert proc.returncode == 0, f"outpost hq {' '.join(args)}: {proc.stderr}{proc.stdout}"
    return proc


def fails(hq: HQ, *args: str, code: int = 1) -> Ran:
    proc = run(hq, *args)
    assert proc.returncode == code, f"exit {proc.returncode}: {proc.stderr}{proc.stdout}"
    assert "Traceback" not in proc.stderr
    return proc


# -- a real agent ---------------------------------------------------------------------------


@dataclass
class Live:
    """A real agent (`outpost serve`) connected to HQ as ``name``; its connection "shop" is the
    local PostgreSQL, where ``schema`` is a throwaway schema with tables ``orders`` and ``t``."""

    name: str
    agent: Agent
    schema: str


@pytest.fixture(scope="module")
def pg_schema(pg_dsn: str) -> Iterator[str]:
    schema = f"hq_client_{uuid.uuid4().hex[:8]}"
    with psycopg.connect(pg_dsn, autocommit=True) as conn:
        conn.execute(f"CREATE SCHEMA {schema}")
        conn.execute(
            f"CREATE TABLE {schema}.orders (id integer PRIMARY KEY, total numeric(10, 2) DEFAULT 0)"
        )
        conn.execute(f"CREATE TABLE {schema}.t (a integer, b text)")
        conn.execute(f"INSERT INTO {schema}.t VALUES (0, 'x'), (0, 'y')")
    try:
        yield schema
    finally:
        with psycopg.connect(pg_dsn, autocommit=True) as conn:
            conn.execute(f"DROP SCHEMA {schema} CASCADE")


@pytest.fixture(scope="module")
def live(
    hq: HQ,
    tmp_path_factory: pytest.TempPathFactory,
    pg_params: dict[str, object],
    pg_schema: str,
) -> Iterator[Live]:
    agent = Agent(tmp_path_factory.mktemp("agent")).with_key()
    agent.ok(
        "connections", "add", "postgres", "--name", "Shop",
        "--host", str(pg_params["host"]), "--port", str(pg_params["port"]),
        "--user", str(pg_params["user"]), "--database", str(pg_params["database"]),
    )  # fmt: skip
    name = unique("live")
    enrol(hq, agent, name)
    with agent.serving():
        wait_for(lambda: f"connected to HQ as {name}" in agent.log(), 30, "the agent at HQ")
        yield Live(name, agent, pg_schema)


def backends(pg_dsn: str, marker: str) -> int:
    """How many PostgreSQL sessions (other than this one) last ran SQL containing MARKER."""
    with psycopg.connect(pg_dsn, autocommit=True) as conn:
        row = conn.execute(
            "SELECT count(*) FROM pg_stat_activity WHERE pid <> pg_backend_pid() AND query LIKE %s",
            (f"%{marker}%",),
        ).fetchone()
    return int(row[0]) if row else 0


# -- agents ---------------------------------------------------------------------------------


def test_agents_create_list_revoke_token(hq: HQ) -> None:
    name = unique("a")
    created = ok(hq, "agents", "create", name)
    tokens = [w for w in created.stdout.split() if w.startswith("opt_")]
    assert created.stdout.startswith(f'Created agent "{name}".')
    assert f"outpost login --hq {hq.url} --token {tokens[0]}" in created.stdout
    agents = json.loads(ok(hq, "agents", "list", "--format", "json").stdout)
    mine = [a for a in agents if a["name"] == name]
    assert mine and mine[0]["online"] is False and mine[0]["revoked"] is False
    table = ok(hq, "agents", "list").stdout
    assert "NAME" in table and "LAST SEEN" in table and name in table

    again = fails(hq, "agents", "create", name)
    assert again.stderr.startswith("Error: ") and name in again.stderr

    revoked = ok(hq, "agents", "revoke", name)
    assert f'Revoked the token of agent "{name}"' in revoked.stdout
    shown = json.loads(ok(hq, "agents", "show", name, "--format", "json").stdout)
    assert shown["revoked"] is True

    reissued = json.loads(ok(hq, "agents", "token", name, "--format", "json").stdout)
    assert reissued["token"].startswith("opt_") and reissued["token"] != tokens[0]
    assert reissued["agent"]["revoked"] is False
    assert reissued["login"] == f"outpost login --hq {hq.url} --token {reissued['token']}"
    # the old token no longer logs in, the new one does
    for token, status in ((tokens[0], 401), (reissued["token"], 200)):
        answer = httpx.post(
            f"{hq.url}/agent/v1/login", headers={"Authorization": f"Bearer {token}"}, timeout=30
        )
        assert answer.status_code == status, answer.text


def test_invalid_agent_name_is_a_usage_error(hq: HQ, client: HQClient) -> None:
    proc = fails(hq, "agents", "create", "bad name!", code=2)
    assert proc.stderr.startswith("Error: ")
    assert "name" in proc.stderr
    with pytest.raises(UsageError):
        client.create_agent("has/slash")


def test_unknown_agent(hq: HQ, client: HQClient) -> None:
    for args in (
        ["agents", "show", "nobody-here"],
        ["agents", "revoke", "nobody-here"],
        ["query", "nobody-here/shop", "SELECT 1"],
        ["connections", "declare", "nobody-here/shop", "--name", "S", "--driver", "postgres"],
    ):
        proc = fails(hq, *args)
        assert proc.stderr.startswith("Error: ") and "nobody-here" in proc.stderr, proc.stderr
        assert len(proc.stderr.strip().splitlines()) == 1
    with pytest.raises(NotFoundError):
        client.agent("nobody-here")


def test_wrong_admin_token(hq: HQ) -> None:
    bad = "opa_" + "x" * 43
    proc = run(hq, "agents", "list", token=bad)
    assert proc.returncode == 1
    assert proc.stderr.startswith(f"Error: HQ at {hq.url} refused the admin token")
    assert "outpost hq admin create" in proc.stderr
    assert bad not in proc.stderr + proc.stdout
    with HQClient(hq.url, bad) as c, pytest.raises(AuthenticationError):
        c.info()


def test_https_to_a_plain_hq(hq: HQ) -> None:
    url = hq.url.replace("http://", "https://")
    with HQClient(url, hq.admin_token) as c, pytest.raises(HQUnreachableError) as info:
        c.agents()
    assert str(info.value) == (
        f"Cannot reach HQ at {url}: it does not speak HTTPS on that port; is the address http:// "
        "instead?"
    )


def test_info(client: HQClient) -> None:
    info = client.info()
    assert uuid.UUID(info.hq_id)
    assert info.signing_key and info.agents_online >= 0


# -- connections ----------------------------------------------------------------------------


def test_connections_declare_and_list(hq: HQ, client: HQClient) -> None:
    name = unique("c")
    client.create_agent(name)
    declared = client.declare_connection(name, "shop", "Shop DB", "postgres")
    assert declared.on_agent is False
    ok(hq, "connections", "declare", f"{name}/crm", "--name", "CRM", "--driver", "mysql")
    found = json.loads(ok(hq, "connections", "list", "--agent", name, "--format", "json").stdout)
    assert sorted((c["slug"], c["name"], c["driver"], c["on_agent"]) for c in found) == [
        ("crm", "CRM", "mysql", False),
        ("shop", "Shop DB", "postgres", False),
    ]
    table = ok(hq, "connections", "list", "--agent", name).stdout
    assert "ON AGENT" in table
    line = next(ln for ln in table.splitlines() if "Shop DB" in ln)
    assert cells(line) == [
        name, "Shop DB", "shop", "postgres", "No", ""
    ]  # fmt: skip
    ok(hq, "connections", "delete", f"{name}/crm")
    assert [c.slug for c in client.connections(name)] == ["shop"]


# -- jobs for an offline agent ----------------------------------------------------------------


def test_jobs_queue_list_show_cancel(hq: HQ, client: HQClient) -> None:
    name = unique("off")
    client.create_agent(name)
    job = client.create_job(agent=name, connection="shop", kind="test")
    assert job.state == "queued"
    query = client.create_job(agent=name, connection="shop", kind="query", sql="SELECT 1")

    listed = json.loads(ok(hq, "jobs", "list", "--agent", name, "--format", "json").stdout)
    assert [j["id"] for j in listed] == [query.id, job.id]  # newest first
    only_test = json.loads(
        ok(hq, "jobs", "list", "--agent", name, "--kind", "test", "--format", "json").stdout
    )
    assert [j["id"] for j in only_test] == [job.id]
    newest = ok(hq, "jobs", "list", "--agent", name, "--limit", "1", "--format", "json")
    assert [j["id"] for j in json.loads(newest.stdout)] == [query.id]
    assert [j.id for j in client.jobs(agent=name, state="queued")] == [query.id, job.id]
    table = ok(hq, "jobs", "list", "--agent", name).stdout
    assert job.id in table and "queued" in table

    shown = ok(hq, "jobs", "show", job.id).stdout
    assert "state" in shown and "queued" in shown
    cancelled = ok(hq, "jobs", "cancel", job.id)
    assert cancelled.stdout.strip() == f"Cancelled job {job.id}."
    assert json.loads(ok(hq, "jobs", "show", job.id, "--format", "json").stdout)["state"] == (
        "cancelled"
    )
    assert [j.id for j in client.jobs(agent=name, state="cancelled")] == [job.id]
    again = fails(hq, "jobs", "cancel", job.id)
    assert again.stderr.startswith("Error: ")
    with pytest.raises(ConflictError):
        client.cancel(job.id)

    missing = fails(hq, "jobs", "show", str(uuid.uuid4()))
    assert missing.stderr.startswith("Error: ")


def test_query_waits_then_says_the_job_is_still_queued(hq: HQ, client: HQClient) -> None:
    name = unique("off")
    client.create_agent(name)
    proc = fails(hq, "query", f"{name}/shop", "SELECT 1", "--wait", "1")
    job_id = client.jobs(agent=name)[0].id
    assert proc.stderr.strip() == (
        f"Error: Job {job_id} (query on {name}/shop) is still queued after 1 s; it keeps going "
        f"at HQ (agent {name!r} is offline): see it later with `outpost hq jobs show {job_id}`, "
        f"or cancel it with `outpost hq jobs cancel {job_id}`."
    )
    assert proc.stdout == ""
    with pytest.raises(JobWaitTimeout) as info:
        client.wait_job(job_id, wait=0.5)
    assert info.value.job.state == "queued"


def test_expired_job_fails_the_wait(hq: HQ, client: HQClient) -> None:
    name = unique("off")
    client.create_agent(name)
    job = client.create_job(agent=name, connection="shop", kind="test", expires_in=0.5)
    with pytest.raises(JobFailedError) as info:
        client.finished(job, wait=30)
    assert info.value.job.state == "expired"
    assert "expired" in str(info.value)


# -- jobs with a real agent -----------------------------------------------------------------

BIG_SQL = f"SELECT g AS id, 'label ' || g AS label FROM generate_series(1, {BIG_ROWS}) g"
MISSING_SQL = "SELECT * FROM no_such_relation_here"
MISSING_ERROR = 'relation "no_such_relation_here" does not exist'


def slow_sql() -> tuple[str, str]:
    """A statement that sleeps 30 s on PostgreSQL, and a marker to find it in pg_stat_activity."""
    marker = f"slow_{uuid.uuid4().hex[:8]}"
    return f"SELECT pg_sleep(30) AS {marker}", marker


def test_query_pages_every_row(client: HQClient, live: Live) -> None:
    outcome = client.run_query(live.name, "shop", BIG_SQL, max_rows=BIG_ROWS)
    assert outcome.columns == ["id", "label"]
    assert len(outcome.rows) == BIG_ROWS == outcome.row_count
    assert outcome.rows == [[i, f"label {i}"] for i in range(1, BIG_ROWS + 1)]
    assert outcome.truncated is False
    assert list(client.iter_rows(outcome.job.id, page_size=777)) == outcome.rows


def test_query_cli_table_json_csv(hq: HQ, live: Live) -> None:
    target = f"{live.name}/shop"
    table = ok(hq, "query", target, BIG_SQL, "--max-rows", "3")
    header = next(ln for ln in table.stdout.splitlines() if "label" in ln)
    assert cells(header) == ["id", "label"]
    rows = [c for c in map(cells, table.stdout.splitlines()) if c[-1].startswith("label ")]
    assert rows == [["1", "label 1"], ["2", "label 2"], ["3", "label 3"]]
    assert "(3 rows)" in table.stderr
    assert "Warning: the result was cut at 3 rows; raise --max-rows to see more." in table.stderr
    data = json.loads(
        ok(hq, "query", target, BIG_SQL, "--max-rows", "2", "--format", "json").stdout
    )
    assert data["columns"] == ["id", "label"] and data["rows"] == [[1, "label 1"], [2, "label 2"]]
    assert data["truncated"] is True and data["row_count"] == 2
    csv = ok(hq, "query", target, "-", "--format", "csv", "--max-rows", "2", input=BIG_SQL)
    assert csv.stdout == "id,label\n1,label 1\n2,label 2\n"


def test_query_flags_reach_the_job(hq: HQ, client: HQClient, live: Live, pg_dsn: str) -> None:
    target = f"{live.name}/shop"
    sql = f"UPDATE {live.schema}.t SET a = %s WHERE b = %s"
    ok(hq, "query", target, sql, "--param", "7", "--param", "x", "--write", "--timeout", "12",
       "--max-rows", "5")  # fmt: skip
    job = client.jobs(agent=live.name, kind="query", limit=1)[0]
    assert job.state == "succeeded"
    assert job.params["sql"] == sql
    assert job.params["params"] == ["7", "x"]
    assert job.params["max_rows"] == 5 and job.params["allow_writes"] is True
    assert job.timeout == 12
    with psycopg.connect(pg_dsn) as conn:
        stored = conn.execute(f"SELECT b, a FROM {live.schema}.t ORDER BY b").fetchall()
    assert stored == [("x", 7), ("y", 0)]

    ok(hq, "query", target, "SELECT 1")
    job = client.jobs(agent=live.name, kind="query", limit=1)[0]
    assert job.params["allow_writes"] is False and job.params["max_rows"] == 1000
    assert job.timeout == 30 and not job.params.get("params")
    # without --write the agent refuses the same statement
    refused = fails(hq, "query", target, sql, "--param", "8", "--param", "x")
    assert refused.stderr.startswith("Error: The query job ")
    assert "read-only" in refused.stderr and "cannot execute UPDATE" in refused.stderr
    with psycopg.connect(pg_dsn) as conn:
        row = conn.execute(f"SELECT a FROM {live.schema}.t WHERE b = 'x'").fetchone()
    assert row == (7,)


def test_jobs_rows(hq: HQ, client: HQClient, live: Live) -> None:
    outcome = client.run_query(live.name, "shop", BIG_SQL, max_rows=3)
    csv = ok(hq, "jobs", "rows", outcome.job.id, "--format", "csv")
    assert csv.stdout == "id,label\n1,label 1\n2,label 2\n3,label 3\n"
    data = json.loads(ok(hq, "jobs", "rows", outcome.job.id, "--format", "json").stdout)
    assert data == {"job_id": outcome.job.id, "columns": ["id", "label"], "rows": outcome.rows}
    table = ok(hq, "jobs", "rows", outcome.job.id)
    assert "label 3" in table.stdout and "(3 rows)" in table.stderr

    inspect = client.create_job(
        agent=live.name, connection="shop", kind="inspect", schemas=[live.schema]
    )
    not_query = fails(hq, "jobs", "rows", inspect.id, code=2)
    assert not_query.stderr.strip() == (
        f"Error: Job {inspect.id} is an inspect job; only query jobs have rows."
    )
    sql, _ = slow_sql()
    slow = client.create_job(agent=live.name, connection="shop", kind="query", sql=sql)
    try:
        running = fails(hq, "jobs", "rows", slow.id)
        assert f"Error: Job {slow.id} is still " in running.stderr
        assert f"`outpost hq jobs show {slow.id} --wait 60`" in running.stderr
    finally:
        client.cancel(slow.id)


def test_failed_query_exits_1_with_its_error(hq: HQ, client: HQClient, live: Live) -> None:
    proc = fails(hq, "query", f"{live.name}/shop", MISSING_SQL)
    message = proc.stderr.strip()
    assert message.startswith("Error: The query job ")
    assert f"on {live.name}/shop failed: " in message and MISSING_ERROR in message
    assert len(message.splitlines()) == 1 and proc.stdout == ""
    with pytest.raises(JobFailedError) as info:
        client.run_query(live.name, "shop", MISSING_SQL)
    assert info.value.job.state == "failed"
    assert MISSING_ERROR in str(info.value) and MISSING_ERROR in (info.value.job.error or "")


def test_inspect_and_test(
    hq: HQ, client: HQClient, live: Live, pg_params: dict[str, object], pg_dsn: str
) -> None:
    target = f"{live.name}/shop"
    document = client.inspect(live.name, "shop", schemas=[live.schema])
    assert document["driver"] == "postgres" and document["database"] == pg_params["database"]
    assert [s["name"] for s in document["schemas"]] == [live.schema]
    tables = {t["name"]: t for t in document["schemas"][0]["tables"]}
    assert sorted(tables) == ["orders", "t"]
    assert [c["name"] for c in tables["orders"]["columns"]] == ["id", "total"]
    assert tables["orders"]["primary_key"]["columns"] == ["id"]
    shown = ok(hq, "inspect", target, "--schema", live.schema, "--format", "json").stdout
    assert json.loads(shown) == document

    table = ok(hq, "inspect", target, "--schema", live.schema).stdout
    header = next(ln for ln in table.splitlines() if "SCHEMA" in ln)
    assert cells(header) == [
        "SCHEMA", "TABLE", "COLUMN", "TYPE", "NULLABLE", "DEFAULT", "KEY"
    ]  # fmt: skip
    row = next(ln for ln in table.splitlines() if " total " in ln)
    assert cells(row) == [
        live.schema, "orders", "total", "NUMERIC(10, 2)", "Yes", "0", ""
    ]  # fmt: skip
    key = next(ln for ln in table.splitlines() if " id " in ln)
    assert cells(key) == [live.schema, "orders", "id", "INTEGER", "No", "", "PK"]
    job = client.jobs(agent=live.name, kind="inspect", limit=1)[0]
    assert job.params.get("schemas") == [live.schema]

    with psycopg.connect(pg_dsn) as conn:
        row_ = conn.execute("SHOW server_version").fetchone()
    assert row_ is not None
    version = str(row_[0]).split()[0]  # e.g. 15.4
    report = json.loads(ok(hq, "test", target, "--format", "json").stdout)
    assert report["up"] is True and version in report["server_version"]
    assert version in ok(hq, "test", target).stdout


def test_cancel_running_job(hq: HQ, client: HQClient, live: Live, pg_dsn: str) -> None:
    sql, marker = slow_sql()
    job = client.create_job(agent=live.name, connection="shop", kind="query", sql=sql)
    wait_for(lambda: client.job(job.id).state == "running", 30, "the job to run")
    wait_for(lambda: backends(pg_dsn, marker) == 1, 30, "the statement to run on PostgreSQL")
    proc = ok(hq, "jobs", "cancel", job.id)
    assert proc.stdout.strip() == (
        f"Asked agent {live.name!r} to cancel job {job.id} (now running)."
    )
    final = client.wait_job(job.id, wait=30)
    assert final.state == "cancelled"
    # the agent stopped the statement: its session is gone long before pg_sleep(30) would end
    wait_for(lambda: backends(pg_dsn, marker) == 0, 15, "the statement to end on PostgreSQL")
    assert f"job {job.id}: cancel requested" in live.agent.log()


# -- transport ------------------------------------------------------------------------------


def test_unreachable_and_tls(tmp_path: Path) -> None:
    ca = trustme.CA()
    cert = ca.issue_cert("127.0.0.1")
    cert_path, key_path, ca_path = tmp_path / "hq.pem", tmp_path / "hq.key", tmp_path / "ca.pem"
    cert.cert_chain_pems[0].write_to_path(str(cert_path))
    for extra in cert.cert_chain_pems[1:]:
        extra.write_to_path(str(cert_path), append=True)
    cert.private_key_pem.write_to_path(str(key_path))
    ca.cert_pem.write_to_path(str(ca_path))
    server = HQ(tmp_path / "tls", args=["--tls-cert", str(cert_path), "--tls-key", str(key_path)])
    server.ca_file = str(ca_path)
    server.create_admin()
    server.start()
    try:
        assert server.url.startswith("https://")
        untrusted = run(server, "agents", "list")
        assert untrusted.returncode == 1
        assert untrusted.stderr.strip() == (
            f"Error: Cannot reach HQ at {server.url}: its TLS certificate is not trusted; give "
            "the CA that signed it with --ca-file."
        )
        trusted = run(server, "agents", "list", "--ca-file", str(ca_path))
        assert trusted.returncode == 0, trusted.stderr
        with HQClient(server.url, server.admin_token, ca_file=str(ca_path)) as c:
            assert c.agents() == []
        with HQClient(server.url, server.admin_token, verify=False) as c:
            assert c.info().agents_online == 0
        plain = server.url.replace("https://", "http://")
        with HQClient(plain, server.admin_token) as c, pytest.raises(HQUnreachableError) as info:
            c.agents()
        assert str(info.value) == (
            f"Cannot reach HQ at {plain}: the server hung up; does HQ serve HTTPS there (https://)?"
        )
    finally:
        server.stop()
    stopped = HQClient(server.url, server.admin_token, ca_file=str(ca_path))
    with stopped, pytest.raises(HQUnreachableError, match="connection refused"):
        stopped.agents()


def test_spinner_on_a_terminal_only(hq: HQ, client: HQClient) -> None:
    name = unique("off")
    client.create_agent(name)
    env = hq_env(
        {"OUTPOST_HQ_URL": hq.url, "OUTPOST_HQ_ADMIN_TOKEN": hq.admin_token, "TERM": "xterm"}
    )
    leader, follower = pty.openpty()
    proc = subprocess.Popen(
        [*OUTPOST, "hq", "query", f"{name}/shop", "SELECT 1", "--wait", "2.5"],
        stdout=subprocess.PIPE,
        stderr=follower,
        env=env,
    )
    os.close(follower)
    seen = b""
    while True:
        try:
            data = os.read(leader, 4096)
        except OSError:  # EIO: the child closed the terminal
            break
        if not data:
            break
        seen += data
    os.close(leader)
    assert proc.wait(timeout=60) == 1
    assert proc.stdout is not None and proc.stdout.read() == b""
    text = seen.decode(errors="replace")
    assert f"Waiting for {name}/shop" in text
    assert "is still queued after 2.5 s" in text


def test_wait_rides_out_an_hq_restart(tmp_path: Path) -> None:
    server = HQ(tmp_path / "restart")
    server.create_admin()
    server.start()
    try:
        with HQClient(server.url, server.admin_token) as c:
            c.create_agent("offline")
            job = c.create_job(agent="offline", connection="shop", kind="test")
            outcome: dict[str, Any] = {}

            def wait() -> None:
                try:
                    outcome["job"] = c.wait_job(job.id, wait=60)
                except Exception as exc:  # reported below
                    outcome["error"] = exc

            waiter = threading.Thread(target=wait)
            waiter.start()
            server.kill()  # SIGKILL while the client holds a long-poll request
            server.start()
            with HQClient(server.url, server.admin_token) as other:
                assert other.cancel(job.id).state == "cancelled"
            waiter.join(60)
            assert not waiter.is_alive()
            assert "error" not in outcome, outcome.get("error")
            assert outcome["job"].state == "cancelled"
    finally:
        server.stop()


def test_interrupted_wait_leaves_the_job_at_hq(hq: HQ, client: HQClient) -> None:
    name = unique("off")
    client.create_agent(name)
    env = hq_env({"OUTPOST_HQ_URL": hq.url, "OUTPOST_HQ_ADMIN_TOKEN": hq.admin_token})
    proc = subprocess.Popen(
        [*OUTPOST, "hq", "query", f"{name}/shop", "SELECT 1", "--wait", "60"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
        # as typed in a shell: Ctrl-C interrupts (a test runner started in the background
        # may pass SIGINT on as ignored)
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    try:
        wait_for(lambda: bool(client.jobs(agent=name)), 30, "the job to be created")
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    job = client.jobs(agent=name)[0]
    assert proc.returncode == 1, err  # click turns Ctrl-C into "Aborted."
    assert out == ""
    assert "keeps going at HQ" in err and err.rstrip().endswith("Aborted.")
    assert "Traceback" not in err
    if job.id in err:
        assert (
            f"Job {job.id} keeps going at HQ; cancel it with `outpost hq jobs cancel {job.id}`."
            in err
        )
    assert client.job(job.id).state == "queued"
