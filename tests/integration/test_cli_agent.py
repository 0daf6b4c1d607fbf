"""The `outpost` command end to end, as a user runs it: real processes, real files.

Most flows use the SQLite driver (no server needed); the PostgreSQL and MariaDB flows are in
test_cli_servers.py.
"""

from __future__ import annotations

import json
import os
import signal
import sqlite3
from pathlib import Path

import httpx
import pytest

from outpost.sample_data import create_sample_database
from tests.helpers import Agent, wait_for


@pytest.fixture
def sample_db(tmp_path: Path) -> Path:
    path = tmp_path / "sample.sqlite"
    create_sample_database(path)
    return path


@pytest.fixture
def agent(tmp_path: Path) -> Agent:
    return Agent(tmp_path / "agent")


@pytest.fixture
def keyed_agent(tmp_path: Path) -> Agent:
    return Agent(tmp_path / "keyed").with_key()


def add_sample(agent: Agent, db: Path, name: str = "Sample shop") -> None:
    out = agent.ok("connections", "add", "sqlite", "--name", name, "--source-url", str(db)).out
    assert out.startswith(f'Added connection "{name}"')


def test_add_list_edit_test_query_delete(agent: Agent, sample_db: Path) -> None:
    add_sample(agent, sample_db)
    rows = agent.list_json()
    assert [(r["name"], r["slug"], r["driver_name"], r["on_agent"], r["up"]) for r in rows] == [
        ("Sample shop", "sample-shop", "SQLite", True, True)
    ]
    table = agent.ok("connections", "list").out
    header = next(line for line in table.splitlines() if "NAME" in line)
    assert [c.strip() for c in header.strip("|").split("|")] == [
        "NAME",
        "SLUG",
        "DRIVER",
        "ON AGENT",
        "UP",
    ]
    assert "| Sample shop | sample-shop | SQLite | Yes      | Yes |" in table

    assert agent.ok("connections", "edit", "sample-shop", "name", "Shop DB").out.strip() == (
        'Saved connection "Shop DB".'
    )
    assert agent.list_json()[0]["slug"] == "sample-shop"  # the slug stays

    result = agent.ok(
        "query", "sample-shop", "SELECT count(*) AS n FROM customers", "--format", "json"
    ).json
    assert result["columns"] == ["n"]
    assert result["rows"][0][0] > 0
    csv_out = agent.ok("query", "sample-shop", "SELECT 1 AS a, 'x' AS b", "--format", "csv").out
    assert csv_out == "a,b\n1,x\n"

    test = agent.ok("connections", "test", "sample-shop", "--format", "json").json
    assert test["up"] is True and test["server_version"].startswith("SQLite")

    other = sample_db.parent / "other.sqlite"
    create_sample_database(other)
    agent.ok("connections", "edit", "sample-shop", "options", "--source-url", str(other))
    shown = agent.ok("connections", "show", "sample-shop", "--format", "json").json
    assert shown["options"]["source_url"] == str(other)

    assert agent.ok("connections", "delete", "sample-shop").out.strip() == (
        'Deleted connection "Shop DB".'
    )
    assert agent.list_json() == []


def test_slugs_are_unique_and_names_too(agent: Agent, sample_db: Path) -> None:
    add_sample(agent, sample_db, "My DB")
    add_sample(agent, sample_db, "My  DB!")
    assert sorted(r["slug"] for r in agent.list_json()) == ["my-db", "my-db-2"]
    err = agent.fails(
        "connections", "add", "sqlite", "--name", "my db", "--source-url", str(sample_db)
    ).err
    assert err.strip() == (
        "Error: A connection named 'my db' already exists (slug 'my-db'); choose another name."
    )
    assert len(agent.list_json()) == 2


def test_max_rows_and_truncation_warning(agent: Agent, sample_db: Path) -> None:
    add_sample(agent, sample_db)
    result = agent.ok("query", "sample-shop", "SELECT * FROM customers", "--max-rows", "2")
    assert "the result was cut at 2 rows" in result.err
    data = agent.ok(
        "query", "sample-shop", "SELECT * FROM customers", "--max-rows", "2", "--format", "json"
    ).json
    assert len(data["rows"]) == 2 and data["truncated"] is True


def test_read_only_agent_refuses_writes(agent: Agent, tmp_path: Path) -> None:
    db = tmp_path / "w.sqlite"
    sqlite3.connect(db).execute("CREATE TABLE t (x)").connection.commit()
    agent.ok("connections", "add", "sqlite", "--name", "w", "--source-url", str(db))
    agent.ok("query", "w", "INSERT INTO t VALUES (1)", "--write")
    err = agent.fails("query", "w", "INSERT INTO t VALUES (2)").err  # no --write: read-only
    assert "read-only" in err
    agent.config["read_only"] = True
    agent.write_config()
    err = agent.fails("query", "w", "INSERT INTO t VALUES (3)", "--write").err
    assert err.strip().startswith("Error: The agent is read-only (read_only: true in ")
    assert sqlite3.connect(db).execute("SELECT x FROM t").fetchall() == [(1,)]


@pytest.mark.parametrize(
    ("args", "code", "message"),
    [
        (["connections", "add", "oracle", "--name", "x"], 2, "Unknown driver 'oracle'; choose one"),
        (
            ["connections", "add", "redshift", "--name", "x"],
            2,
            "option --host is required for the redshift driver",
        ),
        (["connections", "add", "postgres", "--name", "x", "--port", "99999"], 2, "option --port:"),
        (
            ["connections", "add", "postgres", "--name", "x", "--port", "abc"],
            2,
            "'abc' is not a valid integer",
        ),
        (
            ["connections", "add", "postgres", "--name", "x", "--ssl", "maybe"],
            2,
            "'maybe' is not one of",
        ),
        (["connections", "test", "nope"], 1, "No connection with slug 'nope'"),
        (["connections", "delete", "nope"], 1, "No connection with slug 'nope'"),
        (["connections", "edit", "nope", "name", "x"], 1, "No connection with slug 'nope'"),
        (["query", "nope", "SELECT 1"], 1, "No connection with slug 'nope'"),
    ],
)
def test_bad_input_is_one_sentence(agent: Agent, args: list[str], code: int, message: str) -> None:
    result = agent.fails(*args, code=code)
    assert message in result.err
    assert "Traceback" not in result.err


def test_unknown_config_key(agent: Agent) -> None:
    agent.config["colour"] = "blue"
    agent.config["log"] = {"level": "chatty"}
    agent.write_config()
    err = agent.fails("config", "validate").err
    assert f"{agent.config_path}: key 'colour': unknown key" in err
    assert f"{agent.config_path}: key 'log.level':" in err
    agent.fails("connections", "list")  # every command refuses a bad config


def test_config_show_redacts(agent: Agent) -> None:
    agent.config["hq"] = {"url": "https://hq.example", "token": {"$env": "HQ_TOK"}}
    agent.write_config()
    out = agent.ok("config", "show", "--format", "json", env={"HQ_TOK": "tok-very-secret"}).out
    assert "tok-very-secret" not in out
    assert json.loads(out)["hq"]["token"] == "********"
    assert agent.ok("config", "validate", env={"HQ_TOK": "x"}).out.startswith("Configuration OK")


def test_key_generate_refuses_overwrite(agent: Agent) -> None:
    path = agent.root / "k"
    agent.ok("key", "generate", str(path))
    before = path.read_bytes()
    err = agent.fails("key", "generate", str(path)).err
    assert "already exists; refusing to overwrite" in err
    assert path.read_bytes() == before
    assert (path.stat().st_mode & 0o777) == 0o400


def test_no_plaintext_password_with_a_key(keyed_agent: Agent, sample_db: Path) -> None:
    secret = "Sup3r-S3cret-Passw0rd-xyzzy"
    keyed_agent.ok(
        "connections",
        "add",
        "postgres",
        "--name",
        "pg",
        "--host",
        "db.invalid",
        "--password-env",
        "PGPW",
        "--no-verify",
        env={"PGPW": secret},
    )
    add_sample(keyed_agent, sample_db)
    backup = keyed_agent.root / "b.backup"
    keyed_agent.ok("backup", "--path", str(backup))
    files = [p for p in keyed_agent.data_dir.rglob("*") if p.is_file()] + [backup]
    assert len(files) >= 2
    for path in files:
        assert secret.encode() not in path.read_bytes(), path
    shown = keyed_agent.ok("connections", "show", "pg", "--format", "json").out
    assert secret not in shown and "********" in shown


def test_backup_restore_roundtrip(keyed_agent: Agent, sample_db: Path, tmp_path: Path) -> None:
    add_sample(keyed_agent, sample_db)
    keyed_agent.ok(
        "connections",
        "add",
        "postgres",
        "--name",
        "Remote PG",
        "--host",
        "db.invalid",
        "--user",
        "app",
        "--password-env",
        "PW",
        "--no-verify",
        env={"PW": "pw-123"},
    )
    backup = tmp_path / "agent.backup"
    assert keyed_agent.ok("backup", "--path", str(backup)).out.startswith("Wrote backup")
    before = [
        {k: r[k] for k in ("name", "slug", "driver", "on_agent")} for r in keyed_agent.list_json()
    ]

    fresh = Agent(tmp_path / "fresh", config={"key_path": keyed_agent.config["key_path"]})
    with fresh.serving("--restore-path", str(backup)):
        after = [
            {k: r[k] for k in ("name", "slug", "driver", "on_agent")} for r in fresh.list_json()
        ]
        assert after == before
        shown = fresh.ok("connections", "show", "remote-pg", "--format", "json").json
        assert shown["options"]["user"] == "app"
    assert "restored 2 connection(s)" in fresh.log()

    # a data dir that has been started ignores a restore, and says why
    keyed_agent.ok("connections", "delete", "sample-shop")
    with keyed_agent.serving("--restore-path", str(backup)):
        assert [r["slug"] for r in keyed_agent.list_json()] == ["remote-pg"]
    with keyed_agent.serving("--restore-path", str(backup)):
        pass
    assert "restore from" in keyed_agent.log() and "ignored" in keyed_agent.log()


def test_truncated_or_altered_backup_is_refused(
    keyed_agent: Agent, sample_db: Path, tmp_path: Path
) -> None:
    add_sample(keyed_agent, sample_db)
    backup = tmp_path / "b.backup"
    keyed_agent.ok("backup", "--path", str(backup))
    data = backup.read_bytes()
    for label, damaged, message in [
        ("truncated", data[:-7], "is truncated"),
        ("altered", data[:-20] + bytes([data[-20] ^ 1]) + data[-19:], "fails its checksum"),
    ]:
        bad = tmp_path / f"{label}.backup"
        bad.write_bytes(damaged)
        fresh = Agent(tmp_path / label, config={"key_path": keyed_agent.config["key_path"]})
        proc = fresh.start("--restore-path", str(bad))
        assert proc.wait(timeout=30) == 1
        assert message in fresh.log()
        assert "nothing was restored" in fresh.log()
        assert fresh.list_json() == []  # nothing written


def test_backup_to_unwritable_path(agent: Agent, sample_db: Path, tmp_path: Path) -> None:
    add_sample(agent, sample_db)
    err = agent.fails("backup", "--path", str(tmp_path / "no" / "such" / "dir" / "b")).err
    assert "Cannot write backup to" in err and "does not exist" in err
    # a directory this user may not write to (root may write anywhere but sysfs)
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o500)
    target = Path("/sys/outpost.backup") if os.geteuid() == 0 else locked / "b"
    err = agent.fails("backup", "--path", str(target)).err
    assert err.strip() == (
        f"Error: Cannot write backup to {target}: Permission denied; choose a writable path."
    )
    assert list(locked.iterdir()) == []
    err = agent.fails("backup", "--path", str(tmp_path)).err
    assert "is a directory" in err


def test_wrong_key_refuses_to_start(keyed_agent: Agent, sample_db: Path) -> None:
    add_sample(keyed_agent, sample_db)
    other = keyed_agent.root / "other.key"
    keyed_agent.ok("key", "generate", str(other))
    keyed_agent.config["key_path"] = str(other)
    keyed_agent.write_config()
    proc = keyed_agent.start()
    assert proc.wait(timeout=30) == 1
    assert f"Key file {other} is not the key that encrypted the connections" in keyed_agent.log()
    err = keyed_agent.fails("connections", "list").err
    assert f"Key file {other} is not the key" in err


def test_tampered_ciphertext_is_a_clear_error(keyed_agent: Agent, sample_db: Path) -> None:
    add_sample(keyed_agent, sample_db)
    db = sqlite3.connect(keyed_agent.data_dir / "agent.db")
    blob = bytearray(db.execute("SELECT options FROM connections").fetchone()[0])
    blob[40] ^= 0xFF
    db.execute("UPDATE connections SET options = ?", (bytes(blob),))
    db.commit()
    db.close()
    err = keyed_agent.fails("connections", "test", "sample-shop").err
    assert "failed its integrity check" in err
    assert err.count("\n") == 1


def test_key_rotate_encrypts_then_moves_to_a_new_key(agent: Agent, sample_db: Path) -> None:
    secret = "pw-rotate-Secret-42"
    agent.ok(
        "connections",
        "add",
        "postgres",
        "--name",
        "pg",
        "--host",
        "db.invalid",
        "--password-env",
        "PW",
        "--no-verify",
        env={"PW": secret},
    )
    db_file = agent.data_dir / "agent.db"

    def on_disk() -> bytes:
        return b"".join(p.read_bytes() for p in agent.data_dir.iterdir() if p.is_file())

    assert secret.encode() in on_disk()  # no key yet: stored as given
    first = agent.root / "first.key"
    agent.ok("key", "generate", str(first))
    agent.config["key_path"] = str(first)
    agent.write_config()
    warn = agent.ok("connections", "list").err
    assert "unencrypted; run `outpost key rotate`" in warn
    assert agent.ok("key", "rotate").out.startswith("Encrypted 1 connection(s)")
    db = sqlite3.connect(db_file)
    db.execute("VACUUM")
    db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    db.close()
    assert secret.encode() not in on_disk()
    assert agent.ok("connections", "show", "pg", "--format", "json").json["encrypted"] is True

    second = agent.root / "second.key"
    agent.ok("key", "generate", str(second))
    agent.config["key_path"] = str(second)
    agent.write_config()
    assert "is not the key that encrypted" in agent.fails("connections", "list").err
    err = agent.fails("key", "rotate", code=2).err
    assert "give it with --old-key PATH" in err
    agent.ok("key", "rotate", "--old-key", str(first))
    assert (
        agent.ok("connections", "show", "pg", "--format", "json").json["options"]["host"]
        == "db.invalid"
    )


def test_password_sources(agent: Agent, tmp_path: Path) -> None:
    pw_file = tmp_path / "pw"
    pw_file.write_text("from-file\n")
    base = ["connections", "add", "postgres", "--host", "db.invalid", "--no-verify"]
    agent.ok(*base, "--name", "a", "--password-file", str(pw_file))
    agent.ok(*base, "--name", "b", "--password-env", "X", env={"X": "from-env"})
    result = agent.ok(*base, "--name", "c", "--password", "on-the-command-line")
    assert "visible in the process list" in result.err
    err = agent.fails(*base, "--name", "d", "--password-env", "UNSET_VAR_1", code=2).err
    assert "environment variable UNSET_VAR_1 is not set" in err
    err = agent.fails(*base, "--name", "e", "--password-file", str(tmp_path / "nope"), code=2).err
    assert "Cannot read --password-file" in err
    assert sorted(r["slug"] for r in agent.list_json()) == ["a", "b", "c"]


def test_password_prompt(agent: Agent, tmp_path: Path) -> None:
    from click.testing import CliRunner

    from outpost.cli.main import cli

    runner = CliRunner()
    result = runner.invoke(
        cli,
        [
            "-c",
            str(agent.config_path),
            "connections",
            "add",
            "postgres",
            "--name",
            "p",
            "--host",
            "db.invalid",
            "--no-verify",
            "--password",
        ],
        input="typed-secret\n",
    )
    assert result.exit_code == 0, result.output
    assert "typed-secret" not in result.output
    assert "visible in the process list" not in result.output


def test_second_agent_on_one_data_dir(agent: Agent, tmp_path: Path) -> None:
    with agent.serving() as first:
        second = Agent(tmp_path / "second", config={"data_dir": str(agent.data_dir)})
        proc = second.start()
        assert proc.wait(timeout=30) == 1
        assert (
            f"Another Outpost agent (pid {first.pid}) is already running on data dir "
            f"{agent.data_dir}"
        ) in second.log()


def test_cli_goes_through_the_running_agent(agent: Agent, sample_db: Path) -> None:
    with agent.serving():
        add_sample(agent, sample_db)  # written by the agent process, not by the CLI
        assert agent.list_json()[0]["up"] is True
        assert agent.ok("connections", "test", "sample-shop").code == 0
        q = agent.ok("query", "sample-shop", "SELECT 40 + 2 AS answer", "--format", "json").json
        assert q["rows"] == [[42]]
        status = agent.ok("status", "--format", "json").json
        assert status["api_url"] == agent.url and status["connections"] == 1
        token = (agent.data_dir / "api.token").read_text().strip()
        assert httpx.get(f"{agent.url}/v1/connections").status_code == 401
        r = httpx.get(f"{agent.url}/v1/connections", headers={"Authorization": f"Bearer {token}"})
        assert r.status_code == 200 and r.json()[0]["slug"] == "sample-shop"
    assert agent.list_json()[0]["slug"] == "sample-shop"  # and offline afterwards


def test_serve_health_metrics_and_sigterm(agent: Agent, sample_db: Path) -> None:
    add_sample(agent, sample_db)
    agent.config["checks"] = {"interval": 0.2}
    agent.write_config()
    with agent.serving() as proc:
        assert httpx.get(f"{agent.url}/healthz").json() == {"status": "ok"}
        assert httpx.get(f"{agent.url}/readyz").status_code == 200

        def metrics() -> str:
            return httpx.get(f"{agent.url}/metrics").text

        wait_for(
            lambda: "outpost_connection_check_duration_seconds_count" in metrics(),
            20,
            "a check to be recorded",
        )
        text = metrics()
        assert 'outpost_build_info{version="' in text
        assert "outpost_connections 1.0" in text
        assert 'outpost_connection_up{driver="sqlite",slug="sample-shop"} 1.0' in text
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=20) == 0
    assert "stopped" in agent.log()
    assert not (agent.data_dir / "api.token").exists()


def test_check_marks_a_broken_connection_down(agent: Agent, sample_db: Path) -> None:
    add_sample(agent, sample_db)
    agent.config["checks"] = {"interval": 0.2}
    agent.write_config()
    with agent.serving():
        sample_db.write_bytes(b"not a database any more" * 100)
        wait_for(lambda: agent.list_json()[0]["up"] is False, 20, "UP to turn No")
        assert "| No |" in agent.ok("connections", "list").out
        metrics = httpx.get(f"{agent.url}/metrics").text
        assert 'outpost_connection_up{driver="sqlite",slug="sample-shop"} 0.0' in metrics


def test_sighup_reloads_and_json_logs(agent: Agent) -> None:
    agent.config["log"] = {"format": "json", "level": "info"}
    agent.write_config()
    with agent.serving() as proc:
        lines = [json.loads(line) for line in agent.log().splitlines() if line.startswith("{")]
        assert any("serving data dir" in line["message"] for line in lines)
        agent.config["read_only"] = True
        agent.config["api"] = {"client_bind_addresses": ["127.0.0.1:1"]}
        agent.write_config()
        proc.send_signal(signal.SIGHUP)
        wait_for(lambda: "configuration reloaded" in agent.log(), 20, "the reload")
        assert "api.client_bind_addresses changed; restart the agent" in agent.log()
        assert agent.ready()  # still serving on the old address
        status = agent.ok("status", "--format", "json").json
        assert status["read_only"] is True


def test_unencrypted_store_warns_at_serve(agent: Agent) -> None:
    with agent.serving():
        pass
    assert "stored unencrypted" in agent.log()


def test_api_port_in_use(agent: Agent, tmp_path: Path) -> None:
    with agent.serving():
        other = Agent(tmp_path / "other", port=agent.port)
        proc = other.start()
        assert proc.wait(timeout=30) == 1
        assert f"Cannot listen on 127.0.0.1:{agent.port}" in other.log()
