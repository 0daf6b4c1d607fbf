"""PostgreSQL wire protocol 3.0: framing, the startup packet, and the few messages the pooler
builds or reads. Everything else is forwarded as bytes, framed by its 5-byte header.

A regular message is ``type (1 byte) | length (int32, counts itself) | body``; the startup
packet, SSLRequest, GSSENCRequest and CancelRequest have no type byte.
"""

from __future__ import annotations

import asyncio
import ssl
import struct
import sys
from dataclasses import dataclass, field
from typing import cast

PROTOCOL_V3 = 196608  # 3.0
SSL_REQUEST = 80877103
GSSENC_REQUEST = 80877104
CANCEL_REQUEST = 80877102

#: PostgreSQL's own limit for the startup packet (MAX_STARTUP_PACKET_LENGTH).
MAX_STARTUP_LENGTH = 10000
#: The largest regular message accepted from a client (PostgreSQL allows 1 GiB - 1).
MAX_MESSAGE_LENGTH = 0x3FFFFFFF

HEADER = struct.Struct("!BI")
INT32 = struct.Struct("!i")
UINT32 = struct.Struct("!I")
INT16 = struct.Struct("!h")

# Frontend message types (as ints: the first byte of a frame)
F_BIND = ord("B")
F_CLOSE = ord("C")
F_COPY_DATA = ord("d")
F_COPY_DONE = ord("c")
F_COPY_FAIL = ord("f")
F_DESCRIBE = ord("D")
F_EXECUTE = ord("E")
F_FLUSH = ord("H")
F_FUNCTION_CALL = ord("F")
F_PARSE = ord("P")
F_PASSWORD = ord("p")  # also SASLInitialResponse / SASLResponse
F_QUERY = ord("Q")
F_SYNC = ord("S")
F_TERMINATE = ord("X")

# Backend message types
B_AUTH = ord("R")
B_BACKEND_KEY = ord("K")
B_BIND_COMPLETE = ord("2")
B_CLOSE_COMPLETE = ord("3")
B_COMMAND_COMPLETE = ord("C")
B_COPY_IN = ord("G")
B_COPY_OUT = ord("H")
B_COPY_BOTH = ord("W")
B_DATA_ROW = ord("D")
B_ERROR = ord("E")
B_NOTICE = ord("N")
B_NOTIFICATION = ord("A")
B_PARAMETER_STATUS = ord("S")
B_PARSE_COMPLETE = ord("1")
B_READY = ord("Z")
B_ROW_DESCRIPTION = ord("T")

AUTH_OK = 0
AUTH_CLEARTEXT = 3
AUTH_MD5 = 5
AUTH_SASL = 10
AUTH_SASL_CONTINUE = 11
AUTH_SASL_FINAL = 12

# SQLSTATEs the pooler itself reports
PROTOCOL_VIOLATION = "08P01"
CONNECTION_FAILURE = "08006"
CANNOT_CONNECT = "08001"
INVALID_PASSWORD = "28P01"  # noqa: S105 - a SQLSTATE
INVALID_AUTHORIZATION = "28000"
INVALID_CATALOG = "3D000"
TOO_MANY_CONNECTIONS = "53300"
FEATURE_NOT_SUPPORTED = "0A000"
ADMIN_SHUTDOWN = "57P01"
QUERY_CANCELED = "57014"
SYNTAX_ERROR = "42601"
INTERNAL_ERROR = "XX000"


class ProtocolViolation(Exception):
    """The peer broke the protocol (bad length, bad packet); the message names what."""

    sqlstate = PROTOCOL_VIOLATION


@dataclass(frozen=True)
class SSLRequest:
    pass


@dataclass(frozen=True)
class GSSENCRequest:
    pass


@dataclass(frozen=True)
class CancelRequest:
    pid: int
    key: int


@dataclass(frozen=True)
class StartupMessage:
    version: int
    params: dict[str, str] = field(default_factory=dict)


Startup = SSLRequest | GSSENCRequest | CancelRequest | StartupMessage


def parse_startup_length(header: bytes) -> int:
    """The length of a startup packet from its first four bytes (validated)."""
    length: int = INT32.unpack(header)[0]
    if length < 8 or length > MAX_STARTUP_LENGTH:
        raise ProtocolViolation(
            f"invalid startup packet length {length} (must be 8..{MAX_STARTUP_LENGTH} bytes)"
        )
    return length


def parse_startup(body: bytes) -> Startup:
    """Parse a startup-phase packet given without its 4-byte length prefix."""
    if len(body) < 4:
        raise ProtocolViolation("the startup packet is too short")
    (code,) = INT32.unpack_from(body)
    if code == SSL_REQUEST and len(body) == 4:
        return SSLRequest()
    if code == GSSENC_REQUEST and len(body) == 4:
        return GSSENCRequest()
    if code == CANCEL_REQUEST:
        if len(body) != 12:
            raise ProtocolViolation("the cancel request has the wrong length")
        pid, key = struct.unpack_from("!ii", body, 4)
        return CancelRequest(pid, key)
    major = code >> 16
    if major != 3:
        raise ProtocolViolation(
            f"unsupported frontend protocol {major}.{code & 0xFFFF}: only 3.x is supported"
        )
    raw = body[4:]
    if not raw.endswith(b"\0"):
        raise ProtocolViolation("the startup packet's parameter list is not terminated")
    parts = raw[:-1].split(b"\0")
    if parts and parts[-1] == b"":
        parts.pop()
    if len(parts) % 2:
        raise ProtocolViolation("the startup packet has a parameter without a value")
    params: dict[str, str] = {}
    try:
        for i in range(0, len(parts), 2):
            name = parts[i].decode()
            if not name:
                raise ProtocolViolation("the startup packet has an empty parameter name")
            params[name] = parts[i + 1].decode()
    except UnicodeDecodeError:
        raise ProtocolViolation("the startup packet is not valid UTF-8") from None
    if "user" not in params or not params["user"]:
        raise ProtocolViolation("no PostgreSQL user name specified in the startup packet")
    return StartupMessage(code, params)


def schema_from_params(params: dict[str, str]) -> str | None:
    """The tenant schema: ``schema_search_path`` (Perseus clients), ``-c search_path=`` in
    ``options``, or a ``search_path`` startup parameter (asyncpg's server_settings); the first
    entry of a list; None when none is given."""
    value = params.get("schema_search_path")
    if value is None:
        value = search_path_from_options(params.get("options", ""))
    if value is None:
        value = params.get("search_path")
    if value is None:
        return None
    first = value.split(",", 1)[0].strip()
    if first.startswith('"') and first.endswith('"') and len(first) >= 2:
        first = first[1:-1].replace('""', '"')
    return first or None


def settings_from_options(options: str) -> dict[str, str]:
    """The ``-c name=value`` settings (also ``-cname=value``, ``--name=value``) in libpq's
    ``options``, by lower-case name with ``-`` as ``_`` as PostgreSQL reads them; backslash
    escapes a space as PostgreSQL does; a later one wins."""
    words: list[str] = []
    current: list[str] = []
    escaped = False
    for ch in options:
        if escaped:
            current.append(ch)
            escaped = False
        elif ch == "\\":
            escaped = True
        elif ch.isspace():
            if current:
                words.append("".join(current))
                current = []
        else:
            current.append(ch)
    if current:
        words.append("".join(current))
    found: dict[str, str] = {}
    i = 0
    while i < len(words):
        word = words[i]
        setting: str | None = None
        if word == "-c" and i + 1 < len(words):
            setting = words[i + 1]
            i += 1
        elif word.startswith(("-c", "--")):
            setting = word[2:]
        if setting is not None:
            name, sep, value = setting.partition("=")
            if sep:
                found[name.replace("-", "_").lower()] = value
        i += 1
    return found


def search_path_from_options(options: str) -> str | None:
    """``search_path`` from libpq's ``options`` (``-csearch_path=x`` / ``-c search_path=x``,
    ``--search_path=x``); backslash escapes a space as PostgreSQL does."""
    return settings_from_options(options).get("search_path")


# --- builders ------------------------------------------------------------------------------


def message(kind: int, body: bytes = b"") -> bytes:
    return HEADER.pack(kind, len(body) + 4) + body


def cstring(text: str) -> bytes:
    return text.encode() + b"\0"


def startup_packet(params: dict[str, str], version: int = PROTOCOL_V3) -> bytes:
    body = INT32.pack(version) + b"".join(cstring(k) + cstring(v) for k, v in params.items())
    body += b"\0"
    return INT32.pack(len(body) + 4) + body


def ssl_request() -> bytes:
    return struct.pack("!ii", 8, SSL_REQUEST)


def cancel_request(pid: int, key: int) -> bytes:
    return struct.pack("!iiii", 16, CANCEL_REQUEST, pid, key)


_AUTH_HEADER = struct.Struct("!BIi")  # 'R', length, code


def auth_request(code: int, extra: bytes = b"") -> bytes:
    return _AUTH_HEADER.pack(B_AUTH, len(extra) + 8, code) + extra


AUTH_OK_MESSAGE = auth_request(AUTH_OK)


def parameter_status(name: str, value: str) -> bytes:
    return message(B_PARAMETER_STATUS, cstring(name) + cstring(value))


_BACKEND_KEY_DATA = struct.Struct("!BIii")  # 'K', 12, pid, key


def backend_key_data(pid: int, key: int) -> bytes:
    return _BACKEND_KEY_DATA.pack(B_BACKEND_KEY, 12, pid, key)


READY_IDLE = message(B_READY, b"I")
READY_IN_TRANSACTION = message(B_READY, b"T")
READY_FAILED = message(B_READY, b"E")
PARSE_COMPLETE = message(B_PARSE_COMPLETE)
CLOSE_COMPLETE = message(B_CLOSE_COMPLETE)
TERMINATE = message(F_TERMINATE)
SYNC = message(F_SYNC)


def ready_for_query(status: bytes) -> bytes:
    return message(B_READY, status)


def _fields(severity: str, code: str, text: str, detail: str | None, hint: str | None) -> bytes:
    body = (
        b"S" + cstring(severity) + b"V" + cstring(severity) + b"C" + cstring(code) + b"M"
    ) + cstring(text)
    if detail:
        body += b"D" + cstring(detail)
    if hint:
        body += b"H" + cstring(hint)
    return body + b"\0"


def error_response(
    code: str,
    text: str,
    *,
    severity: str = "ERROR",
    detail: str | None = None,
    hint: str | None = None,
) -> bytes:
    return message(B_ERROR, _fields(severity, code, text, detail, hint))


def notice_response(text: str, *, code: str = "00000", severity: str = "NOTICE") -> bytes:
    return message(B_NOTICE, _fields(severity, code, text, None, None))


def query(sql: str) -> bytes:
    return message(F_QUERY, cstring(sql))


def password_message(payload: bytes) -> bytes:
    return message(F_PASSWORD, payload)


def sasl_initial_response(mechanism: str, data: bytes) -> bytes:
    return message(F_PASSWORD, cstring(mechanism) + INT32.pack(len(data)) + data)


def parse_message(name: bytes, rest: bytes) -> bytes:
    """A Parse message for statement NAME; REST is the body after the name (query, types)."""
    return message(F_PARSE, name + b"\0" + rest)


def close_statement(name: bytes) -> bytes:
    return message(F_CLOSE, b"S" + name + b"\0")


# Column type OIDs for result sets the pooler builds (admin console)
TEXT_OID = 25
INT8_OID = 20
NUMERIC_OID = 1700


def row_description(columns: list[tuple[str, int]]) -> bytes:
    body = INT16.pack(len(columns))
    for name, oid in columns:
        body += cstring(name) + struct.pack("!ihihih", 0, 0, oid, -1, -1, 0)
    return message(B_ROW_DESCRIPTION, body)


def data_row(values: list[str | None]) -> bytes:
    body = INT16.pack(len(values))
    for value in values:
        if value is None:
            body += INT32.pack(-1)
        else:
            raw = value.encode()
            body += INT32.pack(len(raw)) + raw
    return message(B_DATA_ROW, body)


def command_complete(tag: str) -> bytes:
    return message(B_COMMAND_COMPLETE, cstring(tag))


def empty_query_response() -> bytes:
    return message(ord("I"))


# --- readers -------------------------------------------------------------------------------


def split_cstring(body: bytes | memoryview, start: int = 0) -> tuple[bytes, int]:
    """The NUL-terminated string at START and the offset after its NUL."""
    data = bytes(body) if isinstance(body, memoryview) else body
    end = data.find(b"\0", start)
    if end < 0:
        raise ProtocolViolation("a string in a message is not NUL-terminated")
    return data[start:end], end + 1


def error_fields(body: bytes) -> dict[str, str]:
    """The fields of an ErrorResponse/NoticeResponse body by their one-letter codes."""
    out: dict[str, str] = {}
    pos = 0
    while pos < len(body) and body[pos] != 0:
        code = chr(body[pos])
        end = body.find(b"\0", pos + 1)
        if end < 0:
            break
        out[code] = body[pos + 1 : end].decode(errors="replace")
        pos = end + 1
    return out


def parameter_from_body(body: bytes) -> tuple[str, str]:
    name, pos = split_cstring(body)
    value, _ = split_cstring(body, pos)
    return name.decode(errors="replace"), value.decode(errors="replace")


def quote_ident(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


def quote_literal(value: str) -> str:
    return "'" + value.replace("'", "''") + "'"


def iter_frames(
    data: bytes, max_length: int = MAX_MESSAGE_LENGTH
) -> tuple[list[tuple[int, bytes]], int]:
    """Complete frames in DATA as (type, body) and the number of bytes they use.

    Raises ProtocolViolation for a length below 4 or above MAX_LENGTH (the fuzz test's seam).
    """
    frames: list[tuple[int, bytes]] = []
    pos = 0
    n = len(data)
    while pos + 5 <= n:
        kind, length = HEADER.unpack_from(data, pos)
        if length < 4 or length > max_length:
            raise ProtocolViolation(
                f"invalid message length {length} for message type {chr(kind)!r}"
            )
        end = pos + 1 + length
        if end > n:
            break
        frames.append((kind, data[pos + 5 : end]))
        pos = end
    return frames, pos


# --- reading whole packets (startup, login, the pooler's own queries) ----------------------


class ConnectionClosed(Exception):
    """The peer closed the connection (or it broke) while a packet was awaited."""


class FramedProtocol(asyncio.Protocol):
    __slots__ = (
        "_buf",
        "_closed",
        "_waiter",
        "peer",
        "tls",
        "transport",
    )

    transport: asyncio.Transport

    def __init__(self) -> None:
        self._buf = bytearray()
        self._waiter: asyncio.Future[None] | None = None
        self._closed = False
        self.peer: tuple[str, int] = ("", 0)
        self.tls = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)
        peer = transport.get_extra_info("peername")
        if isinstance(peer, tuple) and len(peer) >= 2:
            self.peer = (sys.intern(str(peer[0])), int(peer[1]))
        else:
            self.peer = ("unix", 0)

    def buffer_data(self, data: bytes) -> None:
        self._buf += data
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def connection_lost(self, exc: Exception | None) -> None:
        self._closed = True
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    async def _more(self) -> None:
        if self._closed:
            raise ConnectionClosed("the connection was closed")
        self._waiter = asyncio.get_running_loop().create_future()
        try:
            await self._waiter
        finally:
            self._waiter = None
        if self._closed and not self._buf:
            raise ConnectionClosed("the connection was closed")

    async def read_exactly(self, n: int) -> bytes:
        while len(self._buf) < n:
            await self._more()
        out = bytes(self._buf[:n])
        del self._buf[:n]
        return out

    def take_startup(self) -> bytes | None:
        """The next startup-phase packet without its length prefix when it is all here, else
        None (nothing taken). Raises ProtocolViolation for a bad length."""
        buf = self._buf
        if len(buf) < 4:
            return None
        length = parse_startup_length(bytes(buf[:4]))
        if len(buf) < length:
            return None
        data = bytes(buf[4:length])
        del buf[:length]
        return data

    def take_message(self, max_length: int = MAX_MESSAGE_LENGTH) -> tuple[int, bytes] | None:
        """The next message as (type, body) when it is all here, else None (nothing taken).
        Raises ProtocolViolation for a length below 4 or above MAX_LENGTH."""
        buf = self._buf
        if len(buf) < 5:
            return None
        kind, length = HEADER.unpack_from(buf)
        if length < 4 or length > max_length:
            raise ProtocolViolation(
                f"invalid message length {length} for message type {chr(kind)!r}"
            )
        if len(buf) < length + 1:
            return None
        body = bytes(buf[5 : length + 1])
        del buf[: length + 1]
        return kind, body

    async def read_startup(self) -> bytes:
        """A startup-phase packet without its length prefix (validated length)."""
        while (packet := self.take_startup()) is None:
            await self._more()
        return packet

    async def read_message(self, max_length: int = MAX_MESSAGE_LENGTH) -> tuple[int, bytes]:
        while (message := self.take_message(max_length)) is None:
            await self._more()
        return message

    def take_buffer(self) -> bytes:
        data = bytes(self._buf)
        self._buf.clear()
        return data

    async def start_tls(
        self, context: ssl.SSLContext, *, server_side: bool, server_hostname: str | None = None
    ) -> None:
        if self._buf:
            raise ProtocolViolation("unexpected data before the TLS handshake")
        loop = asyncio.get_running_loop()
        new = await loop.start_tls(
            self.transport,
            self,
            context,
            server_side=server_side,
            server_hostname=server_hostname,
        )
        if new is None:  # pragma: no cover - only when the loop closes
            raise ConnectionClosed("the connection was closed during the TLS handshake")
        self.transport = new
        self.tls = True
