"""The commands that change the agent's state.

Every change to the store is one of these objects, applied by ``outpost.state.store.apply``.
They carry everything the change needs (slugs, already-encrypted option blobs, timestamps),
so applying the same command on every member of a Raft cluster gives the same state.
"""

from __future__ import annotations

import base64
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, TypeAdapter


class _Command(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class StoredConnection(BaseModel):
    """A connection as stored: options are an opaque blob (a sealed envelope when encrypted)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    slug: str
    name: str
    driver: str
    options_b64: str
    encrypted: bool
    created_at: float
    updated_at: float

    @property
    def options_blob(self) -> bytes:
        return base64.b64decode(self.options_b64)


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


class AddConnection(_Command):
    type: Literal["add_connection"] = "add_connection"
    slug: str
    name: str
    driver: str
    options_b64: str
    encrypted: bool
    key_id: str | None = None
    at: float


class RenameConnection(_Command):
    type: Literal["rename_connection"] = "rename_connection"
    slug: str
    name: str
    at: float


class UpdateConnectionOptions(_Command):
    type: Literal["update_connection_options"] = "update_connection_options"
    slug: str
    options_b64: str
    encrypted: bool
    key_id: str | None = None
    at: float


class DeleteConnection(_Command):
    type: Literal["delete_connection"] = "delete_connection"
    slug: str


class RekeyItem(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    slug: str
    options_b64: str
    encrypted: bool


class RekeyConnections(_Command):
    """Replace every connection's options at once (key rotation), in one transaction."""

    type: Literal["rekey_connections"] = "rekey_connections"
    items: list[RekeyItem]
    key_id: str | None
    at: float
    #: the pooler routes re-sealed with the new key; None from a caller that knows no routes
    #: (refused when routes are stored, so that none is left sealed with the old key)
    routes: list[RekeyRouteItem] | None = None


class RestoreConnections(_Command):
    """Load the connections of a backup into an empty, never-started store."""

    type: Literal["restore_connections"] = "restore_connections"
    connections: list[StoredConnection]
    key_id: str | None
    at: float
    routes: list[StoredRoute] = Field(default_factory=list)


class StoredRoute(BaseModel):
    """A pooler route as stored: who may connect to (database, schema) as which user, and the
    connection (slug) it leads to. ``secret_b64`` is the client's password verifiers (SCRAM,
    scrypt, md5 as JSON), sealed with the agent key when there is one; never the password."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    database: str
    schema_name: str
    user: str
    to: str
    secret_b64: str
    encrypted: bool
    created_at: float

    @property
    def secret_blob(self) -> bytes:
        return base64.b64decode(self.secret_b64)


class AddRoute(_Command):
    """Add a pooler route (database, schema) -> connection ``to``."""

    type: Literal["add_route"] = "add_route"
    route: StoredRoute
    key_id: str | None = None


class RemoveRoute(_Command):
    type: Literal["remove_route"] = "remove_route"
    database: str
    schema_name: str


class RekeyRouteItem(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    database: str
    schema_name: str
    secret_b64: str
    encrypted: bool


class MarkStarted(_Command):
    """Recorded the first time an agent serves from this data dir."""

    type: Literal["mark_started"] = "mark_started"
    at: float


Command = Annotated[
    AddConnection
    | RenameConnection
    | UpdateConnectionOptions
    | DeleteConnection
    | RekeyConnections
    | RestoreConnections
    | MarkStarted
    | AddRoute
    | RemoveRoute,
    Field(discriminator="type"),
]

command_adapter: TypeAdapter[Command] = TypeAdapter(Command)


def encode_command(command: Command) -> bytes:
    return command.model_dump_json().encode()


def decode_command(data: bytes) -> Command:
    return command_adapter.validate_json(data)
