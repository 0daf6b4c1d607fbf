"""Adding, listing and removing the pooler routes kept in the agent's store.

Used by `outpost pooler routes …` directly on the store when no agent runs, and by the local
API when `outpost serve` owns the data dir (the CLI then goes through ``AgentClient``, which
has the same three methods). A route keeps the client's password only as verifiers (SCRAM,
scrypt, md5), sealed with the agent key like connection options.
"""

from __future__ import annotations

import json
import time
from typing import Protocol

from pydantic import BaseModel, ConfigDict, Field

from outpost.crypto import Key, open_sealed, seal
from outpost.errors import KeyError_, NotFoundError, OutpostError, UsageError
from outpost.pooler.passwords import make_client_secret
from outpost.pooler.routes import ClientSecret
from outpost.state.commands import AddRoute, RekeyRouteItem, RemoveRoute, StoredRoute, b64
from outpost.state.store import ROUTE_DRIVERS, Store, route_label

#: Longest database/schema/user name accepted (Perseus's columns are varchar(1024)/(64)).
MAX_NAME = 1024


class RouteInfo(BaseModel):
    """A route as `routes list` shows it: never a password or a verifier."""

    model_config = ConfigDict(
        frozen=True, populate_by_name=True, serialize_by_alias=True, extra="forbid"
    )

    database: str
    schema_name: str = Field(alias="schema")
    user: str
    to: str
    encrypted: bool
    created_at: float
    auth: list[str] = Field(description="the client auth methods the stored verifiers allow")


class RouteAdmin(Protocol):
    """What the CLI needs; AgentClient implements it over the local API."""

    def list_routes(self) -> list[RouteInfo]: ...

    def add_route(
        self, database: str, schema: str, user: str, password: str, to: str
    ) -> RouteInfo: ...

    def remove_route(self, database: str, schema: str) -> RouteInfo: ...


def _check_name(value: str, what: str, flag: str) -> str:
    value = value.strip()
    if not value:
        raise UsageError(f"The {what} cannot be empty; give {flag}.")
    if len(value) > MAX_NAME or "\0" in value:
        raise UsageError(f"The {what} {value[:40]!r} is too long or holds a NUL character.")
    return value


def encode_secret(secret: ClientSecret, key: Key | None) -> tuple[bytes, bool]:
    """The stored blob of a route's verifiers: JSON, sealed with KEY when there is one."""
    data = {"scram": secret.scram, "scrypt": secret.scrypt, "md5": secret.md5}
    plain = json.dumps({k: v for k, v in data.items() if v}, sort_keys=True).encode()
    if key is None:
        return plain, False
    return seal(key, plain), True


def decode_secret(route: StoredRoute, key: Key | None) -> ClientSecret:
    """A stored route's verifiers, opened and checked."""
    label = route_label(route.database, route.schema_name)
    what = f"stored secret of pooler route {label}"
    blob = route.secret_blob
    if route.encrypted:
        if key is None:
            raise KeyError_(
                f"The {what} is encrypted but no key_path is set; set key_path to the key file."
            )
        blob = open_sealed(key, blob, what=what)
    try:
        data = json.loads(blob)
        if not isinstance(data, dict):
            raise ValueError
        return ClientSecret(scram=data.get("scram"), scrypt=data.get("scrypt"), md5=data.get("md5"))
    except ValueError:
        raise OutpostError(f"The {what} is corrupt; add the route again.") from None


def auth_methods(secret: ClientSecret) -> list[str]:
    methods = []
    if secret.scram:
        methods.append("scram-sha-256")
    if secret.md5:
        methods.append("md5")
    if secret.scrypt:
        methods.append("password")
    return methods


def route_info(route: StoredRoute, key: Key | None) -> RouteInfo:
    try:
        methods = auth_methods(decode_secret(route, key))
    except OutpostError:
        methods = []  # listed all the same: `routes remove` must stay possible
    return RouteInfo(
        database=route.database,
        schema_name=route.schema_name,
        user=route.user,
        to=route.to,
        encrypted=route.encrypted,
        created_at=route.created_at,
        auth=methods,
    )


def rekey_route_items(
    store: Store, old_key: Key | None, new_key: Key | None
) -> list[RekeyRouteItem]:
    """Every stored route re-sealed from OLD_KEY (or plaintext) to NEW_KEY, for a key rotation."""
    items = []
    for route in store.routes():
        secret = decode_secret(route, old_key if route.encrypted else None)
        blob, encrypted = encode_secret(secret, new_key)
        items.append(
            RekeyRouteItem(
                database=route.database,
                schema_name=route.schema_name,
                secret_b64=b64(blob),
                encrypted=encrypted,
            )
        )
    return items


def check_routes_open(routes: list[StoredRoute], key: Key | None) -> None:
    """Raise unless every route's secret opens with KEY (before a restore writes anything)."""
    for route in routes:
        decode_secret(route, key)


class LocalRouteAdmin:
    """Route changes applied to a store this process holds (its lock, its key)."""

    def __init__(self, store: Store, key: Key | None) -> None:
        self.store = store
        self.key = key

    def list_routes(self) -> list[RouteInfo]:
        return [route_info(r, self.key) for r in self.store.routes()]

    def add_route(self, database: str, schema: str, user: str, password: str, to: str) -> RouteInfo:
        database = _check_name(database, "database name", "--database")
        schema = _check_name(schema, "schema name", "--schema")
        user = _check_name(user, "user name", "--user")
        to = _check_name(to, "destination connection", "--to SLUG")
        if not password:
            raise UsageError(
                f"The password for pooler route {route_label(database, schema)} is empty; "
                "give a non-empty one."
            )
        try:
            target = self.store.connection(to)
        except NotFoundError:
            raise NotFoundError(
                f"No connection with slug {to!r} (--to); `outpost connections list` shows the "
                "slugs."
            ) from None
        if target.driver not in ROUTE_DRIVERS:
            raise UsageError(
                f"Connection {to!r} is a {target.driver} connection; a pooler route must lead "
                f"to a {' or '.join(ROUTE_DRIVERS)} connection."
            )
        try:
            secret = make_client_secret(password, user)
        except Exception as exc:  # scramp refuses some unicode (SASLprep)
            raise UsageError(
                f"The password for pooler route {route_label(database, schema)} cannot be used "
                f"for SCRAM ({type(exc).__name__}); choose another one."
            ) from None
        blob, encrypted = encode_secret(secret, self.key)
        stored = StoredRoute(
            database=database,
            schema_name=schema,
            user=user,
            to=to,
            secret_b64=b64(blob),
            encrypted=encrypted,
            created_at=time.time(),
        )
        self.store.apply(AddRoute(route=stored, key_id=self.key.id if self.key else None))
        return route_info(stored, self.key)

    def remove_route(self, database: str, schema: str) -> RouteInfo:
        database = _check_name(database, "database name", "--database")
        schema = _check_name(schema, "schema name", "--schema")
        existing = next(
            (r for r in self.store.routes() if r.database == database and r.schema_name == schema),
            None,
        )
        self.store.apply(RemoveRoute(database=database, schema_name=schema))
        assert existing is not None  # apply raised NotFoundError otherwise
        return route_info(existing, self.key)
