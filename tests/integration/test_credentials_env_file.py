"""`--password-from env:…` and `file:…` end to end against the real PostgreSQL (the scram +
TLS throwaway cluster) and MariaDB servers: the password is never stored, a password changed
at the source is picked up on the next connect, errors name the source and hold no secret."""

from __future__ import annotations

import uuid
from pathlib import Path

import psycopg
import pytest

from tests.conftest import MariaUser
from tests.helpers import Agent
from tests.integration.conftest import PgCluster


@pytest.fixture
def agent(tmp_path: Path) -> Agent:
    a = Agent(tmp_path / "agent", config={"log": {"level": "debug"}})
    return a.with_key()


def everything_on_disk(agent: Agent) -> bytes:
    return b"".join(p.read_bytes() for p in agent.data_dir.rglob("*") if p.is_file())


def test_file_source_with_mariadb_follows_a_changed_password(
    agent: Agent, tmp_path: Path, mysql_params: dict[str, object], maria_user: MariaUser
) -> None:
    user, first = maria_user.name, maria_user.password
    secret = tmp_path / "maria.pw"
    secret.write_text(first + "\n")
    secret.chmod(0o600)
    agent.ok(
        "connections",
        "add",
        "mysql",
        "--name",
        "maria",
        "--host",
        "127.0.0.1",
        "--port",
        str(mysql_params["port"]),
        "--user",
        user,
        "--password-from",
        f"file:{secret}",
    )
    with agent.serving():
        test = agent.ok("connections", "test", "maria", "--format", "json").json
        assert test["up"] is True
        assert test["password_source"].startswith(f"file:{secret} (fetched ")
        table = agent.ok("connections", "test", "maria").out
        assert "PASSWORD FROM" in table and f"file:{secret}" in table
        second = "Maria-Pw2-" + uuid.uuid4().hex[:8]
        maria_user.set_password(second)
        down = agent.fails("connections", "test", "maria", "--format", "json")
        assert "ccess denied" in down.out and second not in down.out and first not in down.out
        secret.write_text(second + "\n")  # changed at the source: no restart, no edit
        assert agent.ok("connections", "test", "maria", "--format", "json").json["up"] is True
        rows = agent.ok("query", "maria", "SELECT CURRENT_USER() AS me", "--format", "json")
        assert rows.json["rows"][0][0].startswith(user)
        shown = agent.ok("connections", "show", "maria", "--format", "json").json
        assert shown["options"]["password_from"] == f"file:{secret}"
        assert shown["options"]["password"] is None
    for value in (first, second):
        assert value.encode() not in everything_on_disk(agent)
        assert value not in agent.log()


def test_env_source_with_postgres_scram(agent: Agent, pg_tls_cluster: PgCluster) -> None:
    c = pg_tls_cluster
    base = [
        *c.cli_flags(),
        "--ssl",
        "verify-full",
        "--ssl-root-cert",
        str(c.ca_path),
    ]
    agent.ok(
        "connections",
        "add",
        "postgres",
        "--name",
        "pg",
        *base,
        "--password-from",
        "env:PG_SECRET",
        env={"PG_SECRET": c.password},
    )
    assert c.password.encode() not in everything_on_disk(agent)
    # the CLI (no agent running) reads the variable at every connect
    ok = agent.ok("connections", "test", "pg", "--format", "json", env={"PG_SECRET": c.password})
    assert ok.json["up"] is True and ok.json["password_source"].startswith("env:PG_SECRET")
    wrong = "Wrong-" + uuid.uuid4().hex[:8]
    bad = agent.fails("connections", "test", "pg", "--format", "json", env={"PG_SECRET": wrong})
    assert "authentication failed" in bad.out and wrong not in bad.out
    missing = agent.fails("connections", "test", "pg", "--format", "json")
    assert missing.json["error"] == (
        "Cannot get the password for connection 'pg' from env:PG_SECRET: the agent's "
        "environment has no variable PG_SECRET."
    )
    err = agent.fails("query", "pg", "SELECT 1").err
    assert err.strip() == "Error: " + missing.json["error"]
    # and through a running agent: the agent's own environment counts
    with agent.serving(env={"PG_SECRET": c.password}):
        q = agent.ok("query", "pg", "SELECT current_user", "--format", "json").json
        assert q["rows"] == [[c.user]]
    assert c.password not in agent.log()


def test_switching_between_stored_password_and_source(
    agent: Agent, pg_tls_cluster: PgCluster, tmp_path: Path
) -> None:
    c = pg_tls_cluster
    base = c.cli_flags()
    agent.ok(
        "connections",
        "add",
        "postgres",
        "--name",
        "pg",
        *base,
        "--password-env",
        "P",
        env={"P": c.password},
    )
    assert (
        agent.ok("connections", "show", "pg", "--format", "json").json["options"]["password"]
        == "********"
    )
    secret = tmp_path / "pg.pw"
    secret.write_text(c.password)
    secret.chmod(0o600)
    agent.ok("connections", "edit", "pg", "options", "--password-from", f"file:{secret}")
    options = agent.ok("connections", "show", "pg", "--format", "json").json["options"]
    assert options["password"] is None and options["password_from"] == f"file:{secret}"
    agent.ok("connections", "edit", "pg", "options", "--password-env", "P", env={"P": c.password})
    options = agent.ok("connections", "show", "pg", "--format", "json").json["options"]
    assert "password_from" not in options and options["password"] == "********"


@pytest.mark.parametrize(
    ("args", "code", "message"),
    [
        (["--password-from", "nope:x"], 2, "is not a credential source"),
        (
            ["--password-from", "env:X", "--password", "p"],
            2,
            "a password or --password-from, not both",
        ),
        (["--password-from", "file:relative"], 2, "give an absolute path"),
        (
            ["--password-from", "file:/nonexistent/secret"],
            1,
            "from file:/nonexistent/secret: /nonexistent/secret does not exist",
        ),
    ],
)
def test_bad_sources(
    agent: Agent, pg_params: dict[str, object], args: list[str], code: int, message: str
) -> None:
    result = agent.fails(
        "connections",
        "add",
        "postgres",
        "--name",
        "x",
        "--host",
        str(pg_params["host"]),
        *args,
        code=code,
    )
    assert message in result.err
    assert agent.list_json() == []


def test_file_source_warns_about_wide_permissions(
    agent: Agent, tmp_path: Path, pg_params: dict[str, object], pg_dsn: str
) -> None:
    secret = tmp_path / "wide.pw"
    secret.write_text("anything\n")
    secret.chmod(0o644)
    with agent.serving():
        agent.ok(
            "connections",
            "add",
            "postgres",
            "--name",
            "pg",
            "--host",
            str(pg_params["host"]),
            "--user",
            str(pg_params["user"]),
            "--database",
            str(pg_params["database"]),
            "--password-from",
            f"file:{secret}",
        )
    assert f"secret file {secret} has mode 0644" in agent.log()
    with psycopg.connect(pg_dsn) as conn:  # trust auth: the password is not checked there
        conn.execute("SELECT 1")
