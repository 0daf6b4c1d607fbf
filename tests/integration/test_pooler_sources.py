"""TableRoutes against a real ``perseus_auth`` table in a throwaway database on the local
PostgreSQL, with rows made by the real `outpost pooler hash-password` / `encrypt-password`
commands (agent key, and AWS KMS through moto in server mode); and open_route_source with both
the store and the table."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlparse, urlunparse

import psycopg
import pytest

from outpost.config import AWSCredentialsConfig, load_config
from outpost.crypto import Key, load_key_file
from outpost.pooler.passwords import scrypt_hash, verify_scrypt
from outpost.pooler.routes import Route, RouteError
from outpost.pooler.sources import ChainedRoutes, TableRoutes, open_route_source, split_dest_host
from tests.helpers import Agent, refused_port
from tests.integration.test_credentials_aws import REGION, Moto, aws_env, moto_server  # noqa: F401

pytestmark = pytest.mark.integration

CREATE = """
CREATE TABLE perseus_auth (
    id serial PRIMARY KEY,
    source_db character varying(1024),
    source_schema character varying(64),
    source_user character varying(64),
    source_pass_hashed character varying(1024),
    dest_host character varying(64),
    dest_db character varying(1024),
    dest_pass_enc character varying(1024),
    dest_user character varying(64),
    UNIQUE (source_db, source_schema)
)
"""
CLIENT_PW = "tenant-pw-91c2"
DEST_PW = "server-pw-5d0e"


def _with_db(dsn: str, dbname: str) -> str:
    u = urlparse(dsn)
    return urlunparse(u._replace(path="/" + dbname))


@pytest.fixture(scope="module")
def auth_dsn(pg_dsn: str) -> Iterator[str]:
    name = f"outpost_routes_test_{uuid.uuid4().hex[:8]}"
    with psycopg.connect(pg_dsn, autocommit=True) as admin:
        admin.execute(f"CREATE DATABASE {name}")
    dsn = _with_db(pg_dsn, name)
    try:
        with psycopg.connect(dsn, autocommit=True) as conn:
            conn.execute(CREATE)
        yield dsn
    finally:
        with psycopg.connect(pg_dsn, autocommit=True) as admin:
            admin.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")


@pytest.fixture
def agent(tmp_path: Path) -> Agent:
    return Agent(tmp_path / "agent").with_key()


def agent_key(agent: Agent) -> Key:
    return load_key_file(agent.config["key_path"])


def insert(dsn: str, db: str, schema: str, hashed: str, enc: str, host: str = "127.0.0.1") -> None:
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute(
            "INSERT INTO perseus_auth (source_db, source_schema, source_user, source_pass_hashed,"
            " dest_host, dest_db, dest_pass_enc, dest_user) VALUES (%s, %s, 'tenant', %s, %s,"
            " 'appdb', %s, 'appuser')",
            (db, schema, hashed, host, enc),
        )


def cli_values(agent: Agent, *encrypt_args: str) -> tuple[str, str]:
    env = {"CLIENT_PW": CLIENT_PW, "DEST_PW": DEST_PW}
    hashed = agent.ok("pooler", "hash-password", "--password-env", "CLIENT_PW", env=env)
    enc = agent.ok(
        "pooler", "encrypt-password", "--password-env", "DEST_PW", *encrypt_args, env=env
    )
    return hashed.out.strip(), enc.out.strip()


def lookup(source: TableRoutes, db: str, schema: str) -> Any:
    async def go() -> Any:
        try:
            return await source.lookup(db, schema)
        finally:
            await source.close()

    return asyncio.run(go())


def fresh_schema() -> str:
    return "t_" + uuid.uuid4().hex[:8]


def test_rows_made_by_the_cli_are_routes(auth_dsn: str, agent: Agent) -> None:
    hashed, enc = cli_values(agent)
    schema = fresh_schema()
    insert(auth_dsn, "app", schema, hashed, enc, host="db.internal:6543")
    source = TableRoutes(auth_dsn, timeout=5, key=agent_key(agent))

    async def scenario() -> None:
        route = await source.lookup("app", schema)
        assert isinstance(route, Route) and route.origin == "table"
        assert (route.database, route.schema, route.user) == ("app", schema, "tenant")
        assert route.secret.scram is None and route.secret.md5 is None
        assert route.secret.scrypt == hashed and verify_scrypt(CLIENT_PW, hashed)
        d = route.destination
        assert (d.host, d.port, d.database, d.user, d.password) == (
            "db.internal",
            6543,
            "appdb",
            "appuser",
            DEST_PW,
        )
        assert d.sslmode == "prefer"
        assert await source.lookup("app", "no_such_schema") is None
        assert await source.lookup("other", schema) is None
        # answers are kept for a few seconds; reload() forgets them
        with psycopg.connect(auth_dsn, autocommit=True) as conn:
            conn.execute(
                "UPDATE perseus_auth SET dest_user = 'changed' WHERE source_schema = %s", (schema,)
            )
        cached = await source.lookup("app", schema)
        assert cached is not None and cached.destination.user == "appuser"
        await source.reload()
        fresh = await source.lookup("app", schema)
        assert fresh is not None and fresh.destination.user == "changed"
        listed = {(r.database, r.schema) for r in await source.routes()}
        assert ("app", schema) in listed
        await source.close()

    asyncio.run(scenario())


def test_perseus_style_values_are_read_as_perseus_writes_them(auth_dsn: str) -> None:
    """A hash made outside Outpost (the easy-scrypt layout, here with a fixed salt)."""
    schema = fresh_schema()
    hashed = scrypt_hash(CLIENT_PW, salt=b"0123456789abcdef")
    insert(auth_dsn, "app", schema, hashed, "", host="127.0.0.1")
    route = lookup(TableRoutes(auth_dsn, timeout=5), "app", schema)
    assert route.destination.port == 5432 and route.destination.password is None
    assert verify_scrypt(CLIENT_PW, route.secret.scrypt)


def test_wrong_or_missing_key_gives_a_clear_error(
    auth_dsn: str, agent: Agent, tmp_path: Path
) -> None:
    _, enc = cli_values(agent)
    schema = fresh_schema()
    insert(auth_dsn, "app", schema, scrypt_hash(CLIENT_PW), enc)
    other = Agent(tmp_path / "other").with_key()
    with pytest.raises(RouteError) as info:
        lookup(TableRoutes(auth_dsn, timeout=5, key=agent_key(other)), "app", schema)
    message = str(info.value)
    assert f"dest_pass_enc of perseus_auth row app/{schema}" in message
    assert "different key" in message and DEST_PW not in message
    with pytest.raises(RouteError, match="sealed with an agent key but no key_path is set"):
        lookup(TableRoutes(auth_dsn, timeout=5, key=None), "app", schema)


def test_bad_rows_give_clear_errors(auth_dsn: str, agent: Agent) -> None:
    key = agent_key(agent)
    plain = fresh_schema()
    insert(auth_dsn, "app", plain, scrypt_hash(CLIENT_PW), "bm90IGVuY3J5cHRlZA==")
    with pytest.raises(
        RouteError, match=r"not sealed with the agent key and pooler\.aws_kms_key_arn"
    ):
        lookup(TableRoutes(auth_dsn, timeout=5, key=key), "app", plain)
    bad_host = fresh_schema()
    _, enc = cli_values(agent)
    insert(auth_dsn, "app", bad_host, scrypt_hash(CLIENT_PW), enc, host="db:notaport")
    with pytest.raises(RouteError, match="dest_host 'db:notaport', which is not HOST or HOST:PORT"):
        lookup(TableRoutes(auth_dsn, timeout=5, key=key), "app", bad_host)
    bad_hash = fresh_schema()
    insert(auth_dsn, "app", bad_hash, "c2hvcnQ=", enc)
    with pytest.raises(RouteError, match=r"source_pass_hashed .* is unusable .* hash-password"):
        lookup(TableRoutes(auth_dsn, timeout=5, key=key), "app", bad_hash)


def test_split_dest_host() -> None:
    assert split_dest_host("db") == ("db", 5432)
    assert split_dest_host("db:6432") == ("db", 6432)
    assert split_dest_host("[::1]:7000") == ("::1", 7000)
    assert split_dest_host("[::1]") == ("::1", 5432)
    for bad in ("db:0", "db:x", ":5432"):
        with pytest.raises(ValueError):
            split_dest_host(bad)


def test_unreachable_auth_db(pg_dsn: str) -> None:
    port = refused_port()
    dsn = f"postgresql://perseus:hunter2-secret@127.0.0.1:{port}/auth"
    with pytest.raises(RouteError) as info:
        lookup(TableRoutes(dsn, timeout=5), "app", "s")
    message = str(info.value)
    assert message.startswith(f"Cannot reach the routing table at perseus@127.0.0.1:{port}/auth")
    assert "hunter2-secret" not in message


def test_silent_auth_db_times_out(silent_listener: int) -> None:
    dsn = f"postgresql://perseus@127.0.0.1:{silent_listener}/auth"
    with pytest.raises(
        RouteError, match=r"did not answer within pooler.auth_query_timeout \(1 s\)"
    ):
        lookup(TableRoutes(dsn, timeout=1), "app", "s")


def test_blocked_query_times_out_then_recovers(auth_dsn: str) -> None:
    schema = fresh_schema()
    insert(auth_dsn, "app", schema, scrypt_hash(CLIENT_PW), "")
    source = TableRoutes(auth_dsn, timeout=1)

    async def scenario() -> None:
        with psycopg.connect(auth_dsn) as locker:
            locker.execute("LOCK TABLE perseus_auth IN ACCESS EXCLUSIVE MODE")
            with pytest.raises(RouteError, match="did not answer within"):
                await source.lookup("app", schema)
        route = await source.lookup("app", schema)  # lock released: a new connection answers
        assert route is not None
        await source.close()

    asyncio.run(scenario())


def test_missing_table(pg_dsn: str) -> None:
    with pytest.raises(RouteError, match="routing table perseus_auth does not exist at"):
        lookup(TableRoutes(_with_db(pg_dsn, "postgres"), timeout=5), "app", "s")


def test_open_route_source_store_then_table(
    auth_dsn: str, agent: Agent, pg_params: dict[str, object]
) -> None:
    agent.ok(
        "connections",
        "add",
        "postgres",
        "--name",
        "dest",
        "--host",
        str(pg_params["host"]),
        "--port",
        str(pg_params["port"]),
        "--user",
        str(pg_params["user"]),
        "--database",
        str(pg_params["database"]),
    )
    shared, table_only = fresh_schema(), fresh_schema()
    agent.ok(
        "pooler", "routes", "add", "--database", "app", "--schema", shared, "--user", "store-user",
        "--to", "dest", "--password-env", "PW", env={"PW": CLIENT_PW},
    )  # fmt: skip
    hashed, enc = cli_values(agent)
    insert(auth_dsn, "app", shared, hashed, enc)
    insert(auth_dsn, "app", table_only, hashed, enc)
    agent.config["pooler"] = {"auth_db_dsn": auth_dsn, "auth_query_timeout": 5}
    agent.write_config()
    loaded = load_config(str(agent.config_path), env={})
    source = open_route_source(loaded, key=agent_key(agent))
    assert isinstance(source, ChainedRoutes)

    async def scenario() -> None:
        first = await source.lookup("app", shared)
        assert first is not None and first.origin == "store" and first.user == "store-user"
        second = await source.lookup("app", table_only)
        assert second is not None and second.origin == "table"
        # how long the pooler may log clients in without asking again: the store's recheck,
        # and for a table route also the table's cache
        assert 0 < source.fresh_for("app", shared) <= 1.0
        assert 0 < source.fresh_for("app", table_only) <= 1.0
        assert source.fresh_for("app", fresh_schema()) == 0  # never looked up: ask
        await source.close()

    asyncio.run(scenario())


# --- AWS KMS (moto server) --------------------------------------------------------------------


def test_kms_encrypted_rows(auth_dsn: str, agent: Agent, moto_server: Moto, aws_env: None) -> None:  # noqa: F811
    arn = moto_server.client("kms").create_key()["KeyMetadata"]["Arn"]
    agent.config["credentials"] = {"aws": {"region": REGION, "endpoint_url": moto_server.url}}
    agent.config["pooler"] = {"aws_kms_key_arn": arn}
    agent.write_config()
    hashed, enc = cli_values(agent)  # KMS by default once the ARN is configured
    _, enc_flag = cli_values(agent, "--kms")
    _, sealed = cli_values(agent, "--agent-key")
    aws = AWSCredentialsConfig(region=REGION, endpoint_url=moto_server.url)
    key = agent_key(agent)
    for value in (enc, enc_flag, sealed):
        schema = fresh_schema()
        insert(auth_dsn, "app", schema, hashed, value)
        route = lookup(
            TableRoutes(auth_dsn, timeout=5, key=key, kms_key_arn=arn, aws=aws), "app", schema
        )
        assert route.destination.password == DEST_PW
    # not a ciphertext of this KMS
    schema = fresh_schema()
    insert(auth_dsn, "app", schema, hashed, "AQIDBAUGBwgJCgsMDQ4PEA==")
    with pytest.raises(RouteError) as info:
        lookup(TableRoutes(auth_dsn, timeout=5, key=key, kms_key_arn=arn, aws=aws), "app", schema)
    assert str(info.value).startswith(
        f"Cannot decrypt the dest_pass_enc of perseus_auth row app/{schema}"
    )


def test_encrypt_password_kms_needs_a_key(agent: Agent) -> None:
    result = agent.fails(
        "pooler", "encrypt-password", "--kms", "--password-env", "X", code=2, env={"X": "pw"}
    )
    assert "--kms needs a KMS key: set pooler.aws_kms_key_arn" in result.err
    assert "Traceback" not in result.err
