"""Passwords on both sides of the pooler.

Clients log in to the pooler with SCRAM-SHA-256 (default), md5, or a cleartext password, checked
against the route's ``ClientSecret``; the pooler logs in to PostgreSQL as a client with whatever
the server asks for (SCRAM-SHA-256, md5, cleartext, or nothing for trust).
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import hashlib
import hmac
import os
from typing import Literal

from scramp import (  # type: ignore[import-untyped, unused-ignore]
    ScramClient,
    ScramException,
    ScramMechanism,
)

from outpost.pooler import protocol as p
from outpost.pooler.passwords import (
    PasswordFormatError,
    parse_scram_verifier,
    verify_scrypt_async,
)
from outpost.pooler.routes import ClientSecret

ClientAuth = Literal["scram-sha-256", "md5", "plain"]
Method = Literal["scram-sha-256", "md5", "password"]

_SCRAM = ScramMechanism("SCRAM-SHA-256")
_b64encode = binascii.b2a_base64
_a2b_base64 = binascii.a2b_base64
_sha256 = hashlib.sha256
_compare = hmac.compare_digest
_int = int.from_bytes
#: Large enough for any real password or SASL message, small enough to stop abuse.
MAX_AUTH_MESSAGE = 8192
#: AuthenticationSASL offering SCRAM-SHA-256 (the same bytes for every login).
_SASL_REQUEST = p.auth_request(p.AUTH_SASL, p.cstring("SCRAM-SHA-256") + b"\0")
_SCRAM_MECHANISM = p.cstring("SCRAM-SHA-256")


class _Mac:
    """HMAC-SHA-256 under one key, set up once (the standard library's HMAC, copied per message);
    ``digest(msg)`` equals ``hmac.digest(key, msg, "sha256")``."""

    __slots__ = ("_mac",)

    def __init__(self, key: bytes) -> None:
        self._mac = hmac.new(key, digestmod="sha256")

    def digest(self, msg: bytes) -> bytes:
        mac = self._mac.copy()
        mac.update(msg)
        return mac.digest()


class _ScramKeys:
    """A parsed SCRAM verifier and what every login with it reuses."""

    __slots__ = (
        "client_mac",
        "engine_secret",
        "iterations",
        "salt",
        "server_first_tail",
        "server_mac",
        "stored_key",
    )

    def __init__(self, verifier: str) -> None:
        salt, stored_key, server_key, iterations = parse_scram_verifier(verifier)
        self.salt = salt
        self.stored_key = stored_key
        self.iterations = iterations
        #: server-first after the nonce: ``,s=<salt>,i=<iterations>``
        self.server_first_tail = f",s={_b64encode(salt, newline=False).decode()},i={iterations}"
        self.client_mac = _Mac(stored_key)  # ClientSignature = HMAC(StoredKey, AuthMessage)
        self.server_mac = _Mac(server_key)  # ServerSignature = HMAC(ServerKey, AuthMessage)
        #: what the engine runs a SCRAM login with (Engine.logins; see _engine.c)
        self.engine_secret = (stored_key, server_key, self.server_first_tail.encode())


#: Parsed SCRAM verifiers (every login of a route uses the same one); cleared when it grows.
_verifiers: dict[str, _ScramKeys] = {}
_MAX_VERIFIERS = 10_000

#: Server nonces: base64 of 18 random bytes each, made 64 at a time (one getrandom call instead
#: of one per login); forgotten in a forked child, so that two processes never share one.
_NONCE_BYTES = 18
_NONCE_BATCH = 64
_nonces: list[str] = []


def _server_nonce() -> str:
    if not _nonces:
        raw = os.urandom(_NONCE_BYTES * _NONCE_BATCH)
        _nonces.extend(
            _b64encode(raw[i : i + _NONCE_BYTES], newline=False).decode()
            for i in range(0, len(raw), _NONCE_BYTES)
        )
    return _nonces.pop()


#: Four random bytes at a time (md5 salts, cancel keys), cut from one getrandom call of 1 KiB.
_RANDOM_BATCH = 256
_random4: list[bytes] = []


def random4() -> bytes:
    """Four bytes from the OS's CSPRNG (batched; forgotten in a forked child, like nonces)."""
    if not _random4:
        raw = os.urandom(4 * _RANDOM_BATCH)
        _random4.extend(raw[i : i + 4] for i in range(0, len(raw), 4))
    return _random4.pop()


def _forget_randomness() -> None:
    _nonces.clear()
    _random4.clear()


if hasattr(os, "register_at_fork"):  # pragma: no branch - POSIX
    os.register_at_fork(after_in_child=_forget_randomness)


class AuthFailed(Exception):
    """The client's password did not match (or could not be checked); shown as 28P01."""

    def __init__(self, user: str, reason: str | None = None) -> None:
        super().__init__(reason or f'password authentication failed for user "{user}"')
        self.sqlstate = p.INVALID_PASSWORD


class AuthRefused(Exception):
    """The login cannot proceed (e.g. cleartext without TLS); a clear sentence, 28000."""

    sqlstate = p.INVALID_AUTHORIZATION


class ServerLoginError(Exception):
    """The PostgreSQL server refused the pooler's login; carries the server's SQLSTATE."""

    def __init__(self, message: str, sqlstate: str = p.CANNOT_CONNECT) -> None:
        super().__init__(message)
        self.sqlstate = sqlstate


def choose_method(configured: ClientAuth, secret: ClientSecret) -> Method:
    """The method a client is asked for: the configured one when the secret allows it."""
    if configured == "plain":
        return "password"
    if configured == "md5" and secret.md5:
        return "md5"
    if secret.scram:
        return "scram-sha-256"
    if secret.md5:
        return "md5"
    return "password"  # a scrypt hash (perseus_auth) can only check a cleartext password


async def check_cleartext(password: str, user: str, secret: ClientSecret) -> bool:
    """Check a cleartext password against whichever form the route keeps."""
    if secret.scram:
        # PBKDF2 with the verifier's iterations (4,096: milliseconds): off the event loop
        return await asyncio.to_thread(_check_scram_cleartext, password, secret.scram)
    if secret.md5:
        digest = "md5" + hashlib.md5((password + user).encode(), usedforsecurity=False).hexdigest()
        return hmac.compare_digest(digest, secret.md5)
    if secret.scrypt:
        return await verify_scrypt_async(password, secret.scrypt)
    return False


def _check_scram_cleartext(password: str, verifier: str) -> bool:
    try:
        salt, stored_key, _server_key, iterations = parse_scram_verifier(verifier)
    except PasswordFormatError:
        return False
    _salt, stored, _server, _count = _SCRAM.make_auth_info(
        password, iteration_count=iterations, salt=salt
    )
    return hmac.compare_digest(stored, stored_key)


def _scram_keys(verifier: str) -> _ScramKeys:
    keys = _verifiers.get(verifier)
    if keys is None:
        keys = _ScramKeys(verifier)  # PasswordFormatError when it is not one
        if len(_verifiers) >= _MAX_VERIFIERS:
            _verifiers.clear()
        _verifiers[verifier] = keys
    return keys


async def authenticate_client(
    conn: p.FramedProtocol,
    user: str,
    secret: ClientSecret,
    configured: ClientAuth,
    *,
    allow_cleartext_without_tls: bool,
) -> bytes:
    """Run the password exchange with a client; raises AuthFailed.

    Returns what is left to send before AuthenticationOk (SCRAM's AuthenticationSASLFinal, or
    nothing): the caller sends it with AuthenticationOk in one write.
    """
    method = choose_method(configured, secret)
    if method == "scram-sha-256":
        return await _scram_exchange(conn, user, secret)
    if method == "md5":
        salt = random4()
        conn.transport.write(p.auth_request(p.AUTH_MD5, salt))
        kind, body = await conn.read_message(MAX_AUTH_MESSAGE)
        check_md5(kind, body, user, secret, salt)
        return b""
    if not conn.tls and not allow_cleartext_without_tls:
        raise AuthRefused(
            "this route can only check a cleartext password, and the pooler refuses "
            "cleartext passwords without TLS; connect with sslmode=require (configure "
            "pooler.tls_cert_file) or set pooler.allow_cleartext_without_tls"
        )
    conn.transport.write(p.auth_request(p.AUTH_CLEARTEXT))
    answer = await _password(conn, user)
    if not await check_cleartext(answer, user, secret):
        raise AuthFailed(user)
    return b""


async def _password(conn: p.FramedProtocol, user: str) -> str:
    kind, body = await conn.read_message(MAX_AUTH_MESSAGE)
    return password_text(kind, body)


def password_text(kind: int, body: bytes) -> str:
    """The password in a PasswordMessage (KIND, BODY); ProtocolViolation for another message."""
    if kind != p.F_PASSWORD:
        raise p.ProtocolViolation(f"expected a password message, got message type {chr(kind)!r}")
    return body.rstrip(b"\0").decode(errors="replace")


def check_md5(kind: int, body: bytes, user: str, secret: ClientSecret, salt: bytes) -> None:
    """Check the client's answer (KIND, BODY) to an md5 request with SALT; raises AuthFailed."""
    if kind != p.F_PASSWORD:
        password_text(kind, body)  # (raises: not a password message)
    assert secret.md5 is not None
    inner = secret.md5[3:].encode() + salt
    expected = b"md5" + hashlib.md5(inner, usedforsecurity=False).hexdigest().encode()
    if not hmac.compare_digest(body.rstrip(b"\0"), expected):
        raise AuthFailed(user)


async def _scram_exchange(conn: p.FramedProtocol, user: str, secret: ClientSecret) -> bytes:
    """The server side of SCRAM-SHA-256 (``ScramServer``) over CONN.

    Returns the AuthenticationSASLFinal message (the caller sends it with AuthenticationOk).
    """
    assert secret.scram is not None
    scram = ScramServer(user, secret.scram)
    conn.transport.write(scram.request)
    kind, body = await conn.read_message(MAX_AUTH_MESSAGE)
    conn.transport.write(scram.client_first(kind, body))
    kind, body = await conn.read_message(MAX_AUTH_MESSAGE)
    return scram.client_final(kind, body)


def _attribute(text: str, name: str) -> str:
    """``dict(item.split("=", 1) for item in text.split(","))[name]``, without the dict: the
    value of the last NAME=... attribute; ValueError when an item has no "=", KeyError when
    there is no NAME."""
    value = None
    for item in text.split(","):
        key, sep, found = item.partition("=")
        if not sep:
            raise ValueError("a SCRAM attribute without '='")
        if key == name:
            value = found
    if value is None:
        raise KeyError(name)
    return value


class ScramServer:
    """The server side of SCRAM-SHA-256 (RFC 5802/7677) as PostgreSQL runs it, without I/O.

    Written out here because libpq sends an empty user name in client-first (``n=``), which
    scramp's server refuses; the client side (``server_login``) uses scramp. Send ``request``
    (AuthenticationSASL), answer the client's SASLInitialResponse with ``client_first`` (its
    AuthenticationSASLContinue) and its SASLResponse with ``client_final``, which checks the
    proof and returns AuthenticationSASLFinal. Raises AuthFailed (a wrong password or an
    unusable verifier), AuthRefused (an unsupported mechanism or channel binding) or
    ProtocolViolation (a malformed message).
    """

    __slots__ = ("_bare", "_gs2_header", "_keys", "_nonce", "_server_first", "user")

    request = _SASL_REQUEST

    def __init__(self, user: str, verifier: str) -> None:
        self.user = user
        try:
            self._keys = _scram_keys(verifier)
        except PasswordFormatError:
            raise AuthFailed(user) from None
        self._bare = self._gs2_header = self._nonce = self._server_first = ""

    @property
    def engine_secret(self) -> tuple[bytes, bytes, bytes]:
        """(StoredKey, ServerKey, ``,s=<salt>,i=<iterations>``): the engine's SCRAM logins."""
        return self._keys.engine_secret

    def resume(self, bare: bytes, gs2_header: bytes, nonce: bytes, server_first: bytes) -> None:
        """Take on an exchange the engine began (it sent server-first): ``client_final`` next."""
        self._bare = bare.decode()
        self._gs2_header = gs2_header.decode()
        self._nonce = nonce.decode()
        self._server_first = server_first.decode()

    def client_first(self, kind: int, body: bytes) -> bytes:
        """The SASLInitialResponse (KIND, BODY) -> AuthenticationSASLContinue (server-first)."""
        if kind != p.F_PASSWORD:
            raise p.ProtocolViolation("expected a SASLInitialResponse message")
        if body.startswith(_SCRAM_MECHANISM):
            pos = len(_SCRAM_MECHANISM)
        else:
            mechanism, pos = p.split_cstring(body)
            if mechanism != b"SCRAM-SHA-256":
                raise AuthRefused(
                    f"SASL mechanism {mechanism.decode(errors='replace')!r} is not supported; "
                    "use SCRAM-SHA-256 without channel binding"
                )
        if len(body) < pos + 4:
            raise p.ProtocolViolation("the SASLInitialResponse message is truncated")
        (length,) = p.INT32.unpack_from(body, pos)
        try:
            first = body[pos + 4 : pos + 4 + max(length, 0)].decode()
            gs2_cb, _authzid, bare = first.split(",", 2)
            if gs2_cb not in ("n", "y"):
                raise AuthRefused("SCRAM channel binding is not supported by the pooler")
            client_nonce = _attribute(bare, "r")
            gs2_header = first[: len(first) - len(bare)]
        except (ValueError, KeyError, UnicodeDecodeError):
            raise p.ProtocolViolation("malformed SCRAM client-first message") from None
        nonce = client_nonce + _server_nonce()
        server_first = f"r={nonce}{self._keys.server_first_tail}"
        self._bare = bare
        self._gs2_header = gs2_header
        self._nonce = nonce
        self._server_first = server_first
        return p.auth_request(p.AUTH_SASL_CONTINUE, server_first.encode())

    def client_final(self, kind: int, body: bytes) -> bytes:
        """The SASLResponse (KIND, BODY) -> AuthenticationSASLFinal, once the proof checks."""
        if kind != p.F_PASSWORD:
            raise p.ProtocolViolation("expected a SASLResponse message")
        if not self._nonce:
            raise p.ProtocolViolation("a SCRAM client-final message before client-first")
        keys = self._keys
        gs2_header = self._gs2_header
        try:
            final = body.decode()
            without_proof, _, proof_attr = final.rpartition(",p=")
            fattrs = dict([item.split("=", 1) for item in without_proof.split(",")])
            try:  # the common case; anything else is decoded exactly as before
                proof = _a2b_base64(proof_attr, strict_mode=True)
            except ValueError:
                proof = base64.b64decode(proof_attr, validate=True)
            binding = fattrs["c"]
            if binding == _b64encode(gs2_header.encode(), newline=False).decode():
                channel = gs2_header
            else:
                channel = base64.b64decode(binding).decode()
        except (ValueError, KeyError, UnicodeDecodeError, binascii.Error):
            raise p.ProtocolViolation("malformed SCRAM client-final message") from None
        stored_key = keys.stored_key
        if fattrs.get("r") != self._nonce or channel != gs2_header or len(proof) != len(stored_key):
            raise AuthFailed(self.user)
        auth_message = f"{self._bare},{self._server_first},{without_proof}".encode()
        client_signature = keys.client_mac.digest(auth_message)
        # ClientKey = proof XOR signature; it must hash to StoredKey
        client_key = (_int(proof) ^ _int(client_signature)).to_bytes(len(proof))
        if not _compare(_sha256(client_key).digest(), stored_key):
            raise AuthFailed(self.user)
        server_signature = keys.server_mac.digest(auth_message)
        return p.auth_request(
            p.AUTH_SASL_FINAL, b"v=" + _b64encode(server_signature, newline=False)
        )


# --- the pooler as a client of PostgreSQL ---------------------------------------------------


async def server_login(
    conn: p.FramedProtocol, user: str, password: str | None
) -> tuple[dict[str, str], tuple[int, int]]:
    """Answer the server's authentication requests after the startup packet was sent.

    Returns the server's ParameterStatus values and its BackendKeyData (pid, key).
    """
    params: dict[str, str] = {}
    key = (0, 0)
    scram: ScramClient | None = None
    while True:
        kind, body = await conn.read_message()
        if kind == p.B_AUTH:
            (code,) = p.INT32.unpack_from(body)
            if code == p.AUTH_OK:
                continue
            if password is None:
                raise ServerLoginError(
                    "the server asks for a password and the route's destination has none",
                    p.INVALID_PASSWORD,
                )
            if code == p.AUTH_CLEARTEXT:
                conn.transport.write(p.password_message(p.cstring(password)))
            elif code == p.AUTH_MD5:
                inner = hashlib.md5((password + user).encode(), usedforsecurity=False)
                outer = hashlib.md5(inner.hexdigest().encode() + body[4:8], usedforsecurity=False)
                conn.transport.write(p.password_message(p.cstring("md5" + outer.hexdigest())))
            elif code == p.AUTH_SASL:
                mechanisms = [m.decode() for m in body[4:].split(b"\0") if m]
                if "SCRAM-SHA-256" not in mechanisms:
                    raise ServerLoginError(
                        f"the server offers only SASL mechanisms {mechanisms}, "
                        "the pooler supports SCRAM-SHA-256"
                    )
                scram = ScramClient(["SCRAM-SHA-256"], user, password)
                first = scram.get_client_first().encode()
                conn.transport.write(p.sasl_initial_response("SCRAM-SHA-256", first))
            elif code == p.AUTH_SASL_CONTINUE and scram is not None:
                try:
                    scram.set_server_first(body[4:].decode())
                except ScramException as exc:
                    raise ServerLoginError(f"SCRAM with the server failed: {exc}") from None
                conn.transport.write(p.password_message(scram.get_client_final().encode()))
            elif code == p.AUTH_SASL_FINAL and scram is not None:
                try:
                    scram.set_server_final(body[4:].decode())
                except ScramException as exc:
                    raise ServerLoginError(
                        f"the server's SCRAM signature did not verify: {exc}"
                    ) from None
            else:
                raise ServerLoginError(f"the server asks for unsupported authentication {code}")
        elif kind == p.B_PARAMETER_STATUS:
            name, value = p.parameter_from_body(body)
            params[name] = value
        elif kind == p.B_BACKEND_KEY:
            pid, secret = p.INT32.unpack_from(body)[0], p.INT32.unpack_from(body, 4)[0]
            key = (pid, secret)
        elif kind == p.B_READY:
            return params, key
        elif kind == p.B_ERROR:
            fields = p.error_fields(body)
            raise ServerLoginError(
                fields.get("M", "the server refused the login"),
                fields.get("C", p.CANNOT_CONNECT),
            )
        elif kind in (p.B_NOTICE, ord("v")):  # NegotiateProtocolVersion: 3.0 is fine
            continue
        else:
            raise ServerLoginError(f"unexpected message {chr(kind)!r} during the server login")
