"""The pooler's front: listeners, client sessions, routing, cancel requests, reload.

A ``ClientSession`` logs a client in (TLS, routing by database and schema, password), then
forwards its bytes to a server connection taken from the destination's pool: in transaction
mode from the first message of a transaction until ReadyForQuery says idle, in session mode
until the client leaves. Named prepared statements are renamed per query text and prepared on
whichever server connection runs them.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import os
import re
import secrets
import signal
import socket
import ssl
import sys
import time
from collections.abc import Callable, Coroutine
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any

from outpost.pooler import protocol as p
from outpost.pooler._engine import Engine, Link, PoolCore
from outpost.pooler.auth import (
    MAX_AUTH_MESSAGE,
    AuthFailed,
    AuthRefused,
    ScramServer,
    authenticate_client,
    check_md5,
    choose_method,
    password_text,
    random4,
)
from outpost.pooler.links import hand_over
from outpost.pooler.pool import (
    TRACKED,
    Greeting,
    Pool,
    PoolError,
    PoolSettings,
    ServerConnection,
    negotiate_server_tls,
)
from outpost.pooler.pool import share as _share
from outpost.pooler.routes import WOULD_BLOCK, Destination, Route, RouteError, RouteSource
from outpost.pooler.sqltext import blank_literals

if TYPE_CHECKING:
    from outpost.config import LoadedConfig, PoolerConfig

log = logging.getLogger("outpost.pooler")

ADMIN_DATABASES = ("outpost", "pgbouncer")
#: How long a client may take from connecting to being logged in.
LOGIN_TIMEOUT = 60.0
#: How long the engine runs md5 and SCRAM logins for a startup packet on its own before the
#: route is looked up again (``PoolerServer.remember_login``).
LOGIN_MEMORY_SECONDS = 1.0
#: Statements that only make sense on a connection the client keeps (refused in transaction mode).
SESSION_ONLY = re.compile(
    rb"(?is)(?:^|;)\s*(listen)\b|\b(pg_(?:try_)?advisory_lock(?:_shared)?)\s*\(|\bwith\s+(hold)\b"
)
#: A statement that may change search_path behind the pooler's back (SET, set_config, RESET ALL,
#: DISCARD ALL): the server connection's search_path is then unknown and is set again before the
#: connection serves another transaction, so one tenant never inherits another's schema.
TOUCHES_SEARCH_PATH = re.compile(rb"(?i)search_path|\breset\s+all\b|\bdiscard\b")
_SESSION_ONLY_WHAT = {
    b"listen": "LISTEN",
    b"hold": "WITH HOLD cursors",
}

_Q, _S = p.F_QUERY, p.F_SYNC
_P, _B, _D = p.F_PARSE, p.F_BIND, p.F_DESCRIBE
_PC, _CC = p.B_PARSE_COMPLETE, p.B_CLOSE_COMPLETE


_monotonic = time.monotonic
_intern = sys.intern
_NO_STATEMENTS: dict[bytes, tuple[bytes, bytes]] = {}
_NO_WANT: dict[str, str | None] = {}  # (read-only, like _NO_STATEMENTS)
_NO_STATE: tuple[str | None, tuple[str | None, ...]] = (None, ())
_NO_PEER = ("", 0)
_wants: dict[tuple[tuple[str, str | None], ...], dict[str, str | None]] = {}


def _share_want(want: dict[str, str | None]) -> dict[str, str | None]:
    """One shared dict per distinct set of wanted settings (never changed in place: a client
    whose settings change gets a new dict)."""
    key = tuple(want.items())
    found = _wants.get(key)
    if found is None:
        if len(_wants) >= 10_000:
            _wants.clear()
        _wants[key] = found = want
    return found


def _screen(sql: bytes) -> tuple[bool, re.Match[bytes] | None]:
    """Whether SQL may touch search_path (TOUCHES_SEARCH_PATH), and its SESSION_ONLY match.

    Substring searches in the lowered text first: most statements contain none of the words,
    and the regular expressions (case-insensitive, unanchored) cost several times more. A
    SESSION_ONLY match counts only outside literals and comments (``blank_literals``).
    """
    find = sql.lower().find  # (find, not ``in``: bytes ``in`` tries an int first, and fails)
    touches = (find(b"search_path") >= 0 or find(b"reset") >= 0 or find(b"discard") >= 0) and (
        TOUCHES_SEARCH_PATH.search(sql) is not None
    )
    if (find(b"listen") >= 0 or find(b"advisory") >= 0 or find(b"hold") >= 0) and (
        SESSION_ONLY.search(sql) is not None
    ):
        return touches, SESSION_ONLY.search(blank_literals(sql))
    return touches, None


def _normalize(name: str, value: str) -> str:
    if name == "client_encoding" and value.replace("-", "").replace("_", "").lower() == "utf8":
        return "UTF8"
    return value


class _Startup:
    """What a StartupMessage says, worked out once per distinct packet: a client program sends
    the same bytes each time it connects, so its logins share one (``_startup_of``)."""

    __slots__ = ("application_name", "database", "schema", "search_path", "tracked", "user")

    def __init__(self, msg: p.StartupMessage) -> None:
        params = msg.params
        self.user = _intern(params["user"])
        self.database = _intern(params.get("database") or self.user)
        self.schema = _intern(p.schema_from_params(params) or "public")
        self.search_path = _intern(p.quote_ident(self.schema))
        #: the tracked settings the client asks for (the rest come from the server's defaults):
        #: startup parameters (any case: libpq sends PGTZ as "timezone"), or ``-c name=value``
        #: in ``options``; a parameter wins, as in PostgreSQL, which applies the packet's
        #: parameters after the options
        given = p.settings_from_options(params["options"]) if params.get("options") else {}
        given.update((key.lower(), value) for key, value in params.items())
        asked = {name: given[name.lower()] for name in TRACKED if name.lower() in given}
        self.application_name = _intern(asked.get("application_name", ""))
        self.tracked = tuple(
            (name, _normalize(name, asked[name])) for name in TRACKED if name in asked
        )


_startups: dict[bytes, _Startup] = {}


def _startup_of(packet: bytes) -> p.Startup | _Startup:
    """PACKET (a startup-phase packet without its length) parsed: a StartupMessage as its
    shared ``_Startup``; raises ProtocolViolation for a malformed one."""
    found = _startups.get(packet)
    if found is not None:
        return found
    msg = p.parse_startup(packet)
    if not isinstance(msg, p.StartupMessage):
        return msg
    if len(_startups) >= 10_000:
        _startups.clear()
    _startups[packet] = found = _Startup(msg)
    return found


def _greeting(start: _Startup, defaults: dict[str, str], pool: Pool) -> Greeting:
    """What a client logging in with START gets from POOL (whose servers have DEFAULTS): the
    settings it wants, its state, and AuthenticationOk with the ParameterStatus messages; kept
    by the pool for the next login with the same startup packet."""
    want = {k: defaults.get(k) for k in TRACKED}
    want.update(start.tracked)
    want = _share_want(want)
    state = _share((start.search_path, tuple(want.get(k) for k in TRACKED)))
    shown = dict(defaults)
    shown.update({k: v for k, v in want.items() if v is not None})
    shown["application_name"] = start.application_name
    statuses = b"".join(p.parameter_status(k, v) for k, v in shown.items())
    greeting = Greeting(defaults, want, state, p.AUTH_OK_MESSAGE + statuses)
    pool.remember_greeting(start, greeting)
    return greeting


#: What a remembered login carries to the engine and back (Engine.logins' info): the route, its
#: pool, the startup packet's meaning, the greeting and the pool's core (the engine greets with
#: them when it runs the login for a client without a Python session)
_LoginInfo = tuple[Route, Pool, _Startup, Greeting, PoolCore]


class _FastLogin:
    """Where a login without a task stands: the route and its pool (whose server settings are
    known), and the password exchange begun (SCRAM, or md5 with its salt)."""

    __slots__ = ("packet", "pool", "route", "salt", "scram", "stage", "start")

    def __init__(
        self,
        route: Route,
        pool: Pool,
        start: _Startup,
        scram: ScramServer | None,
        salt: bytes,
    ) -> None:
        self.route = route
        self.pool = pool
        self.start = start
        self.packet = b""  # the startup packet (md5: what the engine may answer next time)
        self.scram = scram
        self.salt = salt
        self.stage = 0  # SCRAM: 0 before client-first, 1 before client-final


class ClientSession(p.FramedProtocol):
    """One client connection to the pooler.

    A login runs without a task while nothing needs waiting for (plain TCP, a route at hand, a
    known destination, SCRAM or md5): ``data_received`` moves it on message by message
    (``_login_fast``). Anything else (TLS, a cancel request, the console, a route to query, a
    first login to a destination, cleartext passwords) continues in a task (``_login``).
    """

    __slots__ = (
        "_task",
        "admin",
        "application_name",
        "connect_time",
        "database",
        "fast",
        "gone",
        "key",
        "link",
        "local",
        "login_task",
        "pid",
        "pool",
        "ready",
        "schema",
        "search_path",
        "srv",
        "statements",
        "txn",
        "user",
        "want",
    )

    def __init__(
        self, srv: PoolerServer, local: tuple[str, int] = ("", 0), link: Link | None = None
    ) -> None:
        # (FramedProtocol.__init__, inlined with the rest: this runs once per connection)
        self._buf = bytearray()
        self._waiter: asyncio.Future[None] | None = None
        self._closed = False
        self.peer: tuple[str, int] = _NO_PEER
        self.tls = False
        self.srv = srv
        self.ready = False
        self.admin = False
        self.pool: Pool | None = None
        self.txn = txn = srv.settings.pool_mode == "transaction"
        #: the forwarding engine's side of this client (its socket, once logged in); it also
        #: keeps the server connection it is paired with (conn) and its place in the queue
        if link is None:
            self.link = link = Link(self, False, txn)
            link.state = _NO_STATE  # search_path and tracked settings (see ``state``)
            link.request_at = _monotonic()  # when it last got a server connection
        else:  # one the engine accepted (PoolerServer._materialize)
            self.link = link
            link.owner = self
        self.user = ""
        self.database = ""
        self.schema = ""
        self.application_name = ""
        self.search_path = ""
        self.want: dict[str, str | None] = _NO_WANT  # shared between clients: replaced, not changed
        #: the client's named prepared statements: name -> (server name, Parse body); a shared
        #: empty dict until the first one (read-only until then: idle memory)
        self.statements: dict[bytes, tuple[bytes, bytes]] = _NO_STATEMENTS
        self.pid = 0
        self.key = 0
        self.connect_time = time.time()
        self._task: asyncio.Task[None] | None = None  # opening or preparing a server connection
        self.login_task: asyncio.Task[None] | None = None
        self.fast: _FastLogin | None = None
        self.gone = False
        #: the pooler's address of this connection: the listener's, when it has a specific one
        self.local = local

    # --- kept by the engine ----------------------------------------------------------------

    @property
    def conn(self) -> ServerConnection | None:
        """The server connection serving this client now."""
        peer = self.link.peer
        return None if peer is None else peer.owner

    @conn.setter
    def conn(self, conn: ServerConnection | None) -> None:
        if conn is None:
            self.link.unpair()
        else:
            self.link.pair(conn.link)

    @property
    def state(self) -> tuple[str | None, tuple[str | None, ...]]:
        """search_path and tracked settings: the server connection it gets must have them."""
        return self.link.state  # type: ignore[no-any-return]

    @state.setter
    def state(self, value: tuple[str | None, tuple[str | None, ...]]) -> None:
        self.link.state = value

    @property
    def waiting(self) -> bool:
        """In the pool's queue."""
        return bool(self.link.waiting)

    @waiting.setter
    def waiting(self, value: bool) -> None:
        self.link.waiting = value

    @property
    def wait_deadline(self) -> float:
        return self.link.wait_deadline

    @wait_deadline.setter
    def wait_deadline(self, value: float) -> None:
        self.link.wait_deadline = value

    @property
    def wait_started(self) -> float:
        return self.link.wait_started

    @wait_started.setter
    def wait_started(self, value: float) -> None:
        self.link.wait_started = value

    @property
    def waiting_server(self) -> bool:
        """Its bytes are held until a server connection is ready."""
        return bool(self.link.holding)

    @waiting_server.setter
    def waiting_server(self, value: bool) -> None:
        self.link.holding = value

    @property
    def request_at(self) -> float:
        """When it last got a server connection (monotonic)."""
        return self.link.request_at

    @request_at.setter
    def request_at(self, value: float) -> None:
        self.link.request_at = value

    # --- asyncio.Protocol ------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        if not self.local[0]:  # a wildcard listener (or a unix socket): ask
            local = transport.get_extra_info("sockname")
            if isinstance(local, tuple) and len(local) >= 2:
                self.local = _share((str(local[0]), int(local[1])))
        self._arrived()

    def _arrived(self) -> None:
        self.srv.add_client(self)
        self.srv.logging_in[self] = _monotonic() + LOGIN_TIMEOUT  # see PoolerServer._maintain

    def connection_lost(self, exc: Exception | None) -> None:
        # (FramedProtocol.connection_lost, inlined: this runs once per connection)
        self._closed = True
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)
        self.gone = True
        self.srv.remove_client(self)
        self.fast = None
        link = self.link
        link.waiting = False  # leave the pool's queue; a task opening a connection finishes
        if self.login_task is not None and not self.ready:
            self.login_task.cancel()
        peer = link.peer
        if peer is not None and self._task is None:  # a running _prepare/_open tidies up itself
            conn: ServerConnection = peer.owner
            link.unpair()
            conn.detach()
            self.srv.spawn(self._cleanup(conn))
            peer = None
        if peer is None:
            # nothing in the engine reaches this link now: without its way back to this session
            # (a reference cycle), both go when the last reference does, not at the next
            # garbage collection
            link.owner = None

    def pause_writing(self) -> None:  # (asyncio's transport: TLS)
        if self.conn is not None:
            self.conn.transport.pause_reading()

    def resume_writing(self) -> None:
        if self.conn is not None:
            self.conn.transport.resume_reading()

    @property
    def request_time(self) -> float:
        """When the client last got a server connection, as a Unix time."""
        return time.time() - (_monotonic() - self.request_at)

    def data_received(self, data: bytes) -> None:  # from asyncio: logging in, or TLS
        if not self.ready:
            self.buffer_data(data)
            if self.login_task is None:
                self._login_fast()
            return
        self.link.feed(data)

    # --- called by the engine ---------------------------------------------------------------

    def _on_data(self, data: bytes) -> None:
        """Bytes while logging in (a connection the engine accepted), or while no server
        connection is attached (the engine itself holds the bytes of a client waiting for one)."""
        if self.ready:
            self._feed(data)
        else:
            self.data_received(data)

    def on_ready(self, server: ServerConnection) -> None:
        """ReadyForQuery(idle) with nothing outstanding (transaction mode)."""
        if self.conn is server:
            # self._release(server), inlined: this runs once per transaction
            self.conn = None
            pool = server.pool
            pool.xact_count += 1
            now = _monotonic()
            pool.xact_time += now - server.attached_at
            pool.release(server, now)

    def _engine_release(self) -> None:
        """The client sent something that needs no answer (a Flush, say) between transactions."""
        conn = self.conn
        if conn is not None and conn.idle_clean:
            self._release(conn)

    def _engine_terminate(self) -> None:
        self.transport.close()

    def _engine_bad_length(self, kind: int, length: int) -> None:
        conn = self.conn
        self.fatal(
            p.PROTOCOL_VIOLATION, f"invalid message length {length} for message type {chr(kind)!r}"
        )
        if conn is not None and (conn.syncs or conn.unsynced):
            conn.broken = True

    def _engine_message(self, kind: int, body: bytes) -> bytes | None:
        """A message the engine leaves to Python (see _engine.c): None to send it as it is,
        or the bytes to send instead (b"": nothing)."""
        conn = self.conn
        if conn is None:
            return b""
        if self.link.skip_to_sync and kind != _S:
            return b""
        if kind == _Q:
            touches, match = _screen(body)
            if touches:
                conn.forget_search_path()
            if match is not None:
                self._refuse(match, conn, in_query=True)
                return b""
            return None
        if kind == _P:
            touches, match = _screen(body)
            if touches:
                conn.forget_search_path()
            if match is not None:
                match = SESSION_ONLY.search(blank_literals(body[body.index(b"\0") + 1 :]))
            if match is not None:
                self._refuse(match, conn, in_query=False)
                return b""
        return self._rewrite(kind, body, conn)

    # --- ClientLink (called by the server connection) ------------------------------------

    def on_server_param(self, name: str, value: str) -> None:
        self.want = {**self.want, name: value}
        self.state = _share((self.search_path, tuple(self.want.get(k) for k in TRACKED)))
        if self.conn is not None:
            self.conn.compute_state()

    def on_server_lost(self, server: ServerConnection, reason: str) -> None:
        if self.conn is server:
            self.conn = None
        dest = server.pool.destination.describe()
        self.fatal(p.CONNECTION_FAILURE, f"the server connection to {dest} was lost ({reason})")

    def pause_reading(self) -> None:
        if not self.gone:
            self.transport.pause_reading()

    def resume_reading(self) -> None:
        if not self.gone:
            self.transport.resume_reading()

    # --- errors ----------------------------------------------------------------------------

    def fatal(self, sqlstate: str, text: str) -> None:
        """Tell the client why and close its connection (the pooler keeps serving others)."""
        if self.gone:
            return
        with contextlib.suppress(Exception):
            self.transport.write(p.error_response(sqlstate, text, severity="FATAL"))
        self.transport.close()
        self.gone = True

    # --- login ------------------------------------------------------------------------------

    def _login_fast(self) -> None:
        """Move the login on with what has arrived; hand it to a task (``_login``) when it
        needs to wait for something other than the client."""
        try:
            while not self.gone:
                fast = self.fast
                if fast is None:
                    packet = self.take_startup()
                    if packet is None:
                        return
                    msg = _startup_of(packet)
                    if isinstance(msg, p.GSSENCRequest) or (
                        isinstance(msg, p.SSLRequest) and self.srv.tls_context is None
                    ):
                        self.transport.write(b"N")
                        continue
                    if not (isinstance(msg, _Startup) and self._start_fast(msg)):
                        self.login_task = asyncio.get_running_loop().create_task(self._login(msg))
                        return
                    if self.fast is not None:
                        self.fast.packet = packet
                    continue
                message = self.take_message(MAX_AUTH_MESSAGE)
                if message is None:
                    return
                kind, body = message
                scram = fast.scram
                if scram is None:
                    check_md5(kind, body, self.user, fast.route.secret, fast.salt)
                    auth_final = b""
                elif fast.stage == 0:
                    self.transport.write(scram.client_first(kind, body))
                    fast.stage = 1
                    continue
                else:
                    auth_final = scram.client_final(kind, body)
                self.fast = None
                pool = fast.pool
                assert pool.defaults is not None  # (checked by _start_fast; kept once known)
                greeting = self._logged_in(fast.route, pool, fast.start, auth_final, pool.defaults)
                self.srv.remember_login(fast, greeting)
                return
        except Exception as exc:  # every failure ends the login with a reason
            self.fast = None
            self._login_failed(exc)

    def _engine_login(self, info: _LoginInfo, kind: int, outcome: int, rest: bytes) -> None:
        """The engine ran this client's md5 login (``PoolerServer.remember_login``) and got its
        answer: KIND, OUTCOME 1 (it matched), 0 (it did not) or -1 (a bad length: REST starts
        with the message), and REST, what came after it."""
        route, pool, start, _, _ = info
        try:
            self._take_startup(start)
            if outcome < 0:
                length = int.from_bytes(rest[1:5], "big")
                raise p.ProtocolViolation(
                    f"invalid message length {length} for message type {chr(kind)!r}"
                )
            if kind != p.F_PASSWORD:
                password_text(kind, b"")  # (raises: another message than a password)
            if not outcome:
                raise AuthFailed(self.user)
            if rest:
                self.buffer_data(rest)
            assert pool.defaults is not None  # (known when the login was remembered)
            self._logged_in(route, pool, start, b"", pool.defaults)
        except Exception as exc:  # every failure ends the login with a reason
            self._login_failed(exc)

    def _engine_scram_login(
        self,
        info: _LoginInfo,
        outcome: int,
        data: bytes,
        extra: bytes | tuple[bytes, bytes, bytes, bytes] | None,
    ) -> None:
        """The engine ran this client's SCRAM login (``PoolerServer.remember_login``): OUTCOME 1,
        the proof matched (DATA: the AuthenticationSASLFinal to send, EXTRA: what came after);
        0, it did not; 2 or 3, the client sent a message in a shape the engine leaves to
        ScramServer (DATA, from that message on), after AuthenticationSASL (2) or after
        server-first (3; EXTRA: client-first-bare, gs2 header, nonce and server-first)."""
        route, pool, start, _, _ = info
        try:
            self._take_startup(start)
            if outcome == 0:
                raise AuthFailed(self.user)
            assert pool.defaults is not None  # (known when the login was remembered)
            if outcome == 1:
                if extra:
                    assert isinstance(extra, bytes)
                    self.buffer_data(extra)
                self._logged_in(route, pool, start, data, pool.defaults)
                return
            assert route.secret.scram is not None
            scram = ScramServer(self.user, route.secret.scram)
            fast = _FastLogin(route, pool, start, scram, b"")
            if outcome == 3:
                assert isinstance(extra, tuple)
                scram.resume(*extra)
                fast.stage = 1
            self.fast = fast
        except Exception as exc:  # every failure ends the login with a reason
            self._login_failed(exc)
            return
        self.buffer_data(data)
        self._login_fast()

    def _start_fast(self, start: _Startup) -> bool:
        """Begin the password exchange when nothing needs waiting for; False when a task must
        take the login on from START."""
        srv = self.srv
        self._take_startup(start)
        if self.database in ADMIN_DATABASES:
            return False
        found = srv.routes.lookup_nowait(self.database, self.schema)
        if found is WOULD_BLOCK:
            return False
        route = self._route(found)
        pool = srv.pool_for(route.destination)
        if pool.defaults is None:
            return False  # the first login to a destination learns its settings
        method = choose_method(srv.config.client_auth, route.secret)
        if method == "scram-sha-256":
            assert route.secret.scram is not None
            scram = ScramServer(self.user, route.secret.scram)
            self.fast = _FastLogin(route, pool, start, scram, b"")
            self.transport.write(scram.request)
        elif method == "md5":
            salt = random4()
            self.fast = _FastLogin(route, pool, start, None, salt)
            self.transport.write(p.auth_request(p.AUTH_MD5, salt))
        else:
            return False  # cleartext: TLS checks, and a scrypt hash is checked in a thread
        return True

    async def _login(self, first: p.Startup | _Startup | None = None) -> None:
        try:
            await self._startup(first)
            if self.admin:  # a console session: as long as the admin likes
                from outpost.pooler.admin import AdminSession

                await AdminSession(self.srv, self).run()
        except asyncio.CancelledError:
            if not self.gone:
                self.transport.close()
        except Exception as exc:  # every failure ends the login with a reason
            self._login_failed(exc)

    def _login_failed(self, exc: Exception) -> None:
        """Tell the client why its login (or console session) ended, in one sentence."""
        if isinstance(exc, p.ProtocolViolation):
            self.fatal(p.PROTOCOL_VIOLATION, str(exc))
        elif isinstance(exc, AuthFailed | AuthRefused):
            log.info("login refused for %s from %s: %s", self.user, self.peer[0], exc)
            self.fatal(exc.sqlstate, str(exc))
        elif isinstance(exc, PoolError):
            self.fatal(exc.sqlstate, str(exc))
        elif isinstance(exc, RouteError):
            self.fatal(p.CANNOT_CONNECT, f"the route source failed: {exc}")
        elif isinstance(exc, p.ConnectionClosed | ConnectionError | ssl.SSLError):
            if not self.gone:
                self.transport.close()
        else:
            log.error("login of a client from %s failed", self.peer[0], exc_info=exc)
            self.fatal(p.INTERNAL_ERROR, "the pooler failed to log the client in; see its log")

    def login_timed_out(self) -> None:
        """Called by the server when the login has taken longer than LOGIN_TIMEOUT."""
        self.srv.logging_in.pop(self, None)
        if self.login_task is not None:
            self.login_task.cancel()
        self.fatal(p.PROTOCOL_VIOLATION, f"the login took longer than {LOGIN_TIMEOUT:g}s")

    async def _startup(self, first: p.Startup | _Startup | None) -> None:
        srv = self.srv
        while True:
            if first is not None:
                msg, first = first, None
            else:
                msg = _startup_of(await self.read_startup())
            if isinstance(msg, p.SSLRequest):
                if self.tls:
                    raise p.ProtocolViolation("SSLRequest received on a TLS connection")
                # (a connection accepted by the engine has no asyncio transport to start TLS
                # on: one that came before TLS was turned on by a reload)
                if srv.tls_context is None or self.transport is self.link:  # type: ignore[comparison-overlap]
                    self.transport.write(b"N")
                else:
                    self.transport.write(b"S")
                    await self.start_tls(srv.tls_context, server_side=True)
                continue
            if isinstance(msg, p.GSSENCRequest):
                self.transport.write(b"N")
                continue
            if isinstance(msg, p.CancelRequest):
                srv.logging_in.pop(self, None)
                # shielded: the client may hang up before the server got the cancel
                await asyncio.shield(srv.spawn(srv.cancel(msg.pid, msg.key)))
                self.transport.close()
                return
            break
        start = msg if isinstance(msg, _Startup) else _Startup(msg)
        self._take_startup(start)
        if self.database in ADMIN_DATABASES:
            await self._admin_login()
            return
        found = srv.routes.lookup_nowait(self.database, self.schema)  # no coroutine when at hand
        if found is WOULD_BLOCK:
            found = await srv.routes.lookup(self.database, self.schema)
        route = self._route(found)
        auth_final = await self._password_exchange(route)
        pool = srv.pool_for(route.destination)
        defaults = await srv.server_defaults(pool, start.search_path)
        self._logged_in(route, pool, start, auth_final, defaults)

    async def _password_exchange(self, route: Route) -> bytes:
        config = self.srv.config
        return await authenticate_client(
            self,
            self.user,
            route.secret,
            config.client_auth,
            allow_cleartext_without_tls=config.allow_cleartext_without_tls,
        )

    def _take_startup(self, start: _Startup) -> None:
        """Take the user, database, schema and application name from a StartupMessage."""
        srv = self.srv
        self.user = start.user
        self.database = start.database
        self.application_name = start.application_name
        if srv.tls_required:
            self._check_client_tls()
        if srv.client_count > srv.config.max_client_conn:
            raise PoolError(
                f"no more connections allowed (max_client_conn {srv.config.max_client_conn})",
                p.TOO_MANY_CONNECTIONS,
            )
        self.schema = start.schema

    def _check_client_tls(self) -> None:
        """client_tls_sslmode require, verify-ca or verify-full: TLS, and for verify-full a
        certificate whose common name is the user (as PostgreSQL's clientcert=verify-full)."""
        mode = self.srv.config.client_sslmode
        if not self.tls:
            raise AuthRefused(
                f"the pooler accepts only TLS connections (pooler.client_tls_sslmode {mode}); "
                "connect with sslmode=require or stricter"
            )
        if mode == "verify-full":
            cert = self.transport.get_extra_info("peercert") or {}
            names = [
                value
                for rdn in cert.get("subject", ())
                for key, value in rdn
                if key == "commonName"
            ]
            if names != [self.user]:
                shown = ", ".join(names) or "none"
                raise AuthRefused(
                    f"the client certificate's common name ({shown}) is not the user "
                    f'"{self.user}" (pooler.client_tls_sslmode verify-full)'
                )

    def _route(self, found: Route | None) -> Route:
        if found is None:
            raise PoolError(
                f'no route for database "{self.database}" and schema "{self.schema}"; add one '
                "with `outpost pooler routes add` (or a perseus_auth row)",
                p.INVALID_CATALOG,
            )
        return found

    def _logged_in(
        self,
        route: Route,
        pool: Pool,
        start: _Startup,
        auth_final: bytes,
        defaults: dict[str, str],
    ) -> Greeting:
        """The password matched: greet the client and give its socket to the engine."""
        if route.user != self.user:
            raise AuthFailed(self.user)
        srv = self.srv
        self.pool = pool
        self.search_path = start.search_path
        greeting = pool.greetings.get(start)
        if greeting is None or greeting.defaults is not defaults:
            greeting = _greeting(start, defaults, pool)
        self.want = greeting.want
        link = self.link
        link.state = greeting.state
        self.pid, self.key = pid, key = srv.new_backend_key(self)
        key_data = p.backend_key_data(pid, key)
        self.transport.write(b"".join((auth_final, greeting.messages, key_data, p.READY_IDLE)))
        self.ready = True
        self.login_task = None
        srv.logging_in.pop(self, None)
        link.core = pool.core
        if self.transport is not link:  # type: ignore[comparison-overlap]
            self.transport = hand_over(link, self.transport, srv.engine, tls=self.tls)  # type: ignore[assignment]
        if self._buf:
            link.feed(self.take_buffer())
        return greeting

    async def _admin_login(self) -> None:
        srv = self.srv
        if self.user not in srv.config.admin_users:
            raise AuthRefused(
                f'user "{self.user}" may not use the pooler console; list it in pooler.admin_users'
            )
        route = None
        for database in (self.database, *ADMIN_DATABASES):
            route = await srv.routes.lookup(database, "public")
            if route is not None and route.user == self.user:
                break
            route = None
        auth_final = b""
        if route is not None:
            auth_final = await self._password_exchange(route)
        elif self.peer[0] not in ("127.0.0.1", "::1", "unix"):
            raise AuthRefused(
                f'the pooler console accepts "{self.user}" without a password only from '
                "loopback; add a route for database outpost to give it a password"
            )
        self.admin = True
        srv.logging_in.pop(self, None)  # the console session may last
        self.pid, self.key = srv.new_backend_key(self)
        out = [auth_final, p.AUTH_OK_MESSAGE]
        for name, value in (
            ("server_version", "15.0 (outpost pooler)"),
            ("server_encoding", "UTF8"),
            ("client_encoding", "UTF8"),
            ("DateStyle", "ISO, MDY"),
            ("integer_datetimes", "on"),
            ("standard_conforming_strings", "on"),
            ("application_name", self.application_name),
        ):
            out.append(p.parameter_status(name, value))
        out.append(p.backend_key_data(self.pid, self.key))
        out.append(p.READY_IDLE)
        self.transport.write(b"".join(out))

    # --- forwarding -------------------------------------------------------------------------

    def _feed(self, data: bytes) -> None:
        conn = self.conn
        if conn is None:
            pool = self.pool
            if pool is None or self.gone:
                return
            if data[:1] == b"X":  # Terminate between transactions: no server needed
                self.transport.close()
                return
            conn = pool.take_idle(self.state)
            if conn is None or conn.state != self.state:
                self.link.hold(data)
                self.waiting_server = True
                self.wait_started = time.monotonic()
                if conn is not None:
                    self._run(self._prepare(conn))
                elif pool.may_open():
                    pool.reserve()
                    self._run(self._open())
                else:
                    pool.enqueue(self)
                return
            conn.attach(self)
            self.conn = conn
            self.link.pair(conn.link)
            self.request_at = conn.attached_at
        self.link.feed(data)

    # --- Waiter (called by the pool) ------------------------------------------------------

    def handoff(self, conn: ServerConnection | None) -> None:
        pool = self.pool
        assert pool is not None
        if self.gone:
            if conn is not None:
                pool.release(conn)
            return
        if conn is None:  # a slot is free
            conn = pool.take_idle(self.state)
            if conn is None:
                if pool.may_open():
                    pool.reserve()
                    self._run(self._open())
                else:
                    pool.enqueue(self)
                return
        if conn.state != self.state:
            self._run(self._prepare(conn))
            return
        self._attached(conn)

    def timed_out(self, error: PoolError) -> None:
        self.waiting_server = False
        self.fatal(error.sqlstate, str(error))

    def _run(self, coro: Coroutine[Any, Any, None]) -> None:
        self._task = asyncio.get_running_loop().create_task(coro)

    def _attached(self, conn: ServerConnection) -> None:
        conn.attach(self)
        self.conn = conn
        self.link.pair(conn.link)
        self.waiting_server = False
        pool = conn.pool
        pool.wait_time += time.monotonic() - self.wait_started
        pool.wait_count += 1
        self.request_at = conn.attached_at
        data = self.link.take_pending()
        if data:
            self._feed(data)

    async def _open(self) -> None:
        pool = self.pool
        assert pool is not None
        try:
            conn = await pool.open_for_client(self._startup_for_server())
        except PoolError as exc:
            self._task = None
            self.waiting_server = False
            self.fatal(exc.sqlstate, str(exc))
            return
        await self._prepare(conn)

    async def _prepare(self, conn: ServerConnection) -> None:
        """Attach CONN and bring its search_path and settings to the client's."""
        pool = conn.pool
        conn.attach(self)
        self.conn = conn
        try:
            if conn.state != self.state:
                await self._sync_state(conn)
        except PoolError as exc:
            self._task = None
            self._drop_conn(conn)
            self.fatal(exc.sqlstate, str(exc))
            return
        except (TimeoutError, p.ConnectionClosed, p.ProtocolViolation):
            self._task = None
            self._drop_conn(conn)
            self.fatal(
                p.CONNECTION_FAILURE,
                f"could not prepare a server connection to {pool.destination.describe()} "
                f"(setting search_path took longer than {pool.settings.schema_set_timeout:g}s "
                "or the server went away); reconnect",
            )
            return
        except asyncio.CancelledError:
            self._task = None
            self._drop_conn(conn)
            raise
        self._task = None
        if self.gone:
            self._drop_conn(conn)
            return
        self._attached(conn)

    def _drop_conn(self, conn: ServerConnection | None) -> None:
        if conn is None:
            return
        if self.conn is conn:
            self.conn = None
        conn.detach()
        conn.pool.release(conn)

    def _startup_for_server(self) -> dict[str, str]:
        out = {"search_path": self.search_path}
        for name, value in self.want.items():
            if value is not None:
                out[name] = value
        return out

    async def _sync_state(self, conn: ServerConnection) -> None:
        """SET search_path (and tracked settings) on CONN where they differ from the client's."""
        statements: list[str] = []
        if conn.search_path != self.search_path:
            statements.append(f"SET search_path TO {self.search_path}")
        for name, value in self.want.items():
            if value is not None and conn.params.get(name) != value:
                statements.append(f"SET {p.quote_ident(name)} TO {p.quote_literal(value)}")
        if statements:
            assert self.pool is not None
            error = await conn.run_internal(
                "; ".join(statements), self.pool.settings.schema_set_timeout
            )
            if error is not None:
                raise PoolError(
                    f'could not set search_path to "{self.schema}" on '
                    f"{conn.pool.destination.describe()}: {error}",
                    p.INVALID_CATALOG,
                )
        conn.search_path = self.search_path
        # the server's spelling of each setting from now on (e.g. utf-8 -> UTF8)
        want = dict(self.want)
        for name in TRACKED:
            if name in conn.params:
                want[name] = conn.params[name]
        self.want = _share_want(want)
        self.state = _share((self.search_path, tuple(self.want.get(k) for k in TRACKED)))
        conn.compute_state()

    def _refuse(self, match: re.Match[bytes], conn: ServerConnection, *, in_query: bool) -> None:
        word = (match.group(1) or match.group(2) or match.group(3) or b"").lower()
        what = _SESSION_ONLY_WHAT.get(word, "session advisory locks")
        error = p.error_response(
            p.FEATURE_NOT_SUPPORTED,
            f"{what} cannot be used in transaction pooling mode: the server connection goes "
            "back to the pool after each transaction",
            hint="Use pooler.pool_mode session, or pg_advisory_xact_lock for advisory locks.",
        )
        if in_query:
            status = bytes((conn.status,))
            self.transport.write(error + p.ready_for_query(status))
        else:
            self.transport.write(error)
            self.link.skip_to_sync = 1

    def _rewrite(self, kind: int, body: bytes, conn: ServerConnection) -> bytes | None:
        """Named prepared statements: the client's names become per-query server names."""
        expect = conn.expect_answer
        if kind == _P:
            name, pos = p.split_cstring(body)
            if not name:
                expect(b"", _PC, False)
                return None
            rest = body[pos:]
            sname = self.srv.statement_name(rest)
            if self.statements is _NO_STATEMENTS:
                self.statements = {}
            self.statements[name] = (sname, rest)
            out = b""
            if sname in conn.prepared or sname in conn.uncertain:
                conn.prepared.pop(sname, None)
                conn.uncertain.discard(sname)
                expect(sname, _CC, True)
                out += p.close_statement(sname)
            expect(sname, _PC, False)
            out += p.parse_message(sname, rest)
            old = conn.remember_prepared(sname)
            if old is not None:
                expect(old, _CC, True)
                out += p.close_statement(old)
            return out
        if kind == _B:
            portal, pos = p.split_cstring(body)
            name, pos2 = p.split_cstring(body, pos)
            entry = self.statements.get(name) if name else None
            if entry is None:
                return None
            sname, rest = entry
            return self._ensure(conn, sname, rest) + p.message(
                _B, portal + b"\0" + sname + b"\0" + body[pos2:]
            )
        if kind == _D:
            if body[:1] != b"S":
                return None
            name, _ = p.split_cstring(body, 1)
            entry = self.statements.get(name) if name else None
            if entry is None:
                return None
            sname, rest = entry
            return self._ensure(conn, sname, rest) + p.message(_D, b"S" + sname + b"\0")
        # Close
        if body[:1] == b"S":
            name, _ = p.split_cstring(body, 1)
            entry = self.statements.pop(name, None) if name else None
            if entry is not None:
                sname = entry[0]
                conn.prepared.pop(sname, None)
                expect(sname, _CC, False)
                return p.close_statement(sname)
        expect(b"", _CC, False)
        return None

    def _ensure(self, conn: ServerConnection, sname: bytes, rest: bytes) -> bytes:
        prepared = conn.prepared
        if sname in prepared:
            prepared.move_to_end(sname)
            return b""
        out = b""
        if sname in conn.uncertain:
            conn.uncertain.discard(sname)
            conn.expect_answer(sname, _CC, True)
            out += p.close_statement(sname)
        conn.expect_answer(sname, _PC, True)
        out += p.parse_message(sname, rest)
        old = conn.remember_prepared(sname)
        if old is not None:
            conn.expect_answer(old, _CC, True)
            out += p.close_statement(old)
        return out

    def _release(self, conn: ServerConnection) -> None:
        self.conn = None
        pool = conn.pool
        pool.xact_count += 1
        now = _monotonic()
        pool.xact_time += now - conn.attached_at
        pool.release(conn, now)

    async def _cleanup(self, conn: ServerConnection) -> None:
        """The client left while holding CONN: roll back and reset it, or close it."""
        pool = conn.pool
        timeout = pool.settings.close_timeout
        if conn.broken or conn.syncs or conn.unsynced or conn.midway:
            conn.close()
            pool.forget(conn)
            return
        try:
            if conn.status != 73:  # not idle: a transaction is open
                error = await conn.run_internal("ROLLBACK", timeout)
                if error is not None:
                    raise p.ConnectionClosed(error)
            if not self.txn:
                error = await conn.run_internal("DISCARD ALL", timeout)
                if error is not None:
                    raise p.ConnectionClosed(error)
                conn.prepared.clear()
                conn.uncertain.clear()
                conn.search_path = None
                conn.compute_state()
        except (TimeoutError, p.ConnectionClosed, p.ProtocolViolation):
            conn.close()
            pool.forget(conn)
            return
        pool.release(conn)


class PoolerServer:
    """Listeners, pools and clients of one pooler process (one worker)."""

    def __init__(
        self,
        config: PoolerConfig,
        routes: RouteSource,
        *,
        worker_id: int = 0,
        workers: int = 1,
        runtime_dir: Path | None = None,
        reload_config: Callable[[], PoolerConfig | None] | None = None,
    ) -> None:
        self.config = config
        self.settings = PoolSettings.from_config(config)
        self.routes = routes
        self.worker_id = worker_id
        self.workers = workers
        self.runtime_dir = runtime_dir
        self.reload_config = reload_config
        self.pools: dict[tuple[str, int, str, str], Pool] = {}
        self.clients: set[ClientSession] = set()
        #: clients logging in, oldest first, with the monotonic time their login must end by
        self.logging_in: dict[ClientSession, float] = {}
        self.by_pid: dict[int, ClientSession] = {}
        self._next_pid = 0
        self._statement_ids: dict[bytes, bytes] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        self._servers: list[asyncio.AbstractServer] = []
        #: listeners whose connections the engine accepts (plain TCP while TLS is off):
        #: socket -> the address its connections have (None: a wildcard listener, asked each)
        self._accepting: dict[socket.socket, tuple[str, int] | None] = {}
        self.tls_context = self._make_tls_context(config)
        #: client_tls_sslmode require or stricter: clients without TLS are refused
        self.tls_required = config.client_sslmode in ("require", "verify-ca", "verify-full")
        routes.on_change = self.forget_logins
        self.started_at = time.time()
        self.sockets: list[socket.socket] = []
        self.paused = False
        self.reloads = 0
        #: reads, frames and forwards for the logged-in clients' and servers' sockets
        self.engine: Engine | None = None
        self._own_engine = True

    # --- setup -------------------------------------------------------------------------------

    @staticmethod
    def _make_tls_context(config: PoolerConfig) -> ssl.SSLContext | None:
        mode = config.client_sslmode
        if mode == "disable" or not config.tls_cert_file:
            return None
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        try:
            ctx.load_cert_chain(config.tls_cert_file, config.tls_key_file)
            if config.tls_ca_file:
                ctx.load_verify_locations(cafile=config.tls_ca_file)
                # verify-ca/-full: a client without a certificate fails the handshake
                required = mode in ("verify-ca", "verify-full")
                ctx.verify_mode = ssl.CERT_REQUIRED if required else ssl.CERT_OPTIONAL
        except (OSError, ssl.SSLError) as exc:
            from outpost.errors import ConfigError

            reason = getattr(exc, "strerror", None) or str(exc)
            raise ConfigError(
                [
                    "pooler.tls_cert_file/tls_key_file/tls_ca_file: cannot load "
                    f"the TLS certificate: {reason}"
                ]
            ) from None
        return ctx

    async def start(self, sockets: list[socket.socket]) -> None:
        loop = asyncio.get_running_loop()
        # the loop's engine when the loop runs on its epoll set (EngineLoop: `outpost pooler
        # serve`), else one of our own that the loop watches as one file descriptor
        engine = getattr(loop, "engine", None)
        self._own_engine = not isinstance(engine, Engine)
        if not isinstance(engine, Engine):
            engine = Engine(loop.call_soon)
            loop.add_reader(engine.fileno(), engine.poll)
        self.engine = engine
        # the clients it accepts and may run alone (see _materialize)
        engine.materialize = self._materialize
        engine.accept_error = self._accept_failed
        engine.clients = self.clients
        engine.client_pids = self.by_pid
        engine.max_clients = self.config.max_client_conn
        engine.pid_base = (self.worker_id + 1) << 24
        engine.client_txn = self.settings.pool_mode == "transaction"
        self.sockets = sockets
        for sock in sockets:
            await self._listen(sock)
        if self.runtime_dir is not None and self.workers > 1:
            path = cancel_socket_path(self.runtime_dir, self.worker_id)
            with contextlib.suppress(FileNotFoundError):
                path.unlink()
            server = await loop.create_unix_server(lambda: ClientSession(self), str(path))
            self._servers.append(server)
        self.spawn(self._maintain())
        # Everything loaded so far (modules, settings, routes) lives as long as the process: keep
        # it out of the garbage collector's full passes, which otherwise walk it again and again
        # while thousands of clients come and go.
        gc.freeze()

    async def _listen(self, sock: socket.socket) -> None:
        """Serve SOCK: accepted by the engine (plain TCP, no TLS configured: the fast way), or
        by asyncio (TLS may start on the connection)."""
        local = _listener_address(sock)
        if (
            self.tls_context is None
            and self.engine is not None
            and sock.family in (socket.AF_INET, socket.AF_INET6)
        ):
            sock.setblocking(False)
            self._accepting[sock] = at = local if local[0] else None
            self.engine.listen(sock.fileno(), at)
            return
        loop = asyncio.get_running_loop()
        server = await loop.create_server(partial(ClientSession, self, local), sock=sock)
        self._servers.append(server)

    def _accept_failed(self, fileno: int, exc: OSError) -> None:
        """The engine could not accept on FILENO (out of file descriptors, say) and stopped
        listening there: as asyncio does, try again in a second."""
        for sock in self._accepting:
            if sock.fileno() == fileno:
                log.error(
                    "cannot accept connections on %s: %s; trying again in 1s",
                    _address(sock),
                    exc.strerror or exc,
                )
                asyncio.get_running_loop().call_later(1.0, self._resume_accepting, sock)
                return

    def _resume_accepting(self, sock: socket.socket) -> None:
        if sock in self._accepting and self.engine is not None:
            self.engine.listen(sock.fileno(), self._accepting[sock])

    def _stop_accepting(self) -> list[socket.socket]:
        socks = list(self._accepting)
        if self.engine is not None:
            for sock in socks:
                self.engine.unlisten(sock.fileno())
        self._accepting.clear()
        return socks

    async def close(self) -> None:
        self._stop_accepting()
        for server in self._servers:
            server.close()
        for client in list(self.all_clients()):
            client.fatal(p.ADMIN_SHUTDOWN, "the pooler is shutting down")
        for pool in self.pools.values():
            pool.close()
        for task in list(self._tasks):
            task.cancel()
        for server in self._servers:
            with contextlib.suppress(Exception):
                async with asyncio.timeout(2):
                    await server.wait_closed()
        if self.engine is not None:
            engine, self.engine = self.engine, None
            await asyncio.sleep(0)  # the goodbyes written above are sent
            if self._own_engine:
                asyncio.get_running_loop().remove_reader(engine.fileno())
                engine.close()
            else:  # the loop's: it goes on until the loop closes
                engine.close_links()
        if self.runtime_dir is not None and self.workers > 1:
            with contextlib.suppress(OSError):
                cancel_socket_path(self.runtime_dir, self.worker_id).unlink()

    def spawn(self, coro: Coroutine[Any, Any, None]) -> asyncio.Task[None]:
        """Run CORO as a task the server keeps (and cancels on close)."""
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    async def _maintain(self) -> None:
        tick = 0
        while True:
            await asyncio.sleep(0.2)
            now = time.monotonic()
            for pool in list(self.pools.values()):
                pool.expire(now)
            self._expire_logins(now)
            tick += 1
            if tick % 5:
                continue
            for pool in list(self.pools.values()):
                pool.maintain(now)
                missing = min(
                    pool.settings.min_idle - len(pool.idle), pool.settings.pool_size - pool.total
                )
                for _ in range(max(0, missing)):
                    self.spawn(self._open_idle(pool))

    def _expire_logins(self, now: float) -> None:
        """End the logins that took longer than LOGIN_TIMEOUT (one deadline check per client
        still logging in, instead of a timer each)."""
        if self.engine is not None and self.engine.unowned:
            self.engine.materialize_logins(now - LOGIN_TIMEOUT)  # (into logging_in)
        late = [client for client, deadline in self.logging_in.items() if deadline <= now]
        for client in late:
            client.login_timed_out()

    async def _open_idle(self, pool: Pool) -> None:
        pool.reserve()
        try:
            conn = await pool.open_for_client({})
        except PoolError as exc:
            log.warning("min_idle: %s", exc)
            return
        pool.release(conn)

    # --- clients ------------------------------------------------------------------------------

    @property
    def client_count(self) -> int:
        """Connected clients, with those the engine runs alone."""
        engine = self.engine
        return len(self.clients) + (engine.unowned if engine is not None else 0)

    def all_clients(self) -> set[ClientSession]:
        """Every client's session: those the engine ran alone get theirs now."""
        if self.engine is not None and self.engine.unowned:
            self.engine.materialize_all()
        return self.clients

    def _materialize(self, link: Link) -> None:
        """The engine accepted LINK's client and has run it alone (no Python session: see
        _engine.c); something needs its session now (a message for Python, a console listing,
        a cancel request, a login timeout, a server connection lost). Make it, in the state it
        would have had Python logged it in: still logging in, or logged in with what the
        engine sent (``link.info``: the remembered login; ``link.backend_key``)."""
        local = link.local_address
        client = ClientSession(self, _share(local) if local is not None else _NO_PEER, link)
        client.transport = link  # type: ignore[assignment]
        client.peer = link.peer_address or _NO_PEER
        client.connect_time = link.connect_time
        self.clients.add(client)
        info: _LoginInfo | None = link.info
        if info is None:  # logging in: Python takes it on from here
            self.logging_in[client] = link.request_at + LOGIN_TIMEOUT
            return
        _, pool, start, greeting, _ = info
        client.user = start.user
        client.database = start.database
        client.schema = start.schema
        client.application_name = start.application_name
        client.search_path = start.search_path
        client.pool = pool
        client.want = greeting.want
        key = link.backend_key
        assert key is not None  # (set with info)
        client.pid, client.key = key
        client.ready = True
        self.by_pid[client.pid] = client

    def add_client(self, client: ClientSession) -> None:
        self.clients.add(client)

    def remove_client(self, client: ClientSession) -> None:
        self.clients.discard(client)
        self.logging_in.pop(client, None)
        if client.pid:
            self.by_pid.pop(client.pid, None)

    def new_backend_key(self, client: ClientSession) -> tuple[int, int]:
        """Our own BackendKeyData: the worker id in the top bits, a counter, a random key."""
        while True:
            # (pids with bit 23 set are the engine's: see _materialize)
            self._next_pid = (self._next_pid + 1) & 0x7FFFFF
            pid = ((self.worker_id + 1) << 24) | self._next_pid
            if pid not in self.by_pid and self._next_pid:
                break
        key = int.from_bytes(random4(), "big") & 0x7FFFFFFF
        self.by_pid[pid] = client
        return pid, key

    async def cancel(self, pid: int, key: int) -> None:
        """A CancelRequest: reach the backend running the client's query, wherever it is."""
        worker = (pid >> 24) - 1
        if worker != self.worker_id:
            if self.runtime_dir is not None and 0 <= worker < self.workers:
                await forward_cancel(self.runtime_dir, worker, pid, key)
            return
        client = self.by_pid.get(pid)
        if client is None and self.engine is not None:
            client = self.engine.session_of(pid)  # a client the engine logged in
        if client is None or not secrets.compare_digest(
            key.to_bytes(4, "big", signed=True), client.key.to_bytes(4, "big", signed=True)
        ):
            return
        conn = client.conn
        if conn is None or not conn.backend_pid:
            return
        await send_cancel(
            conn.pool.destination,
            conn.backend_pid,
            conn.backend_key,
            conn.pool.settings.connect_timeout,
        )

    # --- pools and routes -------------------------------------------------------------------

    def pool_for(self, dest: Destination) -> Pool:
        pool = self.pools.get(dest.pool_key)
        if pool is None:
            pool = Pool(dest, self.settings, engine=self.engine)
            pool.paused = self.paused
            self.pools[dest.pool_key] = pool
        elif pool.destination is not dest and pool.destination != dest:
            # new password or TLS settings: busy clients carry on
            pool.redirect(dest)
            self.forget_logins()
        return pool

    def remember_login(self, fast: _FastLogin, greeting: Greeting) -> None:
        """An md5 or SCRAM login with FAST's startup packet succeeded: let the engine run the
        next ones with that packet itself (md5: salt and check, then
        ``ClientSession._engine_login``; SCRAM: the exchange and the proof, then
        ``ClientSession._engine_scram_login``) while the route stays current (at most a
        second; ``forget_logins`` drops them sooner)."""
        engine = self.engine
        if engine is None or not fast.packet:
            return
        secret: bytes | tuple[bytes, bytes, bytes]
        if fast.scram is not None:
            secret = fast.scram.engine_secret
        elif fast.route.secret.md5 is not None:
            secret = fast.route.secret.md5[3:].encode()
        else:
            return
        start = fast.start
        fresh = min(LOGIN_MEMORY_SECONDS, self.routes.fresh_for(start.database, start.schema))
        if fresh <= 0:
            return
        logins = engine.logins
        if len(logins) >= 10_000:
            logins.clear()
        info: _LoginInfo = (fast.route, fast.pool, start, greeting, fast.pool.core)
        logins[fast.packet] = (secret, _monotonic() + fresh, info)

    def forget_logins(self) -> None:
        """Routes, settings or a destination changed: the engine's remembered logins go."""
        if self.engine is not None:
            self.engine.logins.clear()

    async def server_defaults(self, pool: Pool, search_path: str) -> dict[str, str]:
        """The server's ParameterStatus values (from the first login to it)."""
        if pool.defaults is None:
            conn = await pool.acquire((None, ()), {"search_path": search_path})
            pool.release(conn)
        assert pool.defaults is not None
        return pool.defaults

    def statement_name(self, rest: bytes) -> bytes:
        """One server-side name per (query text, parameter types)."""
        name = self._statement_ids.get(rest)
        if name is None:
            name = b"_outpost_%d" % len(self._statement_ids)
            self._statement_ids[rest] = name
        return name

    # --- admin operations ----------------------------------------------------------------------

    async def reload(self) -> str:
        """SIGHUP / RELOAD: re-read settings and routes; clients stay connected."""
        self.reloads += 1
        self.forget_logins()
        if self.reload_config is not None:
            new = self.reload_config()
            if new is not None:
                if new.listen_addresses != self.config.listen_addresses:
                    log.warning("pooler.listen_addresses changed; restart the pooler to apply it")
                if new.workers != self.config.workers:
                    log.warning("pooler.workers changed; restart the pooler to apply it")
                self.config = new
                if self.engine is not None:
                    self.engine.max_clients = new.max_client_conn
                settings = PoolSettings.from_config(new)
                settings.pool_mode = self.settings.pool_mode
                if new.pool_mode != self.settings.pool_mode:
                    log.warning("pooler.pool_mode changed; restart the pooler to apply it")
                self.settings = settings
                for pool in self.pools.values():
                    pool.settings = settings
                try:
                    self.tls_context = self._make_tls_context(new)
                except Exception as exc:
                    log.error("reload: %s; keeping the previous TLS certificate", exc)
                if self.tls_context is not None and self._accepting:
                    # TLS turned on: new connections go through asyncio, which can start it
                    for sock in self._stop_accepting():
                        await self._listen(sock)
                self.tls_required = new.client_sslmode in ("require", "verify-ca", "verify-full")
        try:
            await self.routes.reload()
        except RouteError as exc:
            log.error("reload: the routes could not be re-read: %s", exc)
            return f"routes not reloaded: {exc}"
        log.info("pooler configuration and routes reloaded")
        return "RELOAD"

    async def pause(self) -> None:
        """Stop handing out server connections and wait until none is in use."""
        self.paused = True
        for pool in self.pools.values():
            pool.paused = True
        while any(pool.active for pool in self.pools.values()):
            await asyncio.sleep(0.05)

    def resume(self) -> None:
        self.paused = False
        for pool in self.pools.values():
            pool.resume()


def cancel_socket_path(runtime_dir: Path, worker: int) -> Path:
    return runtime_dir / f"cancel-{worker}.sock"


async def forward_cancel(runtime_dir: Path, worker: int, pid: int, key: int) -> None:
    """Hand a cancel request to the worker that owns the client (its unix socket)."""
    path = cancel_socket_path(runtime_dir, worker)
    try:
        async with asyncio.timeout(5):
            reader, writer = await asyncio.open_unix_connection(str(path))
            writer.write(p.cancel_request(pid, key))
            await writer.drain()
            await reader.read()  # the worker closes the connection once the cancel is sent
            writer.close()
    except (OSError, TimeoutError) as exc:
        log.warning("could not forward a cancel request to worker %d: %s", worker, exc)


async def send_cancel(dest: Destination, pid: int, key: int, timeout: float) -> None:
    """Send PostgreSQL a CancelRequest for backend PID (TLS per the destination's sslmode)."""
    loop = asyncio.get_running_loop()
    conn = p.FramedProtocol()
    try:
        async with asyncio.timeout(timeout):
            await loop.create_connection(lambda: conn, dest.host, dest.port)
            await negotiate_server_tls(conn, dest)
            conn.transport.write(p.cancel_request(pid, key))
            with contextlib.suppress(p.ConnectionClosed):
                await conn.read_exactly(1)  # the server closes the connection when done
    except (OSError, TimeoutError, PoolError, ssl.SSLError) as exc:
        log.warning("cancel request to %s failed: %s", dest.describe(), exc)
    finally:
        transport = getattr(conn, "transport", None)
        if transport is not None:
            transport.close()


# --- running -----------------------------------------------------------------------------------


def bind_listeners(addresses: list[str], *, reuse_port: bool = False) -> list[socket.socket]:
    """Listening sockets for HOST:PORT addresses (SO_REUSEPORT for several workers)."""
    from outpost.config import split_host_port
    from outpost.errors import OutpostError

    sockets: list[socket.socket] = []
    for address in addresses:
        host, port = split_host_port(address)
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if reuse_port:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        try:
            sock.bind((host, port))
        except OSError as exc:
            sock.close()
            for s in sockets:
                s.close()
            raise OutpostError(
                f"Cannot listen on {address} (pooler.listen_addresses): {exc.strerror}; "
                "stop the other process or change the address."
            ) from None
        sock.listen(1024)
        sock.setblocking(False)
        sockets.append(sock)
    return sockets


async def serve_pooler(
    loaded: LoadedConfig,
    route_source: RouteSource,
    *,
    stop: asyncio.Event,
    reload: asyncio.Event | None = None,
    config_arg: str | None = None,
    sockets: list[socket.socket] | None = None,
    worker_id: int = 0,
    workers: int = 1,
    runtime_dir: Path | None = None,
    on_started: Callable[[PoolerServer], None] | None = None,
    overrides: dict[str, object] | None = None,
    serve_metrics: bool = False,
) -> None:
    """Run the pooler until STOP is set; RELOAD (when given) re-reads settings and routes.

    Inside ``outpost serve``: ``await serve_pooler(loaded, open_route_source(loaded, key=key),
    stop=stop_event, reload=pooler_reload_event, config_arg=config_arg)``. OVERRIDES (settings
    given on the command line) are kept over the file's values on reload. SERVE_METRICS
    (`outpost pooler serve`): the pooler.metrics_listen endpoint, when configured.
    """
    from outpost.config import load_config
    from outpost.errors import ConfigError

    config = loaded.config.pooler
    if config is None:
        from outpost.config import PoolerConfig

        config = PoolerConfig()

    def reread() -> PoolerConfig | None:
        try:
            new = load_config(config_arg)
        except ConfigError as exc:
            log.error("reload failed, keeping the running pooler settings: %s", exc)
            return None
        fresh = new.config.pooler or config
        if overrides:  # --listen/--workers given on the command line stay in force
            fresh = fresh.model_copy(update=overrides)
        return fresh

    own_sockets = sockets is None
    if sockets is None:
        sockets = bind_listeners(config.listen_addresses)
    srv = PoolerServer(
        config,
        route_source,
        worker_id=worker_id,
        workers=workers,
        runtime_dir=runtime_dir,
        reload_config=reread,
    )
    await srv.start(sockets)
    metrics = None
    if config.metrics_listen is not None:
        if serve_metrics:
            from outpost.pooler.metrics_http import MetricsEndpoint

            metrics = MetricsEndpoint(
                srv,
                config.metrics_listen,
                worker_id=worker_id,
                workers=workers,
                runtime_dir=runtime_dir,
            )
            try:
                await metrics.start()
            except BaseException:
                await srv.close()
                raise
        else:
            log.warning(
                "pooler.metrics_listen is for `outpost pooler serve`; the agent's /metrics "
                "carries the pooler's metrics"
            )
    addresses = ", ".join(_address(s) for s in sockets)
    log.info(
        "pooler listening on %s (worker %d, pid %d, %s mode)",
        addresses,
        worker_id,
        os.getpid(),
        srv.settings.pool_mode,
    )
    if on_started is not None:
        on_started(srv)
    reloader: asyncio.Task[None] | None = None
    if reload is not None:
        reload_event = reload

        async def reload_loop() -> None:
            while True:
                await reload_event.wait()
                reload_event.clear()
                await srv.reload()

        reloader = asyncio.get_running_loop().create_task(reload_loop())
    try:
        await stop.wait()
    finally:
        if reloader is not None:
            reloader.cancel()
        if metrics is not None:
            await metrics.close()
        await srv.close()
        with contextlib.suppress(Exception):
            await route_source.close()
        if own_sockets:
            for sock in sockets:
                sock.close()


def _listener_address(sock: socket.socket) -> tuple[str, int]:
    """A listening socket's address when every connection to it has that address; ("", 0)
    for a wildcard (0.0.0.0, ::) or unix listener, whose connections' addresses vary."""
    address = sock.getsockname()
    if not isinstance(address, tuple) or address[0] in ("0.0.0.0", "::"):  # noqa: S104
        return ("", 0)
    return _share((str(address[0]), int(address[1])))


def _address(sock: socket.socket) -> str:
    host, port = sock.getsockname()[:2]
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def install_signals(stop: asyncio.Event, reload: asyncio.Event) -> None:
    loop = asyncio.get_running_loop()
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    loop.add_signal_handler(signal.SIGINT, stop.set)
    loop.add_signal_handler(signal.SIGHUP, reload.set)
