"""Query overhead: plain psycopg vs Outpost's service layer vs the running agent's API.

Each iteration opens a connection, runs one SELECT in a read-only transaction and closes it,
as `outpost query` does. Prints a table (and JSON with --json); never part of the test run.

    .venv/bin/python bench/query.py [--iterations 200] [--dsn postgresql://postgres@127.0.0.1/test]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from urllib.parse import urlparse

import httpx
import psycopg

from outpost.api.client import AgentClient
from outpost.api.service import AgentService
from outpost.config import load_config

SQL = "SELECT relname, relkind FROM pg_class ORDER BY oid LIMIT 50"


def measure(fn: Callable[[], object], iterations: int) -> list[float]:
    for _ in range(5):
        fn()
    times = []
    for _ in range(iterations):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return times


def summary(name: str, times: list[float], base: float | None) -> dict[str, object]:
    mean = statistics.fmean(times)
    p99 = sorted(times)[max(0, int(len(times) * 0.99) - 1)]
    return {
        "path": name,
        "mean_ms": round(mean * 1000, 3),
        "p50_ms": round(statistics.median(times) * 1000, 3),
        "p99_ms": round(p99 * 1000, 3),
        "qps": round(1 / mean, 1),
        "vs_plain": round(mean / base, 2) if base else 1.0,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--iterations", type=int, default=200)
    parser.add_argument(
        "--dsn",
        default=os.environ.get("OUTPOST_TEST_PG_DSN", "postgresql://postgres@127.0.0.1:5432/test"),
    )
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    u = urlparse(args.dsn)
    host, port = u.hostname or "127.0.0.1", u.port or 5432
    user, db = u.username or "postgres", (u.path or "/test").lstrip("/")

    def plain() -> object:
        with psycopg.connect(host=host, port=port, user=user, dbname=db) as conn:
            conn.read_only = True
            return conn.execute(SQL).fetchmany(1001)

    tmp = Path(tempfile.mkdtemp(prefix="outpost-bench-"))
    key = tmp / "agent.key"
    subprocess.run(
        [sys.executable, "-m", "outpost", "key", "generate", str(key)],
        check=True,
        capture_output=True,
    )
    with socket_port() as api_port:
        pass  # closed again: `outpost serve` binds it below
    config = tmp / "agent.json"
    config.write_text(
        json.dumps(
            {
                "data_dir": str(tmp / "data"),
                "key_path": str(key),
                "api": {"client_bind_addresses": [f"127.0.0.1:{api_port}"]},
                "checks": {"interval": 3600},
                "log": {"level": "warning"},
            }
        )
    )
    loaded = load_config(str(config))
    service = AgentService.open(loaded)
    service.add_connection(
        "postgres", "bench", {"host": host, "port": port, "user": user, "database": db}
    )
    rows: list[dict[str, object]] = []
    base_times = measure(plain, args.iterations)
    base = statistics.fmean(base_times)
    rows.append(summary("psycopg (plain driver)", base_times, None))
    rows.append(
        summary(
            "AgentService.query (decrypt + driver)",
            measure(lambda: service.query("bench", SQL), args.iterations),
            base,
        )
    )
    service.close()

    env = {**os.environ, "OUTPOST_CONFIG": str(config)}
    proc = subprocess.Popen(
        [sys.executable, "-m", "outpost", "serve"], env=env, stderr=subprocess.DEVNULL
    )
    try:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            try:
                if httpx.get(f"http://127.0.0.1:{api_port}/readyz").status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            time.sleep(0.1)
        client = AgentClient.from_data_dir(tmp / "data")
        rows.append(
            summary(
                "local API (HTTP + agent)",
                measure(lambda: client.query("bench", SQL), args.iterations),
                base,
            )
        )
        client.close()
    finally:
        proc.terminate()
        proc.wait()

    if args.json:
        print(json.dumps(rows, indent=2))
        return
    print(f"{args.iterations} iterations, each: connect, one read-only SELECT of 50 rows, close")
    header = ["path", "mean_ms", "p50_ms", "p99_ms", "qps", "vs_plain"]
    table: list[dict[str, object]] = [{h: h for h in header}, *rows]
    widths = [max(len(str(r[h])) for r in table) for h in header]
    print("  ".join(h.ljust(w) for h, w in zip(header, widths, strict=True)))
    for r in rows:
        print("  ".join(str(r[h]).ljust(w) for h, w in zip(header, widths, strict=True)))


class socket_port:
    """A free TCP port on 127.0.0.1 (the socket is closed when the block ends)."""

    def __enter__(self) -> int:
        import socket

        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        return int(self.sock.getsockname()[1])

    def __exit__(self, *exc: object) -> None:
        self.sock.close()


if __name__ == "__main__":
    main()
