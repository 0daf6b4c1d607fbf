"""`outpost.client.HQClient` and `outpost hq agents|connections|query|inspect|test|jobs` against a
real HQ (`outpost hq serve` as a subprocess, SQLite).

Jobs that need an agent are answered by ``ScriptedAgent``: a WebSocket client speaking the agent
protocol (Hello, heartbeats, JobAccepted, ResultChunk, JobFinished) with made-up results, so the
client's paging, waiting and printing are tested against HQ's real storage and API. Query and
inspect against real databases through a real agent are in tests/e2e/test_hq_e2e.py.
"""

from __future__ import annotations

import json
import os
import pty
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
import trustme
from click.testing import CliRunner
from websockets.sync.client import ClientConnection, connect

from outpost import protocol
from outpost.cli.main import main
from outpost.client import (
    AuthenticationError,
    HQClient,
    HQUnreachableError,
    JobFailedError,
    JobWaitTimeout,
)
from outpost.errors import ConflictError, NotFoundError, UsageError
from tests.helpers import OUTPOST, wait_for
from tests.hq_helpers import HQ, hq_env

pytestmark = pytest.mark.integration

HEARTBEAT = 1.0
BIG_ROWS = 25_500  # three /rows pages of 10,000 and a short one

DOCUMENT: dict[str, Any] = {
    "driver": "postgres",
    "database": "test",
    "schemas": [
        {
            "name": "public",
            "tables": [
                {
                    "name": "orders",
                    "comment": None,
                    "columns": [
                        {"name": "id", "type": "INTEGER", "nullable": False, "default": None},
                        {
                            "name": "total",
                            "type": "NUMERIC(10, 2)",
                            "nullable": True,
                            "default": "0",
                        },
                    ],
                    "primary_key": {"name": "orders_pkey", "columns": ["id"]},
                    "foreign_keys": [],
                    "indexes": [],
                }
            ],
            "views": [],
        }
    ],
}


def cells(line: str) -> list[str]:
    """The cells of one row of a printed table."""
    return [c.strip() for c in line.strip().strip("|").split("|")]


def unique(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:8]}"


@pytest.fixture(scope="module")
def hq(tmp_path_factory: pytest.TempPathFactory) -> Iterator[HQ]:
    server = HQ(tmp_path_factory.mktemp("hq"), args=["--heartbeat-interval", str(HEARTBEAT)])
    server.create_admin()
    server.start()
    try:
        yield server
    finally:
        server.stop()


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


# -- a stand-in agent -----------------------------------------------------------------------


class ScriptedAgent:
    """Speaks the agent protocol over WebSocket with canned answers.

    query: ``SELECT big`` -> BIG_ROWS rows (id, label) cut at max_rows; ``SELECT fail`` -> the job
    fails with "relation \\"fail\\" does not exist"; ``SELECT slow`` -> never finishes; any other
    -> one row [1]. inspect -> DOCUMENT; test -> up with server version "PostgreSQL 15.4".
    """

    def __init__(self, hq: HQ, name: str, token: str, slugs: list[str]) -> None:
        self.hq = hq
        self.name = name
        self.token = token
        self.slugs = slugs
        self.stop = threading.Event()
        self.error: BaseException | None = None
        self.cancelled: list[str] = []
        self._thread = threading.Thread(target=self._run, name=f"agent-{name}", daemon=True)

    def __enter__(self) -> ScriptedAgent:
        self._thread.start()
        with HQClient(self.hq.url, self.hq.admin_token) as api:
            wait_for(lambda: api.agent(self.name).online, 30, f"agent {self.name} online")
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        self._thread.join(10)
        if self.error is not None:
            raise self.error

    def _send(self, ws: ClientConnection, message: protocol._Message) -> None:
        ws.send(message.model_dump_json())

    def _run(self) -> None:
        try:
            url = self.hq.url.replace("http", "ws", 1) + "/agent/v1/ws"
            headers = {"Authorization": f"Bearer {self.token}"}
            with connect(url, additional_headers=headers, open_timeout=30) as ws:
                metas = [
                    protocol.ConnectionMeta(slug=s, name=s.title(), driver="postgres", up=True)
                    for s in self.slugs
                ]
                hello = protocol.Hello(agent_version="0-test", read_only=False, connections=metas)
                self._send(ws, hello)
                beat = time.monotonic()
                while not self.stop.is_set():
                    if time.monotonic() - beat >= HEARTBEAT / 2:
                        self._send(ws, protocol.Heartbeat(sent_at=time.time()))
                        beat = time.monotonic()
                    try:
                        raw = ws.recv(timeout=HEARTBEAT / 4)
                    except TimeoutError:
                        continue
                    message = protocol.hq_message.validate_json(raw)
                    if isinstance(message, protocol.SignedJob):
                        self._job(ws, protocol.JobBody.model_validate_json(message.body))
                    elif isinstance(message, protocol.CancelJob):
                        self.cancelled.append(message.job_id)
                        finished = protocol.JobFinished(
                            job_id=message.job_id,
                            state="cancelled",
                            finished_at=time.time(),
                            duration_seconds=0.0,
                            error="cancelled at HQ's request",
                        )
                        self._send(ws, finished)
        except BaseException as exc:  # reported by __exit__
            if not self.stop.is_set():
                self.error = exc

    def _job(self, ws: ClientConnection, body: protocol.JobBody) -> None:
        self._send(ws, protocol.JobAccepted(job_id=body.job_id, started_at=time.time()))
        sql = str(body.params.get("sql") or "")
        chunks = 0
        error = None
        if body.kind == "inspect":
            result: dict[str, Any] | None = DOCUMENT
        elif body.kind == "test":
            result = {
                "up": True,
                "server_version": "PostgreSQL 15.4",
                "duration_seconds": 0.01,
                "error": None,
            }
        elif sql == "SELECT slow":
            return
        elif sql == "SELECT fail":
            result, error = None, 'relation "fail" does not exist'
        else:
            total = BIG_ROWS if sql == "SELECT big" else 1
            max_rows = int(body.params.get("max_rows") or 1000)
            rows = [[i, f"row {i}"] for i in range(min(total, max_rows))]
            for seq, start in enumerate(range(0, len(rows), protocol.CHUNK_ROWS)):
                chunk = rows[start : start + protocol.CHUNK_ROWS]
                self._send(ws, protocol.ResultChunk(job_id=body.job_id, seq=seq, rows=chunk))
                chunks += 1
            result = {
                "columns": ["id", "label"],
                "row_count": len(rows),
                "truncated": total > max_rows,
                "duration_seconds": 0.02,
                "notices": [],
            }
        finished = protocol.JobFinished(
            job_id=body.job_id,
            state="failed" if error else "succeeded",
            finished_at=time.time(),
            duration_seconds=0.02,
            result=result,
            error=error,
            chunks=chunks,
        )
        self._send(ws, finished)


@pytest.fixture
def live(hq: HQ, client: HQClient) -> Iterator[ScriptedAgent]:
    name = unique("live")
    token = client.create_agent(name).token
    with ScriptedAgent(hq, name, token, ["shop"]) as agent:
        yield agent


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


# -- jobs with a (scripted) agent -------------------------------------------------------------


def test_query_pages_every_row(hq: HQ, client: HQClient, live: ScriptedAgent) -> None:
    outcome = client.run_query(live.name, "shop", "SELECT big", max_rows=BIG_ROWS)
    assert outcome.columns == ["id", "label"]
    assert len(outcome.rows) == BIG_ROWS == outcome.row_count
    assert outcome.rows[0] == [0, "row 0"] and outcome.rows[-1] == [
        BIG_ROWS - 1,
        f"row {BIG_ROWS - 1}",
    ]
    assert [r[0] for r in outcome.rows] == list(range(BIG_ROWS))
    assert outcome.truncated is False
    assert len(list(client.iter_rows(outcome.job.id, page_size=777))) == BIG_ROWS


def test_query_cli_table_json_csv(hq: HQ, live: ScriptedAgent) -> None:
    target = f"{live.name}/shop"
    table = ok(hq, "query", target, "SELECT big", "--max-rows", "3")
    header = next(ln for ln in table.stdout.splitlines() if "label" in ln)
    assert cells(header) == ["id", "label"]
    assert "row 2" in table.stdout and "row 3" not in table.stdout
    assert "(3 rows)" in table.stderr
    assert "Warning: the result was cut at 3 rows; raise --max-rows to see more." in table.stderr
    data = json.loads(
        ok(hq, "query", target, "SELECT big", "--max-rows", "2", "--format", "json").stdout
    )
    assert data["columns"] == ["id", "label"] and data["rows"] == [[0, "row 0"], [1, "row 1"]]
    assert data["truncated"] is True and data["row_count"] == 2
    csv = ok(hq, "query", target, "-", "--format", "csv", "--max-rows", "2", input="SELECT big")
    assert csv.stdout == "id,label\n0,row 0\n1,row 1\n"


def test_query_flags_reach_the_job(hq: HQ, client: HQClient, live: ScriptedAgent) -> None:
    target = f"{live.name}/shop"
    sql = "UPDATE t SET a = %s WHERE b = %s"
    ok(hq, "query", target, sql, "--param", "7", "--param", "x", "--write", "--timeout", "12",
       "--max-rows", "5")  # fmt: skip
    job = client.jobs(agent=live.name, kind="query", limit=1)[0]
    assert job.params["sql"] == sql
    assert job.params["params"] == ["7", "x"]
    assert job.params["max_rows"] == 5 and job.params["allow_writes"] is True
    assert job.timeout == 12
    ok(hq, "query", target, "SELECT 1")
    job = client.jobs(agent=live.name, kind="query", limit=1)[0]
    assert job.params["allow_writes"] is False and job.params["max_rows"] == 1000
    assert job.timeout == 30 and not job.params.get("params")


def test_jobs_rows(hq: HQ, client: HQClient, live: ScriptedAgent) -> None:
    outcome = client.run_query(live.name, "shop", "SELECT big", max_rows=3)
    csv = ok(hq, "jobs", "rows", outcome.job.id, "--format", "csv")
    assert csv.stdout == "id,label\n0,row 0\n1,row 1\n2,row 2\n"
    data = json.loads(ok(hq, "jobs", "rows", outcome.job.id, "--format", "json").stdout)
    assert data == {"job_id": outcome.job.id, "columns": ["id", "label"], "rows": outcome.rows}
    table = ok(hq, "jobs", "rows", outcome.job.id)
    assert "row 2" in table.stdout and "(3 rows)" in table.stderr

    inspect = client.create_job(agent=live.name, connection="shop", kind="inspect")
    not_query = fails(hq, "jobs", "rows", inspect.id, code=2)
    assert not_query.stderr.strip() == (
        f"Error: Job {inspect.id} is an inspect job; only query jobs have rows."
    )
    slow = client.create_job(agent=live.name, connection="shop", kind="query", sql="SELECT slow")
    running = fails(hq, "jobs", "rows", slow.id)
    assert f"Error: Job {slow.id} is still " in running.stderr
    assert f"`outpost hq jobs show {slow.id} --wait 60`" in running.stderr
    client.cancel(slow.id)


def test_failed_query_exits_1_with_its_error(hq: HQ, client: HQClient, live: ScriptedAgent) -> None:
    proc = fails(hq, "query", f"{live.name}/shop", "SELECT fail")
    assert proc.stderr.strip().startswith("Error: The query job ")
    assert proc.stderr.strip().endswith(
        f'on {live.name}/shop failed: relation "fail" does not exist.'
    )
    with pytest.raises(JobFailedError) as info:
        client.run_query(live.name, "shop", "SELECT fail")
    assert info.value.job.state == "failed"


def test_inspect_and_test(hq: HQ, client: HQClient, live: ScriptedAgent) -> None:
    target = f"{live.name}/shop"
    assert client.inspect(live.name, "shop") == DOCUMENT
    assert json.loads(ok(hq, "inspect", target, "--format", "json").stdout) == DOCUMENT
    table = ok(hq, "inspect", target, "--schema", "public").stdout
    header = next(ln for ln in table.splitlines() if "SCHEMA" in ln)
    assert cells(header) == [
        "SCHEMA", "TABLE", "COLUMN", "TYPE", "NULLABLE", "DEFAULT", "KEY"
    ]  # fmt: skip
    row = next(ln for ln in table.splitlines() if " total " in ln)
    assert cells(row) == [
        "public", "orders", "total", "NUMERIC(10, 2)", "Yes", "0", ""
    ]  # fmt: skip
    job = client.jobs(agent=live.name, kind="inspect")[0]
    assert job.params.get("schemas") == ["public"]

    report = json.loads(ok(hq, "test", target, "--format", "json").stdout)
    assert report["up"] is True and report["server_version"] == "PostgreSQL 15.4"
    assert "PostgreSQL 15.4" in ok(hq, "test", target).stdout


def test_cancel_running_job(hq: HQ, client: HQClient, live: ScriptedAgent) -> None:
    job = client.create_job(agent=live.name, connection="shop", kind="query", sql="SELECT slow")
    wait_for(lambda: client.job(job.id).state == "running", 30, "the job to run")
    proc = ok(hq, "jobs", "cancel", job.id)
    assert job.id in proc.stdout
    final = client.wait_job(job.id, wait=30)
    assert final.state == "cancelled"
    assert job.id in live.cancelled


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
