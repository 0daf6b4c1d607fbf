"""Running a real Outpost HQ (`outpost hq serve`) as a subprocess in tests and benchmarks, and
enrolling real agents with it."""

from __future__ import annotations

import os
import signal
import ssl
import subprocess
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import psycopg

from tests.helpers import OUTPOST, Agent, free_port, wait_for


def hq_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith("OUTPOST_") or k.startswith("OUTPOST_TEST_")
    }
    env["COLUMNS"] = "200"
    env.update(extra or {})
    return env


@dataclass
class HQ:
    """One HQ installation: a data dir, a database URL, a port; start/stop/kill as a user would."""

    root: Path
    database: str | None = None  # default: SQLite in the data dir
    port: int = field(default_factory=free_port)
    args: list[str] = field(default_factory=list)
    proc: subprocess.Popen[str] | None = None
    admin_token: str = ""
    ca_file: str | None = None  # the CA of --tls-cert, when HQ serves HTTPS

    def __post_init__(self) -> None:
        self.root.mkdir(parents=True, exist_ok=True)

    @property
    def data_dir(self) -> Path:
        return self.root / "hq-data"

    @property
    def url(self) -> str:
        scheme = "https" if "--tls-cert" in self.args else "http"
        return f"{scheme}://127.0.0.1:{self.port}"

    @property
    def verify(self) -> ssl.SSLContext | bool:
        return ssl.create_default_context(cafile=self.ca_file) if self.ca_file else True

    @property
    def log_path(self) -> Path:
        return self.root / "hq.log"

    def log(self) -> str:
        return self.log_path.read_text() if self.log_path.exists() else ""

    def _db_args(self) -> list[str]:
        args = ["--data-dir", str(self.data_dir)]
        if self.database:
            args += ["--database", self.database]
        return args

    def cli(self, *args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
        """`outpost hq ARGS` with this HQ's address and admin token in the environment."""
        env = hq_env({"OUTPOST_HQ_URL": self.url, "OUTPOST_HQ_ADMIN_TOKEN": self.admin_token})
        return subprocess.run(
            [*OUTPOST, "hq", *args], capture_output=True, text=True, env=env, timeout=timeout
        )

    def create_admin(self) -> str:
        proc = subprocess.run(
            [*OUTPOST, "hq", "admin", "create", *self._db_args()],
            capture_output=True,
            text=True,
            env=hq_env(),
            timeout=60,
        )
        assert proc.returncode == 0, proc.stderr + proc.stdout
        tokens = [w for w in proc.stdout.split() if w.startswith("opa_")]
        assert tokens, f"no admin token in: {proc.stdout}"
        self.admin_token = tokens[0]
        return self.admin_token

    def ready(self) -> bool:
        try:
            return httpx.get(f"{self.url}/readyz", timeout=1, verify=self.verify).status_code == 200
        except httpx.HTTPError:
            return False

    def start(self) -> None:
        log = open(self.log_path, "a")  # noqa: SIM115 - owned by the process
        self.proc = subprocess.Popen(
            [*OUTPOST, "hq", "serve", "--port", str(self.port), *self._db_args(), *self.args],
            stdout=log,
            stderr=subprocess.STDOUT,
            text=True,
            env=hq_env(),
        )
        proc = self.proc
        # ready, and past logging where it listens (that line comes just after uvicorn starts
        # answering: waiting for readiness alone let a test read the log too early)
        wait_for(
            lambda: (
                (self.ready() and "Outpost HQ listening on" in self.log())
                or proc.poll() is not None
            ),
            60,
            "HQ to be ready",
        )
        assert proc.poll() is None, f"HQ exited {proc.returncode}: {self.log()}"

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None

    @contextmanager
    def running(self) -> Iterator[HQ]:
        """Create an admin token, start, yield, stop."""
        self.create_admin()
        self.start()
        try:
            yield self
        finally:
            self.stop()

    def kill(self) -> None:
        """SIGKILL: no chance to clean up, as in a crash."""
        assert self.proc is not None
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait()
        self.proc = None

    def api(self) -> httpx.Client:
        return httpx.Client(
            base_url=self.url,
            headers={"Authorization": f"Bearer {self.admin_token}"},
            timeout=90,
            verify=self.verify,
        )

    def create_agent(self, name: str) -> str:
        with self.api() as api:
            response = api.post("/api/v1/agents", json={"name": name})
            assert response.status_code == 201, response.text
            token = response.json()["token"]
            assert isinstance(token, str)
            return token

    def run_job(self, wait: float = 60, **body: Any) -> dict[str, Any]:
        """Create a job and wait for its final state; returns the job."""
        with self.api() as api:
            response = api.post("/api/v1/jobs", json=body)
            assert response.status_code == 201, response.text
            job_id = response.json()["id"]
            return self.wait_job(job_id, wait)

    def wait_job(self, job_id: str, wait: float = 60) -> dict[str, Any]:
        final = {"succeeded", "failed", "expired", "cancelled"}
        job: dict[str, Any] = {}

        def done() -> bool:
            nonlocal job
            with self.api() as api:
                job = api.get(f"/api/v1/jobs/{job_id}", params={"wait": 5}).json()
            return job.get("state") in final

        wait_for(done, wait, f"job {job_id} to finish")
        return job

    def rows(self, job_id: str) -> list[list[Any]]:
        rows: list[list[Any]] = []
        offset: int | None = 0
        with self.api() as api:
            while offset is not None:
                page = api.get(
                    f"/api/v1/jobs/{job_id}/rows", params={"offset": offset, "limit": 10000}
                ).json()
                rows.extend(page["rows"])
                offset = page["next_offset"]
        return rows


def enrol(hq: HQ, agent: Agent, name: str, *extra: str) -> None:
    """Create agent NAME at HQ and `outpost login` the agent to it."""
    token = hq.create_agent(name)
    agent.ok(
        "login",
        "--hq",
        hq.url,
        "--token-env",
        "OUTPOST_TEST_HQ_TOKEN",
        *extra,
        env={"OUTPOST_TEST_HQ_TOKEN": token},
    )


@contextmanager
def throwaway_pg_database(admin_dsn: str, prefix: str) -> Iterator[str]:
    """CREATE DATABASE PREFIX_<random> on the server behind ADMIN_DSN; yields its URL; drops it."""
    name = f"{prefix}_{uuid.uuid4().hex[:10]}"
    with psycopg.connect(admin_dsn, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    info = psycopg.conninfo.conninfo_to_dict(admin_dsn)
    host = info.get("host", "127.0.0.1")
    port = info.get("port", "5432")
    user = info.get("user", "postgres")
    try:
        yield f"postgresql://{user}@{host}:{port}/{name}"
    finally:
        with psycopg.connect(admin_dsn, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@contextmanager
def running_hq(
    root: Path, backend: str, pg_dsn: str | None = None, args: list[str] | None = None
) -> Iterator[HQ]:
    """A started HQ on BACKEND ("sqlite", or "postgresql" in a throwaway database on PG_DSN)."""
    if backend == "sqlite":
        with HQ(root, args=list(args or [])).running() as server:
            yield server
        return
    assert pg_dsn is not None, "a PostgreSQL HQ needs the server's DSN"
    with (
        throwaway_pg_database(pg_dsn, "outpost_hq_test") as url,
        HQ(root, database=url, args=list(args or [])).running() as server,
    ):
        yield server
