"""`outpost connections …` and `outpost query` against the real PostgreSQL and MariaDB servers,
and the password / TLS cases against the throwaway scram + TLS cluster."""

from __future__ import annotations

import time
import uuid
from pathlib import Path

import psycopg
import pytest

from tests.conftest import MariaUser
from tests.helpers import Agent
from tests.integration.conftest import PgCluster


@pytest.fixture
def agent(tmp_path: Path) -> Agent:
    return Agent(tmp_path / "agent").with_key()


def pg_flags(params: dict[str, object]) -> list[str]:
    return [
        "--host",
        str(params["host"]),
        "--port",
        str(params["port"]),
        "--user",
        str(params["user"]),
        "--database",
        str(params["database"]),
    ]


def test_postgres_lifecycle(agent: Agent, pg_params: dict[str, object], pg_dsn: str) -> None:
    table = f"outpost_cli_{uuid.uuid4().hex[:8]}"
    with psycopg.connect(pg_dsn, autocommit=True) as conn:
        conn.execute(f"CREATE TABLE {table} (id int PRIMARY KEY, name text)")
        conn.execute(f"INSERT INTO {table} VALUES (1, 'one'), (2, 'two'), (3, 'three')")
    try:
        out = agent.ok(
            "connections", "add", "postgres", "--name", "Local PG", *pg_flags(pg_params)
        ).out
        assert out.strip() == 'Added connection "Local PG" (slug local-pg).'
        assert (
            "| Local PG | local-pg | PostgreSQL | Yes      | Yes |"
            in agent.ok("connections", "list").out
        )
        rows = agent.ok(
            "query", "local-pg", f"SELECT id, name FROM {table} ORDER BY id", "--format", "json"
        ).json
        with psycopg.connect(pg_dsn) as conn:
            direct = conn.execute(f"SELECT id, name FROM {table} ORDER BY id").fetchall()
        assert rows["columns"] == ["id", "name"]
        assert [tuple(r) for r in rows["rows"]] == direct
        param = agent.ok(
            "query",
            "local-pg",
            f"SELECT name FROM {table} WHERE id = %s",
            "--param",
            "2",
            "--format",
            "json",
        ).json
        assert param["rows"] == [["two"]]
        err = agent.fails("query", "local-pg", f"DELETE FROM {table}").err
        assert "read-only" in err
        agent.ok("query", "local-pg", f"DELETE FROM {table} WHERE id = 3", "--write")
        test = agent.ok("connections", "test", "local-pg", "--format", "json").json
        assert test["up"] is True and test["server_version"][:2].isdigit()
        agent.ok("connections", "edit", "local-pg", "options", "--connect-timeout", "5")
        shown = agent.ok("connections", "show", "local-pg", "--format", "json").json
        assert shown["options"]["connect_timeout"] == 5
        err = agent.fails(
            "connections", "edit", "local-pg", "options", "--database", "no_such_db_xyz"
        ).err
        assert "no_such_db_xyz" in err and "Nothing was changed" in err
        shown = agent.ok("connections", "show", "local-pg", "--format", "json").json
        assert shown["options"]["database"] == pg_params["database"]  # kept
        agent.ok("connections", "delete", "local-pg")
        assert agent.list_json() == []
        with psycopg.connect(pg_dsn) as conn:
            assert conn.execute(f"SELECT count(*) FROM {table}").fetchone() == (2,)
    finally:
        with psycopg.connect(pg_dsn, autocommit=True) as conn:
            conn.execute(f"DROP TABLE IF EXISTS {table}")


def test_redshift_options_over_the_postgres_protocol(
    agent: Agent, pg_params: dict[str, object]
) -> None:
    agent.ok(
        "connections",
        "add",
        "redshift",
        "--name",
        "Warehouse",
        *pg_flags(pg_params),
        "--ssl",
        "disable",
    )
    row = agent.list_json()[0]
    assert (row["driver"], row["driver_name"], row["up"]) == ("redshift", "Amazon Redshift", True)
    shown = agent.ok("connections", "show", "warehouse", "--format", "json").json
    assert shown["options"]["ssl"] == "disable"
    # without --port/--ssl the Redshift defaults apply: port 5439 with ssl require
    err = agent.fails(
        "connections",
        "add",
        "redshift",
        "--name",
        "Defaults",
        "--host",
        "127.0.0.1",
        "--user",
        "x",
        "--connect-timeout",
        "3",
    ).err
    assert "5439" in err and "Nothing was saved" in err


def test_wrong_password_saves_nothing_and_hides_it(agent: Agent, pg_tls_cluster: PgCluster) -> None:
    c = pg_tls_cluster
    wrong = "Wr0ng-Passw0rd-" + uuid.uuid4().hex[:6]
    result = agent.fails(
        "connections",
        "add",
        "postgres",
        "--name",
        "tls",
        *c.cli_flags(),
        "--password-env",
        "PW",
        env={"PW": wrong},
    )
    assert wrong not in result.err + result.out
    assert "authentication failed" in result.err
    assert "Nothing was saved" in result.err
    assert result.err.strip().count("\n") == 0  # one sentence, one line
    assert agent.list_json() == []
    agent.ok(
        "connections",
        "add",
        "postgres",
        "--name",
        "tls",
        *c.cli_flags(),
        "--password-env",
        "PW",
        "--ssl",
        "verify-full",
        "--ssl-root-cert",
        str(c.ca_path),
        env={"PW": c.password},
    )
    assert agent.list_json()[0]["up"] is True
    # edit to a wrong password: refused, the old one kept
    err = agent.fails(
        "connections", "edit", "tls", "options", "--password-env", "PW", env={"PW": wrong}
    ).err
    assert wrong not in err and "authentication failed" in err
    assert agent.ok("connections", "test", "tls").code == 0


def test_verify_full_name_mismatch(agent: Agent, pg_tls_cluster: PgCluster) -> None:
    c = pg_tls_cluster
    err = agent.fails(
        "connections",
        "add",
        "postgres",
        "--name",
        "tls",
        *c.cli_flags("127.0.0.1"),
        "--password-env",
        "PW",
        "--ssl",
        "verify-full",
        "--ssl-root-cert",
        str(c.ca_path),
        env={"PW": c.password},
    ).err
    assert "127.0.0.1" in err and ("does not match" in err or "mismatch" in err)
    assert c.password not in err
    assert agent.list_json() == []


def test_unreachable_host_honours_the_timeout(agent: Agent, silent_listener: int) -> None:
    start = time.monotonic()
    err = agent.fails(
        "connections",
        "add",
        "postgres",
        "--name",
        "slow",
        "--host",
        "127.0.0.1",
        "--port",
        str(silent_listener),
        "--connect-timeout",
        "2",
    ).err
    elapsed = time.monotonic() - start
    assert elapsed < 15, f"took {elapsed:.1f}s with a 2 s connect timeout"
    assert f"127.0.0.1:{silent_listener}" in err or "timeout" in err.lower()
    assert agent.list_json() == []


def test_mysql_lifecycle(agent: Agent, mysql_params: dict[str, object]) -> None:
    import pymysql

    table = f"outpost_cli_{uuid.uuid4().hex[:8]}"
    conn = pymysql.connect(
        host=str(mysql_params["host"]),
        port=int(str(mysql_params["port"])),
        user=str(mysql_params["user"]),
        password=str(mysql_params["password"]),
        database=str(mysql_params["database"]),
        autocommit=True,
    )
    try:
        with conn.cursor() as cur:
            cur.execute(f"CREATE TABLE {table} (id INT PRIMARY KEY, name VARCHAR(20))")
            cur.execute(f"INSERT INTO {table} VALUES (1, 'one'), (2, 'two')")
        flags = [
            "--host",
            str(mysql_params["host"]),
            "--port",
            str(mysql_params["port"]),
            "--user",
            str(mysql_params["user"]),
            "--database",
            str(mysql_params["database"]),
        ]
        agent.ok("connections", "add", "mysql", "--name", "Maria", *flags)
        assert "| Maria | maria | MySQL  | Yes      | Yes |" in agent.ok("connections", "list").out
        rows = agent.ok(
            "query", "maria", f"SELECT id, name FROM {table} ORDER BY id", "--format", "json"
        ).json
        assert rows["rows"] == [[1, "one"], [2, "two"]]
        assert "read-only" in agent.fails("query", "maria", f"DELETE FROM {table}").err
        agent.ok("query", "maria", f"DELETE FROM {table} WHERE id = 2", "--write")
        assert (
            "MariaDB"
            in agent.ok("connections", "test", "maria", "--format", "json").json["server_version"]
        )
        agent.ok("connections", "edit", "maria", "name", "MariaDB local")
        agent.ok("connections", "delete", "maria")
        with conn.cursor() as cur:
            cur.execute(f"SELECT count(*) FROM {table}")
            assert cur.fetchone() == (1,)
    finally:
        with conn.cursor() as cur:
            cur.execute(f"DROP TABLE IF EXISTS {table}")
        conn.close()


def test_mysql_wrong_password(
    agent: Agent, mysql_params: dict[str, object], maria_user: MariaUser
) -> None:
    wrong = "Wr0ng-" + uuid.uuid4().hex[:8]
    base = [
        "connections",
        "add",
        "mysql",
        "--name",
        "m",
        "--host",
        "127.0.0.1",
        "--port",
        str(mysql_params["port"]),
        "--user",
        maria_user.name,
        "--password-env",
        "PW",
    ]
    result = agent.fails(*base, env={"PW": wrong})
    assert wrong not in result.err and "ccess denied" in result.err
    assert agent.list_json() == []
    agent.ok(*base, env={"PW": maria_user.password})
    assert agent.list_json()[0]["up"] is True


def test_mssql_unreachable_is_clear(agent: Agent, silent_listener: int) -> None:
    err = agent.fails(
        "connections",
        "add",
        "mssql",
        "--name",
        "sql server",
        "--host",
        "127.0.0.1",
        "--port",
        str(silent_listener),
        "--timeout",
        "2",
        "--password-env",
        "PW",
        env={"PW": "Mssql-Secret-1"},
    ).err
    assert "Mssql-Secret-1" not in err
    assert "Nothing was saved" in err
    assert agent.list_json() == []
