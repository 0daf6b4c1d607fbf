"""The CredentialSource base class: where a connection's password comes from when it is not
stored.

A connection option ``password_from`` holds a reference such as ``env:PGPASSWORD`` or
``aws-secretsmanager:prod/db#.password``. When the agent opens the connection it asks the
source for a ``Credential`` (a password, sometimes a user name, and when it expires). Values
live only in memory (see ``cache.py``), never in the store, a backup, a log, HQ or an error.

One module per source, registered by name in the ``outpost.credentials`` entry-point group.
"""

from __future__ import annotations

import json
import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar

from outpost.config import CredentialsConfig
from outpost.errors import OutpostError, UsageError

#: A clock returning epoch seconds; tests pass a fake one.
Clock = Callable[[], float]


class CredentialError(OutpostError):
    """A source could not give a value. The message names the source, never a secret."""


@dataclass(frozen=True)
class CredentialContext:
    """What a source may need to know about the connection it serves."""

    connection: str  # the connection's name, for messages
    driver: str
    host: str | None = None
    port: int | None = None
    user: str | None = None
    options: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Credential:
    """A fetched secret. ``repr`` never shows the values."""

    password: str = field(repr=False)
    fetched_at: float
    username: str | None = field(default=None, repr=False)
    expires_at: float | None = None  # epoch seconds; None: the source gives no expiry
    lease_id: str | None = None  # Vault dynamic credentials
    renewable: bool = False
    lease_seconds: float | None = None


class CredentialSource(ABC):
    """One kind of source. An instance is one reference (``kind:argument``)."""

    #: the prefix users write (``aws-secretsmanager``)
    kind: ClassVar[str]
    #: whether the reference takes an argument after ``kind:`` (``aws-rds-iam`` does not)
    takes_argument: ClassVar[bool] = True
    #: the pip extra that brings its SDK, if any
    extra: ClassVar[str | None] = None
    #: cache values that have no expiry of their own (env and file never are: each connect
    #: reads them again, so a changed value is picked up at once)
    cacheable: ClassVar[bool] = True

    def __init__(self, argument: str, config: CredentialsConfig, clock: Clock = time.time):
        self.argument = argument
        self.config = config
        self.clock = clock
        self.validate()

    @property
    def reference(self) -> str:
        return f"{self.kind}:{self.argument}" if self.takes_argument else self.kind

    def validate(self) -> None:  # noqa: B027 - optional hook
        """Check the argument's shape; raise UsageError naming the reference."""

    @abstractmethod
    def fetch(self, ctx: CredentialContext) -> Credential:
        """Get a fresh value (blocking). Raise CredentialError with one clear sentence."""

    def cache_key(self, ctx: CredentialContext) -> str:
        """Values are shared between connections with the same key."""
        return self.reference

    def renew(self, credential: Credential) -> Credential | None:
        """Extend a lease (Vault); None when it cannot be renewed (fetch again instead)."""
        return None

    def revoke(self, credential: Credential) -> None:  # noqa: B027 - optional hook
        """Give back a lease when the agent stops (Vault dynamic credentials)."""

    def close(self) -> None:  # noqa: B027 - optional hook
        """Release clients, tokens, sockets."""

    # --- helpers for subclasses --------------------------------------------------------

    def error(self, ctx: CredentialContext | None, reason: str) -> CredentialError:
        """One sentence: which connection, which source, why."""
        where = f" for connection {ctx.connection!r}" if ctx else ""
        return CredentialError(
            f"Cannot get the password{where} from {self.reference}: {reason.rstrip('.')}."
        )

    def missing_extra(self, module: str) -> CredentialError:
        return CredentialError(
            f"The {self.kind} credential source needs the Python package {module!r}; install "
            f"it with: pip install 'outpost-agent[{self.extra}]'"
        )


def split_dot_path(argument: str) -> tuple[str, str | None]:
    """``name#.a.b`` -> (``name``, ``.a.b``); ``name`` -> (``name``, None)."""
    name, sep, path = argument.partition("#")
    if not sep:
        return name, None
    return name, path


def read_dot_path(
    source: CredentialSource, ctx: CredentialContext | None, text: str, path: str | None
) -> str:
    """The value at a dot-path (``.password``, ``.db.password``) of a JSON secret.

    Without a path the whole text is the value. Errors name the path, never the secret.
    """
    if path is None:
        return text
    if not path.startswith(".") or path == "." or ".." in path:
        raise UsageError(
            f"Bad dot-path {path!r} in {source.reference}: write it as #.field or #.a.b."
        )
    try:
        node: Any = json.loads(text)
    except ValueError:
        raise source.error(
            ctx, f"the secret is not JSON, so dot-path {path} cannot be read"
        ) from None
    walked = ""
    for part in path[1:].split("."):
        walked += "." + part
        if isinstance(node, dict) and part in node:
            node = node[part]
        elif isinstance(node, list) and part.isdigit() and int(part) < len(node):
            node = node[int(part)]
        else:
            raise source.error(ctx, f"the secret has no field {walked}")
    if isinstance(node, dict | list):
        raise source.error(ctx, f"the field {path} is an object, not a value")
    if node is None:
        raise source.error(ctx, f"the field {path} is null")
    return str(node)
