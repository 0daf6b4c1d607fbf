"""The pooler console (virtual database ``outpost``, alias ``pgbouncer``) and its metrics.

Admin users (``pooler.admin_users``) run SHOW POOLS, SHOW CLIENTS, SHOW SERVERS, SHOW STATS,
SHOW ROUTES, SHOW DATABASES, SHOW CONFIG, SHOW VERSION, RELOAD, PAUSE and RESUME, with the
column shapes of pgbouncer 1.21 where pgbouncer has the command. The same numbers are exported
as Prometheus metrics by ``PoolerCollector``.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import TYPE_CHECKING

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from outpost import __version__
from outpost.pooler import protocol as p

if TYPE_CHECKING:
    from outpost.pooler.pool import Pool, ServerConnection
    from outpost.pooler.server import ClientSession, PoolerServer

Row = list[str | int | float | None]
I8 = p.INT8_OID
TX = p.TEXT_OID

POOLS_COLUMNS = [
    ("database", TX),
    ("user", TX),
    ("cl_active", I8),
    ("cl_waiting", I8),
    ("cl_active_cancel_req", I8),
    ("cl_waiting_cancel_req", I8),
    ("sv_active", I8),
    ("sv_active_cancel", I8),
    ("sv_being_canceled", I8),
    ("sv_idle", I8),
    ("sv_used", I8),
    ("sv_tested", I8),
    ("sv_login", I8),
    ("maxwait", I8),
    ("maxwait_us", I8),
    ("pool_mode", TX),
]
_CONN_COLUMNS = [
    ("type", TX),
    ("user", TX),
    ("database", TX),
    ("state", TX),
    ("addr", TX),
    ("port", I8),
    ("local_addr", TX),
    ("local_port", I8),
    ("connect_time", TX),
    ("request_time", TX),
    ("wait", I8),
    ("wait_us", I8),
    ("close_needed", I8),
    ("ptr", TX),
    ("link", TX),
    ("remote_pid", I8),
    ("tls", TX),
    ("application_name", TX),
    ("prepared_statements", I8),
]
STATS_COLUMNS = [
    ("database", TX),
    ("total_xact_count", I8),
    ("total_query_count", I8),
    ("total_received", I8),
    ("total_sent", I8),
    ("total_xact_time", I8),
    ("total_query_time", I8),
    ("total_wait_time", I8),
    ("avg_xact_count", I8),
    ("avg_query_count", I8),
    ("avg_recv", I8),
    ("avg_sent", I8),
    ("avg_xact_time", I8),
    ("avg_query_time", I8),
    ("avg_wait_time", I8),
]
ROUTES_COLUMNS = [
    ("database", TX),
    ("schema", TX),
    ("user", TX),
    ("destination", TX),
    ("sslmode", TX),
    ("origin", TX),
    ("auth", TX),
]
DATABASES_COLUMNS = [
    ("name", TX),
    ("host", TX),
    ("port", I8),
    ("database", TX),
    ("force_user", TX),
    ("pool_size", I8),
    ("min_pool_size", I8),
    ("reserve_pool", I8),
    ("pool_mode", TX),
    ("max_connections", I8),
    ("current_connections", I8),
    ("paused", I8),
    ("disabled", I8),
]

HELP = (
    "Console commands: SHOW POOLS, SHOW CLIENTS, SHOW SERVERS, SHOW STATS, SHOW ROUTES, "
    "SHOW DATABASES, SHOW CONFIG, SHOW VERSION, RELOAD, PAUSE, RESUME"
)


def _ts(epoch: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(epoch))


def _pool_name(pool: Pool) -> str:
    d = pool.destination
    return f"{d.database}@{d.host}:{d.port}"


def pools_rows(srv: PoolerServer) -> list[Row]:
    waiting: dict[int, int] = {}
    clients = srv.all_clients()
    for client in clients:
        if client.waiting_server and client.pool is not None:
            waiting[id(client.pool)] = waiting.get(id(client.pool), 0) + 1
    rows: list[Row] = []
    for pool in srv.pools.values():
        active_clients = sum(
            1 for c in clients if c.pool is pool and c.ready and not c.waiting_server
        )
        maxwait = pool.maxwait
        rows.append(
            [
                _pool_name(pool),
                pool.destination.user,
                active_clients,
                waiting.get(id(pool), 0),
                0,
                0,
                len(pool.active),
                0,
                0,
                len(pool.idle),
                0,
                0,
                pool.connecting,
                int(maxwait),
                int((maxwait % 1) * 1_000_000),
                pool.settings.pool_mode,
            ]
        )
    return rows


def clients_rows(srv: PoolerServer) -> list[Row]:
    rows: list[Row] = []
    for c in srv.all_clients():
        if c.waiting_server:
            state = "waiting"
            wait = time.monotonic() - c.wait_started
        else:
            state = "active" if c.ready or c.admin else "login"
            wait = 0.0
        rows.append(
            [
                "C",
                c.user,
                c.database if not c.schema else f"{c.database}/{c.schema}",
                state,
                c.peer[0],
                c.peer[1],
                c.local[0],
                c.local[1],
                _ts(c.connect_time),
                _ts(c.request_time),
                int(wait),
                int((wait % 1) * 1_000_000),
                0,
                f"{id(c):#x}",
                f"{id(c.conn):#x}" if c.conn is not None else "",
                0,
                _tls(c),
                c.application_name,
                len(c.statements),
            ]
        )
    return rows


def _tls(conn: p.FramedProtocol) -> str:
    if not conn.tls:
        return ""
    ssl_object = conn.transport.get_extra_info("ssl_object")
    if ssl_object is None:
        return "TLS"
    return f"{ssl_object.version()}/{(ssl_object.cipher() or ('',))[0]}"


def servers_rows(srv: PoolerServer) -> list[Row]:
    rows: list[Row] = []
    for pool in srv.pools.values():
        conns: list[tuple[str, ServerConnection]] = [("active", c) for c in pool.active]
        conns += [("idle", c) for c in pool.idle]
        for state, s in conns:
            client = s.client
            rows.append(
                [
                    "S",
                    pool.destination.user,
                    _pool_name(pool),
                    state,
                    s.peer[0],
                    s.peer[1],
                    s.local[0],
                    s.local[1],
                    _ts(s.connect_time),
                    _ts(s.request_time),
                    0,
                    0,
                    0,
                    f"{id(s):#x}",
                    f"{id(client):#x}" if client is not None else "",
                    s.backend_pid,
                    _tls(s),
                    s.params.get("application_name", ""),
                    len(s.prepared),
                ]
            )
    return rows


def stats_rows(srv: PoolerServer) -> list[Row]:
    rows: list[Row] = []
    uptime = max(1.0, time.time() - srv.started_at)
    for pool in srv.pools.values():
        xact_us = int(pool.xact_time * 1_000_000)
        wait_us = int(pool.wait_time * 1_000_000)
        n = max(1, pool.xact_count)
        rows.append(
            [
                _pool_name(pool),
                pool.xact_count,
                pool.xact_count,
                pool.bytes_received,
                pool.bytes_sent,
                xact_us,
                xact_us,
                wait_us,
                int(pool.xact_count / uptime),
                int(pool.xact_count / uptime),
                int(pool.bytes_received / uptime),
                int(pool.bytes_sent / uptime),
                xact_us // n,
                xact_us // n,
                wait_us // max(1, pool.wait_count),
            ]
        )
    return rows


async def routes_rows(srv: PoolerServer) -> list[Row]:
    rows: list[Row] = []
    for route in await srv.routes.routes():
        forms = [
            name
            for name, value in (
                ("scram", route.secret.scram),
                ("md5", route.secret.md5),
                ("scrypt", route.secret.scrypt),
            )
            if value
        ]
        rows.append(
            [
                route.database,
                route.schema,
                route.user,
                route.destination.describe(),
                route.destination.sslmode,
                route.origin,
                ",".join(forms),
            ]
        )
    return rows


def databases_rows(srv: PoolerServer) -> list[Row]:
    rows: list[Row] = []
    for pool in srv.pools.values():
        d = pool.destination
        rows.append(
            [
                _pool_name(pool),
                d.host,
                d.port,
                d.database,
                d.user,
                pool.settings.pool_size,
                pool.settings.min_idle,
                0,
                pool.settings.pool_mode,
                pool.settings.pool_size,
                pool.total,
                1 if pool.paused else 0,
                0,
            ]
        )
    return rows


def config_rows(srv: PoolerServer) -> list[Row]:
    data = srv.config.model_dump(mode="json", by_alias=False)
    rows: list[Row] = []
    for key in sorted(data):
        value = data[key]
        if key == "auth_db_dsn" and value is not None:
            value = "********"
        rows.append([key, "" if value is None else str(value), "yes"])
    return rows


def result_set(columns: list[tuple[str, int]], rows: list[Row], tag: str) -> bytes:
    out = [p.row_description(columns)]
    for row in rows:
        out.append(p.data_row([None if v is None else str(v) for v in row]))
    out.append(p.command_complete(f"{tag} {len(rows)}" if tag == "SELECT" else tag))
    return b"".join(out)


class AdminSession:
    """Simple-query loop of one console client."""

    def __init__(self, srv: PoolerServer, client: ClientSession) -> None:
        self.srv = srv
        self.client = client

    async def run(self) -> None:
        client = self.client
        while True:
            try:
                kind, body = await client.read_message(1 << 20)
            except p.ConnectionClosed:
                return
            if kind == p.F_TERMINATE:
                client.transport.close()
                return
            if kind != p.F_QUERY:
                client.transport.write(
                    p.error_response(
                        p.FEATURE_NOT_SUPPORTED,
                        "the pooler console accepts simple queries only (psql works)",
                    )
                )
                if kind == p.F_SYNC:
                    client.transport.write(p.READY_IDLE)
                continue
            sql = body.rstrip(b"\0").decode(errors="replace")
            try:
                reply = await self.execute(sql)
            except ValueError as exc:
                reply = p.error_response(p.SYNTAX_ERROR, str(exc), hint=HELP)
            client.transport.write(reply + p.READY_IDLE)

    async def execute(self, sql: str) -> bytes:
        words = sql.strip().rstrip(";").strip().split()
        if not words:
            return p.empty_query_response()
        command = " ".join(w.upper() for w in words)
        srv = self.srv
        if command == "SHOW POOLS":
            return result_set(POOLS_COLUMNS, pools_rows(srv), "SHOW")
        if command == "SHOW CLIENTS":
            return result_set(_CONN_COLUMNS, clients_rows(srv), "SHOW")
        if command == "SHOW SERVERS":
            return result_set(_CONN_COLUMNS, servers_rows(srv), "SHOW")
        if command == "SHOW STATS":
            return result_set(STATS_COLUMNS, stats_rows(srv), "SHOW")
        if command == "SHOW ROUTES":
            return result_set(ROUTES_COLUMNS, await routes_rows(srv), "SHOW")
        if command == "SHOW DATABASES":
            return result_set(DATABASES_COLUMNS, databases_rows(srv), "SHOW")
        if command == "SHOW CONFIG":
            cols = [("key", TX), ("value", TX), ("changeable", TX)]
            return result_set(cols, config_rows(srv), "SHOW")
        if command == "SHOW VERSION":
            return result_set([("version", TX)], [[f"Outpost pooler {__version__}"]], "SHOW")
        if command == "RELOAD":
            tag = await srv.reload()
            if tag != "RELOAD":
                return p.error_response(p.CONNECTION_FAILURE, tag)
            return p.command_complete("RELOAD")
        if command == "PAUSE":
            await srv.pause()
            return p.command_complete("PAUSE")
        if command == "RESUME":
            srv.resume()
            return p.command_complete("RESUME")
        raise ValueError(f"unknown console command {sql.strip()!r}")


class PoolerCollector(Collector):
    """Prometheus metrics of one pooler process (read at scrape time)."""

    def __init__(self, srv: PoolerServer) -> None:
        self.srv = srv

    def collect(self) -> Iterator[Metric]:
        srv = self.srv
        labels = ["pool"]
        clients = GaugeMetricFamily(
            "outpost_pooler_clients", "Client connections by state", labels=["state"]
        )
        # (clients waiting for a server connection all have a session; the count has the
        # rest, those the engine runs alone too)
        waiting = sum(1 for c in srv.clients if c.waiting_server)
        clients.add_metric(["waiting"], waiting)
        clients.add_metric(["active"], srv.client_count - waiting)
        yield clients
        servers = GaugeMetricFamily(
            "outpost_pooler_server_connections",
            "Server connections by pool and state",
            labels=[*labels, "state"],
        )
        xacts = CounterMetricFamily(
            "outpost_pooler_transactions", "Transactions served", labels=labels
        )
        xact_time = CounterMetricFamily(
            "outpost_pooler_transaction_seconds",
            "Time server connections spent serving clients",
            labels=labels,
        )
        wait = CounterMetricFamily(
            "outpost_pooler_client_wait_seconds",
            "Time clients waited for a server connection",
            labels=labels,
        )
        received = CounterMetricFamily(
            "outpost_pooler_received_bytes", "Bytes received from clients", labels=labels
        )
        sent = CounterMetricFamily(
            "outpost_pooler_sent_bytes", "Bytes sent to clients", labels=labels
        )
        timeouts = CounterMetricFamily(
            "outpost_pooler_client_wait_timeouts",
            "Clients that gave up waiting for a server connection",
            labels=labels,
        )
        errors = CounterMetricFamily(
            "outpost_pooler_server_connect_errors",
            "Failed server logins and connects",
            labels=labels,
        )
        for pool in srv.pools.values():
            name = [_pool_name(pool)]
            servers.add_metric([*name, "active"], len(pool.active))
            servers.add_metric([*name, "idle"], len(pool.idle))
            servers.add_metric([*name, "connecting"], pool.connecting)
            xacts.add_metric(name, pool.xact_count)
            xact_time.add_metric(name, pool.xact_time)
            wait.add_metric(name, pool.wait_time)
            received.add_metric(name, pool.bytes_received)
            sent.add_metric(name, pool.bytes_sent)
            timeouts.add_metric(name, pool.timeouts)
            errors.add_metric(name, pool.connect_errors)
        yield from (servers, xacts, xact_time, wait, received, sent, timeouts, errors)
        paused = GaugeMetricFamily("outpost_pooler_paused", "1 while PAUSE is in effect")
        paused.add_metric([], 1 if srv.paused else 0)
        yield paused
