"""Outpost HQ as a real process (`outpost hq serve`) on SQLite and on PostgreSQL.

The agent side of the link is a protocol-speaking client written here (websockets / httpx
sending the messages of ``outpost.protocol``): a real peer on a real socket, not a mock. What is
asserted is what an admin or an agent sees: REST answers, messages on the link, metrics, logs.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import signal
import subprocess
import time
import uuid
from collections.abc import Awaitable, Callable, Iterator, Sequence
from pathlib import Path
from typing import Any, TypeVar

import httpx
import pytest
import sqlalchemy as sa
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed

from outpost.hq.settings import database_url
from outpost.protocol import (
    CancelJob,
    ConnectionMeta,
    ConnectionsReport,
    Disconnect,
    Error,
    Heartbeat,
    Hello,
    HQMessage,
    JobAccepted,
    JobBody,
    JobFinished,
    JobRejected,
    LoginResponse,
    PollRequest,
    PollResponse,
    ResultAck,
    ResultChunk,
    SignedJob,
    Welcome,
    hq_message,
    load_public_key,
    verify_job,
)
from tests.helpers import OUTPOST, free_port
from tests.hq_helpers import HQ, hq_env, running_hq

pytestmark = [pytest.mark.integration, pytest.mark.anyio]

HEARTBEAT = 2.0  # the module's HQs: an agent silent for 4 s is offline
MAX_JOBS = 2
T = TypeVar("T")


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture(scope="module", params=["sqlite", "postgresql"])
def hq(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[HQ]:
    """A running HQ per database backend, shared by the module's tests (agents are unique)."""
    args = ["--heartbeat-interval", str(HEARTBEAT), "--max-concurrent-jobs", str(MAX_JOBS)]
    root = tmp_path_factory.mktemp(f"hq-{request.param}")
    pg_dsn = request.getfixturevalue("pg_dsn") if request.param == "postgresql" else None
    with running_hq(root, request.param, pg_dsn, args) as server:
        yield server


# -- the protocol-speaking agent ---------------------------------------------------------------


def unique(prefix: str = "agent") -> str:
    return f"{prefix}-{uuid.uuid4().hex[:8]}"


def meta(slug: str, driver: str = "postgres", up: bool | None = True) -> ConnectionMeta:
    return ConnectionMeta(slug=slug, name=slug.upper(), driver=driver, up=up, checked_at=1.0)


def ws_url(hq: HQ) -> str:
    return hq.url.replace("http", "ws", 1) + "/agent/v1/ws"


class Link:
    """An agent speaking the protocol over HQ's WebSocket."""

    def __init__(self, hq: HQ, token: str) -> None:
        self.hq = hq
        self.token = token
        self.ws: ClientConnection | None = None
        self._beat: asyncio.Task[None] | None = None

    async def connect(
        self,
        *,
        connections: Sequence[ConnectionMeta] = (),
        running: Sequence[str] = (),
        heartbeats: bool = True,
        read_only: bool = False,
    ) -> Welcome:
        self.ws = await connect(
            ws_url(self.hq), additional_headers={"Authorization": f"Bearer {self.token}"}
        )
        hello = Hello(
            agent_version="9.9.9",
            read_only=read_only,
            connections=list(connections),
            running=list(running),
        )
        await self.send(hello)
        welcome = await self.expect(Welcome)
        if heartbeats:
            self._beat = asyncio.create_task(self._heartbeats())
        return welcome

    async def _heartbeats(self) -> None:
        while True:
            await asyncio.sleep(HEARTBEAT / 2)
            await self.send(Heartbeat(sent_at=time.time()))

    async def send(self, message: Any) -> None:
        assert self.ws is not None
        await self.ws.send(message.model_dump_json())

    async def recv(self, timeout: float = 30) -> HQMessage:
        """The next message that is not a heartbeat."""
        assert self.ws is not None
        while True:
            message = hq_message.validate_json(await asyncio.wait_for(self.ws.recv(), timeout))
            if not isinstance(message, Heartbeat):
                return message

    async def expect(self, kind: type[T], timeout: float = 30) -> T:
        message = await self.recv(timeout)
        assert isinstance(message, kind), f"expected {kind.__name__}, got {message!r}"
        return message

    async def close(self) -> None:
        if self._beat is not None:
            self._beat.cancel()
        if self.ws is not None:
            await self.ws.close()

    async def finish_query(self, job_id: str, rows: list[list[Any]], chunk: int = 1000) -> None:
        """Accept, stream the rows in chunks, finish; HQ acknowledges."""
        await self.send(JobAccepted(job_id=job_id, started_at=time.time()))
        seq = 0
        for seq, start in enumerate(range(0, len(rows), chunk)):
            await self.send(ResultChunk(job_id=job_id, seq=seq, rows=rows[start : start + chunk]))
        chunks = (len(rows) + chunk - 1) // chunk
        await self.send(
            JobFinished(
                job_id=job_id,
                state="succeeded",
                finished_at=time.time(),
                duration_seconds=0.25,
                result={
                    "columns": ["n", "label"],
                    "row_count": len(rows),
                    "truncated": False,
                    "duration_seconds": 0.25,
                    "notices": [],
                },
                chunks=chunks,
            )
        )
        ack = await self.expect(ResultAck)
        assert ack.job_id == job_id


def admin(hq: HQ) -> httpx.AsyncClient:
    return httpx.AsyncClient(
        base_url=hq.url,
        headers={"Authorization": f"Bearer {hq.admin_token}"},
        timeout=90,
        verify=hq.verify,
    )


async def eventually(check: Callable[[], Awaitable[bool]], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if await check():
            return
        await asyncio.sleep(0.05)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


async def new_agent(api: httpx.AsyncClient, name: str | None = None) -> tuple[str, str]:
    name = name or unique()
    response = await api.post("/api/v1/agents", json={"name": name})
    assert response.status_code == 201, response.text
    return name, response.json()["token"]


async def create_job(api: httpx.AsyncClient, **body: Any) -> dict[str, Any]:
    response = await api.post("/api/v1/jobs", json=body)
    assert response.status_code == 201, response.text
    job: dict[str, Any] = response.json()
    return job


async def job_state(api: httpx.AsyncClient, job_id: str, state: str, timeout: float = 30) -> Any:
    job: dict[str, Any] = {}

    async def reached() -> bool:
        nonlocal job
        job = (await api.get(f"/api/v1/jobs/{job_id}", params={"wait": 2})).json()
        return bool(job["state"] == state)

    await eventually(reached, timeout, f"job {job_id} to be {state}")
    return job


async def agent_info(api: httpx.AsyncClient, name: str) -> dict[str, Any]:
    response = await api.get(f"/api/v1/agents/{name}")
    assert response.status_code == 200, response.text
    data: dict[str, Any] = response.json()
    return data


async def signing_key(api: httpx.AsyncClient) -> str:
    key: str = (await api.get("/api/v1/hq")).json()["signing_key"]
    return key


# -- the process -------------------------------------------------------------------------------


async def test_serves_health_metrics_openapi_and_dashboard(hq: HQ) -> None:
    assert f"Outpost HQ listening on {hq.url}" in hq.log()
    async with httpx.AsyncClient(base_url=hq.url) as plain:
        assert (await plain.get("/healthz")).json() == {"status": "ok"}
        assert (await plain.get("/readyz")).status_code == 200
        metrics = (await plain.get("/metrics")).text
        for name in (
            "outpost_hq_agents_connected",
            "outpost_hq_jobs_total",
            "outpost_hq_job_duration_seconds",
            'outpost_build_info{version="',
        ):
            assert name in metrics
        root = await plain.get("/")
        assert root.status_code in (302, 307) and root.headers["location"] == "/ui/"
        assert (await plain.get("/ui/")).status_code == 200
        spec = (await plain.get("/openapi.json")).json()
        assert "/api/v1/jobs/{job_id}/rows" in spec["paths"]
        missing = await plain.get("/api/v1/nothing-here")
        assert missing.status_code in (401, 404)
        assert set(missing.json()) == {"code", "message"}


def _concrete(path: str) -> str:
    return (
        path.replace("{name}", "someone")
        .replace("{slug}", "some-db")
        .replace("{job_id}", str(uuid.uuid4()))
    )


async def test_every_api_route_needs_the_admin_token(hq: HQ) -> None:
    async with httpx.AsyncClient(base_url=hq.url) as plain:
        spec = (await plain.get("/openapi.json")).json()
        routes = [
            (method.upper(), _concrete(path))
            for path, item in spec["paths"].items()
            if path.startswith("/api/v1")
            for method in item
        ]
        assert len(routes) >= 14
        for method, path in routes:
            for headers in ({}, {"Authorization": "Bearer opa_wrong"}):
                response = await plain.request(method, path, headers=headers, json={})
                assert response.status_code == 401, (method, path, response.text)
                body = response.json()
                assert body["code"] in ("unauthorized", "token_unknown")
                assert "outpost hq admin create" in body["message"]


# -- agents ------------------------------------------------------------------------------------


async def test_agents_create_list_get_and_bad_names(hq: HQ) -> None:
    async with admin(hq) as api:
        name, token = await new_agent(api)
        assert token.startswith("opt_") and len(token) > 40
        again = await api.post("/api/v1/agents", json={"name": name})
        assert again.status_code == 409 and again.json()["code"] == "conflict"
        bad = await api.post("/api/v1/agents", json={"name": "-nope"})
        assert bad.status_code == 422 and "agent name '-nope' is not valid" in bad.json()["message"]
        listed = (await api.get("/api/v1/agents")).json()["agents"]
        assert name in [a["name"] for a in listed]
        info = await agent_info(api, name)
        assert info["online"] is False and info["revoked"] is False and info["connections"] == 0
        missing = await api.get("/api/v1/agents/no-such-agent")
        assert missing.status_code == 404 and "no-such-agent" in missing.json()["message"]
        unknown = await api.post(
            "/api/v1/jobs", json={"agent": "no-such-agent", "connection": "db", "kind": "test"}
        )
        assert unknown.status_code == 404
        no_sql = await api.post(
            "/api/v1/jobs", json={"agent": name, "connection": "db", "kind": "query"}
        )
        assert no_sql.status_code == 422 and "sql" in no_sql.json()["message"]
        info_hq = (await api.get("/api/v1/hq")).json()
        assert uuid.UUID(info_hq["hq_id"]) and info_hq["version"]


def _all_text(hq: HQ) -> str:
    """Every value in every table of HQ's database, as one string."""
    url = database_url(hq.database, hq.data_dir)
    engine = sa.create_engine(url)
    try:
        meta = sa.MetaData()
        meta.reflect(engine)
        parts: list[str] = []
        with engine.connect() as conn:
            for table in meta.sorted_tables:
                for row in conn.execute(sa.select(table)):
                    parts.extend(str(v) for v in row)
        return "\n".join(parts)
    finally:
        engine.dispose()


async def test_tokens_are_stored_only_as_sha256(hq: HQ) -> None:
    async with admin(hq) as api:
        _, token = await new_agent(api)
    stored = _all_text(hq)
    for secret in (token, hq.admin_token):
        assert secret not in stored
        assert hashlib.sha256(secret.encode()).hexdigest() in stored


async def test_login_and_refused_tokens(hq: HQ) -> None:
    async with admin(hq) as api:
        name, token = await new_agent(api)
        key = await signing_key(api)
    async with httpx.AsyncClient(base_url=hq.url) as plain:
        login = await plain.post("/agent/v1/login", headers={"Authorization": f"Bearer {token}"})
        assert login.status_code == 200
        body = LoginResponse.model_validate(login.json())
        assert body.agent_name == name and body.signing_key == key
        assert body.heartbeat_interval == HEARTBEAT
        for headers in ({}, {"Authorization": "Bearer opt_unknown"}):
            refused = await plain.post("/agent/v1/login", headers=headers)
            assert refused.status_code == 401
            assert Error.model_validate(refused.json()).code == "token_unknown"
    async with connect(ws_url(hq), additional_headers={"Authorization": "Bearer opt_x"}) as ws:
        with pytest.raises(ConnectionClosed) as closed:
            await asyncio.wait_for(ws.recv(), 10)
    assert closed.value.rcvd is not None and closed.value.rcvd.code == 4401
    assert Error.model_validate_json(closed.value.rcvd.reason).code == "token_unknown"


async def test_revoke_cuts_the_agent_off_and_reissue_replaces_the_token(hq: HQ) -> None:
    async with admin(hq) as api:
        name, token = await new_agent(api)
        link = Link(hq, token)
        await link.connect()
        assert (await agent_info(api, name))["online"] is True
        revoked = await api.post(f"/api/v1/agents/{name}/revoke")
        assert revoked.status_code == 200 and revoked.json()["revoked"] is True
        bye = await link.expect(Disconnect, timeout=HEARTBEAT * 2)
        assert bye.code == "token_revoked"
        assert link.ws is not None
        with pytest.raises(ConnectionClosed):
            await asyncio.wait_for(link.ws.recv(), HEARTBEAT * 2)
        await link.close()
        assert (await agent_info(api, name))["online"] is False
        async with httpx.AsyncClient(base_url=hq.url) as plain:
            login = await plain.post(
                "/agent/v1/login", headers={"Authorization": f"Bearer {token}"}
            )
            assert login.status_code == 401 and login.json()["code"] == "token_revoked"
            reissued = await api.post(f"/api/v1/agents/{name}/token")
            assert reissued.status_code == 200
            new_token = reissued.json()["token"]
            assert reissued.json()["agent"]["revoked"] is False and new_token != token
            old = await plain.post("/agent/v1/login", headers={"Authorization": f"Bearer {token}"})
            assert old.status_code == 401 and old.json()["code"] == "token_unknown"
            new = await plain.post(
                "/agent/v1/login", headers={"Authorization": f"Bearer {new_token}"}
            )
            assert new.status_code == 200
        job = await create_job(api, agent=name, connection="db", kind="test")
        assert job["state"] == "queued"
        revoked_job = await api.post(f"/api/v1/agents/{name}/revoke")
        assert revoked_job.status_code == 200
        refused = await api.post(
            "/api/v1/jobs", json={"agent": name, "connection": "db", "kind": "test"}
        )
        assert refused.status_code == 409 and "revoked" in refused.json()["message"]


# -- jobs over the WebSocket -------------------------------------------------------------------


async def test_query_job_signed_run_and_rows_paged(hq: HQ) -> None:
    async with admin(hq) as api:
        name, token = await new_agent(api)
        public = load_public_key(await signing_key(api))
        link = Link(hq, token)
        welcome = await link.connect(connections=[meta("pg")])
        assert welcome.agent_name == name and welcome.max_concurrent_jobs == MAX_JOBS
        info = await agent_info(api, name)
        assert info["online"] is True and info["transport"] == "websocket"
        assert info["version"] == "9.9.9" and info["connections"] == 1
        job = await create_job(
            api, agent=name, connection="pg", kind="query", sql="SELECT $1", params=[1]
        )
        signed = await link.expect(SignedJob)
        body = verify_job(public, signed)
        assert body.job_id == job["id"] and body.agent == name and body.connection == "pg"
        assert body.kind == "query" and body.params["sql"] == "SELECT $1"
        assert body.params["params"] == [1] and body.params["timeout"] == 30
        assert len(body.nonce) == 32 and int(body.nonce, 16) >= 0
        assert body.expires_at > time.time()
        assert (await agent_info(api, name))["online"]
        sent = (await api.get(f"/api/v1/jobs/{job['id']}")).json()
        assert sent["state"] == "sent" and sent["attempts"] == 1 and sent["sent_at"]
        rows = [[i, f"row {i}"] for i in range(2500)]
        await link.finish_query(job["id"], rows)
        done = await job_state(api, job["id"], "succeeded")
        assert done["result"]["row_count"] == 2500 and done["started_at"] and done["finished_at"]
        page = (
            await api.get(f"/api/v1/jobs/{job['id']}/rows", params={"offset": 900, "limit": 250})
        ).json()
        assert page["columns"] == ["n", "label"] and page["row_count"] == 2500
        assert page["rows"] == rows[900:1150] and page["next_offset"] == 1150
        last = (
            await api.get(f"/api/v1/jobs/{job['id']}/rows", params={"offset": 2400, "limit": 500})
        ).json()
        assert last["rows"] == rows[2400:] and last["next_offset"] is None
        listed = (await api.get("/api/v1/jobs", params={"agent": name})).json()["jobs"]
        assert [j["id"] for j in listed] == [job["id"]]
        metrics = (await api.get("/metrics")).text
        assert 'outpost_hq_jobs_total{kind="query",state="succeeded"}' in metrics
        assert 'outpost_hq_job_duration_seconds_count{kind="query"}' in metrics
        await link.close()


async def test_rejected_job_fails_with_the_reason(hq: HQ) -> None:
    async with admin(hq) as api:
        name, token = await new_agent(api)
        link = Link(hq, token)
        await link.connect()
        job = await create_job(api, agent=name, connection="pg", kind="inspect", schemas=["a"])
        signed = await link.expect(SignedJob)
        assert JobBody.model_validate_json(signed.body).params == {"schemas": ["a"]}
        await link.send(JobRejected(job_id=job["id"], reason="the agent is read-only"))
        failed = await job_state(api, job["id"], "failed")
        assert failed["error"] == "rejected by agent: the agent is read-only"
        await link.close()


async def test_a_dropped_link_gets_its_job_again_with_the_same_body(hq: HQ) -> None:
    async with admin(hq) as api:
        name, token = await new_agent(api)
        link = Link(hq, token)
        await link.connect()
        job = await create_job(api, agent=name, connection="pg", kind="test")
        first = await link.expect(SignedJob)
        await link.send(JobAccepted(job_id=job["id"], started_at=time.time()))
        await job_state(api, job["id"], "running")
        await link.close()
        await eventually(lambda: _offline(api, name), HEARTBEAT * 3, "the agent to be offline")
        again = Link(hq, token)
        await again.connect(running=[job["id"]])
        second = await again.expect(SignedJob)
        assert second == first  # same body, nonce and signature: the agent dedups by job id
        running = (await api.get(f"/api/v1/jobs/{job['id']}")).json()
        assert running["state"] == "running" and running["attempts"] == 2
        await again.send(
            JobFinished(
                job_id=job["id"],
                state="succeeded",
                finished_at=time.time(),
                duration_seconds=0.01,
                result={
                    "up": True,
                    "server_version": "15",
                    "duration_seconds": 0.01,
                    "error": None,
                },
            )
        )
        await again.expect(ResultAck)
        done = await job_state(api, job["id"], "succeeded")
        assert done["result"]["up"] is True
        await again.close()


async def _offline(api: httpx.AsyncClient, name: str) -> bool:
    return (await agent_info(api, name))["online"] is False


async def test_job_for_an_offline_agent_waits_then_expires(hq: HQ) -> None:
    async with admin(hq) as api:
        name, token = await new_agent(api)
        waiting = await create_job(api, agent=name, connection="pg", kind="test")
        short = await create_job(api, agent=name, connection="pg", kind="test", expires_in=1)
        held = (await api.get(f"/api/v1/jobs/{waiting['id']}", params={"wait": 0.5})).json()
        assert held["state"] == "queued"
        expired = await job_state(api, short["id"], "expired")
        assert "expired" in expired["error"]
        link = Link(hq, token)
        await link.connect()
        signed = await link.expect(SignedJob)
        assert JobBody.model_validate_json(signed.body).job_id == waiting["id"]
        await link.close()


async def test_cancel_queued_and_running_jobs(hq: HQ) -> None:
    async with admin(hq) as api:
        name, token = await new_agent(api)
        queued = await create_job(api, agent=name, connection="pg", kind="test")
        cancelled = await api.post(f"/api/v1/jobs/{queued['id']}/cancel")
        assert cancelled.status_code == 200 and cancelled.json()["state"] == "cancelled"
        again = await api.post(f"/api/v1/jobs/{queued['id']}/cancel")
        assert again.status_code == 409 and "already cancelled" in again.json()["message"]
        link = Link(hq, token)
        await link.connect()
        job = await create_job(api, agent=name, connection="pg", kind="test")
        await link.expect(SignedJob)
        await link.send(JobAccepted(job_id=job["id"], started_at=time.time()))
        await job_state(api, job["id"], "running")
        assert (await api.post(f"/api/v1/jobs/{job['id']}/cancel")).status_code == 200
        cancel = await link.expect(CancelJob)
        assert cancel.job_id == job["id"]
        await link.send(
            JobFinished(
                job_id=job["id"],
                state="cancelled",
                finished_at=time.time(),
                duration_seconds=0.5,
                error="cancelled",
            )
        )
        await link.expect(ResultAck)
        await job_state(api, job["id"], "cancelled")
        missing = await api.post(f"/api/v1/jobs/{uuid.uuid4()}/cancel")
        assert missing.status_code == 404
        await link.close()


async def test_cancel_while_offline_stops_the_job_on_reconnect(hq: HQ) -> None:
    async with admin(hq) as api:
        name, token = await new_agent(api)
        link = Link(hq, token)
        await link.connect()
        job = await create_job(api, agent=name, connection="pg", kind="test")
        await link.expect(SignedJob)
        await link.send(JobAccepted(job_id=job["id"], started_at=time.time()))
        await job_state(api, job["id"], "running")
        await link.close()
        await eventually(lambda: _offline(api, name), HEARTBEAT * 3, "the agent to be offline")
        cancelled = await api.post(f"/api/v1/jobs/{job['id']}/cancel")
        assert cancelled.status_code == 200 and cancelled.json()["state"] == "cancelled"
        again = Link(hq, token)
        await again.connect(running=[job["id"]])
        assert await again.expect(CancelJob) == CancelJob(job_id=job["id"])
        assert await again.expect(ResultAck) == ResultAck(job_id=job["id"])
        await again.close()


async def test_max_concurrent_jobs_is_respected(hq: HQ) -> None:
    async with admin(hq) as api:
        name, token = await new_agent(api)
        link = Link(hq, token)
        await link.connect()
        jobs = [
            await create_job(api, agent=name, connection="pg", kind="test")
            for _ in range(MAX_JOBS + 1)
        ]
        got = [JobBody.model_validate_json((await link.expect(SignedJob)).body).job_id]
        got += [JobBody.model_validate_json((await link.expect(SignedJob)).body).job_id]
        assert got == [j["id"] for j in jobs[:MAX_JOBS]]
        third = (await api.get(f"/api/v1/jobs/{jobs[-1]['id']}", params={"wait": 1})).json()
        assert third["state"] == "queued"
        await link.send(JobRejected(job_id=got[0], reason="no"))
        signed = await link.expect(SignedJob)
        assert JobBody.model_validate_json(signed.body).job_id == jobs[-1]["id"]
        await link.close()


async def test_a_silent_agent_goes_offline(hq: HQ) -> None:
    async with admin(hq) as api:
        name, token = await new_agent(api)
        link = Link(hq, token)
        await link.connect(heartbeats=False)
        assert (await agent_info(api, name))["online"] is True
        await eventually(lambda: _offline(api, name), HEARTBEAT * 5, "the silent agent offline")
        info = await agent_info(api, name)
        assert info["last_seen"] is not None and info["transport"] is None
        await link.close()


@pytest.fixture
def roomy_hq(hq: HQ) -> Iterator[HQ]:
    """The module's HQ restarted with the default 5 s heartbeat: this measures how many links one
    HQ holds, not how fast 200 agents heartbeat on a busy 2-core machine."""
    original = list(hq.args)
    hq.stop()
    hq.args = ["--heartbeat-interval", "5", "--max-concurrent-jobs", str(MAX_JOBS)]
    hq.start()
    try:
        yield hq
    finally:
        hq.stop()
        hq.args = original
        hq.start()


async def test_many_idle_websockets_at_once(roomy_hq: HQ) -> None:
    hq = roomy_hq
    count = 200
    async with admin(hq) as api:
        limit = asyncio.Semaphore(16)

        async def enrol() -> str:
            async with limit:
                return (await new_agent(api, unique("idle")))[1]

        tokens = await asyncio.gather(*(enrol() for _ in range(count)))
        before = (await api.get("/api/v1/hq")).json()["agents_online"]
        links = [Link(hq, t) for t in tokens]

        async def connect(link: Link) -> None:
            async with limit:
                await link.connect()

        await asyncio.gather(*(connect(link) for link in links))
        try:

            async def all_online() -> bool:
                online = (await api.get("/api/v1/hq")).json()["agents_online"]
                return bool(online >= before + count)

            await eventually(all_online, 120, f"{count} agents online")
            metrics = (await api.get("/metrics")).text
            gauge = next(
                line
                for line in metrics.splitlines()
                if line.startswith("outpost_hq_agents_connected ")
            )
            assert float(gauge.split()[1]) >= count
        finally:
            await asyncio.gather(*(link.close() for link in links))


async def test_large_result_in_pages(hq: HQ) -> None:
    total = 100_000
    rows = [[i, f"label {i}"] for i in range(total)]
    async with admin(hq) as api:
        name, token = await new_agent(api)
        link = Link(hq, token)
        await link.connect()
        job = await create_job(
            api, agent=name, connection="pg", kind="query", sql="SELECT 1", max_rows=total
        )
        await link.expect(SignedJob)
        await link.finish_query(job["id"], rows)
        await job_state(api, job["id"], "succeeded")
        got: list[list[Any]] = []
        offset: int | None = 0
        while offset is not None:
            page = (
                await api.get(
                    f"/api/v1/jobs/{job['id']}/rows", params={"offset": offset, "limit": 10_000}
                )
            ).json()
            got.extend(page["rows"])
            offset = page["next_offset"]
        assert got == rows
        await link.close()


# -- metadata ----------------------------------------------------------------------------------


async def test_connection_metadata_from_the_agent_and_declared_at_hq(hq: HQ) -> None:
    async with admin(hq) as api:
        name, token = await new_agent(api)
        declared = await api.put(
            f"/api/v1/agents/{name}/connections/warehouse",
            json={"name": "Warehouse", "driver": "redshift"},
        )
        assert declared.status_code == 200 and declared.json()["on_agent"] is False
        link = Link(hq, token)
        await link.connect(connections=[meta("pg"), meta("maria", "mysql", up=False)])

        async def listed() -> dict[str, Any]:
            conns = (await api.get("/api/v1/connections", params={"agent": name})).json()
            return {c["slug"]: c for c in conns["connections"]}

        conns = await listed()
        assert set(conns) == {"pg", "maria", "warehouse"}
        assert conns["pg"]["on_agent"] and conns["pg"]["up"] is True
        assert conns["maria"]["up"] is False and conns["maria"]["driver"] == "mysql"
        assert conns["warehouse"]["on_agent"] is False
        await link.send(ConnectionsReport(connections=[meta("pg"), meta("warehouse", "redshift")]))

        async def reported() -> bool:
            now = await listed()
            return set(now) == {"pg", "warehouse"} and now["warehouse"]["on_agent"] is True

        await eventually(reported, 20, "the connections report to apply")
        assert (await agent_info(api, name))["connections"] == 2
        gone = await api.delete(f"/api/v1/agents/{name}/connections/nothing")
        assert gone.status_code == 404
        await link.close()
    columns = _connection_columns(hq)
    assert columns == {
        "agent",
        "slug",
        "name",
        "driver",
        "up",
        "checked_at",
        "on_agent",
        "declared",
    }


def _connection_columns(hq: HQ) -> set[str]:
    engine = sa.create_engine(database_url(hq.database, hq.data_dir))
    try:
        return {c["name"] for c in sa.inspect(engine).get_columns("connections")}
    finally:
        engine.dispose()


# -- long-poll ---------------------------------------------------------------------------------


async def test_long_poll_link(hq: HQ) -> None:
    async with admin(hq) as api:
        name, token = await new_agent(api)
        auth = {"Authorization": f"Bearer {token}"}
        async with httpx.AsyncClient(base_url=hq.url, headers=auth, timeout=60) as agent:

            async def poll(*messages: Any, wait: float = 1) -> list[HQMessage]:
                request = PollRequest(messages=list(messages), wait=wait)
                response = await agent.post(
                    "/agent/v1/poll",
                    content=request.model_dump_json(),
                    headers={"Content-Type": "application/json"},
                )
                assert response.status_code == 200, response.text
                return PollResponse.model_validate(response.json()).messages

            hello = Hello(agent_version="1.2.3", read_only=True, connections=[meta("pg")])
            first = await poll(hello)
            assert isinstance(first[0], Welcome) and first[0].agent_name == name
            info = await agent_info(api, name)
            assert info["online"] and info["transport"] == "poll" and info["read_only"] is True
            job = await create_job(api, agent=name, connection="pg", kind="query", sql="SELECT 1")
            got = [m for m in await poll(wait=5) if isinstance(m, SignedJob)]
            assert JobBody.model_validate_json(got[0].body).job_id == job["id"]
            answer = await poll(
                JobAccepted(job_id=job["id"], started_at=time.time()),
                ResultChunk(job_id=job["id"], seq=0, rows=[[1, "a"], [2, "b"]]),
                JobFinished(
                    job_id=job["id"],
                    state="succeeded",
                    finished_at=time.time(),
                    duration_seconds=0.1,
                    result={"columns": ["n", "s"], "row_count": 2, "truncated": False},
                    chunks=1,
                ),
            )
            assert ResultAck(job_id=job["id"]) in answer
            await job_state(api, job["id"], "succeeded")
            rows = (await api.get(f"/api/v1/jobs/{job['id']}/rows")).json()
            assert rows["rows"] == [[1, "a"], [2, "b"]]
            idle = await poll(wait=0.2)
            assert all(isinstance(m, Heartbeat) for m in idle)
            refused = await agent.post(
                "/agent/v1/poll", json={"messages": []}, headers={"Authorization": "Bearer x"}
            )
            assert refused.status_code == 401 and refused.json()["code"] == "token_unknown"
        # no more polls: offline after two heartbeat intervals
        await eventually(lambda: _offline(api, name), HEARTBEAT * 5, "the poll agent offline")


# -- restart, signals, TLS, retention, CLI errors ----------------------------------------------


async def test_restart_keeps_id_agents_and_jobs(hq: HQ) -> None:
    async with admin(hq) as api:
        before = (await api.get("/api/v1/hq")).json()
        name, _ = await new_agent(api)
        job = await create_job(api, agent=name, connection="pg", kind="test")
    hq.stop()
    hq.start()
    async with admin(hq) as api:
        after = (await api.get("/api/v1/hq")).json()
        assert after["hq_id"] == before["hq_id"] and after["signing_key"] == before["signing_key"]
        assert (await agent_info(api, name))["name"] == name
        assert (await api.get(f"/api/v1/jobs/{job['id']}")).json()["state"] == "queued"


@pytest.fixture
def sqlite_hq(tmp_path: Path) -> Iterator[HQ]:
    server = HQ(
        tmp_path / "hq", args=["--heartbeat-interval", str(HEARTBEAT), "--log-format", "json"]
    )
    server.create_admin()
    server.start()
    try:
        yield server
    finally:
        server.stop()


async def test_sigterm_stops_cleanly_closes_links_and_logs_json(sqlite_hq: HQ) -> None:
    async with admin(sqlite_hq) as api:
        _, token = await new_agent(api)
    link = Link(sqlite_hq, token)
    await link.connect()
    assert sqlite_hq.proc is not None
    proc = sqlite_hq.proc
    proc.send_signal(signal.SIGTERM)
    assert link.ws is not None
    with pytest.raises(ConnectionClosed):
        while True:
            await asyncio.wait_for(link.ws.recv(), 20)
    code = await asyncio.to_thread(proc.wait, 20)
    assert code == 0, sqlite_hq.log()
    lines = [json.loads(line) for line in sqlite_hq.log().splitlines() if line.strip()]
    messages = [line["message"] for line in lines]
    assert f"Outpost HQ listening on {sqlite_hq.url}" in messages
    assert "Outpost HQ stopped" in messages
    await link.close()


async def test_tls(tmp_path: Path) -> None:
    import trustme

    ca = trustme.CA()
    cert = ca.issue_cert("127.0.0.1")
    cert_path, key_path, ca_path = (tmp_path / n for n in ("cert.pem", "key.pem", "ca.pem"))
    cert.private_key_and_cert_chain_pem.write_to_path(str(cert_path))
    cert.private_key_pem.write_to_path(str(key_path))
    ca.cert_pem.write_to_path(str(ca_path))
    server = HQ(tmp_path / "hq", args=["--tls-cert", str(cert_path), "--tls-key", str(key_path)])
    server.ca_file = str(ca_path)
    server.create_admin()
    server.start()
    try:
        assert f"Outpost HQ listening on https://127.0.0.1:{server.port}" in server.log()
        async with admin(server) as api:
            name, token = await new_agent(api)
        import ssl

        context = ssl.create_default_context(cafile=str(ca_path))
        async with connect(
            ws_url(server), additional_headers={"Authorization": f"Bearer {token}"}, ssl=context
        ) as ws:
            await ws.send(
                Hello(agent_version="1", read_only=False, connections=[]).model_dump_json()
            )
            welcome = hq_message.validate_json(await asyncio.wait_for(ws.recv(), 20))
            assert isinstance(welcome, Welcome) and welcome.agent_name == name
    finally:
        server.stop()


async def test_retention_deletes_old_finished_jobs(tmp_path: Path) -> None:
    server = HQ(tmp_path / "hq", args=["--retention-days", "0.00002"])  # ~1.7 s
    server.create_admin()
    server.start()
    try:
        async with admin(server) as api:
            name, _ = await new_agent(api)
            job = await create_job(api, agent=name, connection="pg", kind="test")
            await api.post(f"/api/v1/jobs/{job['id']}/cancel")

            async def deleted() -> bool:
                return (await api.get(f"/api/v1/jobs/{job['id']}")).status_code == 404

            await eventually(deleted, 30, "retention to delete the finished job")
            assert "retention: deleted 1 finished job(s)" in server.log()
    finally:
        server.stop()


def _hq_cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*OUTPOST, "hq", *args], capture_output=True, text=True, env=hq_env(), timeout=60
    )


def test_serve_refuses_bad_options(tmp_path: Path) -> None:
    data = str(tmp_path / "data")
    half = _hq_cli("serve", "--data-dir", data, "--tls-cert", __file__)
    assert half.returncode == 2 and "--tls-cert and --tls-key go together" in half.stderr
    scheme = _hq_cli("serve", "--data-dir", data, "--database", "mysql://root@localhost/x")
    assert scheme.returncode == 2 and "scheme 'mysql' is not supported" in scheme.stderr
    assert "Traceback" not in half.stderr + scheme.stderr
    bad_db = _hq_cli(
        "admin",
        "create",
        "--data-dir",
        data,
        "--database",
        "postgresql://nobody:s3cret-pw@127.0.0.1:1/none",
    )
    assert bad_db.returncode == 1 and "Cannot use HQ database" in bad_db.stderr
    assert "s3cret-pw" not in bad_db.stderr and "Traceback" not in bad_db.stderr


def test_serve_reports_a_busy_port(tmp_path: Path) -> None:
    port = free_port()
    first = HQ(tmp_path / "one", port=port)
    first.start()
    try:
        second = subprocess.run(
            [*OUTPOST, "hq", "serve", "--port", str(port), "--data-dir", str(tmp_path / "two")],
            capture_output=True,
            text=True,
            env=hq_env(),
            timeout=60,
        )
        assert second.returncode == 1
        assert f"Cannot listen on 127.0.0.1:{port}" in second.stderr
        assert "Traceback" not in second.stderr
    finally:
        first.stop()
