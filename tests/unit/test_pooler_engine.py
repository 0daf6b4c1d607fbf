"""The pooler's C forwarding engine (``_engine.c``) on real socket pairs.

A client link and a server link sit between two socket pairs (the application's end and the
database's end); the test drives ``Engine.poll`` itself and checks what comes out of the other
end, byte for byte, and which Python callbacks ran.
"""

from __future__ import annotations

import contextlib
import os
import socket
import struct
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from scramp import ScramClient

from outpost.pooler._engine import (
    HIGH_WATER,
    Engine,
    Link,
    PoolCore,
    mentions_keyword,
)
from outpost.pooler.auth import ScramServer
from outpost.pooler.passwords import scram_verifier


def msg(kind: bytes, body: bytes = b"") -> bytes:
    return kind + struct.pack("!I", len(body) + 4) + body


def query(sql: str) -> bytes:
    return msg(b"Q", sql.encode() + b"\0")


READY_IDLE = msg(b"Z", b"I")
READY_TXN = msg(b"Z", b"T")


class Owner:
    """Records every callback the engine makes."""

    def __init__(self) -> None:
        self.data: list[bytes] = []
        self.messages: list[tuple[int, bytes]] = []
        self.reply: bytes | None = None
        self.ready: list[object] = []
        self.params: list[bytes] = []
        self.unanswered: list[tuple[bytes, int, bool]] = []
        self.bad: list[tuple[int, int]] = []
        self.released = 0
        self.terminated = 0
        self.lost: list[object] = []
        self.logins: list[tuple[object, int, int, bytes]] = []
        self.scram_logins: list[tuple[object, int, bytes, object]] = []
        self.link: Link | None = None

    def _on_data(self, data: bytes) -> None:
        self.data.append(data)

    def _engine_message(self, kind: int, body: bytes) -> bytes | None:
        self.messages.append((kind, body))
        return self.reply

    def _engine_terminate(self) -> None:
        self.terminated += 1

    def _engine_bad_length(self, kind: int, length: int) -> None:
        self.bad.append((kind, length))

    def _engine_release(self) -> None:
        self.released += 1

    def on_ready(self, server: object) -> None:
        self.ready.append(server)
        if self.link is not None:
            self.link.unpair()

    def _engine_param(self, body: bytes) -> None:
        self.params.append(body)

    def _unanswered(self, entry: tuple[bytes, int, bool]) -> None:
        self.unanswered.append(entry)

    def connection_lost(self, exc: object) -> None:
        self.lost.append(exc)

    def _engine_login(self, info: object, kind: int, outcome: int, rest: bytes) -> None:
        self.logins.append((info, kind, outcome, rest))

    def _engine_scram_login(self, info: object, outcome: int, data: bytes, extra: object) -> None:
        self.scram_logins.append((info, outcome, data, extra))


class Rig:
    """An engine with client links and one server link, each on a socket pair."""

    def __init__(self) -> None:
        self.scheduled: list[tuple[Callable[..., Any], tuple[Any, ...]]] = []
        self.engine = Engine(lambda fn, *args: self.scheduled.append((fn, args)))
        self.sockets: list[socket.socket] = []
        self.server_owner = Owner()
        self.server, self.db = self.link(self.server_owner, server=True)

    def link(self, owner: Owner, *, server: bool, txn: bool = True) -> tuple[Link, socket.socket]:
        ours, theirs = socket.socketpair()
        self.sockets += [ours, theirs]
        ours.setblocking(False)
        theirs.settimeout(5)
        link = Link(owner, server, txn)
        link.adopt(self.engine, os.dup(ours.fileno()), {"peername": ("test", 0)})
        owner.link = link
        return link, theirs

    def client(self, *, txn: bool = True) -> tuple[Owner, Link, socket.socket]:
        owner = Owner()
        link, app = self.link(owner, server=False, txn=txn)
        return owner, link, app

    def pump(self, until: Callable[[], bool], timeout: float = 5) -> None:
        deadline = time.monotonic() + timeout
        while not until():
            assert time.monotonic() < deadline, "the engine did not get there in time"
            self.engine.poll()
            for fn, args in self.scheduled:
                fn(*args)
            self.scheduled.clear()

    def idle_server(self, core: PoolCore, state: object) -> None:
        """The server link, in STATE, idle in CORE."""
        self.server.core = core
        self.server.state = state
        self.server.generation = core.generation
        core.push_idle(self.server)

    def engine_links(self) -> list[Link]:
        """The links the engine holds (its tables, seen through the garbage collector)."""
        import gc

        found: dict[int, Link] = {}
        for table in gc.get_referents(self.engine):
            if isinstance(table, dict):
                found.update((id(v), v) for v in table.values() if isinstance(v, Link))
        return list(found.values())

    def close(self) -> None:
        self.engine.close()
        for sock in self.sockets:
            sock.close()


@pytest.fixture
def rig() -> Iterator[Rig]:
    r = Rig()
    yield r
    r.close()


def recv_exactly(sock: socket.socket, n: int, rig: Rig) -> bytes:
    out = b""
    sock.setblocking(False)

    def got() -> bool:
        nonlocal out
        try:
            chunk = sock.recv(n - len(out))
        except BlockingIOError:
            return False
        out += chunk
        return len(out) >= n or not chunk

    rig.pump(got)
    return out


def test_keyword_prescreen_is_case_insensitive_and_finds_every_word() -> None:
    for sql in (
        b"SET Search_Path TO x",
        b"RESET ALL",
        b"discard all",
        b"LISTEN chan",
        b"select pg_advisory_lock(1)",
        b"DECLARE c CURSOR WITH HOLD FOR select 1",
    ):
        assert mentions_keyword(sql), sql
    for sql in (b"select 1", b"SELECT abalance FROM pgbench_accounts WHERE aid = 7", b""):
        assert not mentions_keyword(sql), sql


def test_queries_and_answers_pass_through_and_ready_releases(rig: Rig) -> None:
    owner, client, app = rig.client()
    client.pair(rig.server)
    app.sendall(query("select 1"))
    sent = recv_exactly(rig.db, len(query("select 1")), rig)
    assert sent == query("select 1")
    assert rig.server.syncs == 1
    answer = msg(b"T", b"\0\0") + msg(b"D", b"\0\0") + msg(b"C", b"SELECT 1\0") + READY_IDLE
    rig.db.sendall(answer)
    assert recv_exactly(app, len(answer), rig) == answer
    rig.pump(lambda: bool(owner.ready))
    assert owner.ready == [rig.server_owner]
    assert rig.server.syncs == 0
    assert client.peer is None  # the owner released it


def test_no_release_while_a_transaction_is_open(rig: Rig) -> None:
    owner, client, app = rig.client()
    client.pair(rig.server)
    app.sendall(query("begin"))
    recv_exactly(rig.db, len(query("begin")), rig)
    rig.db.sendall(msg(b"C", b"BEGIN\0") + READY_TXN)
    recv_exactly(app, len(msg(b"C", b"BEGIN\0") + READY_TXN), rig)
    assert owner.ready == []
    assert rig.server.status == ord("T")


@settings(max_examples=40, deadline=None)
@given(
    bodies=st.lists(st.binary(max_size=300), min_size=1, max_size=12),
    cuts=st.lists(st.integers(min_value=1, max_value=97), min_size=1, max_size=40),
)
def test_messages_cut_anywhere_arrive_whole_and_in_order(
    bodies: list[bytes], cuts: list[int]
) -> None:
    rig = Rig()
    try:
        owner, client, app = rig.client()
        client.pair(rig.server)
        # CopyData carries any bytes; a Query every third message; Sync at the end
        stream = b"".join(
            query(f"select {i}") if i % 3 == 0 else msg(b"d", body) for i, body in enumerate(bodies)
        ) + msg(b"S")
        pos, i = 0, 0
        while pos < len(stream):
            step = cuts[i % len(cuts)]
            app.sendall(stream[pos : pos + step])
            rig.engine.poll()
            pos += step
            i += 1
        assert recv_exactly(rig.db, len(stream), rig) == stream
        queries = sum(1 for i in range(len(bodies)) if i % 3 == 0)
        assert rig.server.syncs == queries + 1
        assert owner.messages == [] and owner.bad == []
    finally:
        rig.close()


def test_a_query_naming_a_session_feature_goes_to_python(rig: Rig) -> None:
    owner, client, app = rig.client()
    client.pair(rig.server)
    owner.reply = b""  # refused: nothing is sent
    app.sendall(query("LISTEN chan") + query("select 2"))
    assert recv_exactly(rig.db, len(query("select 2")), rig) == query("select 2")
    assert owner.messages == [(ord("Q"), b"LISTEN chan\0")]
    assert rig.server.syncs == 1  # only the query that was sent is due an answer
    owner.reply = None  # let through as it is
    app.sendall(query("set search_path to a"))
    assert recv_exactly(rig.db, len(query("set search_path to a")), rig) == query(
        "set search_path to a"
    )
    assert rig.server.syncs == 2


def test_named_statements_go_to_python_and_hidden_answers_are_dropped(rig: Rig) -> None:
    owner, client, app = rig.client()
    client.pair(rig.server)
    parse = msg(b"P", b"stmt1\0select 1\0\0\0")
    owner.reply = msg(b"P", b"_outpost_0\0select 1\0\0\0")
    rig.server.expect(b"_outpost_0", ord("1"), True)  # what Python queues with its rewrite
    app.sendall(parse + msg(b"S"))
    expected = owner.reply + msg(b"S")
    assert recv_exactly(rig.db, len(expected), rig) == expected
    assert owner.messages == [(ord("P"), b"stmt1\0select 1\0\0\0")]
    rig.db.sendall(msg(b"1") + READY_IDLE)
    assert recv_exactly(app, len(READY_IDLE), rig) == READY_IDLE  # ParseComplete hidden
    rig.pump(lambda: bool(owner.ready))


def test_an_unnamed_parse_stays_in_c_and_its_answer_is_shown(rig: Rig) -> None:
    owner, client, app = rig.client()
    client.pair(rig.server)
    stream = msg(b"P", b"\0select 1\0\0\0") + msg(b"B", b"\0\0\0\0\0\0") + msg(b"E", b"\0\0\0\0\0")
    stream += msg(b"S")
    app.sendall(stream)
    assert recv_exactly(rig.db, len(stream), rig) == stream
    assert owner.messages == []
    answer = msg(b"1") + msg(b"2") + msg(b"C", b"SELECT 1\0") + READY_IDLE
    rig.db.sendall(answer)
    assert recv_exactly(app, len(answer), rig) == answer
    rig.pump(lambda: bool(owner.ready))
    assert rig.server.pending_answers == 0


def test_an_error_before_sync_reports_the_statements_left_unanswered(rig: Rig) -> None:
    owner, client, app = rig.client()
    client.pair(rig.server)
    owner.reply = msg(b"P", b"_outpost_1\0select x\0\0\0")
    rig.server.expect(b"_outpost_1", ord("1"), False)
    app.sendall(msg(b"P", b"s\0select x\0\0\0") + msg(b"S"))
    recv_exactly(rig.db, len(owner.reply) + 5, rig)
    error = msg(b"E", b"SERROR\0C42703\0Mno such column\0\0")
    rig.db.sendall(error + READY_IDLE)
    assert recv_exactly(app, len(error + READY_IDLE), rig) == error + READY_IDLE
    assert rig.server_owner.unanswered == [(b"_outpost_1", ord("1"), False)]


def test_parameter_status_reaches_python_and_the_client(rig: Rig) -> None:
    _owner, client, app = rig.client()
    client.pair(rig.server)
    app.sendall(query("set timezone to 'UTC'"))
    recv_exactly(rig.db, len(query("set timezone to 'UTC'")), rig)
    status = msg(b"S", b"TimeZone\0UTC\0")
    rig.db.sendall(msg(b"C", b"SET\0") + status + READY_IDLE)
    recv_exactly(app, len(msg(b"C", b"SET\0") + status + READY_IDLE), rig)
    assert rig.server_owner.params == [b"TimeZone\0UTC\0"]


@pytest.mark.parametrize("length", [0, 3, 0x40000000])
def test_a_bad_message_length_is_reported_not_forwarded(rig: Rig, length: int) -> None:
    owner, client, app = rig.client()
    client.pair(rig.server)
    app.sendall(query("select 1") + b"Q" + struct.pack("!I", length) + b"junk")
    recv_exactly(rig.db, len(query("select 1")), rig)
    rig.pump(lambda: bool(owner.bad))
    assert owner.bad == [(ord("Q"), length)]


def test_terminate_and_hang_up(rig: Rig) -> None:
    owner, client, app = rig.client()
    client.pair(rig.server)
    app.sendall(msg(b"X"))
    rig.pump(lambda: owner.terminated == 1)
    app.close()
    rig.pump(lambda: bool(owner.lost))
    assert owner.lost == [None]
    assert client.closed


def test_bytes_without_a_server_go_to_python(rig: Rig) -> None:
    owner, _client, app = rig.client()
    app.sendall(query("select 1"))
    rig.pump(lambda: bool(owner.data))
    assert b"".join(owner.data) == query("select 1")


def test_read_now_takes_what_has_arrived_without_a_poll(rig: Rig) -> None:
    """read_now (a connection just accepted): bytes already in the socket reach Python at
    once; nothing waiting reads nothing and blocks nothing; a peer gone is a lost connection."""
    owner, client, app = rig.client()
    client.read_now()
    assert owner.data == [] and owner.lost == []
    app.sendall(b"\0\0\0\x08\x04\xd2\x16\x2f")  # an SSLRequest, sent with the connect
    client.read_now()
    assert owner.data == [b"\0\0\0\x08\x04\xd2\x16\x2f"]
    app.close()
    client.read_now()
    assert client.closed
    rig.pump(lambda: bool(owner.lost))  # (connection_lost comes from the loop, as asyncio's)
    assert owner.lost == [None]
    client.read_now()  # closed: nothing happens
    rig.pump(lambda: True)
    assert owner.lost == [None]


SSL_REQUEST = struct.pack("!II", 8, 80877103)
STARTUP = b"\0\3\0\0user\0app_a\0database\0app\0\0"
MD5_SECRET = b"0123456789abcdef0123456789abcdef"  # the hex digits of md5(password + user)


def startup(body: bytes = STARTUP) -> bytes:
    return struct.pack("!I", len(body) + 4) + body


def md5_answer(salt: bytes, secret: bytes = MD5_SECRET) -> bytes:
    import hashlib

    return b"md5" + hashlib.md5(secret + salt, usedforsecurity=False).hexdigest().encode() + b"\0"


def logging_in(rig: Rig, *, valid_for: float = 60.0) -> tuple[Owner, Link, socket.socket]:
    owner, client, app = rig.client()
    rig.engine.logins[STARTUP] = (MD5_SECRET, time.monotonic() + valid_for, "info")
    client.login = 1
    return owner, client, app


def md5_request(app: socket.socket, rig: Rig) -> bytes:
    """The AuthenticationMD5Password the engine sent: its salt."""
    request = recv_exactly(app, 13, rig)
    assert request[:9] == b"R\0\0\0\x0c\0\0\0\x05"
    return request[9:]


@pytest.mark.parametrize("chunk", [1, 3, 1000])
def test_the_engine_runs_a_remembered_md5_login(rig: Rig, chunk: int) -> None:
    """An SSLRequest gets 'N'; the startup packet Python remembered gets an md5 request with a
    fresh salt; the right answer reaches Python once, with what came after it, however the
    bytes are cut."""
    owner, client, app = logging_in(rig)
    sent = SSL_REQUEST + startup()
    for i in range(0, len(sent), chunk):
        app.sendall(sent[i : i + chunk])
        time.sleep(0.001)
    assert recv_exactly(app, 1, rig) == b"N"
    salt = md5_request(app, rig)
    answer = msg(b"p", md5_answer(salt)) + query("select 1")
    for i in range(0, len(answer), chunk):
        app.sendall(answer[i : i + chunk])
        time.sleep(0.001)
    rig.pump(lambda: bool(owner.logins))
    info, kind, outcome, rest = owner.logins[0]
    assert (info, kind, outcome) == ("info", ord("p"), 1)
    # what followed the answer: with the call, or (cut apart) as bytes afterwards
    rig.pump(lambda: len(rest + b"".join(owner.data)) >= len(query("select 1")))
    assert rest + b"".join(owner.data) == query("select 1")
    assert client.login == 0 and owner.logins[1:] == []
    # a second client gets another salt
    _owner2, _client2, app2 = logging_in(rig)
    app2.sendall(startup())
    assert md5_request(app2, rig) != salt


def test_a_wrong_answer_or_another_message_goes_to_python_as_such(rig: Rig) -> None:
    owner, _client, app = logging_in(rig)
    app.sendall(startup())
    salt = md5_request(app, rig)
    app.sendall(msg(b"p", md5_answer(salt, b"f" * 32)))
    rig.pump(lambda: bool(owner.logins))
    assert owner.logins == [("info", ord("p"), 0, b"")]
    owner, _client, app = logging_in(rig)
    app.sendall(startup())
    md5_request(app, rig)
    app.sendall(msg(b"Q", b"select 1\0"))
    rig.pump(lambda: bool(owner.logins))
    assert owner.logins == [("info", ord("Q"), 0, b"")]
    owner, _client, app = logging_in(rig)
    app.sendall(startup())
    md5_request(app, rig)
    bad = b"p" + struct.pack("!I", 1_000_000)
    app.sendall(bad)
    rig.pump(lambda: bool(owner.logins))
    assert owner.logins == [("info", ord("p"), -1, bad)]


@pytest.mark.parametrize(
    "packet",
    [
        startup(STARTUP.replace(b"app_a", b"app_b")),  # not remembered
        struct.pack("!I", 3) + b"junk",  # a length below 8
        struct.pack("!I", 1_000_000),  # oversized
        struct.pack("!II", 16, 80877102) + b"\0" * 8,  # a CancelRequest
    ],
)
def test_anything_else_goes_to_python_untouched(rig: Rig, packet: bytes) -> None:
    owner, client, app = logging_in(rig)
    app.sendall(packet)
    rig.pump(lambda: len(b"".join(owner.data)) >= len(packet))
    assert b"".join(owner.data) == packet
    assert owner.logins == [] and client.login == 0


def test_an_expired_login_goes_to_python(rig: Rig) -> None:
    owner, _client, app = logging_in(rig, valid_for=-1)
    app.sendall(startup())
    rig.pump(lambda: bool(owner.data))
    assert b"".join(owner.data) == startup() and owner.logins == []


SCRAM_PASSWORD = "scram-pw"
SCRAM_VERIFIER = scram_verifier(SCRAM_PASSWORD)
SASL_REQUEST = b"R\0\0\0\x17\0\0\0\x0aSCRAM-SHA-256\0\0"


def scram_logging_in(rig: Rig) -> tuple[Owner, Link, socket.socket]:
    owner, client, app = rig.client()
    secret = ScramServer("app_a", SCRAM_VERIFIER).engine_secret
    rig.engine.logins[STARTUP] = (secret, time.monotonic() + 60, "info")
    client.login = 1
    return owner, client, app


def read_message(app: socket.socket, rig: Rig) -> bytes:
    head = recv_exactly(app, 5, rig)
    return head + recv_exactly(app, struct.unpack("!I", head[1:])[0] - 4, rig)


def sasl_initial(first: str, mechanism: bytes = b"SCRAM-SHA-256") -> bytes:
    data = first.encode()
    return msg(b"p", mechanism + b"\0" + struct.pack("!I", len(data)) + data)


def scram_to_final(
    rig: Rig, app: socket.socket, password: str = SCRAM_PASSWORD
) -> tuple[ScramClient, str, str]:
    """Startup, AuthenticationSASL, client-first, server-first: (the client, client-first,
    server-first)."""
    client = ScramClient(["SCRAM-SHA-256"], "app_a", password)
    app.sendall(startup())
    assert read_message(app, rig) == SASL_REQUEST
    first = client.get_client_first()
    app.sendall(sasl_initial(first))
    server_first = read_message(app, rig)
    assert server_first[:9] == b"R" + struct.pack("!II", len(server_first) - 1, 11)
    client.set_server_first(server_first[9:].decode())
    return client, first, server_first[9:].decode()


@pytest.mark.parametrize("chunk", [1, 3, 1000])
def test_the_engine_runs_a_remembered_scram_login(rig: Rig, chunk: int) -> None:
    """The startup packet Python remembered with a SCRAM secret gets AuthenticationSASL, the
    client-first a server-first with the client's nonce and a fresh one of the engine's, and a
    right proof the server signature the client checks; Python hears once, with what came
    after, however the bytes are cut."""
    owner, client, app = scram_logging_in(rig)
    scram = ScramClient(["SCRAM-SHA-256"], "app_a", SCRAM_PASSWORD)
    first = scram.get_client_first()
    sent = SSL_REQUEST + startup() + sasl_initial(first)
    for i in range(0, len(sent), chunk):
        app.sendall(sent[i : i + chunk])
        rig.engine.poll()
    assert recv_exactly(app, 1, rig) == b"N"
    assert read_message(app, rig) == SASL_REQUEST
    server_first = read_message(app, rig)[9:].decode()
    scram.set_server_first(server_first)
    assert server_first.startswith("r=" + first.split(",r=")[1]) and ",s=" in server_first
    answer = msg(b"p", scram.get_client_final().encode()) + query("select 1")
    for i in range(0, len(answer), chunk):
        app.sendall(answer[i : i + chunk])
        rig.engine.poll()
    rig.pump(lambda: bool(owner.scram_logins))
    info, outcome, final, rest = owner.scram_logins[0]
    assert (info, outcome) == ("info", 1)
    assert final[:9] == b"R" + struct.pack("!II", len(final) - 1, 12)
    scram.set_server_final(final[9:].decode())  # (raises when the signature is not the server's)
    assert isinstance(rest, bytes)
    rig.pump(lambda: len(rest + b"".join(owner.data)) >= len(query("select 1")))
    assert rest + b"".join(owner.data) == query("select 1")
    assert client.login == 0 and owner.scram_logins[1:] == [] and owner.logins == []
    # a second client gets another nonce
    _owner2, _client2, app2 = scram_logging_in(rig)
    assert scram_to_final(rig, app2)[2] != server_first


def test_a_wrong_scram_proof_is_refused_in_the_engine(rig: Rig) -> None:
    owner, _client, app = scram_logging_in(rig)
    scram, _, _ = scram_to_final(rig, app, password="not-the-password")
    app.sendall(msg(b"p", scram.get_client_final().encode()))
    rig.pump(lambda: bool(owner.scram_logins))
    assert owner.scram_logins == [("info", 0, b"", None)]


@pytest.mark.parametrize(
    "first",
    [
        sasl_initial("p=tls-server-end-point,,n=,r=abc"),  # channel binding
        sasl_initial("n,a=app_a,n=,r=abc"),  # an authzid
        sasl_initial("n,,n=,r=abc,x=extension"),
        sasl_initial("n,,n=,r=abc", mechanism=b"SCRAM-SHA-256-PLUS"),
        msg(b"p", b"SCRAM-SHA-256\0" + struct.pack("!I", 5) + b"n,,n=,r=abc"),  # lengths differ
        msg(b"Q", b"select 1\0"),
        b"p" + struct.pack("!I", 1_000_000),  # oversized
    ],
)
def test_a_client_first_in_another_shape_goes_to_python_whole(rig: Rig, first: bytes) -> None:
    """Python's ScramServer takes the exchange on from the message (its errors, its answers)."""
    owner, client, app = scram_logging_in(rig)
    app.sendall(startup())
    assert read_message(app, rig) == SASL_REQUEST
    app.sendall(first)
    rig.pump(lambda: bool(owner.scram_logins))
    assert owner.scram_logins == [("info", 2, first, None)]
    assert client.login == 0


@pytest.mark.parametrize(
    "change",
    [
        lambda final: final.replace(",p=", ",x=extension,p="),
        lambda final: final.replace("c=biws", "c=eSws"),  # another gs2 header
        lambda final: final.replace(",r=", ",r=x"),  # another nonce
        lambda final: final[:-1],  # a proof cut short
        lambda final: final.replace("=", "", 1) if final.endswith("=") else final + "!",
    ],
)
def test_a_client_final_in_another_shape_goes_to_python_with_the_exchange(
    rig: Rig, change: Callable[[str], str]
) -> None:
    owner, _client, app = scram_logging_in(rig)
    scram, first, server_first = scram_to_final(rig, app)
    final = msg(b"p", change(scram.get_client_final()).encode())
    app.sendall(final)
    rig.pump(lambda: bool(owner.scram_logins))
    [(info, outcome, data, extra)] = owner.scram_logins
    assert (info, outcome, data) == ("info", 3, final)
    assert extra == (
        first[3:].encode(),
        b"n,,",
        server_first.split(",")[0][2:].encode(),
        server_first.encode(),
    )


def test_a_slow_reader_throttles_the_sender_and_nothing_is_lost(rig: Rig) -> None:
    _owner, client, app = rig.client()
    client.pair(rig.server)
    rig.db.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 64 * 1024)
    chunk = msg(b"d", os.urandom(60_000))
    total = chunk * 80  # 4.8 MB while the database end reads nothing
    app.setblocking(False)
    sent = 0
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline and sent < len(total):
        with contextlib.suppress(BlockingIOError):
            sent += app.send(total[sent : sent + 65536])
        rig.engine.poll()
    assert sent < len(total), "the engine read everything although nobody took it"
    # what the engine buffers stays near the high-water mark (plus one read)
    assert rig.server.get_write_buffer_size() <= HIGH_WATER + 256 * 1024
    received = bytearray()
    rig.db.setblocking(False)
    deadline = time.monotonic() + 20
    while len(received) < len(total):
        assert time.monotonic() < deadline
        if sent < len(total):
            with contextlib.suppress(BlockingIOError):
                sent += app.send(total[sent : sent + 65536])
        rig.engine.poll()
        with contextlib.suppress(BlockingIOError):
            received += rig.db.recv(1 << 20)
    assert bytes(received) == total


def test_pool_core_hands_out_and_takes_back_without_python(rig: Rig) -> None:
    active: set[object] = set()
    core = PoolCore(active)
    core.pool_size = 1
    core.wait_timeout = 30
    state = ("public", ("UTF8",))
    rig.idle_server(core, state)
    first, first_link, first_app = rig.client()
    second, second_link, second_app = rig.client()
    for link in (first_link, second_link):
        link.core = core
        link.state = state
    first_app.sendall(query("select 1"))
    assert recv_exactly(rig.db, len(query("select 1")), rig) == query("select 1")
    assert first_link.peer is rig.server and active == {rig.server_owner}
    second_app.sendall(query("select 2"))
    rig.pump(lambda: second_link.waiting == 1)
    assert second_link.pending == len(query("select 2")) and second_link.peer is None
    rig.db.sendall(msg(b"C", b"SELECT 1\0") + READY_IDLE)
    # the connection goes straight to the waiting client, which sends what it held
    assert recv_exactly(rig.db, len(query("select 2")), rig) == query("select 2")
    assert second_link.peer is rig.server and first_link.peer is None
    assert core.wait_count == 1 and core.xact_count == 1
    rig.db.sendall(msg(b"C", b"SELECT 1\0") + READY_IDLE)
    rig.pump(lambda: core.idle_count == 1)
    assert active == set() and core.xact_count == 2
    assert first.messages == second.messages == []
    assert first.ready == second.ready == []  # no Python on the way


def test_a_terminate_between_transactions_closes_without_python(rig: Rig) -> None:
    """No server connection is taken for it, and Python hears only connection_lost."""
    core = PoolCore(set())
    core.pool_size = 1
    rig.idle_server(core, ("public", ()))
    owner, client, app = rig.client()
    client.core = core
    client.state = ("public", ())
    app.sendall(msg(b"X"))
    rig.pump(lambda: bool(owner.lost))
    assert owner.lost == [None] and client.closed
    assert owner.data == [] and owner.terminated == 0
    assert client.peer is None and core.idle_count == 1


def test_links_closed_in_a_poll_are_told_at_its_end_and_others_through_the_loop(
    rig: Rig,
) -> None:
    """A link that closes while Engine.poll runs hears connection_lost when the poll ends (no
    handle on the loop per closed connection), after every event of the batch; one closed
    from Python outside a poll hears it through call_soon, never from inside close()."""
    first, first_link, first_app = rig.client()
    second, second_link, second_app = rig.client()
    third, third_link, _ = rig.client()

    class Closing(Owner):  # closes another link from its connection_lost
        def connection_lost(self, exc: object) -> None:
            super().connection_lost(exc)
            third_link.close()

    closing = Closing()
    closing_link, closing_app = rig.link(closing, server=False)
    first_app.close()
    second_app.close()
    closing_app.close()
    deadline = time.monotonic() + 5
    while not (first.lost and second.lost and closing.lost):
        assert time.monotonic() < deadline, "the engine did not see the clients go"
        rig.engine.poll()
        # told by the poll itself, not scheduled on the loop
        assert rig.scheduled == []
    assert first.lost == second.lost == closing.lost == [None]
    assert first_link.closed and second_link.closed and closing_link.closed
    # the link closed by a connection_lost call is told within the same poll too
    assert third.lost == [None] and third_link.closed

    fourth, fourth_link, _ = rig.client()
    fourth_link.close()  # from Python, outside a poll: later, through the loop
    assert fourth.lost == [] and len(rig.scheduled) == 1
    rig.pump(lambda: bool(fourth.lost))
    assert fourth.lost == [None]


def test_pool_core_leaves_a_different_search_path_to_python(rig: Rig) -> None:
    core = PoolCore(set())
    core.pool_size = 1
    rig.idle_server(core, ("tenant_a", ()))
    owner, link, app = rig.client()
    link.core = core
    link.state = ("tenant_b", ())
    app.sendall(query("select 1"))
    rig.pump(lambda: bool(owner.data))
    assert link.peer is None and core.idle_count == 1  # Python sets search_path first


def test_a_statement_left_uncertain_is_closed_and_prepared_again_unseen(rig: Rig) -> None:
    """A Close the server skipped (after an error) leaves the statement uncertain on that
    connection: the next client to bind it gets a Close and a Parse sent first, whose answers
    the client never sees."""
    from outpost.pooler import protocol as p
    from outpost.pooler.pool import Pool, PoolSettings, ServerConnection
    from outpost.pooler.routes import Destination
    from outpost.pooler.server import ClientSession

    pool = Pool(Destination("127.0.0.1", 5432, "db", "u"), PoolSettings())
    conn = ServerConnection(pool)
    name, rest = b"_outpost_0", b"select 1\0\0\0"
    conn.uncertain.add(name)
    out = ClientSession._ensure(None, conn, name, rest)  # type: ignore[arg-type]  # uses no self
    assert out == p.close_statement(name) + p.parse_message(name, rest)
    assert conn.link.pending_answers == 2
    assert name in conn.prepared and not conn.uncertain
    # the server's answers to both are hidden; what follows reaches the client
    ours, db = socket.socketpair()
    rig.sockets += [ours, db]
    ours.setblocking(False)
    conn.link.adopt(rig.engine, os.dup(ours.fileno()), {})
    _owner, client, app = rig.client()
    client.pair(conn.link)
    complete = msg(b"C", b"SELECT 1\0")
    db.sendall(msg(b"3") + msg(b"1") + complete)
    assert recv_exactly(app, len(complete), rig) == complete
    assert conn.link.pending_answers == 0


class Accepting:
    """An engine listening on a TCP socket (Engine.listen): the clients it accepts have no
    Python session until ``materialize`` (recorded here) gives them an Owner."""

    def __init__(self, rig: Rig, *, host: str = "127.0.0.1", local: bool = True) -> None:
        self.rig = rig
        self.made: list[Link] = []
        self.owners: list[Owner] = []
        self.clients: set[object] = set()
        self.pids: dict[int, object] = {}
        self.errors: list[tuple[int, OSError]] = []
        engine = rig.engine
        engine.materialize = self._materialize
        engine.accept_error = lambda fd, exc: self.errors.append((fd, exc))
        engine.clients = self.clients
        engine.client_pids = self.pids
        engine.pid_base = 3 << 24
        self.listener = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET)
        self.listener.bind((host, 0))
        self.listener.listen(64)
        self.listener.setblocking(False)
        self.address = self.listener.getsockname()[:2]
        rig.sockets.append(self.listener)
        engine.listen(self.listener.fileno(), self.address if local else None)

    def _materialize(self, link: Link) -> None:
        owner = Owner()
        owner.link = link
        link.owner = owner
        self.made.append(link)
        self.owners.append(owner)
        self.clients.add(owner)

    def connect(self, *, source: str | None = None) -> socket.socket:
        app = socket.socket(self.listener.family)
        if source is not None:
            app.bind((source, 0))
        app.settimeout(5)
        app.connect(self.address)
        self.rig.sockets.append(app)
        return app

    def accepted(self, count: int) -> list[Link]:
        """The links of the first COUNT connections accepted (from the engine's own table)."""
        links: list[Link] = []

        def enough() -> bool:
            links[:] = [
                link
                for link in self.rig.engine_links()
                if link.peer_address is not None and link not in (self.rig.server,)
            ]
            return len(links) >= count

        self.rig.pump(enough)
        return links


def fd_of_peer(sockname: tuple[str, int]) -> int:
    """The fd of this process's socket whose peer is SOCKNAME (the end the engine accepted)."""
    for name in os.listdir("/proc/self/fd"):
        fd = int(name)
        with contextlib.suppress(OSError), socket.socket(fileno=os.dup(fd)) as sock:
            if sock.getpeername()[:2] == sockname[:2]:
                return fd
    raise AssertionError(f"no socket connected to {sockname}")


@pytest.mark.parametrize("host", ["127.0.0.1", "::1"])
@pytest.mark.parametrize("local", [True, False])
def test_the_engine_accepts_connections_ready_to_use(rig: Rig, host: str, local: bool) -> None:
    """With no login remembered, each connection the engine accepts gets its Python session at
    once (as before the engine accepted): the socket non-blocking, with TCP_NODELAY and
    close-on-exec, the peer's address, the pooler's end (the listener's, or asked for a
    wildcard listener), the time it came; its first packet reaches the session."""
    import fcntl

    try:
        accepting = Accepting(rig, host=host, local=local)
    except OSError as exc:
        pytest.skip(f"no {host} here: {exc}")
    before = time.time()
    apps = [accepting.connect() for _ in range(2)]
    apps[0].sendall(startup())
    rig.pump(lambda: len(accepting.made) == 2 and bool(accepting.owners[0].data))
    assert rig.engine.unowned == 0
    by_peer = {link.peer_address: link for link in accepting.made}
    for app in apps:
        peer = app.getsockname()[:2]
        link = by_peer[peer]
        assert link.local_address == accepting.address
        assert before - 1 <= link.connect_time <= time.time() + 1
        assert link.info is None and link.backend_key is None and not link.unowned
        fd = fd_of_peer(peer)
        assert os.get_blocking(fd) is False
        assert fcntl.fcntl(fd, fcntl.F_GETFD) & fcntl.FD_CLOEXEC
        with socket.socket(fileno=os.dup(fd)) as sock:
            assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) == 1
    # one (host, port) for all, as the listener's or the last one asked (idle memory)
    assert accepting.made[0].local_address is accepting.made[1].local_address
    first = by_peer[apps[0].getsockname()[:2]].owner
    assert first.data == [startup()]
    assert rig.engine.unlisten(accepting.listener.fileno()) is True
    assert rig.engine.unlisten(accepting.listener.fileno()) is False


def test_the_engine_names_each_peer_host_right_past_its_cache(rig: Rig) -> None:
    """The peer's host comes as one interned str per address (the last few are kept): clients
    from more source addresses than it keeps, each twice, each get their own host's text."""
    import sys

    accepting = Accepting(rig)
    sources = [f"127.0.0.{n}" for n in range(2, 14)] * 2  # 12 hosts, more than are kept
    for i, source in enumerate(sources):
        try:
            app = accepting.connect(source=source)
        except OSError as exc:
            pytest.skip(f"cannot connect from {source}: {exc}")
        want = i + 1
        rig.pump(lambda: len(accepting.made) == want)  # noqa: B023 - used at once
        host, port = accepting.made[-1].peer_address or ("", 0)
        assert (host, port) == app.getsockname()[:2]
        assert sys.intern(host) is host
        app.close()


AUTH_OK = b"R\0\0\0\x08\0\0\0\0"


def engine_login(accepting: Accepting) -> PoolCore:
    """Remember STARTUP's md5 login with what the engine greets with, and a pool whose one
    server connection is idle."""
    from outpost.pooler.pool import Greeting

    rig = accepting.rig
    core = PoolCore(set())
    core.pool_size = 1
    state = ("public", ("UTF8",))
    rig.idle_server(core, state)
    info = ("route", "pool", "startup", Greeting({}, {}, state, AUTH_OK), core)
    rig.engine.logins[STARTUP] = (MD5_SECRET, time.monotonic() + 60, info)
    return core


def log_in(accepting: Accepting) -> tuple[socket.socket, int, int]:
    """A client that logs in with the remembered packet; its BackendKeyData."""
    app = accepting.connect()
    app.sendall(startup())
    salt = md5_request(app, accepting.rig)
    app.sendall(msg(b"p", md5_answer(salt)))
    greeting = recv_exactly(app, 9 + 13 + 6, accepting.rig)
    assert greeting[:9] == AUTH_OK  # (the greeting kept with the login)
    assert greeting[9:14] == b"K\0\0\0\x0c" and greeting[22:] == READY_IDLE
    pid, key = struct.unpack("!ii", greeting[14:22])
    return app, pid, key


def test_a_remembered_login_and_its_transactions_run_without_python(rig: Rig) -> None:
    """A client whose startup packet Python remembered is accepted, logged in (md5), greeted
    with a backend key of the engine's own, served a transaction from the pool's idle server
    connection and closed by its Terminate, all without a Python session or callback."""
    accepting = Accepting(rig)
    core = engine_login(accepting)
    app, pid, key = log_in(accepting)
    assert pid >> 24 == 3 and pid & 0x800000  # the worker's, in the engine's half
    assert rig.engine.unowned == 1 and accepting.made == []
    [link] = accepting.accepted(1)
    assert link.unowned and link.owner is None and link.backend_key == (pid, key)
    assert link.info[0] == "route" and link.core is core
    app.sendall(query("select 1"))
    assert recv_exactly(rig.db, len(query("select 1")), rig) == query("select 1")
    answer = msg(b"C", b"SELECT 1\0") + READY_IDLE
    rig.db.sendall(answer)
    assert recv_exactly(app, len(answer), rig) == answer
    rig.pump(lambda: core.idle_count == 1)
    assert core.xact_count == 1
    app.sendall(msg(b"X"))
    rig.pump(lambda: link.closed)
    assert rig.engine.unowned == 0 and accepting.made == []
    assert rig.engine.session_of(pid) is None
    # a second one gets another pid
    _, pid2, _ = log_in(accepting)
    assert pid2 != pid


def test_a_client_run_alone_gets_its_session_when_python_is_needed(rig: Rig) -> None:
    """Materialized once, with what the engine sent, when: a message needs Python, a cancel
    request names its pid (session_of), a listing needs every client (materialize_all), a
    login takes too long (materialize_logins); the client vanishing mid-transaction gets its
    session so that Python can roll the server connection back."""
    accepting = Accepting(rig)
    engine_login(accepting)
    app, pid, key = log_in(accepting)
    app.sendall(query("set search_path = x"))  # (Python's: it names search_path)
    rig.pump(lambda: len(accepting.made) == 1 and bool(accepting.owners[0].messages))
    [link] = accepting.made
    owner = accepting.owners[0]
    assert owner.messages == [(ord("Q"), b"set search_path = x\0")]
    assert link.owner is owner and not link.unowned and link.backend_key == (pid, key)
    assert rig.engine.unowned == 0
    core = link.core
    assert core is not None and link.peer is rig.server  # (forwarded: the reply was None)
    assert recv_exactly(rig.db, len(query("set search_path = x")), rig) == query(
        "set search_path = x"
    )
    rig.db.sendall(msg(b"C", b"SET\0") + READY_IDLE)
    rig.pump(lambda: core.idle_count == 1)
    # by pid
    _, pid2, _ = log_in(accepting)
    assert rig.engine.unowned == 1
    assert rig.engine.session_of(pid2) is accepting.owners[-1] and len(accepting.made) == 2
    assert rig.engine.session_of(pid2) is None  # (Python's own map has it now)
    # all of them
    log_in(accepting)
    log_in(accepting)
    assert rig.engine.unowned == 2
    rig.engine.materialize_all()
    assert rig.engine.unowned == 0 and len(accepting.made) == 4
    # those logging in since before a time
    slow = accepting.connect()
    slow.sendall(startup())
    md5_request(slow, rig)  # and no answer
    assert rig.engine.unowned == 1
    rig.engine.materialize_logins(time.monotonic() - 60)
    assert rig.engine.unowned == 1  # not late yet
    rig.engine.materialize_logins(time.monotonic())
    assert rig.engine.unowned == 0 and accepting.made[-1].info is None
    # mid-transaction and gone
    quick, _, _ = log_in(accepting)
    [busy] = [link for link in accepting.accepted(6) if link.unowned]
    quick.sendall(query("select 1"))
    assert recv_exactly(rig.db, len(query("select 1")), rig) == query("select 1")
    assert busy.peer is rig.server and busy.unowned
    quick.close()
    rig.pump(lambda: busy.closed)
    assert busy.owner is accepting.owners[-1] and rig.engine.unowned == 0
    rig.pump(lambda: bool(accepting.owners[-1].lost))


def test_a_wrong_password_or_a_full_pooler_is_left_to_python(rig: Rig) -> None:
    """A wrong md5 answer: the session is made and hears the outcome (Python says why). Past
    max_clients a connection gets its session at once, and Python refuses it."""
    accepting = Accepting(rig)
    engine_login(accepting)
    app = accepting.connect()
    app.sendall(startup())
    md5_request(app, rig)
    app.sendall(msg(b"p", md5_answer(b"salt")))
    rig.pump(lambda: bool(accepting.owners) and bool(accepting.owners[0].logins))
    _, kind, outcome, _ = accepting.owners[0].logins[0]
    assert (kind, outcome) == (ord("p"), 0)
    rig.engine.max_clients = 1  # (the session above counts)
    full = accepting.connect()
    full.sendall(startup())
    rig.pump(lambda: len(accepting.made) == 2 and bool(accepting.owners[1].data))
    assert accepting.owners[1].data == [startup()] and accepting.made[1].login == 0


def test_an_accept_failure_drops_the_listener_and_tells_python(rig: Rig) -> None:
    """Out of file descriptors (a real EMFILE, from a lowered RLIMIT_NOFILE): the listener is
    dropped and Python hears it once, with the OSError; listened on again, the connection
    that waited is accepted."""
    import errno
    import resource

    accepting = Accepting(rig)
    app = accepting.connect()
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    lowest_free = os.dup(0)
    os.close(lowest_free)
    resource.setrlimit(resource.RLIMIT_NOFILE, (lowest_free, hard))
    try:
        rig.pump(lambda: bool(accepting.errors))
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
    [(fd, exc)] = accepting.errors
    assert fd == accepting.listener.fileno() and exc.errno == errno.EMFILE
    assert accepting.made == []
    assert rig.engine.unlisten(fd) is False  # dropped
    rig.engine.listen(fd, accepting.address)
    rig.pump(lambda: len(accepting.made) == 1)
    assert accepting.made[0].peer_address == app.getsockname()[:2]
