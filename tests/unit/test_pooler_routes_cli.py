"""`outpost pooler routes add|list|remove`, `hash-password`, `encrypt-password` as a user runs
them: the real command in a subprocess, on the store directly and through a running
`outpost serve`."""

from __future__ import annotations

import base64
from pathlib import Path

import pytest

from outpost.crypto import load_key_file, open_sealed
from outpost.pooler.passwords import verify_scrypt
from tests.helpers import Agent

pytestmark = pytest.mark.integration

PW = "tenant-secret-42"


@pytest.fixture
def agent(tmp_path: Path, pg_params: dict[str, object]) -> Agent:
    a = Agent(tmp_path / "agent").with_key()
    a.ok(
        "connections", "add", "postgres", "--name", "Dest DB", "--host", str(pg_params["host"]),
        "--port", str(pg_params["port"]), "--user", str(pg_params["user"]),
        "--database", str(pg_params["database"]),
    )  # fmt: skip
    a.ok(
        "connections",
        "add",
        "sqlite",
        "--name",
        "Sheet",
        "--source-url",
        str(tmp_path / "x.db"),
        "--no-verify",
    )
    return a


def exercise(agent: Agent) -> None:
    r = agent.ok(
        "pooler", "routes", "add", "--database", "app", "--schema", "t1", "--user", "alice",
        "--to", "dest-db", "--password-env", "PW", env={"PW": PW},
    )  # fmt: skip
    assert r.out.strip() == "Added pooler route app/t1 for user alice to connection dest-db."
    # prompt with confirmation (stdin when no terminal)
    agent.ok(
        "pooler", "routes", "add", "--database", "app", "--schema", "t2", "--user", "bob",
        "--to", "dest-db", input=f"{PW}\n{PW}\n",
    )  # fmt: skip
    listed = agent.ok("pooler", "routes", "list", "--format", "json").json
    assert [(r["database"], r["schema"], r["user"], r["to"]) for r in listed] == [
        ("app", "t1", "alice", "dest-db"),
        ("app", "t2", "bob", "dest-db"),
    ]
    assert listed[0]["auth"] == ["scram-sha-256", "md5", "password"]
    table = agent.ok("pooler", "routes", "list").out
    assert (
        "| DATABASE | SCHEMA | USER  | TO      |" in table and "| app      | t2     | bob" in table
    )
    assert PW not in table

    dup = agent.fails(
        "pooler", "routes", "add", "--database", "app", "--schema", "t1", "--user", "x",
        "--to", "dest-db", "--password-env", "PW", env={"PW": PW},
    )  # fmt: skip
    assert "A pooler route for database 'app' and schema 't1' already exists" in dup.err
    wrong = agent.fails(
        "pooler", "routes", "add", "--database", "app", "--schema", "t3", "--user", "x",
        "--to", "sheet", "--password-env", "PW", code=2, env={"PW": PW},
    )  # fmt: skip
    assert "Connection 'sheet' is a sqlite connection" in wrong.err
    gone = agent.fails("connections", "delete", "dest-db")
    assert "is the destination of 2 pooler route(s) (app/t1, app/t2)" in gone.err
    missing = agent.fails("pooler", "routes", "remove", "--database", "app", "--schema", "zz")
    assert "No pooler route for database 'app' and schema 'zz'" in missing.err

    r = agent.ok("pooler", "routes", "remove", "--database", "app", "--schema", "t1")
    assert r.out.strip() == "Removed pooler route app/t1."
    assert [x["schema"] for x in agent.ok("pooler", "routes", "list", "--format", "json").json] == [
        "t2"
    ]
    for result in (dup, wrong, gone, missing):
        assert "Traceback" not in result.err and PW not in result.err


def test_routes_on_the_store(agent: Agent) -> None:
    exercise(agent)


def test_routes_through_a_running_agent(agent: Agent) -> None:
    with agent.serving():
        exercise(agent)


def test_hash_and_encrypt_password(agent: Agent, tmp_path: Path) -> None:
    secret_file = tmp_path / "pw.txt"
    secret_file.write_text(PW + "\n")
    hashed = agent.ok("pooler", "hash-password", "--password-file", str(secret_file)).out.strip()
    assert verify_scrypt(PW, hashed) and not verify_scrypt(PW + "x", hashed)
    prompted = agent.ok("pooler", "hash-password", input=f"{PW}\n{PW}\n").out.strip().splitlines()
    assert verify_scrypt(PW, prompted[-1])

    sealed = agent.ok("pooler", "encrypt-password", "--password-env", "P", env={"P": PW}).out
    key = load_key_file(agent.config["key_path"])
    assert open_sealed(key, base64.b64decode(sealed.strip())).decode() == PW

    empty = agent.fails("pooler", "hash-password", "--password-env", "P", code=2, env={"P": ""})
    assert "The client password is empty" in empty.err
    unset = agent.fails("pooler", "hash-password", "--password-env", "NOPE_NOT_SET", code=2)
    assert "environment variable NOPE_NOT_SET is not set" in unset.err
    both = agent.fails(
        "pooler", "hash-password", "--password-env", "P", "--password-file", str(secret_file),
        code=2, env={"P": PW},
    )  # fmt: skip
    assert "Give the password one way only" in both.err


def test_encrypt_password_without_a_key(tmp_path: Path) -> None:
    bare = Agent(tmp_path / "bare")
    result = bare.fails("pooler", "encrypt-password", "--password-env", "P", env={"P": PW})
    assert "needs key_path in the configuration" in result.err
