"""Pooler routes in the store: the replicated commands, the admin operations, and StoreRoutes
reading them without the data dir lock."""

from __future__ import annotations

import asyncio
import math
import sqlite3
from pathlib import Path

import pytest

from outpost.config import CredentialsConfig
from outpost.crypto import Key
from outpost.errors import ConflictError, KeyError_, NotFoundError, UsageError
from outpost.pooler.passwords import md5_secret, verify_scrypt
from outpost.pooler.route_admin import LocalRouteAdmin, decode_secret, rekey_route_items
from outpost.pooler.routes import (
    ClientSecret,
    Destination,
    Route,
    RouteError,
    StaticRoutes,
)
from outpost.pooler.sources import ChainedRoutes, StoreRoutes
from outpost.state.codec import encode_options
from outpost.state.commands import (
    AddConnection,
    AddRoute,
    DeleteConnection,
    RekeyConnections,
    RekeyItem,
    RemoveRoute,
    RestoreConnections,
    b64,
    decode_command,
    encode_command,
)
from outpost.state.store import Store

KEY = Key(bytes(range(64)), "/k")
OTHER_KEY = Key(bytes(range(1, 65)), "/other")
PASSWORD = "client-pw-7f3a"


def add_connection(
    store: Store, slug: str, driver: str, options: dict[str, object], key: Key | None = KEY
) -> None:
    blob, enc = encode_options(options, key)
    store.apply(
        AddConnection(
            slug=slug,
            name=slug,
            driver=driver,
            options_b64=b64(blob),
            encrypted=enc,
            key_id=key.id if key else None,
            at=1.0,
        )
    )


PG = {
    "host": "db.internal",
    "port": 6543,
    "user": "app",
    "password": "server-pw",
    "database": "appdb",
    "ssl": "require-ca",
    "ssl_root_cert": "/etc/ca.pem",
}


@pytest.fixture
def store(tmp_path: Path) -> Store:
    s = Store(tmp_path / "data")
    add_connection(s, "pg", "postgres", PG)
    add_connection(s, "lite", "sqlite", {"path": str(tmp_path / "x.db")})
    return s


def test_add_list_remove(store: Store) -> None:
    admin = LocalRouteAdmin(store, KEY)
    info = admin.add_route("app", "tenant1", "alice", PASSWORD, "pg")
    assert (info.database, info.schema_name, info.user, info.to) == (
        "app",
        "tenant1",
        "alice",
        "pg",
    )
    assert info.auth == ["scram-sha-256", "md5", "password"] and info.encrypted
    assert info.model_dump(mode="json")["schema"] == "tenant1"
    admin.add_route("app", "tenant2", "bob", "other-pw", "pg")
    assert [(r.schema_name, r.user) for r in admin.list_routes()] == [
        ("tenant1", "alice"),
        ("tenant2", "bob"),
    ]
    removed = admin.remove_route("app", "tenant1")
    assert removed.schema_name == "tenant1"
    assert [r.schema_name for r in admin.list_routes()] == ["tenant2"]


def test_nothing_secret_is_stored_in_the_clear(store: Store) -> None:
    LocalRouteAdmin(store, KEY).add_route("app", "t", "alice", PASSWORD, "pg")
    raw = b"".join(
        Path(store.path.parent / name).read_bytes()
        for name in ("agent.db", "agent.db-wal")
        if (store.path.parent / name).exists()
    )
    assert PASSWORD.encode() not in raw
    assert md5_secret(PASSWORD, "alice").encode() not in raw
    assert b"SCRAM-SHA-256" not in raw
    assert b"alice" in raw  # the user name is clear, as documented


def test_bad_routes_are_refused_with_clear_errors(store: Store) -> None:
    admin = LocalRouteAdmin(store, KEY)
    with pytest.raises(UsageError, match=r"'lite' is a sqlite connection; .* postgres or redshift"):
        admin.add_route("app", "t", "u", PASSWORD, "lite")
    with pytest.raises(NotFoundError, match=r"No connection with slug 'nope' \(--to\)"):
        admin.add_route("app", "t", "u", PASSWORD, "nope")
    with pytest.raises(UsageError, match="schema name cannot be empty; give --schema"):
        admin.add_route("app", " ", "u", PASSWORD, "pg")
    with pytest.raises(UsageError, match="password for pooler route app/t is empty"):
        admin.add_route("app", "t", "u", "", "pg")
    admin.add_route("app", "t", "u", PASSWORD, "pg")
    with pytest.raises(ConflictError, match="route for database 'app' and schema 't' already"):
        admin.add_route("app", "t", "v", PASSWORD, "pg")
    with pytest.raises(NotFoundError, match="No pooler route for database 'app' and schema 'x'"):
        admin.remove_route("app", "x")
    assert len(admin.list_routes()) == 1


def test_a_connection_with_routes_cannot_be_deleted(store: Store) -> None:
    admin = LocalRouteAdmin(store, KEY)
    admin.add_route("app", "t", "u", PASSWORD, "pg")
    with pytest.raises(ConflictError, match=r"'pg' is the destination of 1 pooler route\(s\)"):
        store.apply(DeleteConnection(slug="pg"))
    assert "pg" in store.slugs()
    admin.remove_route("app", "t")
    store.apply(DeleteConnection(slug="pg"))
    assert "pg" not in store.slugs()


def test_route_commands_roundtrip_as_bytes(store: Store) -> None:
    LocalRouteAdmin(store, KEY).add_route("app", "t", "u", PASSWORD, "pg")
    stored = store.routes()[0]
    for command in (
        AddRoute(route=stored, key_id=KEY.id),
        RemoveRoute(database="a", schema_name="b"),
    ):
        assert decode_command(encode_command(command)) == command


def test_key_rotation_reseals_routes(store: Store) -> None:
    admin = LocalRouteAdmin(store, KEY)
    admin.add_route("app", "t", "u", PASSWORD, "pg")
    items = [
        RekeyItem(slug=c.slug, options_b64=c.options_b64, encrypted=c.encrypted)
        for c in store.connections()
    ]
    with pytest.raises(ConflictError, match="1 pooler route"):
        store.apply(RekeyConnections(items=items, key_id=OTHER_KEY.id, at=2.0))
    store.apply(
        RekeyConnections(
            items=items,
            key_id=OTHER_KEY.id,
            at=2.0,
            routes=rekey_route_items(store, KEY, OTHER_KEY),
        )
    )
    assert LocalRouteAdmin(store, OTHER_KEY).list_routes()[0].auth  # opens with the new key
    assert LocalRouteAdmin(store, KEY).list_routes()[0].auth == []  # not with the old one


def test_restore_carries_routes(store: Store, tmp_path: Path) -> None:
    LocalRouteAdmin(store, KEY).add_route("app", "t", "u", PASSWORD, "pg")
    connections, routes = store.connections(), store.routes()
    with Store(tmp_path / "new") as fresh:
        with pytest.raises(ConflictError, match="leads to connection 'pg', which the backup lacks"):
            fresh.apply(
                RestoreConnections(
                    connections=[c for c in connections if c.slug != "pg"],
                    key_id=KEY.id,
                    at=3.0,
                    routes=routes,
                )
            )
        assert fresh.connections() == []
        fresh.apply(
            RestoreConnections(connections=connections, key_id=KEY.id, at=3.0, routes=routes)
        )
        assert fresh.routes() == routes


# --- StoreRoutes ------------------------------------------------------------------------------


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def run(coro: object) -> object:
    return asyncio.run(coro)  # type: ignore[arg-type]


def test_store_routes_reads_beside_the_lock_holder(store: Store) -> None:
    admin = LocalRouteAdmin(store, KEY)
    admin.add_route("app", "t1", "alice", PASSWORD, "pg")
    clock = Clock()
    source = StoreRoutes(store.data_dir, KEY, CredentialsConfig(), clock=clock)

    async def scenario() -> None:
        route = await source.lookup("app", "t1")
        assert route is not None and route.origin == "store"
        assert (route.database, route.schema, route.user) == ("app", "t1", "alice")
        assert route.destination == Destination(
            host="db.internal",
            port=6543,
            database="appdb",
            user="app",
            password="server-pw",
            sslmode="verify-ca",
            sslrootcert="/etc/ca.pem",
        )
        assert route.secret.scrypt and verify_scrypt(PASSWORD, route.secret.scrypt)
        assert route.secret.md5 == md5_secret(PASSWORD, "alice")
        assert await source.lookup("app", "t2") is None
        assert await source.lookup("other", "t1") is None

        # a route added while the pooler runs is seen after the recheck interval
        admin.add_route("app", "t2", "bob", "pw-b", "pg")
        assert await source.lookup("app", "t2") is None  # checked less than a second ago
        clock.now += 1.5
        assert (await source.lookup("app", "t2")) is not None
        admin.remove_route("app", "t1")
        await source.reload()  # at once on SIGHUP / RELOAD
        assert await source.lookup("app", "t1") is None
        assert [r.schema for r in await source.routes()] == ["t2"]
        await source.close()

    run(scenario())


def test_store_routes_say_how_long_an_answer_stays_current(store: Store) -> None:
    """fresh_for: until the next recheck of the store; a reload that finds a change calls
    ``changed`` (the pooler then forgets the logins it runs from the old routes)."""
    admin = LocalRouteAdmin(store, KEY)
    admin.add_route("app", "t1", "alice", PASSWORD, "pg")
    clock = Clock()
    source = StoreRoutes(store.data_dir, KEY, CredentialsConfig(), clock=clock)
    changes: list[int] = []
    source.on_change = lambda: changes.append(1)
    assert source.lookup_nowait("app", "t1") is not None
    assert source.fresh_for("app", "t1") == pytest.approx(1.0)
    clock.now += 0.75
    assert source.fresh_for("app", "t1") == pytest.approx(0.25)
    clock.now += 0.5
    assert source.fresh_for("app", "t1") == 0.0
    assert source.lookup_nowait("app", "t1") is not None and changes == []  # no change found
    admin.remove_route("app", "t1")
    clock.now += 1.5
    assert source.lookup_nowait("app", "t1") is None and changes == [1]
    chained = ChainedRoutes([source, StaticRoutes()])
    chained.on_change = lambda: changes.append(2)
    run(chained.reload())
    assert changes == [1, 2]
    assert StaticRoutes().fresh_for("app", "t1") == math.inf
    run(source.close())


def test_store_routes_is_read_only(store: Store) -> None:
    source = StoreRoutes(store.data_dir, KEY, CredentialsConfig())
    assert source._db is not None
    with pytest.raises(sqlite3.OperationalError, match="readonly"):
        source._db.execute("DELETE FROM routes")
    run(source.close())


def test_store_routes_without_a_store(tmp_path: Path) -> None:
    source = StoreRoutes(tmp_path / "nothing", None, CredentialsConfig())
    assert run(source.lookup("app", "public")) is None
    assert run(source.routes()) == []


def test_password_from_a_credential_source(store: Store, monkeypatch: pytest.MonkeyPatch) -> None:
    options = {k: v for k, v in PG.items() if k != "password"}
    add_connection(store, "pg-env", "postgres", {**options, "password_from": "env:OUTPOST_T_PW"})
    LocalRouteAdmin(store, KEY).add_route("app", "env", "u", PASSWORD, "pg-env")
    source = StoreRoutes(store.data_dir, KEY, CredentialsConfig())
    monkeypatch.setenv("OUTPOST_T_PW", "from-env-1")
    route = run(source.lookup("app", "env"))
    assert isinstance(route, Route) and route.destination.password == "from-env-1"
    monkeypatch.setenv("OUTPOST_T_PW", "from-env-2")  # env values are read at every connect
    route = run(source.lookup("app", "env"))
    assert isinstance(route, Route) and route.destination.password == "from-env-2"
    monkeypatch.delenv("OUTPOST_T_PW")
    with pytest.raises(RouteError, match="route app/env has no destination password") as info:
        run(source.lookup("app", "env"))
    assert "OUTPOST_T_PW" in str(info.value)


def test_unusable_routes_give_a_clear_error(store: Store) -> None:
    LocalRouteAdmin(store, KEY).add_route("app", "t", "u", PASSWORD, "pg")
    source = StoreRoutes(store.data_dir, OTHER_KEY, CredentialsConfig())
    with pytest.raises(RouteError, match=r"route app/t cannot be used: .*different key") as info:
        run(source.lookup("app", "t"))
    assert PASSWORD not in str(info.value)
    without_key = StoreRoutes(store.data_dir, None, CredentialsConfig())
    with pytest.raises(RouteError, match="encrypted but no key_path is set"):
        run(without_key.lookup("app", "t"))
    with pytest.raises(KeyError_, match="no key_path is set"):
        decode_secret(store.routes()[0], None)


def test_chained_routes_ask_the_store_first(store: Store) -> None:
    LocalRouteAdmin(store, KEY).add_route("app", "t", "u", PASSWORD, "pg")
    dest = Destination(host="h", port=1, database="d", user="u")
    static = StaticRoutes(
        [
            Route("app", "t", "static-user", ClientSecret(), dest),
            Route("app", "s", "static-user", ClientSecret(), dest),
        ]
    )
    chain = ChainedRoutes([StoreRoutes(store.data_dir, KEY, CredentialsConfig()), static])
    first = run(chain.lookup("app", "t"))
    second = run(chain.lookup("app", "s"))
    assert isinstance(first, Route) and first.origin == "store"
    assert isinstance(second, Route) and second.origin == "static"
    assert run(chain.lookup("app", "zz")) is None
    routes = run(chain.routes())
    assert isinstance(routes, list) and [r.origin for r in routes] == ["static", "store"]
