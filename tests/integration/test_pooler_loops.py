"""The pooler on the other event loops it runs on: uvloop, where the engine is one file
descriptor of the loop's (inside `outpost serve`), and the standard library's loop the same
way (uvloop is the optional `speed` extra). The engine's sockets, queue, hand-over, the logins
it runs alone and cancel requests work there too. (Every other pooler test runs on EngineLoop,
as `outpost pooler serve` does.)"""

from __future__ import annotations

import threading
from collections.abc import Iterator

import psycopg
import pytest

from outpost.config import PoolerConfig
from outpost.pooler.routes import StaticRoutes
from tests.integration.test_pooler_support import (
    TENANTS,
    RunningPooler,
    TenantDb,
    cancel_a_slow_query,
    running_pooler,
    tenant_db,  # noqa: F401 - fixture
)

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module", params=["uvloop", "asyncio"])
def pooler(request: pytest.FixtureRequest, tenant_db: TenantDb) -> Iterator[RunningPooler]:  # noqa: F811
    config = PoolerConfig(pool_size=2, client_wait_timeout=20)
    routes = StaticRoutes(tenant_db.routes())
    with running_pooler(config, routes, loop_kind=request.param) as running:
        assert running.loop is not None
        assert ("uvloop" in type(running.loop).__module__) == (request.param == "uvloop")
        assert running.server is not None and running.server.engine is not None
        assert getattr(running.loop, "engine", None) is None  # (the engine is one fd of its)
        yield running


def test_tenants_queue_for_two_server_connections_and_see_their_own_schema(
    pooler: RunningPooler,
) -> None:
    errors: list[str] = []

    def client(tenant: str) -> None:
        try:
            with psycopg.connect(
                **pooler.conninfo(options=f"-csearch_path={tenant}"), autocommit=True
            ) as conn:
                for i in range(10):
                    row = conn.execute("SELECT name, %s::int FROM whoami", (i,)).fetchone()
                    if row != (tenant, i):
                        errors.append(f"{tenant} got {row}")
        except Exception as exc:
            errors.append(f"{tenant}: {exc}")

    threads = [threading.Thread(target=client, args=(t,)) for t in TENANTS for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert errors == []
    assert all(active + idle <= 2 for active, idle in pooler.pool_stats())


def test_logins_the_engine_runs_alone_and_cancels(pooler: RunningPooler) -> None:
    for _ in range(2):  # Python's: the second is remembered
        with psycopg.connect(**pooler.conninfo()) as conn:
            conn.execute("SELECT 1")
    with (
        psycopg.connect(**pooler.conninfo(), autocommit=True) as conn,
        psycopg.connect(**pooler.conninfo(), autocommit=True) as other,
    ):
        assert conn.pgconn.backend_pid & 0x800000  # a backend pid of the engine's own
        cancel_a_slow_query(conn, other)
