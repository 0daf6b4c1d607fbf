"""The agent's link to a real `outpost hq serve`: login, the connected log line, jobs on SQLite
and PostgreSQL through HQ, the long-poll transport, and the fallback to it when a proxy
refuses the WebSocket upgrade. Agents and HQ are real subprocesses."""

from __future__ import annotations

import contextlib
import socket
import sqlite3
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest

from tests.helpers import Agent, wait_for
from tests.hq_helpers import HQ, enrol

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def hq(tmp_path_factory: pytest.TempPathFactory) -> Iterator[HQ]:
    server = HQ(tmp_path_factory.mktemp("hq"))
    server.create_admin()
    server.start()
    yield server
    server.stop()


@pytest.fixture
def shop_db(tmp_path: Path) -> Path:
    path = tmp_path / "shop.db"
    with sqlite3.connect(path) as conn:
        conn.execute("CREATE TABLE orders (id INTEGER PRIMARY KEY, item TEXT NOT NULL)")
        conn.executemany(
            "INSERT INTO orders (item) VALUES (?)", [(f"item {i}",) for i in range(1, 2501)]
        )
    return path


def sqlite_agent(root: Path, db: Path, **config: Any) -> Agent:
    agent = Agent(root, config=config)
    agent.ok("connections", "add", "sqlite", "--name", "Shop", "--source-url", str(db))
    return agent


def connected(agent: Agent, name: str, times: int = 1) -> None:
    line = f"connected to HQ as {name}"
    wait_for(lambda: agent.log().count(line) >= times, 30, f"{line!r} in the agent log")


def agent_info(hq: HQ, name: str) -> dict[str, Any]:
    with hq.api() as api:
        data: dict[str, Any] = api.get(f"/api/v1/agents/{name}").json()
        return data


def test_login_connect_and_query_sqlite_over_websocket(
    hq: HQ, tmp_path: Path, shop_db: Path
) -> None:
    agent = sqlite_agent(tmp_path / "agent", shop_db)
    token = hq.create_agent("edge-ws")
    login = agent.ok(
        "login", "--hq", hq.url, "--token-env", "T", "--format", "json", env={"T": token}
    )
    info = login.json
    assert info["agent_name"] == "edge-ws" and info["url"] == hq.url
    with hq.api() as api:
        assert info["signing_key"] == api.get("/api/v1/hq").json()["signing_key"]
    assert token not in (agent.data_dir / "hq.json").read_text()
    with agent.serving():
        connected(agent, "edge-ws")
        wait_for(lambda: agent_info(hq, "edge-ws")["online"], 20, "HQ to list the agent online")
        assert agent_info(hq, "edge-ws")["transport"] == "websocket"
        with hq.api() as api:
            [conn] = api.get("/api/v1/connections", params={"agent": "edge-ws"}).json()[
                "connections"
            ]
        assert conn["slug"] == "shop" and conn["driver"] == "sqlite" and conn["on_agent"]
        assert set(conn) == {"agent", "slug", "name", "driver", "up", "checked_at", "on_agent"}

        job = hq.run_job(
            agent="edge-ws",
            connection="shop",
            kind="query",
            sql="SELECT id, item FROM orders WHERE id > ? ORDER BY id",
            params=[100],
            max_rows=5000,
        )
        assert job["state"] == "succeeded", job
        assert job["result"]["columns"] == ["id", "item"]
        assert job["result"]["row_count"] == 2400
        rows = hq.rows(job["id"])
        assert rows[0] == [101, "item 101"] and rows[-1] == [2500, "item 2500"]
        assert len(rows) == 2400

        test = hq.run_job(agent="edge-ws", connection="shop", kind="test")
        assert test["state"] == "succeeded" and test["result"]["up"] is True

        missing = hq.run_job(agent="edge-ws", connection="nowhere", kind="test")
        assert missing["state"] == "failed" and "nowhere" in missing["error"]

        # a write on a read/write agent runs only when the job allows it
        refused = hq.run_job(
            agent="edge-ws", connection="shop", kind="query", sql="DELETE FROM orders"
        )
        assert refused["state"] == "failed"
    with sqlite3.connect(shop_db) as conn:
        assert conn.execute("SELECT count(*) FROM orders").fetchone()[0] == 2500


def test_query_on_postgres_through_hq_matches_the_driver(
    hq: HQ, tmp_path: Path, pg_dsn: str, pg_params: dict[str, object]
) -> None:
    agent = Agent(tmp_path / "agent")
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
    )
    enrol(hq, agent, "edge-pg")
    sql = "SELECT n, md5(n::text) AS digest FROM generate_series(1, 3000) AS n ORDER BY n"
    with psycopg.connect(pg_dsn) as conn:
        expected = [list(row) for row in conn.execute(sql).fetchall()]
    with agent.serving():
        connected(agent, "edge-pg")
        job = hq.run_job(
            agent="edge-pg", connection="warehouse", kind="query", sql=sql, max_rows=10000
        )
        assert job["state"] == "succeeded", job
        assert job["result"]["columns"] == ["n", "digest"]
        assert hq.rows(job["id"]) == expected


def test_read_only_agent_rejects_a_write_job(hq: HQ, tmp_path: Path, shop_db: Path) -> None:
    agent = sqlite_agent(tmp_path / "agent", shop_db, read_only=True)
    enrol(hq, agent, "edge-ro")
    with agent.serving():
        connected(agent, "edge-ro")
        job = hq.run_job(
            agent="edge-ro",
            connection="shop",
            kind="query",
            sql="DELETE FROM orders",
            allow_writes=True,
        )
    assert job["state"] == "failed"
    assert job["error"].startswith("rejected by agent:") and "read-only" in job["error"]
    with sqlite3.connect(shop_db) as conn:
        assert conn.execute("SELECT count(*) FROM orders").fetchone()[0] == 2500


def test_poll_transport_when_configured(hq: HQ, tmp_path: Path, shop_db: Path) -> None:
    agent = sqlite_agent(tmp_path / "agent", shop_db, hq={"transport": "poll"})
    enrol(hq, agent, "edge-poll")
    with agent.serving() as proc:
        connected(agent, "edge-poll")
        wait_for(lambda: agent_info(hq, "edge-poll")["online"], 20, "HQ to list the agent online")
        assert agent_info(hq, "edge-poll")["transport"] == "poll"
        job = hq.run_job(
            agent="edge-poll", connection="shop", kind="query", sql="SELECT count(*) FROM orders"
        )
        assert job["state"] == "succeeded", job
        assert hq.rows(job["id"]) == [[2500]]
        # a connection added while the agent runs is reported to HQ
        agent.ok("connections", "add", "sqlite", "--name", "Copy", "--source-url", str(shop_db))

        def slugs() -> set[str]:
            with hq.api() as api:
                found = api.get("/api/v1/connections", params={"agent": "edge-poll"}).json()
            return {c["slug"] for c in found["connections"] if c["on_agent"]}

        wait_for(lambda: slugs() == {"shop", "copy"}, 20, "HQ to list the new connection")
    assert proc.returncode == 0  # SIGTERM stops the agent and its link cleanly


class UpgradeBlockingProxy:
    """A loopback HTTP proxy in front of HQ, as some corporate proxies are: it forwards plain
    HTTP and answers every WebSocket upgrade with 403."""

    def __init__(self, upstream_port: int) -> None:
        self.upstream_port = upstream_port
        self.refused = 0
        self.forwarded = 0
        self._server = socket.create_server(("127.0.0.1", 0))
        self.port = int(self._server.getsockname()[1])
        self._stop = False
        self._thread = threading.Thread(target=self._accept, daemon=True)

    def __enter__(self) -> UpgradeBlockingProxy:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop = True
        self._server.close()

    def _accept(self) -> None:
        while not self._stop:
            try:
                client, _ = self._server.accept()
            except OSError:
                return
            threading.Thread(target=self._handle, args=(client,), daemon=True).start()

    def _handle(self, client: socket.socket) -> None:
        head = b""
        while b"\r\n\r\n" not in head:
            chunk = client.recv(65536)
            if not chunk:
                client.close()
                return
            head += chunk
        if b"upgrade: websocket" in head.lower():
            self.refused += 1
            client.sendall(
                b"HTTP/1.1 403 Forbidden\r\nContent-Length: 9\r\nConnection: close\r\n\r\nforbidden"
            )
            client.close()
            return
        self.forwarded += 1
        upstream = socket.create_connection(("127.0.0.1", self.upstream_port))
        upstream.sendall(head)

        def pipe(src: socket.socket, dst: socket.socket) -> None:
            try:
                while data := src.recv(65536):
                    dst.sendall(data)
            except OSError:
                pass
            finally:
                for sock in (src, dst):
                    with contextlib.suppress(OSError):
                        sock.shutdown(socket.SHUT_RDWR)

        threading.Thread(target=pipe, args=(upstream, client), daemon=True).start()
        pipe(client, upstream)
        client.close()
        upstream.close()


def test_auto_falls_back_to_poll_when_a_proxy_blocks_websockets(
    hq: HQ, tmp_path: Path, shop_db: Path
) -> None:
    agent = sqlite_agent(tmp_path / "agent", shop_db)
    token = hq.create_agent("edge-proxied")
    with UpgradeBlockingProxy(hq.port) as proxy:
        agent.ok(
            "login",
            "--hq",
            f"http://127.0.0.1:{proxy.port}",
            "--token-env",
            "T",
            env={"T": token},
        )
        with agent.serving():
            connected(agent, "edge-proxied")
            assert proxy.refused >= 1
            assert "falling back to long-polling" in agent.log()
            wait_for(
                lambda: agent_info(hq, "edge-proxied")["transport"] == "poll",
                20,
                "HQ to see the agent polling",
            )
            job = hq.run_job(
                agent="edge-proxied",
                connection="shop",
                kind="query",
                sql="SELECT max(id) FROM orders",
            )
            assert job["state"] == "succeeded", job
            assert hq.rows(job["id"]) == [[2500]]


def test_serve_logs_in_by_itself_from_the_config(hq: HQ, tmp_path: Path, shop_db: Path) -> None:
    token = hq.create_agent("edge-cfg")
    agent = sqlite_agent(tmp_path / "agent", shop_db, hq={"url": hq.url})
    with agent.serving(env={"OUTPOST_HQ_TOKEN": token}):
        connected(agent, "edge-cfg")
        assert "logged in to HQ" in agent.log()
    assert (agent.data_dir / "hq.json").exists()
    assert token not in agent.log()


def test_login_while_the_agent_runs_then_sighup_connects(
    hq: HQ, tmp_path: Path, shop_db: Path
) -> None:
    agent = sqlite_agent(tmp_path / "agent", shop_db)
    with agent.serving() as proc:
        token = hq.create_agent("edge-hup")
        result = agent.ok("login", "--hq", hq.url, "--token-env", "T", env={"T": token})
        assert f"kill -HUP {proc.pid}" in result.out
        proc.send_signal(1)  # SIGHUP
        connected(agent, "edge-hup")


def test_login_refuses_a_bad_token_and_another_hq(hq: HQ, tmp_path: Path, shop_db: Path) -> None:
    agent = sqlite_agent(tmp_path / "agent", shop_db)
    bad = agent.fails("login", "--hq", hq.url, "--token-env", "T", env={"T": "opt_nonsense"})
    assert "rejected this agent's token (token_unknown)" in bad.err
    assert "Traceback" not in bad.err
    assert not (agent.data_dir / "hq.json").exists()

    enrol(hq, agent, "edge-once")
    other = HQ(tmp_path / "other-hq")
    other.create_admin()
    other.start()
    try:
        token = other.create_agent("edge-once")
        refused = agent.fails("login", "--hq", other.url, "--token-env", "T", env={"T": token})
    finally:
        other.stop()
    assert "is another HQ" in refused.err and "hq.json" in refused.err
    assert hq.url in (agent.data_dir / "hq.json").read_text()

    flagged = agent.run("login", "--hq", hq.url, "--token", "opt_visible")
    assert "visible in the process list" in flagged.err

    insecure = agent.fails(
        "login", "--hq", "http://hq.example.com", "--token-env", "T", env={"T": "x"}
    )
    assert "plain HTTP" in insecure.err and "--allow-insecure" in insecure.err


def test_tls_hq_is_verified_with_the_ca_file(tmp_path: Path, shop_db: Path) -> None:
    trustme = pytest.importorskip("trustme")
    ca = trustme.CA()
    cert = ca.issue_cert("127.0.0.1", "localhost")
    ca_pem, cert_pem, key_pem = tmp_path / "ca.pem", tmp_path / "hq.pem", tmp_path / "hq.key"
    ca.cert_pem.write_to_path(str(ca_pem))
    cert.private_key_and_cert_chain_pem.write_to_path(str(cert_pem))
    cert.private_key_pem.write_to_path(str(key_pem))
    hq = HQ(tmp_path / "hq", args=["--tls-cert", str(cert_pem), "--tls-key", str(key_pem)])
    hq.ca_file = str(ca_pem)
    hq.create_admin()
    hq.start()
    try:
        agent = sqlite_agent(tmp_path / "agent", shop_db)
        token = hq.create_agent("edge-tls")
        untrusted = agent.fails("login", "--hq", hq.url, "--token-env", "T", env={"T": token})
        assert "certificate" in untrusted.err and "--ca-file" in untrusted.err
        assert "Traceback" not in untrusted.err
        agent.ok(
            "login", "--hq", hq.url, "--token-env", "T", "--ca-file", str(ca_pem), env={"T": token}
        )
        with agent.serving():
            connected(agent, "edge-tls")
            assert f"link to HQ at {hq.url} open over websocket" in agent.log()
            job = hq.run_job(
                agent="edge-tls", connection="shop", kind="query", sql="SELECT min(id) FROM orders"
            )
            assert job["state"] == "succeeded", job
            assert hq.rows(job["id"]) == [[1]]
    finally:
        hq.stop()
