"""The console (SHOW …, PAUSE/RESUME, RELOAD), metrics, and `outpost pooler serve` as a real
process: routes from the agent's store, SIGHUP reload without dropping clients, two workers
with SO_REUSEPORT and cancel requests that land on the other worker."""

from __future__ import annotations

import signal
import subprocess
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import psycopg
import pytest
from prometheus_client import CollectorRegistry, generate_latest

from outpost.config import PoolerConfig
from outpost.pooler.admin import POOLS_COLUMNS, PoolerCollector
from outpost.pooler.routes import StaticRoutes
from tests.helpers import OUTPOST, Agent, free_port, wait_for
from tests.integration.test_pooler_support import (
    PASSWORD,
    USER,
    RunningPooler,
    TenantDb,
    running_pooler,
    tenant_db,  # noqa: F401 - fixture
)

pytestmark = pytest.mark.integration

PGBOUNCER_POOLS = [
    "database", "user", "cl_active", "cl_waiting", "cl_active_cancel_req",
    "cl_waiting_cancel_req", "sv_active", "sv_active_cancel", "sv_being_canceled", "sv_idle",
    "sv_used", "sv_tested", "sv_login", "maxwait", "maxwait_us", "pool_mode",
]  # fmt: skip


@pytest.fixture(scope="module")
def pooler(tenant_db: TenantDb) -> Iterator[RunningPooler]:  # noqa: F811
    config = PoolerConfig(pool_size=2, admin_users=["admin"])
    with running_pooler(config, StaticRoutes(tenant_db.routes())) as running:
        yield running


def _console(port: int, database: str = "outpost", user: str = "admin") -> Any:
    return psycopg.connect(
        host="127.0.0.1", port=port, user=user, dbname=database, sslmode="disable", autocommit=True
    )


def _show(console: Any, command: str) -> tuple[list[str], list[tuple[str | None, ...]]]:
    """Run a console command with the simple protocol (as psql does)."""
    result = console.pgconn.exec_(command.encode())
    if result.error_message:
        raise AssertionError(result.error_message.decode())
    columns = [result.fname(i).decode() for i in range(result.nfields)]
    rows = [
        tuple(
            None if result.get_value(r, c) is None else result.get_value(r, c).decode()
            for c in range(result.nfields)
        )
        for r in range(result.ntuples)
    ]
    return columns, rows


def test_console_shows_pools_clients_servers_stats_routes(pooler: RunningPooler) -> None:
    with psycopg.connect(**pooler.conninfo(options="-csearch_path=tenant_a")) as client:
        client.execute("SELECT 1")  # holds a server: a transaction is open
        with _console(pooler.port) as console:
            columns, rows = _show(console, "SHOW POOLS")
            assert columns == PGBOUNCER_POOLS == [name for name, _ in POOLS_COLUMNS]
            (pool,) = rows
            assert pool[1] == "postgres" and pool[-1] == "transaction"
            assert pool[6] == "1"  # sv_active
            columns, rows = _show(console, "SHOW CLIENTS")
            assert columns[:4] == ["type", "user", "database", "state"]
            assert ("C", USER, "app/tenant_a") in {row[:3] for row in rows}
            addr, port = columns.index("local_addr"), columns.index("local_port")
            # the pooler's end of each (the listener's address: no getsockname per client)
            assert {(row[addr], row[port]) for row in rows} == {("127.0.0.1", str(pooler.port))}
            columns, rows = _show(console, "SHOW SERVERS")
            assert {row[3] for row in rows} == {"active"}
            assert all(row[15] and int(row[15]) > 0 for row in rows)  # remote_pid
            columns, rows = _show(console, "SHOW STATS")
            assert columns[:3] == ["database", "total_xact_count", "total_query_count"]
            columns, rows = _show(console, "SHOW ROUTES")
            assert {(r[0], r[1], r[2]) for r in rows} >= {("app", "tenant_a", USER)}
            assert all("password" not in str(r) for r in rows)
            with pytest.raises(AssertionError, match="unknown console command"):
                _show(console, "SHOW NONSENSE")
        client.rollback()
    with _console(pooler.port, database="pgbouncer") as console:  # the alias
        _columns, rows = _show(console, "SHOW STATS")
        assert int(str(rows[0][1])) >= 1  # total_xact_count


def test_console_refuses_non_admins(pooler: RunningPooler) -> None:
    with pytest.raises(psycopg.OperationalError, match="may not use the pooler console"):
        _console(pooler.port, user=USER)


def test_pause_holds_new_transactions_until_resume(pooler: RunningPooler) -> None:
    with (
        _console(pooler.port) as console,
        psycopg.connect(**pooler.conninfo(), autocommit=True) as client,
    ):
        _show(console, "PAUSE")
        result: dict[str, Any] = {}
        thread = threading.Thread(
            target=lambda: result.update(row=client.execute("SELECT 'after'").fetchone())
        )
        thread.start()
        wait_for(
            lambda: _show(console, "SHOW POOLS")[1][0][3] == "1",  # cl_waiting
            what="the client to wait while paused",
        )
        assert "row" not in result
        _show(console, "RESUME")
        thread.join(20)
        assert result["row"] == ("after",)


def test_prometheus_metrics(pooler: RunningPooler) -> None:
    with psycopg.connect(**pooler.conninfo(), autocommit=True) as client:
        client.execute("SELECT 1")
    assert pooler.server is not None
    registry = CollectorRegistry()
    registry.register(PoolerCollector(pooler.server))
    text = pooler.call(_latest(registry))
    assert "outpost_pooler_transactions_total{pool=" in text
    assert 'outpost_pooler_server_connections{pool="' in text
    assert "outpost_pooler_client_wait_timeouts_total" in text


async def _latest(registry: CollectorRegistry) -> str:
    return generate_latest(registry).decode()


# --- `outpost pooler serve` as a process ---------------------------------------------------------


@pytest.fixture
def agent_with_route(tmp_path: Path, tenant_db: TenantDb) -> Agent:  # noqa: F811
    agent = Agent(tmp_path / "agent").with_key()
    agent.config["pooler"] = {"admin_users": ["admin"], "pool_size": 3}
    agent.write_config()
    agent.ok(
        "connections", "add", "postgres", "--name", "tenants", "--host", tenant_db.host,
        "--port", str(tenant_db.port), "--user", tenant_db.user, "--database", tenant_db.name,
    )  # fmt: skip
    for schema in ("tenant_a", "tenant_b"):
        agent.ok(
            "pooler", "routes", "add", "--database", "app", "--schema", schema, "--user", USER,
            "--to", "tenants", "--password-env", "ROUTE_PW", env={"ROUTE_PW": PASSWORD},
        )  # fmt: skip
    return agent


def _serve(agent: Agent, *args: str) -> tuple[subprocess.Popen[str], int]:
    port = free_port()
    log = open(agent.root / "pooler.log", "a")  # noqa: SIM115 - owned by the process
    proc = subprocess.Popen(
        [*OUTPOST, "pooler", "serve", "--listen", f"127.0.0.1:{port}", *args],
        stdout=log,
        stderr=subprocess.STDOUT,
        text=True,
        env=agent.env(),
    )

    def up() -> bool:
        assert proc.poll() is None, (agent.root / "pooler.log").read_text()
        try:
            with _console(port):
                return True
        except psycopg.OperationalError:
            return False

    wait_for(up, what="the pooler to accept connections")
    return proc, port


def _stop(proc: subprocess.Popen[str]) -> None:
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(30) == 0


def _conninfo(port: int, schema: str) -> dict[str, Any]:
    return {
        "host": "127.0.0.1",
        "port": port,
        "user": USER,
        "password": PASSWORD,
        "dbname": "app",
        "sslmode": "disable",
        "options": f"-csearch_path={schema}",
        "autocommit": True,
    }


def test_serve_with_store_routes_and_sighup_reload(agent_with_route: Agent) -> None:
    agent = agent_with_route
    proc, port = _serve(agent)
    try:
        with psycopg.connect(**_conninfo(port, "tenant_a")) as client:
            assert client.execute("SELECT name FROM whoami").fetchone() == ("tenant_a",)
            agent.config["pooler"]["pool_size"] = 7
            agent.write_config()
            proc.send_signal(signal.SIGHUP)
            with _console(port) as console:
                wait_for(
                    lambda: _show(console, "SHOW DATABASES")[1][0][5] == "7",
                    what="pool_size 7 after SIGHUP",
                )
            # the client stayed connected through the reload
            assert client.execute("SELECT name FROM whoami").fetchone() == ("tenant_a",)
        with psycopg.connect(**_conninfo(port, "tenant_b")) as other:
            assert other.execute("SELECT name FROM whoami").fetchone() == ("tenant_b",)
    finally:
        _stop(proc)


def test_tls_turned_on_by_sighup_serves_new_connections(
    agent_with_route: Agent, tmp_path: Path
) -> None:
    """Without TLS the engine accepts connections itself; a reload that adds a certificate
    moves the listener back to asyncio, so that new clients can start TLS."""
    import trustme

    agent = agent_with_route
    ca = trustme.CA()
    cert = ca.issue_cert("127.0.0.1")
    cert.private_key_and_cert_chain_pem.write_to_path(str(tmp_path / "pooler.pem"))
    ca.cert_pem.write_to_path(str(tmp_path / "ca.pem"))
    proc, port = _serve(agent)
    try:
        tls = {**_conninfo(port, "tenant_a"), "sslmode": "verify-full"}
        tls["sslrootcert"] = str(tmp_path / "ca.pem")
        with pytest.raises(psycopg.OperationalError, match="server does not support SSL"):
            psycopg.connect(**tls)
        with psycopg.connect(**_conninfo(port, "tenant_a")) as before:  # stays connected
            agent.config["pooler"]["tls_cert_file"] = str(tmp_path / "pooler.pem")
            agent.write_config()
            proc.send_signal(signal.SIGHUP)

            def tls_works() -> bool:
                try:
                    with psycopg.connect(**tls) as conn:
                        return bool(conn.pgconn.ssl_in_use)
                except psycopg.OperationalError:
                    return False

            wait_for(tls_works, what="TLS after SIGHUP")
            assert before.execute("SELECT name FROM whoami").fetchone() == ("tenant_a",)
        with psycopg.connect(**_conninfo(port, "tenant_b")) as plain:  # prefer: still offered
            assert plain.execute("SELECT name FROM whoami").fetchone() == ("tenant_b",)
    finally:
        _stop(proc)


def test_two_workers_share_the_port_and_cancel_across_workers(agent_with_route: Agent) -> None:
    proc, port = _serve(agent_with_route, "--workers", "2")
    clients: list[psycopg.Connection[tuple[Any, ...]]] = []
    try:
        workers_seen: set[int] = set()
        for _ in range(40):
            conn = psycopg.connect(**_conninfo(port, "tenant_a"))
            clients.append(conn)
            workers_seen.add(conn.info.backend_pid >> 24)
            if len(workers_seen) == 2 and len(clients) >= 6:
                break
        assert workers_seen == {1, 2}, "both workers accept connections"
        # every client's cancel request reaches its backend, whichever worker receives it
        for conn in clients[:6]:
            outcome: dict[str, str] = {}

            def slow(c: Any = conn, out: dict[str, str] = outcome) -> None:
                try:
                    c.execute("SELECT pg_sleep(30)")
                    out["result"] = "finished"
                except psycopg.errors.QueryCanceled:
                    out["result"] = "canceled"

            thread = threading.Thread(target=slow)
            thread.start()
            with psycopg.connect(**_conninfo(port, "tenant_b")) as watcher:

                def started(w: psycopg.Connection[tuple[Any, ...]] = watcher) -> bool:
                    row = w.execute(
                        "SELECT count(*) FROM pg_stat_activity WHERE state = 'active'"
                        " AND query = 'SELECT pg_sleep(30)'"
                    ).fetchone()
                    return row == (1,)

                wait_for(started, what="the slow query to start")
            conn.cancel_safe()
            thread.join(30)
            assert outcome == {"result": "canceled"}
        assert proc.poll() is None  # the supervisor is still running
    finally:
        for conn in clients:
            conn.close()
        _stop(proc)


def _scrape(port: int) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """GET /metrics as {(sample name, sorted labels): value}."""
    from prometheus_client.parser import text_string_to_metric_families

    response = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=10)
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/plain")
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(response.text)
        for sample in family.samples
    }


def _transactions(samples: dict[tuple[str, tuple[tuple[str, str], ...]], float]) -> float:
    return sum(v for (name, _), v in samples.items() if name == "outpost_pooler_transactions_total")


@pytest.mark.parametrize("workers", [1, 2])
def test_pooler_serve_metrics_listen(agent_with_route: Agent, workers: int) -> None:
    """`outpost pooler serve` shows /metrics, /healthz and /readyz on pooler.metrics_listen; with
    several workers, one scrape covers them all, labelled by worker."""
    from outpost import __version__

    agent = agent_with_route
    metrics_port = free_port()
    agent.config["pooler"]["metrics_listen"] = f"127.0.0.1:{metrics_port}"
    agent.write_config()
    proc, port = _serve(agent, "--workers", str(workers))
    clients: list[psycopg.Connection[tuple[Any, ...]]] = []
    try:

        def metrics_up() -> bool:  # (with workers, the supervisor opens it beside the pooler)
            try:
                return httpx.get(f"http://127.0.0.1:{metrics_port}/healthz", timeout=10).is_success
            except httpx.ConnectError:
                return False

        wait_for(metrics_up, what="pooler.metrics_listen to accept connections")
        assert httpx.get(f"http://127.0.0.1:{metrics_port}/healthz", timeout=10).text == "ok\n"
        assert httpx.get(f"http://127.0.0.1:{metrics_port}/readyz", timeout=10).status_code == 200
        before = _transactions(_scrape(metrics_port))
        seen: set[int] = set()
        while len(clients) < 40 and (len(seen) < workers or len(clients) < 4):
            conn = psycopg.connect(**_conninfo(port, "tenant_a"))
            clients.append(conn)
            seen.add(conn.info.backend_pid >> 24)
        for conn in clients:
            conn.execute("SELECT 1")
        samples = _scrape(metrics_port)
        assert samples[("outpost_build_info", (("version", __version__),))] == 1
        assert _transactions(samples) - before >= len(clients)
        if workers == 1:
            assert not any(dict(labels).get("worker") for _, labels in samples)
        else:
            assert len(seen) == 2  # the clients reached both workers
            for worker in ("0", "1"):
                assert samples[("outpost_pooler_worker_up", (("worker", worker),))] == 1
                assert any(
                    name == "outpost_pooler_transactions_total" and ("worker", worker) in labels
                    for name, labels in samples
                )
    finally:
        for conn in clients:
            conn.close()
        _stop(proc)


def test_pooler_serve_metrics_listen_taken(agent_with_route: Agent) -> None:
    import socket

    agent = agent_with_route
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        metrics_port = taken.getsockname()[1]
        agent.config["pooler"]["metrics_listen"] = f"127.0.0.1:{metrics_port}"
        agent.write_config()
        result = agent.run("pooler", "serve", "--listen", f"127.0.0.1:{free_port()}")
    assert result.code == 1, result.err
    assert (
        f"Cannot listen on 127.0.0.1:{metrics_port} (pooler.metrics_listen): Address already in "
        "use; stop the other process or change pooler.metrics_listen."
    ) in result.err
    assert "Traceback" not in result.err


def test_outpost_serve_runs_the_pooler_of_its_config(agent_with_route: Agent) -> None:
    agent = agent_with_route
    port = free_port()
    agent.config["pooler"]["listen_addresses"] = [f"127.0.0.1:{port}"]
    agent.write_config()
    with agent.serving() as proc:
        wait_for(lambda: f"127.0.0.1:{port}" in agent.log(), what="the pooler to listen")
        with psycopg.connect(**_conninfo(port, "tenant_a")) as client:
            assert client.execute("SELECT name FROM whoami").fetchone() == ("tenant_a",)
            # a route added while the agent runs (through its API) is served without a restart
            agent.ok(
                "pooler", "routes", "add", "--database", "app", "--schema", "tenant_c",
                "--user", USER, "--to", "tenants", "--password-env", "ROUTE_PW",
                env={"ROUTE_PW": PASSWORD},
            )  # fmt: skip

            def tenant_c() -> bool:
                try:
                    with psycopg.connect(**_conninfo(port, "tenant_c")) as other:
                        return other.execute("SELECT name FROM whoami").fetchone() == ("tenant_c",)
                except psycopg.OperationalError:
                    return False

            wait_for(tenant_c, what="the new route to be served")
            # SIGHUP reloads the pooler's settings; the connected client stays
            agent.config["pooler"]["pool_size"] = 5
            agent.write_config()
            proc.send_signal(signal.SIGHUP)
            with _console(port) as console:
                wait_for(
                    lambda: _show(console, "SHOW DATABASES")[1][0][5] == "5",
                    what="pool_size 5 after SIGHUP",
                )
            assert client.execute("SELECT name FROM whoami").fetchone() == ("tenant_a",)
        metrics = httpx.get(f"{agent.url}/metrics", timeout=10).text
        assert "outpost_pooler_" in metrics


def test_a_console_session_outlives_the_login_timeout(
    pooler: RunningPooler, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The login timeout bounds the login only, not the console session that follows it."""
    import time

    from outpost.pooler import server

    monkeypatch.setattr(server, "LOGIN_TIMEOUT", 0.5)
    with _console(pooler.port) as console:
        _show(console, "SHOW POOLS")
        time.sleep(1.0)  # the session is older than the (patched) login timeout
        columns, _rows = _show(console, "SHOW POOLS")
        assert columns[0] == "database"
