"""The pooler on the standard library's event loop (uvloop is the optional `speed` extra): the
forwarding engine's sockets, queue and hand-over work there too."""

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
    running_pooler,
    tenant_db,  # noqa: F401 - fixture
)

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def pooler(tenant_db: TenantDb) -> Iterator[RunningPooler]:  # noqa: F811
    config = PoolerConfig(pool_size=1, client_wait_timeout=20)
    routes = StaticRoutes(tenant_db.routes())
    with running_pooler(config, routes, stdlib_loop=True) as running:
        assert running.loop is not None and "uvloop" not in type(running.loop).__module__
        yield running


def test_tenants_queue_for_one_server_connection_and_see_their_own_schema(
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
    assert all(active + idle <= 1 for active, idle in pooler.pool_stats())
