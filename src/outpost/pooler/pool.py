"""Server connections and the pools that hold them.

A ``ServerConnection`` is one PostgreSQL backend. While it serves a client, the forwarding
engine (``_engine.c``, through the connection's ``link``) passes the server's bytes to that
client frame by frame, looking only at the 5-byte header, and at the body of ReadyForQuery (to
release the connection), ParameterStatus (to track settings), and ParseComplete/CloseComplete
(to hide the answers to statements the pooler prepared itself).

A ``Pool`` holds the connections to one destination (host, port, database, user): every tenant
routed there shares them. Idle connections are reused last-in first-out, preferring one whose
``search_path`` and tracked settings already match the client.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import ssl
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, NamedTuple, Protocol, TypeVar

from outpost.pooler import protocol as p
from outpost.pooler._engine import Engine, Link, PoolCore
from outpost.pooler.auth import ServerLoginError, server_login
from outpost.pooler.links import hand_over
from outpost.pooler.routes import Destination

if TYPE_CHECKING:
    from outpost.config import PoolerConfig

log = logging.getLogger("outpost.pooler")

#: Settings the pooler keeps equal between a client and the server connection it uses
#: (pgbouncer's "varcache"); ``search_path`` is handled the same way, from the route's schema.
#: application_name too, so that pg_stat_activity and the server's log name the client
#: running each transaction (clients that share one get no extra SET).
TRACKED = (
    "client_encoding",
    "DateStyle",
    "TimeZone",
    "IntervalStyle",
    "standard_conforming_strings",
    "application_name",
)
#: Server-side prepared statements kept per connection before the oldest is closed.
MAX_PREPARED_PER_SERVER = 1000

_PC = p.B_PARSE_COMPLETE
_monotonic = time.monotonic
_time = time.time
#: One shared copy of each (search_path, tracked settings) state and listening address, so
#: that thousands of clients of a few tenants do not each keep their own (idle memory), and
#: the engine finds a client's and a connection's states equal by identity.
_shared: dict[Any, Any] = {}
_T = TypeVar("_T")


def share(value: _T) -> _T:
    """The one shared copy of VALUE (hashable)."""
    found: _T | None = _shared.get(value)
    if found is None:
        if len(_shared) >= 10_000:
            _shared.clear()
        _shared[value] = found = value
    return found


class ClientLink(Protocol):
    """What a server connection needs from the client it serves (server.ClientSession)."""

    link: Link  # the engine writes the server's bytes straight to it

    def on_ready(self, server: ServerConnection) -> None: ...

    def on_server_param(self, name: str, value: str) -> None: ...

    def on_server_lost(self, server: ServerConnection, reason: str) -> None: ...

    def pause_reading(self) -> None: ...

    def resume_reading(self) -> None: ...


class Greeting(NamedTuple):
    """What a client logging in gets from a pool: worked out from the server's settings
    (DEFAULTS) and the client's startup packet, once per distinct packet."""

    defaults: dict[str, str]
    want: dict[str, str | None]  # the tracked settings it wants (shared, never changed)
    state: tuple[str | None, tuple[str | None, ...]]  # (search_path, tracked values)
    messages: bytes  # AuthenticationOk and the ParameterStatus messages


@dataclass
class PoolSettings:
    pool_mode: str = "transaction"
    pool_size: int = 20
    min_idle: int = 0
    max_idle: int = 20
    max_lifetime: float = 3600.0
    max_idle_time: float = 600.0
    connect_timeout: float = 10.0
    close_timeout: float = 5.0
    schema_set_timeout: float = 5.0
    client_wait_timeout: float = 30.0

    @classmethod
    def from_config(cls, cfg: PoolerConfig) -> PoolSettings:
        return cls(
            pool_mode=cfg.pool_mode,
            pool_size=cfg.pool_size,
            min_idle=cfg.min_idle,
            max_idle=cfg.max_idle,
            max_lifetime=cfg.max_lifetime,
            max_idle_time=cfg.max_idle_time,
            connect_timeout=cfg.connect_timeout,
            close_timeout=cfg.close_timeout,
            schema_set_timeout=cfg.schema_set_timeout,
            client_wait_timeout=cfg.client_wait_timeout,
        )


class PoolError(Exception):
    """A server connection could not be had; the message is safe to show to the client."""

    def __init__(self, message: str, sqlstate: str = p.CANNOT_CONNECT) -> None:
        super().__init__(message)
        self.sqlstate = sqlstate


# --- TLS to servers --------------------------------------------------------------------------

_contexts: dict[tuple[str, str | None, str | None, str | None], ssl.SSLContext] = {}


def server_ssl_context(dest: Destination) -> ssl.SSLContext | None:
    """The client-side TLS context for DEST's sslmode (cached), None for disable."""
    if dest.sslmode == "disable":
        return None
    key = (dest.sslmode, dest.sslrootcert, dest.sslcert, dest.sslkey)
    ctx = _contexts.get(key)
    if ctx is not None:
        return ctx
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    if dest.sslmode in ("verify-ca", "verify-full") or (
        dest.sslmode == "require" and dest.sslrootcert
    ):
        if dest.sslrootcert:
            ctx.load_verify_locations(cafile=dest.sslrootcert)
        else:
            ctx.load_default_certs()
        ctx.check_hostname = dest.sslmode == "verify-full"
        ctx.verify_mode = ssl.CERT_REQUIRED
    else:
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
    if dest.sslcert:
        ctx.load_cert_chain(dest.sslcert, dest.sslkey)
    _contexts[key] = ctx
    return ctx


async def negotiate_server_tls(conn: p.FramedProtocol, dest: Destination) -> None:
    """SSLRequest as libpq does for DEST's sslmode; raises PoolError when TLS is required."""
    ctx = server_ssl_context(dest)
    if ctx is None:
        return
    conn.transport.write(p.ssl_request())
    answer = await conn.read_exactly(1)
    if answer == b"S":
        try:
            await conn.start_tls(ctx, server_side=False, server_hostname=dest.host)
        except ssl.SSLError as exc:
            raise PoolError(
                f"TLS with {dest.host}:{dest.port} failed ({exc.reason or exc}); check "
                "the destination's sslmode and sslrootcert"
            ) from None
    elif answer == b"N":
        if dest.sslmode not in ("prefer", "allow"):
            raise PoolError(
                f"{dest.host}:{dest.port} does not accept TLS and the destination's "
                f"sslmode is {dest.sslmode}"
            )
    else:
        raise PoolError(f"{dest.host}:{dest.port} answered the TLS request with garbage")


# --- one server connection ---------------------------------------------------------------------


class ServerConnection(p.FramedProtocol):
    __slots__ = (
        "backend_key",
        "backend_pid",
        "connect_time",
        "link",
        "local",
        "params",
        "pool",
        "prepared",
        "search_path",
        "track",
        "uncertain",
    )

    def __init__(self, pool: Pool) -> None:
        super().__init__()
        self.pool = pool
        self.track = pool.settings.pool_mode == "transaction"
        #: the forwarding state (answers due, transaction status, the client it serves) and,
        #: once logged in, the I/O; kept by the engine
        link = self.link = Link(self, True, self.track)
        link.forwarding = 0  # logging in: the bytes are read here, not forwarded
        link.generation = pool.generation  # the destination it logged in to (Pool.redirect)
        link.core = pool.core
        link.created_at = link.last_used = link.attached_at = _monotonic()
        link.state = (None, ())
        self.params: dict[str, str] = {}
        self.backend_pid = 0
        self.backend_key = 0
        self.search_path: str | None = None
        self.prepared: collections.OrderedDict[bytes, None] = collections.OrderedDict()
        #: statements that may or may not exist here (a Close the server skipped)
        self.uncertain: set[bytes] = set()
        self.connect_time = time.time()
        self.local: tuple[str, int] = ("", 0)

    # --- asyncio.Protocol ------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        local = transport.get_extra_info("sockname")
        if isinstance(local, tuple) and len(local) >= 2:
            self.local = (str(local[0]), int(local[1]))

    def connection_lost(self, exc: Exception | None) -> None:
        super().connection_lost(exc)
        self.link.broken = 1
        client = self.client
        if client is not None:
            self.link.unpair()
            client.on_server_lost(self, "the server closed the connection")
        self.pool.forget(self)

    def pause_writing(self) -> None:
        if self.client is not None:
            self.client.pause_reading()

    def resume_writing(self) -> None:
        if self.client is not None:
            self.client.resume_reading()

    # --- the forwarding state, kept by the engine ---------------------------------------------

    @property
    def client(self) -> ClientLink | None:
        """The client this connection serves now."""
        peer = self.link.peer
        if peer is None:
            return None
        owner = peer.owner
        # (a client the engine ran alone so far gets its session now)
        return owner if owner is not None else peer.materialize()  # type: ignore[no-any-return]

    @property
    def state(self) -> tuple[str | None, tuple[str | None, ...]]:
        """search_path and the tracked settings (a client gets a connection with its own)."""
        return self.link.state  # type: ignore[no-any-return]

    @property
    def broken(self) -> bool:
        return bool(self.link.broken)

    @broken.setter
    def broken(self, value: bool) -> None:
        self.link.broken = value

    @property
    def generation(self) -> int:
        return self.link.generation

    @property
    def attached_at(self) -> float:
        """When the current (or last) client got it (monotonic)."""
        return self.link.attached_at

    @property
    def last_used(self) -> float:
        return self.link.last_used

    @property
    def created_at(self) -> float:
        return self.link.created_at

    @property
    def forwarding(self) -> bool:
        """Whether the server's bytes go to the client (False: read here, run_internal)."""
        return bool(self.link.forwarding)

    @forwarding.setter
    def forwarding(self, value: bool) -> None:
        self.link.forwarding = value

    @property
    def syncs(self) -> int:
        """Queries/Syncs sent and not yet answered by ReadyForQuery."""
        return self.link.syncs

    @property
    def unsynced(self) -> bool:
        """An extended-protocol message was sent since the last Sync."""
        return bool(self.link.unsynced)

    @property
    def status(self) -> int:
        """The transaction status of the last ReadyForQuery (73 "I", 84 "T", 69 "E")."""
        return self.link.status

    @status.setter
    def status(self, value: int) -> None:
        self.link.status = value

    @property
    def midway(self) -> bool:
        """A message from the server was forwarded in part."""
        return bool(self.link.remain or self.link.partial)

    def expect_answer(self, name: bytes, kind: int, drop: bool) -> None:
        """A Parse/Close (KIND: its answer) was sent; DROP: hide the answer from the client."""
        self.link.expect(name, kind, drop)

    # --- called by the engine -------------------------------------------------------------------

    def data_received(self, data: bytes) -> None:
        self.link.feed(data)  # transport mode (TLS), and while logging in

    def _on_data(self, data: bytes) -> None:
        if not self.link.forwarding:
            self.buffer_data(data)
        # else: an idle connection's notice or parameter report: nothing to do

    def _engine_param(self, body: bytes) -> None:
        name, value = p.parameter_from_body(body)
        self.params[name] = value
        if name in TRACKED:
            self.compute_state()
            client = self.client
            if client is not None:
                client.on_server_param(name, value)

    def _engine_bad_length(self, kind: int, length: int) -> None:
        log.warning(
            "%s sent a message of type %r with invalid length %d; closing the connection",
            self.pool.destination.describe(),
            chr(kind),
            length,
        )
        self.close()

    def _unanswered(self, entry: tuple[bytes, int, bool]) -> None:
        """A Parse/Close the server skipped after an error: its statement's state is unsure."""
        name, what, _drop = entry
        if not name:
            return
        if what == _PC:
            self.prepared.pop(name, None)
        else:
            self.uncertain.add(name)

    # --- used by the pool and the client session ---------------------------------------

    def compute_state(self) -> None:
        self.link.state = share((self.search_path, tuple(self.params.get(k) for k in TRACKED)))

    def forget_search_path(self) -> None:
        """The client may have changed search_path: set it again before the next handout."""
        self.search_path = None
        self.compute_state()

    @property
    def request_time(self) -> float:
        """When the current (or last) client got this connection, as a Unix time."""
        return _time() - (_monotonic() - self.attached_at)

    def attach(self, client: ClientLink) -> None:
        link = self.link
        link.pair(client.link)
        link.forwarding = 1
        link.attached_at = _monotonic()

    def detach(self) -> None:
        """No longer serving a client (a message forwarded in part is dropped with it)."""
        self.link.unpair()

    @property
    def idle_clean(self) -> bool:
        """No answer due, no transaction open: safe to hand to another client."""
        link = self.link
        return (
            not self.broken
            and not link.syncs
            and not link.unsynced
            and link.status == 73  # "I"
            and not link.remain
            and not link.partial
        )

    async def run_internal(self, sql: str, timeout: float) -> str | None:
        """Run SQL as a simple query nobody sees; the error message, or None when it worked."""
        self.forwarding = False
        self._buf.clear()
        self.transport.write(p.query(sql))
        error: str | None = None
        try:
            async with asyncio.timeout(timeout):
                while True:
                    kind, body = await self.read_message()
                    if kind == p.B_ERROR:
                        error = p.error_fields(body).get("M", "error")
                    elif kind == p.B_PARAMETER_STATUS:
                        name, value = p.parameter_from_body(body)
                        self.params[name] = value
                    elif kind == p.B_READY:
                        self.status = body[0]
                        break
        except (TimeoutError, p.ConnectionClosed, p.ProtocolViolation):
            self.close()
            raise
        finally:
            self.forwarding = True
        return error

    def remember_prepared(self, name: bytes) -> bytes | None:
        """Record NAME as prepared here; the statement to close when the cache is full."""
        self.prepared[name] = None
        if len(self.prepared) > MAX_PREPARED_PER_SERVER:
            old, _ = self.prepared.popitem(last=False)
            return old
        return None

    def close(self) -> None:
        self.link.broken = 1
        if not self._closed:
            try:
                self.transport.write(p.TERMINATE)
            except Exception:
                log.debug("terminate failed", exc_info=True)
            self.transport.close()

    def describe_state(self) -> str:
        return "active" if self.client is not None else "idle"


# --- the pool --------------------------------------------------------------------------------


class Pool:
    """Server connections to one destination, shared by every route that leads there."""

    def __init__(
        self,
        destination: Destination,
        settings: PoolSettings,
        *,
        on_change: Callable[[], None] | None = None,
        engine: Engine | None = None,
    ) -> None:
        self.destination = destination
        #: reads and forwards for the connections' sockets (None: through asyncio's transports)
        self.engine = engine
        self.active: set[ServerConnection] = set()
        #: the idle connections, the waiting clients and the statistics, where the engine hands
        #: out and takes back connections without calling Python (see _engine.c)
        self.core = PoolCore(self.active)
        self.settings = settings
        self.defaults: dict[str, str] | None = None
        #: what a client gets at login, by its startup packet (server._Startup): worked out
        #: once, not per login
        self.greetings: dict[object, Greeting] = {}
        self._on_change = on_change
        # statistics (SHOW STATS, metrics); transactions, waits and bytes are in self.core
        self.query_count = 0
        self.connect_errors = 0
        self.timeouts = 0

    # --- what the engine keeps ------------------------------------------------------------

    @property
    def settings(self) -> PoolSettings:
        return self._settings

    @settings.setter
    def settings(self, settings: PoolSettings) -> None:
        self._settings = settings
        core = self.core
        core.pool_size = settings.pool_size
        core.max_lifetime = settings.max_lifetime or 0.0
        core.wait_timeout = settings.client_wait_timeout

    @property
    def idle(self) -> list[ServerConnection]:
        """The idle connections, most recently used last (a copy)."""
        return [link.owner for link in self.core.idle_links()]

    @property
    def waiters(self) -> list[Waiter]:
        """Who waits for a connection, first come first (a copy; some may have given up)."""
        return [_waiter(entry) for entry in self.core.waiters()]

    @property
    def connecting(self) -> int:
        return self.core.connecting

    @connecting.setter
    def connecting(self, value: int) -> None:
        self.core.connecting = value

    @property
    def paused(self) -> bool:
        return bool(self.core.paused)

    @paused.setter
    def paused(self, value: bool) -> None:
        self.core.paused = value

    @property
    def closed(self) -> bool:
        return bool(self.core.closed)

    @property
    def generation(self) -> int:
        return self.core.generation

    @property
    def xact_count(self) -> int:
        return self.core.xact_count

    @xact_count.setter
    def xact_count(self, value: int) -> None:
        self.core.xact_count = value

    @property
    def xact_time(self) -> float:
        return self.core.xact_time

    @xact_time.setter
    def xact_time(self, value: float) -> None:
        self.core.xact_time = value

    @property
    def wait_count(self) -> int:
        return self.core.wait_count

    @wait_count.setter
    def wait_count(self, value: int) -> None:
        self.core.wait_count = value

    @property
    def wait_time(self) -> float:
        return self.core.wait_time

    @wait_time.setter
    def wait_time(self, value: float) -> None:
        self.core.wait_time = value

    @property
    def bytes_received(self) -> int:
        return self.core.received

    @property
    def bytes_sent(self) -> int:
        return self.core.sent

    def remember_greeting(self, startup: object, greeting: Greeting) -> None:
        if len(self.greetings) >= 1000:
            self.greetings.clear()
        self.greetings[startup] = greeting

    @property
    def total(self) -> int:
        core = self.core
        return core.idle_count + len(self.active) + core.connecting

    # --- acquire / release -------------------------------------------------------------
    #
    # A client that finds no idle connection and no room to open one waits in the queue; a
    # released connection is handed to the first waiter directly (``Waiter.handoff``), with no
    # task or future per transaction. ``expire`` (called a few times a second) ends the waits
    # that passed client_wait_timeout. In transaction mode the engine does the common cases
    # itself (a client takes an idle connection with its own search_path, or queues; a
    # connection goes to the next waiter with the same search_path, or back to the idle list)
    # and calls Python for the rest.

    def take_idle(
        self, state: tuple[str | None, tuple[str | None, ...]]
    ) -> ServerConnection | None:
        """An idle connection now (one matching STATE when possible), or None."""
        link = self.core.take_idle(state)
        if link is None:
            return None
        conn: ServerConnection = link.owner
        self.active.add(conn)
        return conn

    def may_open(self) -> bool:
        """Whether a new server connection may be opened now."""
        return not self.paused and self.total < self.settings.pool_size

    def enqueue(self, waiter: Waiter) -> None:
        now = time.monotonic()
        waiter.waiting = True
        waiter.wait_deadline = now + self.settings.client_wait_timeout
        link = getattr(waiter, "link", None)
        self.core.enqueue(link if isinstance(link, Link) else waiter)

    def _next_waiter(self) -> Waiter | None:
        """The first waiter still waiting (no longer waiting once returned), or None."""
        core = self.core
        while True:
            entry = core.popleft()
            if entry is None:
                return None
            waiter = _waiter(entry)
            if waiter.waiting:
                waiter.waiting = False
                return waiter

    def expire(self, now: float) -> None:
        """End the waits that passed client_wait_timeout (and drop finished entries)."""
        if not self.core.waiter_count:
            return
        keep: list[object] = []
        late: list[Waiter] = []
        for entry in self.core.waiters():
            waiter = _waiter(entry)
            if not waiter.waiting:
                continue
            if now >= waiter.wait_deadline:
                waiter.waiting = False
                late.append(waiter)
            else:
                keep.append(entry)
        self.core.set_waiters(keep)
        for waiter in late:
            self.timeouts += 1
            waiter.timed_out(self.timeout_error())

    def timeout_error(self) -> PoolError:
        return PoolError(
            f"no server connection to {self.destination.describe()} became free within "
            f"{self.settings.client_wait_timeout:g}s (pool_size {self.settings.pool_size}); "
            "retry later or raise pooler.pool_size or pooler.client_wait_timeout",
            p.TOO_MANY_CONNECTIONS,
        )

    @property
    def waiting_count(self) -> int:
        return sum(1 for w in self.waiters if w.waiting)

    @property
    def maxwait(self) -> float:
        starts = [w.wait_deadline for w in self.waiters if w.waiting]
        if not starts:
            return 0.0
        return max(0.0, time.monotonic() - (min(starts) - self.settings.client_wait_timeout))

    async def acquire(
        self, state: tuple[str | None, tuple[str | None, ...]], startup: dict[str, str]
    ) -> ServerConnection:
        """A server connection (outside the hot path: the first login to a destination)."""
        while True:
            conn = self.take_idle(state)
            if conn is not None:
                return conn
            if self.may_open():
                self.reserve()
                return await self.open_for_client(startup)
            waiter = _FutureWaiter()
            self.enqueue(waiter)
            try:
                handed = await waiter.future
            except asyncio.CancelledError:
                waiter.waiting = False
                if waiter.future.done() and not waiter.future.cancelled():
                    lost = waiter.future.result()
                    if lost is not None:
                        self.release(lost)
                raise
            if handed is not None:
                return handed

    def reserve(self) -> None:
        """Count a connection about to be opened (call when may_open() said yes)."""
        self.connecting += 1

    async def open_for_client(self, startup: dict[str, str]) -> ServerConnection:
        """Open a connection reserved with reserve() (active when it returns)."""
        try:
            conn = await self.connect(startup)
        except BaseException:
            self.connecting -= 1
            self._wake_one()
            raise
        self.connecting -= 1
        self.active.add(conn)
        return conn

    def release(self, conn: ServerConnection, now: float = 0.0) -> None:
        """Back from a client: to a waiting client, to the idle list, or closed (NOW: the
        monotonic time when the caller has it at hand)."""
        self.active.discard(conn)
        conn.detach()
        link = conn.link
        link.last_used = now or _monotonic()
        if (  # not conn.idle_clean (detach() dropped what was forwarded in part)
            link.broken
            or link.syncs
            or link.unsynced
            or link.status != 73
            or self.closed
            or link.generation != self.generation
        ):
            conn.close()
            self._wake_one()
            return
        if self.settings.max_lifetime and (
            link.last_used - link.created_at > self.settings.max_lifetime
        ):
            conn.close()
            self._wake_one()
            return
        if not self.paused:
            waiter = self._next_waiter()
            if waiter is not None:
                self.active.add(conn)
                waiter.handoff(conn)
                return
        link.forwarding = 1
        self.core.push_idle(link)

    def forget(self, conn: ServerConnection) -> None:
        """A connection closed (by either side): drop it and let a waiter open a new one."""
        removed = False
        if conn in self.active:
            self.active.discard(conn)
            removed = True
        elif self.core.remove_idle(conn.link):
            removed = True
        if removed:
            self._wake_one()

    def _wake_one(self) -> None:
        """A slot is free: the first waiter opens a connection itself."""
        if self.may_open():
            waiter = self._next_waiter()
            if waiter is not None:
                waiter.handoff(None)

    def resume(self) -> None:
        self.paused = False
        while self.core.idle_count and self.core.waiter_count:
            waiter = self._next_waiter()
            if waiter is None:
                break
            link = self.core.pop_idle()
            assert link is not None
            conn: ServerConnection = link.owner
            self.active.add(conn)
            waiter.handoff(conn)
        while self.core.waiter_count and self.may_open():
            before = self.core.waiter_count
            self._wake_one()
            if self.core.waiter_count == before:
                break

    # --- opening and closing -------------------------------------------------------------

    async def connect(self, startup: dict[str, str]) -> ServerConnection:
        """Open and log in a new server connection with these startup settings."""
        dest = self.destination
        loop = asyncio.get_running_loop()
        conn = ServerConnection(self)
        params = {"user": dest.user, "database": dest.database, **startup}
        try:
            async with asyncio.timeout(self.settings.connect_timeout):
                await loop.create_connection(lambda: conn, dest.host, dest.port)
                await negotiate_server_tls(conn, dest)
                conn.transport.write(p.startup_packet(params))
                server_params, (pid, key) = await server_login(conn, dest.user, dest.password)
        except TimeoutError:
            self._drop_failed(conn)
            raise PoolError(
                f"could not connect to {dest.describe()} within "
                f"{self.settings.connect_timeout:g}s (pooler.connect_timeout)"
            ) from None
        except OSError as exc:
            self._drop_failed(conn)
            raise PoolError(
                f"could not connect to {dest.describe()}: {exc.strerror or exc}"
            ) from None
        except ServerLoginError as exc:
            self._drop_failed(conn)
            raise PoolError(f"login to {dest.describe()} failed: {exc}", exc.sqlstate) from None
        except (p.ConnectionClosed, p.ProtocolViolation) as exc:
            self._drop_failed(conn)
            raise PoolError(f"the connection to {dest.describe()} broke: {exc}") from None
        conn.params = server_params
        conn.backend_pid, conn.backend_key = pid, key
        sp = startup.get("search_path")
        conn.search_path = sp
        conn.compute_state()
        conn.transport = hand_over(conn.link, conn.transport, self.engine, tls=conn.tls)  # type: ignore[assignment]
        conn.link.forwarding = 1
        if self.defaults is None:
            self.defaults = dict(server_params)
        return conn

    def _drop_failed(self, conn: ServerConnection) -> None:
        self.connect_errors += 1
        conn.broken = True
        transport = getattr(conn, "transport", None)
        if transport is not None:
            transport.close()

    def maintain(self, now: float) -> None:
        """Close idle connections past max_idle_time, max_lifetime or the max_idle count."""
        s = self.settings
        keep: list[Link] = []
        drop: list[ServerConnection] = []
        for link in self.core.idle_links():
            expired = (s.max_idle_time and now - link.last_used > s.max_idle_time) or (
                s.max_lifetime and now - link.created_at > s.max_lifetime
            )
            if expired or link.broken:
                drop.append(link.owner)
            else:
                keep.append(link)
        while len(keep) > s.max_idle:
            drop.append(keep.pop(0).owner)
        self.core.set_idle(keep)
        for conn in drop:
            conn.close()

    def redirect(self, destination: Destination) -> None:
        """The same server and role with a new password or TLS settings (a rotated secret, a
        renewed IAM token, `connections edit`): new connections use DESTINATION; idle ones close
        now, busy ones when their transaction is over. No client is cut off."""
        self.destination = destination
        self.core.generation += 1
        idle = self.idle
        self.core.set_idle([])
        for conn in idle:
            conn.close()
        self._wake_one()

    def close(self) -> None:
        self.core.closed = 1
        idle = self.idle
        self.core.set_idle([])
        for conn in idle:
            conn.close()
        for conn in list(self.active):
            conn.close()
        waiters = self.waiters
        self.core.set_waiters([])
        for waiter in waiters:
            if waiter.waiting:
                waiter.waiting = False
                waiter.timed_out(PoolError("the pooler is shutting down", p.ADMIN_SHUTDOWN))


class Waiter(Protocol):
    """Something waiting for a server connection (a client session, or a coroutine)."""

    waiting: bool  # in the pool's queue
    wait_deadline: float

    def handoff(self, conn: ServerConnection | None) -> None:
        """CONN is yours (already active), or None: a slot is free, open one yourself."""

    def timed_out(self, error: PoolError) -> None:
        """The wait passed client_wait_timeout."""


def _waiter(entry: object) -> Waiter:
    """A queue entry as a Waiter: a client's Link stands for the client."""
    if isinstance(entry, Link):
        return entry.owner  # type: ignore[no-any-return]
    return entry  # type: ignore[return-value]


class _FutureWaiter:
    __slots__ = ("future", "wait_deadline", "waiting")

    def __init__(self) -> None:
        self.waiting = False
        self.wait_deadline = 0.0
        self.future: asyncio.Future[ServerConnection | None] = (
            asyncio.get_running_loop().create_future()
        )

    def handoff(self, conn: ServerConnection | None) -> None:
        if not self.future.done():
            self.future.set_result(conn)

    def timed_out(self, error: PoolError) -> None:
        if not self.future.done():
            self.future.set_exception(error)
