"""The pooler in transaction mode against the real PostgreSQL: psql, psycopg, asyncpg, pgbench,
many tenants on one destination, prepared statements, COPY, cancel, disconnects."""

from __future__ import annotations

import asyncio
import dataclasses
import os
import shutil
import socket
import subprocess
import threading
from collections.abc import Iterator

import psycopg
import pytest

from outpost.config import PoolerConfig
from outpost.pooler.routes import StaticRoutes
from tests.conftest import service_missing
from tests.helpers import wait_for
from tests.integration.test_pooler_support import (
    PASSWORD,
    TENANTS,
    USER,
    RunningPooler,
    TenantDb,
    cancel_a_slow_query,
    running_pooler,
    tenant_db,  # noqa: F401 - fixture
)

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def pooler(tenant_db: TenantDb) -> Iterator[RunningPooler]:  # noqa: F811
    config = PoolerConfig(pool_size=2, client_wait_timeout=20, admin_users=["admin"])
    with running_pooler(config, StaticRoutes(tenant_db.routes())) as running:
        yield running


def _psql(pooler: RunningPooler, *args: str, options: str | None = None) -> str:
    if shutil.which("psql") is None:
        service_missing("psql is not installed")
    conninfo = f"host=127.0.0.1 port={pooler.port} dbname=app user={USER} sslmode=disable"
    if options:
        conninfo += f" options={options}"
    proc = subprocess.run(
        ["psql", conninfo, "-X", "-A", "-t", "-v", "ON_ERROR_STOP=1", *args],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "PGPASSWORD": PASSWORD, "PGCONNECT_TIMEOUT": "10"},
    )
    assert proc.returncode == 0, proc.stderr
    return proc.stdout


def test_psql_runs_queries_and_keeps_a_transaction_on_one_server(pooler: RunningPooler) -> None:
    out = _psql(
        pooler,
        "-c",
        "SELECT name FROM whoami",
        "-c",
        "BEGIN",
        "-c",
        "CREATE TEMP TABLE scratch (x int)",
        "-c",
        "INSERT INTO scratch VALUES (41), (1)",
        "-c",
        "SELECT sum(x) FROM scratch",
        "-c",
        "ROLLBACK",
    )
    lines = [line for line in out.splitlines() if line]
    assert lines[0] == "public"
    assert "42" in lines  # the temp table lived on the server the transaction held
    assert "ROLLBACK" in lines
    assert "WARNING" not in out


def test_tenant_from_options_and_schema_search_path(pooler: RunningPooler) -> None:
    assert (
        _psql(pooler, "-c", "SELECT name FROM whoami", options="-csearch_path=tenant_b").strip()
        == "tenant_b"
    )
    asyncpg = pytest.importorskip("asyncpg")

    async def perseus_style() -> tuple[str, str]:
        # Perseus clients (Go, lib/pq) send schema_search_path as a startup parameter
        conn = await asyncpg.connect(
            host="127.0.0.1",
            port=pooler.port,
            user=USER,
            password=PASSWORD,
            database="app",
            ssl=False,
            server_settings={"schema_search_path": "tenant_c"},
        )
        try:
            row = await conn.fetchrow("SELECT name, current_setting('search_path') FROM whoami")
            return (row[0], row[1])
        finally:
            await conn.close()

    assert asyncio.run(perseus_style()) == ("tenant_c", "tenant_c")


def test_many_tenants_share_two_server_connections_and_each_sees_its_own_schema(
    pooler: RunningPooler,
) -> None:
    errors: list[str] = []
    clients_per_tenant = 4

    def client(tenant: str) -> None:
        try:
            with psycopg.connect(
                **pooler.conninfo(options=f"-csearch_path={tenant}"), autocommit=True
            ) as conn:
                for _ in range(15):
                    (name,) = conn.execute("SELECT name FROM whoami").fetchone()  # type: ignore[misc]
                    if name != tenant:
                        errors.append(f"{tenant} saw {name}")
                    with conn.transaction():
                        (again,) = conn.execute("SELECT name FROM whoami").fetchone()  # type: ignore[misc]
                        if again != tenant:
                            errors.append(f"{tenant} saw {again} in a transaction")
        except Exception as exc:
            errors.append(f"{tenant}: {exc}")

    threads = [
        threading.Thread(target=client, args=(t,))
        for t in TENANTS
        for _ in range(clients_per_tenant)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert errors == []
    assert all(active + idle <= 2 for active, idle in pooler.pool_stats())


def test_a_clients_own_search_path_never_reaches_another_tenant(pooler: RunningPooler) -> None:
    """A tenant_a client that points search_path at tenant_b (SET, set_config, RESET ALL) keeps
    it for its transaction only; the next client of that server connection gets its own schema."""
    changes = [
        "SET search_path TO tenant_b",
        "SELECT set_config('search_path', 'tenant_b', false)",
        "SET Search_Path = tenant_b",
    ]
    for change in changes:
        with psycopg.connect(
            **pooler.conninfo(options="-csearch_path=tenant_a"), autocommit=True
        ) as first:
            with first.transaction():
                first.execute(change)
                row = first.execute("SELECT name FROM whoami").fetchone()
                assert row == ("tenant_b",)  # inside its own transaction the change holds
            # the next transaction, even of the same client, is back on its tenant's schema
            assert first.execute("SELECT name FROM whoami").fetchone() == ("tenant_a",)
        for _ in range(4):  # pool_size 2: every server connection is reused
            with psycopg.connect(
                **pooler.conninfo(options="-csearch_path=tenant_a"), autocommit=True
            ) as other:
                assert other.execute("SELECT name FROM whoami").fetchone() == ("tenant_a",), change


def test_psycopg_prepared_statements_on_any_server_connection(pooler: RunningPooler) -> None:
    conns = [
        psycopg.connect(
            **pooler.conninfo(options=f"-csearch_path={t}"), autocommit=True, prepare_threshold=0
        )
        for t in TENANTS
    ]
    try:
        for round_ in range(10):
            for tenant, conn in zip(TENANTS, conns, strict=True):
                row = conn.execute(
                    "SELECT name, %s::int FROM whoami WHERE name = %s", (round_, tenant)
                ).fetchone()
                assert row == (tenant, round_)
        # psycopg really prepared it (named statement) and reuses it
        assert all(conn._prepared._names for conn in conns)
        # a transaction that uses the statement after a failed one still works
        conn = conns[0]
        with pytest.raises(psycopg.errors.DivisionByZero):
            conn.execute("SELECT 1 / %s", (0,))
        assert conn.execute("SELECT 1 / %s", (1,)).fetchone() == (1,)
    finally:
        for conn in conns:
            conn.close()


def test_psycopg_copy_in_and_out(pooler: RunningPooler, tenant_db: TenantDb) -> None:  # noqa: F811
    with tenant_db.admin() as admin:
        admin.execute("CREATE TABLE IF NOT EXISTS tenant_a.copied (id int, label text)")
        admin.execute("TRUNCATE tenant_a.copied")
    with psycopg.connect(**pooler.conninfo(options="-csearch_path=tenant_a")) as conn:
        with conn.cursor() as cur, cur.copy("COPY copied (id, label) FROM STDIN") as copy:
            for i in range(2000):
                copy.write_row((i, f"row {i}"))
        conn.commit()
        with conn.cursor() as cur:
            out = bytearray()
            with cur.copy("COPY (SELECT id, label FROM copied ORDER BY id) TO STDOUT") as copy:
                for chunk in copy:
                    out += chunk
        lines = bytes(out).decode().splitlines()
        assert len(lines) == 2000
        assert lines[1999] == "1999\trow 1999"
        assert conn.execute("SELECT count(*) FROM copied").fetchone() == (2000,)


def test_asyncpg_prepared_statements_in_transaction_mode(pooler: RunningPooler) -> None:
    asyncpg = pytest.importorskip("asyncpg")

    async def client(tenant: str) -> list[str]:
        conn = await asyncpg.connect(
            host="127.0.0.1",
            port=pooler.port,
            user=USER,
            password=PASSWORD,
            database="app",
            ssl=False,
            server_settings={"search_path": tenant},
        )
        try:
            seen = []
            stmt = await conn.prepare("SELECT name, $1::int AS n FROM whoami")
            for i in range(20):
                row = await stmt.fetchrow(i)
                assert row["n"] == i
                seen.append(row["name"])
                seen.append(await conn.fetchval("SELECT name FROM whoami WHERE $1::int >= 0", i))
                async with conn.transaction():
                    seen.append(await conn.fetchval("SELECT name FROM whoami"))
            return seen
        finally:
            await conn.close()

    async def main() -> list[list[str]]:
        return await asyncio.gather(*(client(t) for t in TENANTS for _ in range(2)))

    results = asyncio.run(main())
    for tenant, seen in zip([t for t in TENANTS for _ in range(2)], results, strict=True):
        assert set(seen) == {tenant}


def test_cancel_reaches_the_right_backend(pooler: RunningPooler) -> None:
    with (
        psycopg.connect(**pooler.conninfo(), autocommit=True) as conn,
        psycopg.connect(**pooler.conninfo(), autocommit=True) as other,
    ):
        cancel_a_slow_query(conn, other)


def test_client_vanishing_mid_transaction_is_rolled_back(pooler: RunningPooler) -> None:
    victim = psycopg.connect(**pooler.conninfo(options="-csearch_path=tenant_b"))
    victim.execute("INSERT INTO whoami VALUES ('ghost')")
    victim.execute("SELECT pg_advisory_xact_lock(4242)")
    # vanish without a Terminate message
    sock = socket.socket(fileno=os.dup(victim.fileno()))
    sock.shutdown(socket.SHUT_RDWR)
    sock.close()
    with pytest.raises(psycopg.OperationalError):
        victim.execute("SELECT 1")
    with psycopg.connect(
        **pooler.conninfo(options="-csearch_path=tenant_b"), autocommit=True
    ) as conn:
        wait_for(
            lambda: conn.execute("SELECT pg_try_advisory_xact_lock(4242)").fetchone() == (True,),
            what="the vanished client's transaction to be rolled back",
        )
        assert conn.execute("SELECT count(*) FROM whoami WHERE name = 'ghost'").fetchone() == (0,)
        assert conn.execute("SELECT name FROM whoami").fetchone() == ("tenant_b",)


def test_session_only_features_get_a_clear_error(pooler: RunningPooler) -> None:
    with psycopg.connect(**pooler.conninfo(), autocommit=True) as conn:
        with pytest.raises(psycopg.errors.FeatureNotSupported, match="LISTEN cannot be used"):
            conn.execute("LISTEN jobs")
        with pytest.raises(psycopg.errors.FeatureNotSupported, match="advisory locks"):
            conn.execute("SELECT pg_advisory_lock(1)")
        with pytest.raises(psycopg.errors.FeatureNotSupported, match="WITH HOLD"):
            conn.execute("DECLARE c CURSOR WITH HOLD FOR SELECT 1")
        # the connection keeps working, transaction-scoped locks are fine
        conn.execute("SELECT pg_advisory_xact_lock(1)")
        assert conn.execute("SELECT 1").fetchone() == (1,)


@pytest.mark.parametrize("prepare", [False, True], ids=["simple", "extended"])
def test_the_words_inside_literals_and_comments_are_no_session_feature(
    pooler: RunningPooler, prepare: bool
) -> None:
    """LISTEN, advisory locks and WITH HOLD are refused as statements, not as text in a string,
    a quoted identifier or a comment."""
    with psycopg.connect(**pooler.conninfo(), autocommit=True) as conn:
        for sql, expected in (
            ("SELECT 'declare c cursor with hold'", "declare c cursor with hold"),
            ('SELECT 1 AS "with hold"', 1),
            ("SELECT $$pg_advisory_lock(1)$$", "pg_advisory_lock(1)"),
            ("SELECT 'a; listen x'", "a; listen x"),
            ("/* ; listen x */ SELECT 2", 2),
            ("SELECT 3 -- ; listen x", 3),
        ):
            assert conn.execute(sql.encode(), prepare=prepare).fetchone() == (expected,), sql
        with pytest.raises(psycopg.errors.FeatureNotSupported, match="LISTEN cannot be used"):
            conn.execute("SELECT 'a'; LISTEN jobs", prepare=prepare)
        assert conn.execute("SELECT 1").fetchone() == (1,)


def test_notices_and_parameter_status_pass_through(pooler: RunningPooler) -> None:
    notices: list[str] = []
    with psycopg.connect(**pooler.conninfo(), autocommit=True) as conn:
        conn.add_notice_handler(lambda diag: notices.append(diag.message_primary or ""))
        conn.execute("DO $$BEGIN RAISE NOTICE 'hello from the server'; END$$")
        assert notices == ["hello from the server"]
        conn.execute("SET TimeZone TO 'Asia/Tokyo'")
        assert conn.info.parameter_status("TimeZone") == "Asia/Tokyo"
        # the setting follows the client to whichever server connection it gets next
        for _ in range(5):
            assert conn.execute("SHOW TimeZone").fetchone() == ("Asia/Tokyo",)
        assert conn.info.parameter_status("server_version")


def test_application_name_follows_the_client_to_its_server_connection(
    tenant_db: TenantDb,  # noqa: F811
) -> None:
    """Clients sharing one server connection each show their own application_name, in
    current_setting and in pg_stat_activity, whoever used the connection before."""
    config = PoolerConfig(pool_size=1)
    with (
        running_pooler(config, StaticRoutes(tenant_db.routes())) as pooler,
        psycopg.connect(**pooler.conninfo(application_name="billing"), autocommit=True) as a,
        psycopg.connect(**pooler.conninfo(application_name="reports"), autocommit=True) as b,
        psycopg.connect(**pooler.conninfo(), autocommit=True) as anonymous,
    ):
        query = (
            "SELECT current_setting('application_name'), application_name "
            "FROM pg_stat_activity WHERE pid = pg_backend_pid()"
        )
        pids = set()
        for _ in range(3):
            for conn, name in ((a, "billing"), (b, "reports"), (anonymous, "")):
                assert conn.execute(query).fetchone() == (name, name)
                assert conn.info.parameter_status("application_name") == name
                pids.add(conn.execute("SELECT pg_backend_pid()").fetchone())
        assert len(pids) == 1  # one server connection served all three
        a.execute("SET application_name TO 'billing-2'")  # the client's own change sticks
        b.execute("SELECT 1")
        assert a.execute(query).fetchone() == ("billing-2", "billing-2")


def test_logins_with_the_same_startup_packet_each_get_their_own_greeting(
    pooler: RunningPooler,
) -> None:
    """The pooler works out a startup packet's greeting once: clients sending the same packet
    still each get their own backend key, and one differing only in a tracked setting gets
    that setting, in ParameterStatus and on the server."""
    keys = set()
    for encoding in ("UTF8", "LATIN1", "UTF8", "LATIN1"):
        for _ in range(2):
            with psycopg.connect(
                **pooler.conninfo(), client_encoding=encoding, autocommit=True
            ) as conn:
                assert conn.info.parameter_status("client_encoding") == encoding
                assert conn.execute("SHOW client_encoding").fetchone() == (encoding,)
                assert conn.info.parameter_status("server_version")
                keys.add(conn.info.backend_pid)
    assert len(keys) == 8


def test_tracked_settings_from_options_or_in_any_case_reach_the_server(
    pooler: RunningPooler, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``-c TimeZone=…`` in ``options`` (PGOPTIONS), or a startup parameter in lower case (libpq
    sends PGTZ as "timezone"), is the client's setting on whichever server connection runs its
    transactions, and in its ParameterStatus; clients that gave none keep the server's."""
    with psycopg.connect(**pooler.conninfo(), autocommit=True) as plain:
        default_zone = plain.execute("SHOW TimeZone").fetchone()
        default_style = plain.execute("SHOW DateStyle").fetchone()
    assert default_zone != ("America/New_York",) and default_style != ("SQL, DMY",)
    options = r"-csearch_path=tenant_b -c TimeZone=America/New_York --DateStyle=SQL,\ DMY"
    with psycopg.connect(**pooler.conninfo(options=options), autocommit=True) as conn:
        assert conn.info.parameter_status("TimeZone") == "America/New_York"
        for _ in range(3):  # (on whichever of the pool's connections)
            assert conn.execute("SHOW TimeZone").fetchone() == ("America/New_York",)
            assert conn.execute("SHOW DateStyle").fetchone() == ("SQL, DMY",)
            assert conn.execute("SELECT current_schema()").fetchone() == ("tenant_b",)
            with psycopg.connect(**pooler.conninfo(), autocommit=True) as plain:
                assert plain.execute("SHOW TimeZone").fetchone() == default_zone
                assert plain.execute("SHOW DateStyle").fetchone() == default_style
    monkeypatch.setenv("PGTZ", "Asia/Tokyo")
    with psycopg.connect(**pooler.conninfo(), autocommit=True) as conn:
        assert conn.info.parameter_status("TimeZone") == "Asia/Tokyo"
        assert conn.execute("SHOW TimeZone").fetchone() == ("Asia/Tokyo",)
    monkeypatch.delenv("PGTZ")
    # a startup parameter wins over the same setting in options, as in PostgreSQL
    with psycopg.connect(
        **pooler.conninfo(options="-c TimeZone=Europe/Paris", application_name="from-param"),
        autocommit=True,
    ) as conn:
        assert conn.execute("SHOW TimeZone").fetchone() == ("Europe/Paris",)
        assert conn.execute("SHOW application_name").fetchone() == ("from-param",)


def test_a_closed_clients_session_is_freed_at_once(pooler: RunningPooler) -> None:
    """A client that hangs up leaves nothing behind for the garbage collector: its session and
    the engine's link are freed when it goes (memory stays flat between collections)."""
    import gc

    from outpost.pooler.server import ClientSession

    def sessions() -> int:
        return sum(1 for obj in gc.get_objects() if type(obj) is ClientSession)

    assert pooler.server is not None
    gc.collect()
    gc.disable()
    try:
        before = sessions()
        for number in range(30):
            with psycopg.connect(**pooler.conninfo(), autocommit=True) as conn:
                assert conn.execute("SELECT %s::int", (number,)).fetchone() == (number,)
        server = pooler.server
        wait_for(lambda: server.client_count == 0, what="the clients to go")
        assert sessions() <= before
    finally:
        gc.enable()


def _pgbench(pooler: RunningPooler, *args: str) -> str:
    proc = subprocess.run(
        ["pgbench", "-h", "127.0.0.1", "-p", str(pooler.port), "-U", USER, *args, "app"],
        capture_output=True,
        text=True,
        timeout=180,
        env={**os.environ, "PGPASSWORD": PASSWORD},
    )
    assert proc.returncode == 0, proc.stderr + proc.stdout
    return proc.stdout


def test_pgbench_select_only_and_tpcb(pooler: RunningPooler, tenant_db: TenantDb) -> None:  # noqa: F811
    if shutil.which("pgbench") is None:
        service_missing("pgbench is not installed")
    init = subprocess.run(
        [
            "pgbench",
            "-i",
            "-s",
            "1",
            "-q",
            "-h",
            tenant_db.host,
            "-p",
            str(tenant_db.port),
            "-U",
            tenant_db.user,
            tenant_db.name,
        ],
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert init.returncode == 0, init.stderr
    out = _pgbench(pooler, "-S", "-c", "8", "-t", "200", "-n")
    assert "number of transactions actually processed: 1600/1600" in out
    out = _pgbench(pooler, "-c", "4", "-t", "100", "-n")
    assert "number of transactions actually processed: 400/400" in out
    out = _pgbench(pooler, "-S", "-M", "prepared", "-c", "4", "-t", "100", "-n")
    assert "number of transactions actually processed: 400/400" in out
    out = _pgbench(pooler, "-M", "extended", "-c", "4", "-t", "50", "-n")
    assert "number of transactions actually processed: 200/200" in out
    with tenant_db.admin() as conn:
        assert conn.execute("SELECT count(*) FROM pgbench_history").fetchone() == (600,)


def test_session_mode_keeps_the_server_and_resets_it_after_the_client(
    tenant_db: TenantDb,  # noqa: F811
) -> None:
    config = PoolerConfig(pool_mode="session", pool_size=1)
    with running_pooler(config, StaticRoutes(tenant_db.routes())) as pooler:
        with psycopg.connect(
            **pooler.conninfo(options="-csearch_path=tenant_a"), autocommit=True
        ) as conn:
            conn.execute("LISTEN jobs")  # allowed: the client keeps its server connection
            conn.execute("CREATE TEMP TABLE mine (x int)")
            conn.execute("SELECT pg_advisory_lock(7)")
            conn.execute("NOTIFY jobs, 'hi'")
            assert [n.payload for n in conn.notifies(timeout=5, stop_after=1)] == ["hi"]
            pid = conn.execute("SELECT pg_backend_pid()").fetchone()
        with psycopg.connect(
            **pooler.conninfo(options="-csearch_path=tenant_b"), autocommit=True
        ) as conn:
            # the same server connection, reset: no temp table, no lock, the new schema
            assert conn.execute("SELECT pg_backend_pid()").fetchone() == pid
            assert conn.execute("SELECT to_regclass('pg_temp.mine')").fetchone() == (None,)
            assert conn.execute("SELECT pg_try_advisory_lock(7)").fetchone() == (True,)
            assert conn.execute("SELECT name FROM whoami").fetchone() == ("tenant_b",)


def test_idle_server_connections_follow_min_idle_and_max_idle_time(
    tenant_db: TenantDb,  # noqa: F811
) -> None:
    config = PoolerConfig(pool_size=4, min_idle=2, max_idle_time=0.5)
    with (
        running_pooler(config, StaticRoutes(tenant_db.routes())) as pooler,
        psycopg.connect(**pooler.conninfo(), autocommit=True) as conn,
    ):
        assert conn.execute("SELECT 1").fetchone() == (1,)
        # min_idle opens a second idle connection; max_idle_time closes the extra ones and
        # min_idle reopens: the pool settles at two idle connections
        wait_for(lambda: pooler.pool_stats() == [(0, 2)], what="two idle connections")
        first = pooler.call(_idle_pids(pooler))
        wait_for(
            lambda: not pooler.call(_idle_pids(pooler)) & first,
            what="max_idle_time to replace the idle connections",
        )
        assert conn.execute("SELECT name FROM whoami").fetchone() == ("public",)


async def _idle_pids(pooler: RunningPooler) -> set[int]:
    assert pooler.server is not None
    return {c.backend_pid for pool in pooler.server.pools.values() for c in pool.idle}


def test_a_changed_destination_password_cuts_no_client_off(
    tenant_db: TenantDb,  # noqa: F811
) -> None:
    """A rotated destination secret (new password, same server and role) takes effect for new
    server connections; a client in the middle of a transaction finishes it undisturbed."""
    routes = StaticRoutes(tenant_db.routes())
    with running_pooler(PoolerConfig(pool_size=2), routes) as pooler:
        busy = psycopg.connect(**pooler.conninfo(options="-csearch_path=tenant_a"))
        try:
            assert busy.execute("SELECT name FROM whoami").fetchone() == ("tenant_a",)
            # the transaction is open; the destination's password changes at the source
            rotated = dataclasses.replace(
                tenant_db.destination(sslmode="disable"), password="rotated-secret"
            )
            routes.replace(dataclasses.replace(r, destination=rotated) for r in tenant_db.routes())
            with psycopg.connect(
                **pooler.conninfo(options="-csearch_path=tenant_b"), autocommit=True
            ) as newcomer:  # looks up the route: the pool now logs in with the new password
                assert newcomer.execute("SELECT name FROM whoami").fetchone() == ("tenant_b",)
            assert busy.execute("SELECT count(*) FROM whoami").fetchone() == (1,)
            busy.commit()
            assert busy.execute("SELECT name FROM whoami").fetchone() == ("tenant_a",)
            busy.commit()
        finally:
            busy.close()
