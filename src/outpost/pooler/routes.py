"""Routes: which destination a client reaches, by (database, schema), and how its password is
checked. ``RouteSource`` is the interface the pooler's server uses; the sources are the agent's
encrypted store, a Perseus-compatible ``perseus_auth`` table, and a static list (tests, embedding).
"""

from __future__ import annotations

import enum
import math
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Final, Literal

SslMode = Literal["disable", "allow", "prefer", "require", "verify-ca", "verify-full"]


@dataclass(frozen=True)
class Destination:
    """A PostgreSQL server, database and role the pooler connects to on a client's behalf."""

    host: str
    port: int
    database: str
    user: str
    password: str | None = field(default=None, repr=False)  # None: trust / no password
    sslmode: SslMode = "prefer"
    sslrootcert: str | None = None
    sslcert: str | None = None
    sslkey: str | None = None

    @property
    def pool_key(self) -> tuple[str, int, str, str]:
        """Clients whose routes share a pool key share server connections."""
        return (self.host, self.port, self.database, self.user)

    def describe(self) -> str:
        """For logs and the admin console: never the password."""
        return f"{self.user}@{self.host}:{self.port}/{self.database}"


@dataclass(frozen=True)
class ClientSecret:
    """What the pooler keeps of a client's password; any of the forms may be absent.

    - ``scram``: PostgreSQL's verifier format
      ``SCRAM-SHA-256$<iterations>:<salt b64>$<StoredKey b64>:<ServerKey b64>`` (SCRAM auth)
    - ``scrypt``: Perseus's base64 scrypt hash (checks a cleartext password)
    - ``md5``: ``"md5" + md5(password + user).hexdigest()`` (md5 auth)
    """

    scram: str | None = field(default=None, repr=False)
    scrypt: str | None = field(default=None, repr=False)
    md5: str | None = field(default=None, repr=False)


@dataclass(frozen=True)
class Route:
    database: str  # what the client asks for
    schema: str  # the tenant schema; the server connection's search_path is set to it
    user: str  # the client's user name
    secret: ClientSecret
    destination: Destination
    origin: Literal["store", "table", "static"] = "static"


class RouteError(Exception):
    """The route source itself failed (auth database unreachable, bad row); a clear sentence."""


class WouldBlock(enum.Enum):
    """The type of WOULD_BLOCK."""

    WOULD_BLOCK = "would block"


#: ``lookup_nowait``'s answer when the source cannot answer without waiting.
WOULD_BLOCK: Final = WouldBlock.WOULD_BLOCK


class RouteSource(ABC):
    """Where routes come from. Implementations must be safe to call from the event loop."""

    #: set by the pooler: called when routes may have changed (``changed``), so that it
    #: forgets what it worked out from them
    on_change: Callable[[], None] | None = None

    def changed(self) -> None:
        if self.on_change is not None:
            self.on_change()

    def fresh_for(self, database: str, schema: str) -> float:
        """How many seconds the answer ``lookup_nowait`` just gave for (database, schema)
        stays current without asking again (a change in between calls ``changed``); the
        pooler then logs clients in without asking. 0: ask every time."""
        return 0.0

    @abstractmethod
    async def lookup(self, database: str, schema: str) -> Route | None:
        """The route for (database, schema), or None when there is none."""

    def lookup_nowait(self, database: str, schema: str) -> Route | WouldBlock | None:
        """What ``await lookup(database, schema)`` would answer, when the source has it at hand
        (a loaded or cached route, or a known miss); WOULD_BLOCK when it has to wait (a query,
        a password to fetch), and then ``lookup`` is the way. Raises what ``lookup`` raises.
        Lets a login that needs nothing else to wait for run without a task."""
        return WOULD_BLOCK

    @abstractmethod
    async def routes(self) -> list[Route]:
        """Every route (SHOW ROUTES)."""

    async def reload(self) -> None:  # noqa: B027 - optional hook
        """Re-read the source (SIGHUP, RELOAD)."""

    async def close(self) -> None:  # noqa: B027 - optional hook
        """Release connections."""


class StaticRoutes(RouteSource):
    """A fixed list of routes, for embedding and tests."""

    def __init__(self, routes: Iterable[Route] = ()) -> None:
        self._routes = {(r.database, r.schema): r for r in routes}

    def replace(self, routes: Iterable[Route]) -> None:
        self._routes = {(r.database, r.schema): r for r in routes}
        self.changed()

    def fresh_for(self, database: str, schema: str) -> float:
        return math.inf  # until ``replace``

    async def lookup(self, database: str, schema: str) -> Route | None:
        return self._routes.get((database, schema))

    def lookup_nowait(self, database: str, schema: str) -> Route | None:
        return self._routes.get((database, schema))

    async def routes(self) -> list[Route]:
        return sorted(self._routes.values(), key=lambda r: (r.database, r.schema))
