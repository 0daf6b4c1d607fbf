"""The pooler against pgbouncer and the direct server, in one run, with pgbench.

Starts pgbouncer (/usr/sbin/pgbouncer) and `outpost pooler serve --workers 1` side by side with
equivalent settings (transaction mode, 20 server connections, max 2000 clients, SCRAM-SHA-256
client auth from a verifier, trust to the server), on a throwaway database initialised with
`pgbench -i`, then runs:

- ``select``: pgbench -S, 20 clients, transaction pooling
- ``connect``: pgbench -S -C (a new client connection per transaction), 20 clients
- ``connect-md5``: the same with md5 client auth (both poolers started again for it): with SCRAM,
  pgbench's own PBKDF2 (4,096 rounds per connection) takes most of the machine and hides the
  pooler's login cost; md5 costs the client almost nothing, so the pooler's own cost shows
- ``1000-clients``: pgbench -S with 1,000 clients sharing the 20 server connections
- ``idle-memory``: RSS of the pooler process before/after opening N idle client connections

and prints TPS, average and p99 latency, the pooler's CPU per transaction (and, behind each
pooler, what PostgreSQL's backends and pgbench spent per transaction) and the Outpost/pgbouncer
ratio (a table, or JSON with --json). Each pgbench scenario runs ``--rounds``
times, the targets taking turns (pgbouncer first in odd rounds, Outpost first in even ones); the
table shows the medians and the lowest and highest of the per-round ratios, since a single
10-second run on a small machine can be off by 20%. With ``--together`` the two poolers' pgbench
runs go at the same time in each round (each with the scenario's clients; the direct server
alone before them), so that whatever else the machine does hits both alike: for the login
scenarios the ratio is then steadier (the TPS about half of what each gets alone); for
``select``, a closed loop that fills the machine, a round can tip to one side for seconds, so
run it one at a time with more rounds. Never part of the test run.

    .venv/bin/python bench/pooler.py [--duration 10] [--rounds 3] [--idle-clients 1000]
        [--only SCENARIO]... [--together] [--json]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import pwd
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psycopg

from outpost.pooler.passwords import scram_verifier


def md5_hash(password: str, user: str) -> str:
    """PostgreSQL's md5 password form (pgbouncer's auth_file accepts it)."""
    import hashlib

    return "md5" + hashlib.md5((password + user).encode(), usedforsecurity=False).hexdigest()


PASSWORD = "bench-pw"
USER = "bench"
PGBOUNCER = "/usr/sbin/pgbouncer"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_port(port: int, proc: subprocess.Popen[bytes], what: str, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"{what} exited with {proc.returncode}")
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 1):
            return
        time.sleep(0.1)
    raise SystemExit(f"{what} did not listen on {port} within {timeout}s")


@dataclass
class Target:
    name: str
    port: int
    pid: int | None  # the process whose RSS is measured
    user: str
    password: str | None
    database: str


@contextlib.contextmanager
def throwaway_db(host: str, port: int, user: str, scale: int) -> Iterator[str]:
    name = f"outpost_bench_{uuid.uuid4().hex[:8]}"
    with psycopg.connect(host=host, port=port, user=user, dbname="postgres", autocommit=True) as c:
        c.execute(f'CREATE DATABASE "{name}"'.encode())
    try:
        subprocess.run(
            ["pgbench", "-i", "-q", "-s", str(scale), "-h", host, "-p", str(port), "-U", user,
             name],
            check=True,
            capture_output=True,
        )  # fmt: skip
        yield name
    finally:
        with psycopg.connect(
            host=host, port=port, user=user, dbname="postgres", autocommit=True
        ) as c:
            c.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'.encode())


@contextlib.contextmanager
def pgbouncer(
    tmp: Path, host: str, port: int, user: str, db: str, auth: str = "scram-sha-256"
) -> Iterator[Target]:
    listen = free_port()
    run_as = "postgres" if os.geteuid() == 0 else None
    secret = scram_verifier(PASSWORD) if auth == "scram-sha-256" else md5_hash(PASSWORD, USER)
    (tmp / "userlist.txt").write_text(f'"{USER}" "{secret}"\n')
    (tmp / "pgbouncer.ini").write_text(
        f"""[databases]
bench = host={host} port={port} dbname={db} user={user}

[pgbouncer]
listen_addr = 127.0.0.1
listen_port = {listen}
unix_socket_dir =
auth_type = {auth}
auth_file = {tmp}/userlist.txt
pool_mode = transaction
default_pool_size = 20
max_client_conn = 2000
logfile = {tmp}/pgbouncer.log
pidfile = {tmp}/pgbouncer.pid
ignore_startup_parameters = extra_float_digits
"""
    )
    if run_as:
        pw = pwd.getpwnam(run_as)
        for path in (tmp, tmp / "userlist.txt", tmp / "pgbouncer.ini"):
            os.chown(path, pw.pw_uid, pw.pw_gid)
    argv = [PGBOUNCER, str(tmp / "pgbouncer.ini")]
    if run_as:
        argv[1:1] = ["-u", run_as]
    proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_port(listen, proc, "pgbouncer")
        yield Target("pgbouncer", listen, proc.pid, USER, PASSWORD, "bench")
    finally:
        proc.send_signal(signal.SIGINT)
        proc.wait(20)


@contextlib.contextmanager
def outpost(
    tmp: Path, host: str, port: int, user: str, db: str, auth: str = "scram-sha-256"
) -> Iterator[Target]:
    listen = free_port()
    tmp.mkdir(parents=True, exist_ok=True)
    config = tmp / "agent.json"
    settings: dict[str, Any] = {
        "data_dir": str(tmp / "data"),
        "key_path": str(tmp / "agent.key"),
        "checks": {"interval": 3600},
        "log": {"level": "warning"},
        "pooler": {
            "pool_size": 20,
            "max_idle": 20,
            "max_client_conn": 2000,
            "client_wait_timeout": 120,
            "client_auth": auth,
            "workers": 1,
        },
    }
    config.write_text(json.dumps(settings))
    env = {**os.environ, "OUTPOST_CONFIG": str(config), "ROUTE_PW": PASSWORD}
    cli = [sys.executable, "-m", "outpost"]

    def run(*args: str) -> None:
        subprocess.run([*cli, *args], check=True, capture_output=True, env=env)

    run("key", "generate", str(tmp / "agent.key"))
    run("connections", "add", "postgres", "--name", "bench", "--host", host, "--port", str(port),
        "--user", user, "--database", db)  # fmt: skip
    run("pooler", "routes", "add", "--database", "bench", "--schema", "public", "--user", USER,
        "--to", "bench", "--password-env", "ROUTE_PW")  # fmt: skip
    proc = subprocess.Popen(
        [*cli, "pooler", "serve", "--listen", f"127.0.0.1:{listen}", "--workers", "1"],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=open(tmp / "outpost.log", "w"),  # noqa: SIM115 - owned by the process
    )
    try:
        wait_port(listen, proc, "outpost pooler serve")
        yield Target("outpost", listen, proc.pid, USER, PASSWORD, "bench")
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(20)


@dataclass
class PgbenchRun:
    """A pgbench process running against TARGET (``start_pgbench``; ``finish_pgbench``)."""

    target: Target
    proc: subprocess.Popen[bytes]
    logdir: Path
    cpu_before: float


def start_pgbench(target: Target, tmp: Path, args: list[str], duration: int) -> PgbenchRun:
    logdir = Path(tempfile.mkdtemp(dir=tmp))
    threads = "4" if "1000" in args else "2"
    argv = [
        "pgbench", "-n", "-h", "127.0.0.1", "-p", str(target.port), "-U", target.user,
        "-T", str(duration), "-j", threads, "-l", f"--log-prefix={logdir}/tx", *args,
        target.database,
    ]  # fmt: skip
    env = {**os.environ}
    if target.password:
        env["PGPASSWORD"] = target.password
    cpu_before = cpu_seconds(target.pid) if target.pid else 0.0
    with open(logdir / "output", "wb") as output:
        proc = subprocess.Popen(argv, stdout=output, stderr=subprocess.STDOUT, env=env, cwd=logdir)
    return PgbenchRun(target, proc, logdir, cpu_before)


def finish_pgbench(run: PgbenchRun) -> dict[str, Any]:
    """Wait for RUN; TPS from pgbench's summary, latencies (avg, p99) from its per-transaction
    log, the pooler's CPU and pgbench's own (its rusage) per transaction."""
    _, status, usage = os.wait4(run.proc.pid, 0)
    run.proc.returncode = os.waitstatus_to_exitcode(status)
    target = run.target
    cpu = cpu_seconds(target.pid) - run.cpu_before if target.pid else None
    client_cpu = usage.ru_utime + usage.ru_stime
    output = (run.logdir / "output").read_text(errors="replace")
    if run.proc.returncode != 0:
        shutil.rmtree(run.logdir, ignore_errors=True)
        return {"error": output.strip().splitlines()[-1][:120] if output.strip() else "failed"}
    tps = 0.0
    processed = 0
    for line in output.splitlines():
        if line.startswith("tps = "):
            tps = float(line.split()[2])
        if line.startswith("number of transactions actually processed:"):
            processed = int(line.split(":")[1].split("/")[0])
    latencies: list[int] = []
    for path in run.logdir.glob("tx*"):
        with open(path) as fh:
            for line in fh:
                parts = line.split()
                if len(parts) > 2:
                    latencies.append(int(parts[2]))
    shutil.rmtree(run.logdir, ignore_errors=True)
    latencies.sort()
    if not latencies:
        return {"tps": tps}
    p99 = latencies[min(len(latencies) - 1, int(len(latencies) * 0.99))]
    out: dict[str, Any] = {
        "tps": round(tps, 1),
        "avg_ms": round(statistics.fmean(latencies) / 1000, 3),
        "p99_ms": round(p99 / 1000, 3),
    }
    if cpu is not None and processed:
        out["transactions"] = processed
        out["pooler_cpu_us_per_tx"] = round(cpu * 1e6 / processed, 1)
        out["pgbench_cpu_us_per_tx"] = round(client_cpu * 1e6 / processed, 1)
    return out


def pgbench(target: Target, tmp: Path, args: list[str], duration: int) -> dict[str, Any]:
    """Run pgbench alone against TARGET; behind a pooler, also what PostgreSQL's backends spent
    per transaction."""
    server_before = postgres_cpu()
    out = finish_pgbench(start_pgbench(target, tmp, args, duration))
    server_after = postgres_cpu()
    # (backends that lived through the run: behind a pooler, its server connections)
    server_cpu = sum(
        t - server_before[pid] for pid, t in server_after.items() if pid in server_before
    )
    if "pooler_cpu_us_per_tx" in out:
        out["server_cpu_us_per_tx"] = round(server_cpu * 1e6 / out["transactions"], 1)
    return out


def pgbench_together(
    targets: list[Target], tmp: Path, args: list[str], duration: int
) -> list[dict[str, Any]]:
    """Run pgbench against every target at the same time (each with the scenario's clients):
    whatever the machine does meanwhile hits them alike."""
    runs = [start_pgbench(target, tmp, args, duration) for target in targets]
    return [finish_pgbench(run) for run in runs]


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of PID (the pooler process)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def postgres_cpu() -> dict[int, float]:
    """CPU seconds of each PostgreSQL server process on this machine that we may read (empty
    when the server runs elsewhere): what the backends spend per transaction behind a pooler."""
    out: dict[int, float] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            if (entry / "comm").read_text().strip() != "postgres":
                continue
            out[int(entry.name)] = cpu_seconds(int(entry.name))
        except OSError:
            continue
    return out


def rss_kib(pid: int) -> int:
    """Resident memory of PID (pgbouncer, or outpost with one worker: one process each)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


def idle_memory(target: Target, clients: int) -> dict[str, Any]:
    assert target.pid is not None
    conns = []
    with psycopg.connect(**_conninfo(target)) as warm:
        warm.execute("SELECT 1")
    time.sleep(0.5)
    before = rss_kib(target.pid)
    try:
        for _ in range(clients):
            conns.append(psycopg.connect(**_conninfo(target)))
        time.sleep(1.0)
        after = rss_kib(target.pid)
    finally:
        for conn in conns:
            conn.close()
    return {
        "rss_before_kib": before,
        "rss_after_kib": after,
        "bytes_per_client": round((after - before) * 1024 / clients),
    }


def _conninfo(target: Target) -> dict[str, Any]:
    return {
        "host": "127.0.0.1",
        "port": target.port,
        "user": target.user,
        "password": target.password,
        "dbname": target.database,
        "sslmode": "disable",
    }


SCENARIOS = {
    "select": ["-S", "-c", "20"],
    "connect": ["-S", "-C", "-c", "20"],
    "connect-md5": ["-S", "-C", "-c", "20"],
    "1000-clients": ["-S", "-c", "1000"],
}
#: Scenarios run against poolers started with md5 client auth.
MD5_SCENARIOS = ("connect-md5",)


def median_run(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """The per-key median of several pgbench results (errors win: one is enough to report)."""
    for run in runs:
        if "error" in run:
            return run
    out: dict[str, Any] = {}
    for key in runs[0]:
        values = [run[key] for run in runs if key in run]
        out[key] = round(statistics.median(values), 3)
    out["tps_runs"] = [run.get("tps", 0.0) for run in runs]
    return out


def run_scenario(
    scenario: str,
    targets: list[Target],
    tmp: Path,
    duration: int,
    rounds: int,
    *,
    together: bool = False,
) -> dict[str, Any]:
    """Run SCENARIO ROUNDS times on each target, the poolers taking turns to go first; with
    TOGETHER, the poolers at the same time (the direct server alone before them)."""
    runs: dict[str, list[dict[str, Any]]] = {target.name: [] for target in targets}
    args = SCENARIOS[scenario]
    for number in range(rounds):
        order = targets if number % 2 == 0 else list(reversed(targets))
        if together:
            poolers = [target for target in order if target.pid is not None]
            for target in order:
                if target.pid is None:
                    runs[target.name].append(pgbench(target, tmp, args, duration))
            for target, result in zip(
                poolers, pgbench_together(poolers, tmp, args, duration), strict=True
            ):
                runs[target.name].append(result)
            continue
        for target in order:
            runs[target.name].append(pgbench(target, tmp, args, duration))
    row: dict[str, Any] = {"scenario": scenario}
    for name, results in runs.items():
        row[name] = median_run(results)
    ours, ref = runs.get("outpost"), runs.get("pgbouncer")
    if ours and ref:
        ratios = [
            a["tps"] / b["tps"]
            for a, b in zip(ours, ref, strict=True)
            if a.get("tps") and b.get("tps")
        ]
        if ratios:
            row["ratio_range"] = [round(min(ratios), 3), round(max(ratios), 3)]
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--duration", type=int, default=10, help="seconds per pgbench run")
    parser.add_argument("--rounds", type=int, default=3, help="pgbench runs per target")
    parser.add_argument("--idle-clients", type=int, default=1000)
    parser.add_argument("--scale", type=int, default=1, help="pgbench -i scale")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=5432)
    parser.add_argument("--user", default="postgres")
    parser.add_argument("--only", choices=[*SCENARIOS, "idle-memory"], action="append")
    parser.add_argument(
        "--together",
        action="store_true",
        help="run the two poolers' pgbench at the same time in each round (drift hits both)",
    )
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    if not Path(PGBOUNCER).exists():
        raise SystemExit(f"{PGBOUNCER} is not installed")
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, min(hard, 8192)), hard))
    # idle memory first: RSS is a high-water mark, the 1,000-client run would hide it
    wanted = args.only or ["idle-memory", *SCENARIOS]
    wanted.sort(key=lambda scenario: scenario in MD5_SCENARIOS)  # after the others
    results: list[dict[str, Any]] = []
    tmp = Path(tempfile.mkdtemp(prefix="outpost-bench-"))
    os.chmod(tmp, 0o755)  # noqa: S103 - pgbouncer runs as postgres and reads its config here
    try:
        with throwaway_db(args.host, args.port, args.user, args.scale) as db:
            bouncer_dir = tmp / "pgbouncer"
            bouncer_dir.mkdir()
            direct = Target("direct", args.port, None, args.user, None, db)
            with (
                pgbouncer(bouncer_dir, args.host, args.port, args.user, db) as bouncer,
                outpost(tmp / "outpost", args.host, args.port, args.user, db) as ours,
            ):
                for scenario in wanted:
                    if scenario in MD5_SCENARIOS:
                        continue
                    if scenario == "idle-memory":
                        row: dict[str, Any] = {"scenario": scenario}
                        for target in (bouncer, ours):
                            row[target.name] = idle_memory(target, args.idle_clients)
                        results.append(row)
                        continue
                    targets = [bouncer, ours]
                    if scenario != "1000-clients":  # max_connections is 100
                        targets.insert(0, direct)
                    results.append(
                        run_scenario(
                            scenario,
                            targets,
                            tmp,
                            args.duration,
                            args.rounds,
                            together=args.together,
                        )
                    )
            md5 = [scenario for scenario in wanted if scenario in MD5_SCENARIOS]
            if md5:
                (tmp / "pgbouncer-md5").mkdir()
                with (
                    pgbouncer(
                        tmp / "pgbouncer-md5", args.host, args.port, args.user, db, "md5"
                    ) as bouncer,
                    outpost(
                        tmp / "outpost-md5", args.host, args.port, args.user, db, "md5"
                    ) as ours,
                ):
                    for scenario in md5:
                        results.append(
                            run_scenario(
                                scenario,
                                [bouncer, ours],
                                tmp,
                                args.duration,
                                args.rounds,
                                together=args.together,
                            )
                        )
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    if args.json:
        print(json.dumps(results, indent=2))
        return
    print_table(results, together=args.together)


def print_table(results: list[dict[str, Any]], *, together: bool = False) -> None:
    from rich.console import Console
    from rich.table import Table

    how = "the poolers at the same time" if together else "one target at a time"
    table = Table(
        title=f"pooler benchmark (pgbench, {how}; outpost workers=1; medians, per-round ratio "
        "range)"
    )
    columns = (
        "scenario",
        "target",
        "tps",
        "avg ms",
        "p99 ms",
        "cpu µs/tx",
        "server+pgbench µs/tx",
        "memory",
        "vs pgbouncer",
    )
    for col in columns:
        table.add_column(col, justify="left" if col in ("scenario", "target") else "right")
    for row in results:
        scenario = row["scenario"]
        for name in ("direct", "pgbouncer", "outpost"):
            data = row.get(name)
            if data is None:
                continue
            ratio = ""
            if name == "outpost" and "pgbouncer" in row:
                ref = row["pgbouncer"]
                if scenario == "idle-memory":
                    ratio = f"{data['bytes_per_client'] / max(1, ref['bytes_per_client']):.2f}x"
                elif ref.get("tps") and data.get("tps"):
                    ratio = f"{data['tps'] / ref['tps']:.2f}x"
                    low, high = row.get("ratio_range", (None, None))
                    if low is not None and low != high:
                        ratio += f" ({low:.2f}-{high:.2f})"
            others = ""
            if "server_cpu_us_per_tx" in data:
                others = f"{data['server_cpu_us_per_tx']}+{data['pgbench_cpu_us_per_tx']}"
            elif "pgbench_cpu_us_per_tx" in data:  # (together: the server's share is mixed)
                others = f"?+{data['pgbench_cpu_us_per_tx']}"
            if "error" in data:
                table.add_row(scenario, name, "error: " + data["error"], "", "", "", "", "", "")
            elif scenario == "idle-memory":
                memory = f"{data['bytes_per_client']} B/client"
                table.add_row(scenario, name, "", "", "", "", "", memory, ratio)
            else:
                table.add_row(
                    scenario,
                    name,
                    f"{data.get('tps', 0):.0f}",
                    f"{data.get('avg_ms', 0):.3f}",
                    f"{data.get('p99_ms', 0):.3f}",
                    str(data.get("pooler_cpu_us_per_tx", "")),
                    others,
                    "",
                    ratio,
                )
    Console(width=140).print(table)


if __name__ == "__main__":
    main()
