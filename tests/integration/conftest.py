"""Fixtures for integration tests that need more than the shared servers.

``pg_tls_cluster`` starts a throwaway PostgreSQL cluster from the installed server binaries:
its own port and socket dir, TLS with a certificate from a test CA (``trustme``) valid for the
host name ``localhost`` only, ``scram-sha-256`` for every TCP login, and a role with a known
password that owns its own database. The shared server on 127.0.0.1:5432 trusts every loopback
login, so anything about passwords or certificates needs this cluster.

As root (initdb refuses to run as root) the server commands run as the ``postgres`` OS user
through ``runuser``, with the cluster's directory owned by that user; otherwise they run as the
current user.
"""

from __future__ import annotations

import contextlib
import glob
import os
import pwd
import re
import secrets
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import service_missing

#: How long the cluster may take to start and accept a login before the fixture gives up.
START_DEADLINE_SECONDS = 60.0


@dataclass(frozen=True)
class PgCluster:
    """A running throwaway PostgreSQL cluster (TLS on, scram-sha-256 for TCP logins)."""

    host: str  # "localhost": the only name the server certificate is valid for
    port: int
    user: str  # a login role with a password (not a superuser)
    password: str
    database: str  # owned by ``user``
    ca_path: Path  # the CA that signed the server certificate (PEM)
    # Less often needed:
    superuser: str = "postgres"  # trusted over the Unix socket only
    socket_dir: Path = field(default=Path())
    data_dir: Path = field(default=Path())
    bin_dir: Path = field(default=Path())
    log_path: Path = field(default=Path())
    server_cert_path: Path = field(default=Path())
    server_version: str = ""

    def options(self, **overrides: Any) -> dict[str, Any]:
        """Driver options (postgres driver) for this cluster; OVERRIDES win."""
        opts: dict[str, Any] = {
            "host": self.host,
            "port": self.port,
            "user": self.user,
            "password": self.password,
            "database": self.database,
        }
        opts.update(overrides)
        return opts

    def cli_flags(self, host: str | None = None) -> list[str]:
        """`outpost connections add postgres` flags for this cluster (no password, no ssl)."""
        return [
            "--host",
            host or self.host,
            "--port",
            str(self.port),
            "--user",
            self.user,
            "--database",
            self.database,
        ]

    def superuser_conninfo(self, dbname: str = "postgres") -> dict[str, Any]:
        """psycopg.connect() keyword arguments for the superuser over the Unix socket."""
        return {
            "host": str(self.socket_dir),
            "port": self.port,
            "user": self.superuser,
            "dbname": dbname,
        }

    def superuser_execute(self, *statements: str, dbname: str = "postgres") -> None:
        """Run STATEMENTS as the superuser (autocommit), e.g. to create roles for a test."""
        import psycopg

        with psycopg.connect(**self.superuser_conninfo(dbname), autocommit=True) as conn:
            for statement in statements:
                conn.execute(statement.encode())


def _find_bin_dir() -> Path | None:
    """The newest installed PostgreSQL server bin dir (OUTPOST_TEST_PG_BINDIR overrides)."""
    override = os.environ.get("OUTPOST_TEST_PG_BINDIR")
    if override:
        return Path(override) if (Path(override) / "initdb").exists() else None

    def version(path: str) -> tuple[int, ...]:
        match = re.search(r"/postgresql/([\d.]+)/bin", path)
        return tuple(int(p) for p in match.group(1).split(".")) if match else (0,)

    candidates = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"), key=version)
    if candidates:
        return Path(candidates[-1]).parent
    initdb = shutil.which("initdb")
    return Path(initdb).parent if initdb else None


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class _Runner:
    """Runs the server commands, as the postgres OS user when we are root."""

    def __init__(self, bin_dir: Path, cwd: Path) -> None:
        self.bin_dir = bin_dir
        self.cwd = cwd
        self.as_postgres = os.geteuid() == 0

    def argv(self, program: str, args: Sequence[str]) -> list[str]:
        argv = [str(self.bin_dir / program), *args]
        if self.as_postgres:
            return ["runuser", "-u", "postgres", "--", *argv]
        return argv

    def run(self, program: str, *args: str, timeout: float = 120.0) -> None:
        env = dict(os.environ, LC_ALL="C", LANG="C")
        proc = subprocess.run(
            self.argv(program, args),
            cwd=self.cwd,
            env=env,
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )
        if proc.returncode != 0:
            output = (proc.stdout + proc.stderr).strip()
            raise RuntimeError(f"{program} {' '.join(args)} failed ({proc.returncode}): {output}")


def _chown_tree(root: Path, uid: int, gid: int) -> None:
    os.chown(root, uid, gid)
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            os.chown(os.path.join(dirpath, name), uid, gid)


def _write_certificates(base: Path) -> tuple[Path, Path, Path]:
    """A test CA and a server certificate valid for "localhost" only (not for 127.0.0.1)."""
    import trustme

    ca = trustme.CA()
    server = ca.issue_cert("localhost")
    ca_path = base / "ca.crt"
    cert_path = base / "server.crt"
    key_path = base / "server.key"
    ca.cert_pem.write_to_path(str(ca_path))
    server.cert_chain_pems[0].write_to_path(str(cert_path))
    for extra in server.cert_chain_pems[1:]:
        extra.write_to_path(str(cert_path), append=True)
    server.private_key_pem.write_to_path(str(key_path))
    os.chmod(key_path, 0o600)  # the server refuses a key others can read
    os.chmod(ca_path, 0o644)
    return ca_path, cert_path, key_path


def _wait_until_ready(cluster: PgCluster, deadline: float) -> None:
    """Wait (with a deadline) until the cluster accepts a scram login over TLS."""
    import psycopg

    last: Exception | None = None
    while time.monotonic() < deadline:
        try:
            with psycopg.connect(
                host=cluster.host,
                port=cluster.port,
                user=cluster.user,
                password=cluster.password,
                dbname=cluster.database,
                sslmode="verify-full",
                sslrootcert=str(cluster.ca_path),
                connect_timeout=5,
            ) as conn:
                conn.execute("SELECT 1")
                return
        except psycopg.OperationalError as exc:
            last = exc
            time.sleep(0.1)  # polling interval of a deadline-bound wait
    raise RuntimeError(f"the test cluster did not accept a login in time: {last}")


def _start_cluster(base: Path, bin_dir: Path, runner: _Runner) -> PgCluster:
    import psycopg

    data_dir = base / "data"
    socket_dir = base / "sock"
    log_path = base / "server.log"
    socket_dir.mkdir()
    ca_path, cert_path, key_path = _write_certificates(base)
    pwfile = base / "superuser.pw"
    pwfile.write_text(secrets.token_urlsafe(16) + "\n")
    os.chmod(pwfile, 0o600)
    if runner.as_postgres:
        pg = pwd.getpwnam("postgres")
        _chown_tree(base, pg.pw_uid, pg.pw_gid)

    runner.run(
        "initdb",
        "-D",
        str(data_dir),
        "-U",
        "postgres",
        "--pwfile",
        str(pwfile),
        "--auth-local=trust",
        "--auth-host=scram-sha-256",
        "--no-locale",
        "-E",
        "UTF8",
        "--no-sync",
    )
    pwfile.unlink()
    port = _free_port()
    with open(data_dir / "postgresql.conf", "a") as conf:
        conf.write(
            "\n# outpost test cluster\n"
            f"port = {port}\n"
            "listen_addresses = 'localhost'\n"
            f"unix_socket_directories = '{socket_dir}'\n"
            "ssl = on\n"
            f"ssl_cert_file = '{cert_path}'\n"
            f"ssl_key_file = '{key_path}'\n"
            f"ssl_ca_file = '{ca_path}'\n"
            "password_encryption = 'scram-sha-256'\n"
            "fsync = off\n"
            "synchronous_commit = off\n"
            "full_page_writes = off\n"
        )
    (data_dir / "pg_hba.conf").write_text(
        "# outpost test cluster: trust on the private socket, scram-sha-256 for every TCP login\n"
        "local   all all                trust\n"
        "hostssl all all all            scram-sha-256\n"
        "host    all all all            scram-sha-256\n"
    )
    runner.run(
        "pg_ctl",
        "-D",
        str(data_dir),
        "-l",
        str(log_path),
        "-w",
        "-t",
        str(int(START_DEADLINE_SECONDS)),
        "start",
        timeout=START_DEADLINE_SECONDS + 10,
    )

    user = "outpost_pw"
    password = "pw-" + secrets.token_urlsafe(12)
    database = "outpost_tls"
    with psycopg.connect(
        host=str(socket_dir),
        port=port,
        user="postgres",
        dbname="postgres",
        autocommit=True,
        connect_timeout=10,
    ) as conn:
        conn.execute(
            psycopg.sql.SQL("CREATE ROLE {} LOGIN PASSWORD {}").format(
                psycopg.sql.Identifier(user), psycopg.sql.Literal(password)
            )
        )
        conn.execute(
            psycopg.sql.SQL("CREATE DATABASE {} OWNER {}").format(
                psycopg.sql.Identifier(database), psycopg.sql.Identifier(user)
            )
        )
        row = conn.execute("SHOW server_version").fetchone()
        version = str(row[0]) if row else ""

    cluster = PgCluster(
        host="localhost",
        port=port,
        user=user,
        password=password,
        database=database,
        ca_path=ca_path,
        socket_dir=socket_dir,
        data_dir=data_dir,
        bin_dir=bin_dir,
        log_path=log_path,
        server_cert_path=cert_path,
        server_version=version,
    )
    _wait_until_ready(cluster, time.monotonic() + START_DEADLINE_SECONDS)
    return cluster


def _log_tail(log_path: Path, lines: int = 20) -> str:
    with contextlib.suppress(OSError):
        return "\n".join(log_path.read_text(errors="replace").splitlines()[-lines:])
    return ""


@pytest.fixture(scope="session")
def pg_tls_cluster() -> Iterator[PgCluster]:
    """A throwaway PostgreSQL cluster: TLS (cert for "localhost" only) + scram-sha-256."""
    bin_dir = _find_bin_dir()
    if bin_dir is None or not (bin_dir / "pg_ctl").exists():
        service_missing("PostgreSQL server binaries (initdb, pg_ctl) are not installed")
    assert bin_dir is not None
    try:
        import trustme  # noqa: F401
    except ImportError:
        service_missing("the Python package 'trustme' is not installed")
    if os.geteuid() == 0:
        if shutil.which("runuser") is None:
            service_missing("running as root needs 'runuser' to start PostgreSQL as postgres")
        try:
            pwd.getpwnam("postgres")
        except KeyError:
            service_missing("running as root needs a 'postgres' OS user to run PostgreSQL")

    base = Path(tempfile.mkdtemp(prefix="outpost-pg-"))
    runner = _Runner(bin_dir, base)
    data_dir = base / "data"
    try:
        try:
            cluster = _start_cluster(base, bin_dir, runner)
        except (RuntimeError, subprocess.TimeoutExpired, OSError) as exc:
            pytest.fail(
                f"could not start the throwaway PostgreSQL cluster: {exc}\n"
                f"{_log_tail(base / 'server.log')}"
            )
        yield cluster
    finally:
        if (data_dir / "postmaster.pid").exists():
            with contextlib.suppress(RuntimeError, subprocess.TimeoutExpired, OSError):
                runner.run(
                    "pg_ctl", "-D", str(data_dir), "-m", "immediate", "-w", "stop", timeout=60
                )
        shutil.rmtree(base, ignore_errors=True)
