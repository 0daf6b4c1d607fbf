"""Jobs through Outpost HQ, side by side with the plain driver, in the same run.

Starts a real HQ (SQLite) and a real agent logged in to it, with a PostgreSQL connection, and
measures:

- round-trip latency of `select 1`: plain psycopg (connect, query, close, as the agent does)
  against a query job through HQ (POST /api/v1/jobs, then GET /jobs/{id}?wait= and its rows);
- jobs per second through one agent (many query jobs submitted at once);
- rows per second for a one-million-row result: psycopg fetching it against HQ relaying it
  (agent -> HQ in chunks, then paged out of HQ's API);
- how many simulated agents (WebSocket clients speaking the agent protocol, heartbeating) one HQ
  process holds connected, and HQ's memory with them.

Prints a table (JSON with --json); never part of the test run.

    .venv/bin/python bench/hq.py [--latency 200] [--jobs 300] [--rows 1000000] [--agents 1000]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import resource
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import httpx
import psycopg
import websockets

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tests.helpers import Agent, wait_for
from tests.hq_helpers import HQ, enrol

from outpost import protocol


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q * len(ordered)) - 1))]


def timed(fn: Callable[[], object], n: int) -> list[float]:
    for _ in range(3):
        fn()
    times = []
    for _ in range(n):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return times


def hq_query(api: httpx.Client, sql: str, max_rows: int = 1000) -> list[list[Any]]:
    created = api.post(
        "/api/v1/jobs",
        json={"agent": "bench", "connection": "pg", "kind": "query", "sql": sql,
              "max_rows": max_rows, "timeout": 600},
    )  # fmt: skip
    created.raise_for_status()
    job_id = created.json()["id"]
    while True:
        job = api.get(f"/api/v1/jobs/{job_id}", params={"wait": 60}).json()
        if job["state"] in protocol.FINAL_STATES:
            break
    if job["state"] != "succeeded":
        raise RuntimeError(f"job {job_id} {job['state']}: {job['error']}")
    rows: list[list[Any]] = []
    offset: int | None = 0
    while offset is not None:
        page = api.get(
            f"/api/v1/jobs/{job_id}/rows", params={"offset": offset, "limit": 10000}
        ).json()
        rows.extend(page["rows"])
        offset = page["next_offset"]
    return rows


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


async def simulated_agents(hq: HQ, count: int, hold: float) -> int:
    """Enrol COUNT agents, connect them all over WebSocket, heartbeat; return how many HQ
    counted as connected at the peak."""
    tokens = []
    async with httpx.AsyncClient(
        base_url=hq.url, headers={"Authorization": f"Bearer {hq.admin_token}"}, timeout=60
    ) as api:
        for i in range(count):
            response = await api.post("/api/v1/agents", json={"name": f"sim-{i:05d}"})
            response.raise_for_status()
            tokens.append(response.json()["token"])
    stop = asyncio.Event()
    ws_url = hq.url.replace("http", "ws", 1) + "/agent/v1/ws"

    async def one(token: str) -> None:
        async with websockets.connect(
            ws_url, additional_headers={"Authorization": f"Bearer {token}"}, open_timeout=60
        ) as ws:
            hello = protocol.Hello(agent_version="sim", read_only=True, connections=[])
            await ws.send(hello.model_dump_json())
            while not stop.is_set():
                try:
                    await asyncio.wait_for(ws.recv(), timeout=2)
                except TimeoutError:
                    beat = protocol.Heartbeat(sent_at=time.time())
                    await ws.send(beat.model_dump_json())

    tasks = [asyncio.create_task(one(t)) for t in tokens]
    peak = 0
    deadline = time.monotonic() + hold
    async with httpx.AsyncClient(base_url=hq.url, timeout=30) as plain:
        while time.monotonic() < deadline:
            await asyncio.sleep(1)
            metrics = (await plain.get("/metrics")).text
            for line in metrics.splitlines():
                if line.startswith("outpost_hq_agents_connected "):
                    peak = max(peak, int(float(line.split()[1])))
            if peak >= count:
                break
    stop.set()
    await asyncio.gather(*tasks, return_exceptions=True)
    return peak


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--latency", type=int, default=200, help="select 1 round trips")
    parser.add_argument("--jobs", type=int, default=300, help="jobs for the throughput run")
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--agents", type=int, default=1000, help="simulated agents")
    parser.add_argument(
        "--dsn",
        default=os.environ.get("OUTPOST_TEST_PG_DSN", "postgresql://postgres@127.0.0.1:5432/test"),
    )
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    _soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    u = urlparse(args.dsn)
    pg = {"host": u.hostname or "127.0.0.1", "port": u.port or 5432,
          "user": u.username or "postgres", "dbname": (u.path or "/test").lstrip("/")}  # fmt: skip
    results: list[dict[str, Any]] = []
    tmp = Path(tempfile.mkdtemp(prefix="outpost-bench-hq-"))
    hq = HQ(tmp / "hq")
    hq.create_admin()
    hq.start()
    agent = Agent(tmp / "agent", config={"log": {"level": "warning"}}).with_key()
    agent.ok(
        "connections", "add", "postgres", "--name", "pg", "--host", str(pg["host"]),
        "--port", str(pg["port"]), "--user", str(pg["user"]), "--database", str(pg["dbname"]),
    )  # fmt: skip
    enrol(hq, agent, "bench")
    with agent.serving(), hq.api() as api:
        wait_for(lambda: api.get("/api/v1/agents/bench").json()["online"], 30, "agent online")

        def plain_select() -> object:
            with psycopg.connect(**pg) as conn:  # type: ignore[arg-type]
                return conn.execute("select 1").fetchall()

        plain = timed(plain_select, args.latency)
        through = timed(lambda: hq_query(api, "select 1"), args.latency)
        for name, times in (("psycopg select 1", plain), ("HQ job select 1", through)):
            results.append({
                "measure": f"{name}: round trip",
                "p50_ms": round(statistics.median(times) * 1000, 2),
                "p99_ms": round(percentile(times, 0.99) * 1000, 2),
                "per_s": round(1 / statistics.fmean(times), 1),
            })  # fmt: skip
        results[-1]["vs_plain"] = round(statistics.median(through) / statistics.median(plain), 1)

        # throughput: submit all, then wait for all
        start = time.perf_counter()
        ids = []
        for n in range(args.jobs):
            body = {"agent": "bench", "connection": "pg", "kind": "query",
                    "sql": f"select {n}"}  # fmt: skip
            ids.append(api.post("/api/v1/jobs", json=body).json()["id"])
        for job_id in ids:
            while (
                api.get(f"/api/v1/jobs/{job_id}", params={"wait": 60}).json()["state"]
                not in protocol.FINAL_STATES
            ):
                pass
        elapsed = time.perf_counter() - start
        plain_rate = 1 / statistics.fmean(plain)
        results.append({
            "measure": f"jobs/s through one agent ({args.jobs} queued at once)",
            "per_s": round(args.jobs / elapsed, 1),
            "vs_plain": round((args.jobs / elapsed) / plain_rate, 2),
        })  # fmt: skip

        sql = f"select g, md5(g::text) from generate_series(1, {args.rows}) g"
        start = time.perf_counter()
        with psycopg.connect(**pg) as conn:  # type: ignore[arg-type]
            direct = conn.execute(sql).fetchall()
        direct_s = time.perf_counter() - start
        start = time.perf_counter()
        relayed = hq_query(api, sql, max_rows=args.rows)
        hq_s = time.perf_counter() - start
        assert len(relayed) == len(direct) == args.rows
        results.append({"measure": f"psycopg fetch {args.rows:,} rows",
                        "seconds": round(direct_s, 2),
                        "per_s": round(args.rows / direct_s)})  # fmt: skip
        results.append({"measure": f"HQ relays {args.rows:,} rows (agent -> HQ -> API)",
                        "seconds": round(hq_s, 2), "per_s": round(args.rows / hq_s),
                        "vs_plain": round(hq_s / direct_s, 1)})  # fmt: skip
    assert hq.proc is not None
    before = rss_mib(hq.proc.pid)
    peak = asyncio.run(simulated_agents(hq, args.agents, hold=120))
    results.append({
        "measure": f"simulated agents held connected (of {args.agents})",
        "count": peak,
        "hq_rss_mib": round(rss_mib(hq.proc.pid), 1),
        "rss_before_mib": round(before, 1),
    })  # fmt: skip
    hq.stop()
    if args.json:
        print(json.dumps(results, indent=2))
        return
    keys = ["measure", "p50_ms", "p99_ms", "per_s", "seconds", "count", "hq_rss_mib",
            "rss_before_mib", "vs_plain"]  # fmt: skip
    widths = {k: max(len(k), *(len(str(r.get(k, ""))) for r in results)) for k in keys}
    print("  ".join(k.ljust(widths[k]) for k in keys))
    for r in results:
        print("  ".join(str(r.get(k, "")).ljust(widths[k]) for k in keys))


if __name__ == "__main__":
    main()
