"""What the pooler keeps of a client's password: never the password itself.

Three forms, all derived when a route is added:

- the SCRAM-SHA-256 verifier in PostgreSQL's own format (what ``pg_authid.rolpassword`` holds),
  ``SCRAM-SHA-256$<iterations>:<salt b64>$<StoredKey b64>:<ServerKey b64>``;
- Perseus's scrypt hash (``source_pass_hashed``): github.com/agnivade/easy-scrypt's
  ``DerivePassphrase(password, 32)``, base64 (standard alphabet, padded) of::

      derived key (32) | salt (16) | N (int32 LE) | r (int32 LE) | p (int32 LE) | SHA-256 (32)

  with N=16384, r=8, p=1 and the SHA-256 taken over everything before it; verification reads
  the key length (total - 60) and the parameters from the hash itself, as easy-scrypt does;
- PostgreSQL's md5 form ``"md5" + md5(password + user)``.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import hashlib
import hmac
import os
import struct
import threading
from collections import OrderedDict

from scramp import ScramMechanism

from outpost.pooler.routes import ClientSecret

#: easy-scrypt's fixed parameters and layout.
SCRYPT_N = 16384
SCRYPT_R = 8
SCRYPT_P = 1
SCRYPT_KEY_LEN = 32
_SALT_LEN = 16
_META_LEN = _SALT_LEN + 12 + 32  # salt, N r p, SHA-256
#: A hash made elsewhere may ask for more work than this; refuse rather than stall the pooler
#: (at most 256 MiB of memory: 128 * r * N).
_MAX_SCRYPT_MEMORY = 256 * 1024 * 1024
_MAX_SCRYPT_P = 16
#: PostgreSQL's default (scram_iterations).
SCRAM_ITERATIONS = 4096

_scram = ScramMechanism("SCRAM-SHA-256")


class PasswordFormatError(ValueError):
    """A stored hash is not in the expected format (the message never holds a secret)."""


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def _scrypt(password: bytes, salt: bytes, n: int, r: int, p: int, dklen: int) -> bytes:
    maxmem = 128 * r * (n + p + 2) + 1024 * 1024
    return hashlib.scrypt(password, salt=salt, n=n, r=r, p=p, dklen=dklen, maxmem=maxmem)


def scrypt_hash(password: str, *, salt: bytes | None = None) -> str:
    """Perseus's ``source_pass_hashed`` for PASSWORD (a random salt unless one is given)."""
    salt = os.urandom(_SALT_LEN) if salt is None else salt
    if len(salt) != _SALT_LEN:
        raise ValueError(f"an easy-scrypt salt is {_SALT_LEN} bytes")
    key = _scrypt(password.encode(), salt, SCRYPT_N, SCRYPT_R, SCRYPT_P, SCRYPT_KEY_LEN)
    body = key + salt + struct.pack("<iii", SCRYPT_N, SCRYPT_R, SCRYPT_P)
    return _b64(body + hashlib.sha256(body).digest())


def _parse_scrypt(hashed: str) -> tuple[bytes, bytes, int, int, int, bytes, bytes]:
    try:
        raw = base64.b64decode(hashed.strip(), validate=True)
    except (binascii.Error, ValueError):
        raise PasswordFormatError("the scrypt hash is not base64") from None
    key_len = len(raw) - _META_LEN
    if key_len < 1:
        raise PasswordFormatError("the scrypt hash is too short to be an easy-scrypt hash")
    key = raw[:key_len]
    salt = raw[key_len : key_len + _SALT_LEN]
    n, r, p = struct.unpack("<iii", raw[key_len + _SALT_LEN : key_len + _SALT_LEN + 12])
    if (
        n < 2
        or n & (n - 1)
        or r < 1
        or not 1 <= p <= _MAX_SCRYPT_P
        or 128 * r * n > _MAX_SCRYPT_MEMORY
    ):
        raise PasswordFormatError("the scrypt hash has invalid or excessive parameters")
    body, digest = raw[: key_len + _SALT_LEN + 12], raw[key_len + _SALT_LEN + 12 :]
    return key, salt, n, r, p, body, digest


def check_scrypt_hash(hashed: str) -> None:
    """Raise PasswordFormatError when HASHED is not a well-formed easy-scrypt hash."""
    _key, _salt, _n, _r, _p, body, digest = _parse_scrypt(hashed)
    if not hmac.compare_digest(hashlib.sha256(body).digest(), digest):
        raise PasswordFormatError("the scrypt hash fails its SHA-256 check (it is corrupt)")


class _VerifiedCache:
    """Remembers recent successful checks, so a reconnecting client does not pay scrypt again.

    Entries are HMACs under a random per-process key: the cache never holds a password.
    """

    def __init__(self, size: int = 4096) -> None:
        self._key = os.urandom(32)
        self._size = size
        self._entries: OrderedDict[bytes, None] = OrderedDict()
        self._lock = threading.Lock()

    def _entry(self, password: str, hashed: str) -> bytes:
        text = hashed.encode() + b"\0" + password.encode()
        return hmac.new(self._key, text, hashlib.sha256).digest()

    def hit(self, password: str, hashed: str) -> bool:
        entry = self._entry(password, hashed)
        with self._lock:
            if entry in self._entries:
                self._entries.move_to_end(entry)
                return True
        return False

    def add(self, password: str, hashed: str) -> None:
        entry = self._entry(password, hashed)
        with self._lock:
            self._entries[entry] = None
            while len(self._entries) > self._size:
                self._entries.popitem(last=False)

    def clear(self) -> None:
        with self._lock:
            self._entries.clear()


_verified = _VerifiedCache()


def verify_scrypt(password: str, hashed: str) -> bool:
    """Whether PASSWORD matches a Perseus/easy-scrypt hash (False for a malformed hash).

    CPU-heavy (~16 MiB, tens of milliseconds) the first time for a given pair; call it through
    ``verify_scrypt_async`` from the event loop.
    """
    if _verified.hit(password, hashed):
        return True
    try:
        key, salt, n, r, p, body, digest = _parse_scrypt(hashed)
    except PasswordFormatError:
        return False
    derived = _scrypt(password.encode(), salt, n, r, p, len(key))
    ok = hmac.compare_digest(derived, key) & hmac.compare_digest(
        hashlib.sha256(body).digest(), digest
    )
    if ok:
        _verified.add(password, hashed)
    return ok


async def verify_scrypt_async(password: str, hashed: str) -> bool:
    """``verify_scrypt`` off the event loop (a cached success answers at once)."""
    if _verified.hit(password, hashed):
        return True
    return await asyncio.to_thread(verify_scrypt, password, hashed)


def scram_verifier(
    password: str, *, salt: bytes | None = None, iterations: int = SCRAM_ITERATIONS
) -> str:
    """PostgreSQL's SCRAM-SHA-256 verifier for PASSWORD (SASLprep applied as PostgreSQL does)."""
    salt_, stored_key, server_key, count = _scram.make_auth_info(
        password, iteration_count=iterations, salt=salt
    )
    return f"SCRAM-SHA-256${count}:{_b64(salt_)}${_b64(stored_key)}:{_b64(server_key)}"


def parse_scram_verifier(verifier: str) -> tuple[bytes, bytes, bytes, int]:
    """(salt, stored_key, server_key, iterations): what scramp's ``make_auth_info`` returns."""
    try:
        method, rest = verifier.split("$", 1)
        counts, keys = rest.split("$", 1)
        iterations_text, salt_b64 = counts.split(":", 1)
        stored_b64, server_b64 = keys.split(":", 1)
        if method != "SCRAM-SHA-256":
            raise ValueError
        return (
            base64.b64decode(salt_b64, validate=True),
            base64.b64decode(stored_b64, validate=True),
            base64.b64decode(server_b64, validate=True),
            int(iterations_text),
        )
    except (ValueError, binascii.Error):
        raise PasswordFormatError("not a SCRAM-SHA-256 verifier") from None


def md5_secret(password: str, user: str) -> str:
    """PostgreSQL's stored md5 form: ``"md5" + md5(password + user)``."""
    return "md5" + hashlib.md5((password + user).encode(), usedforsecurity=False).hexdigest()


def make_client_secret(password: str, user: str) -> ClientSecret:
    """Every form the pooler can check PASSWORD with (SCRAM, scrypt, md5)."""
    if not password:
        raise ValueError("the password is empty")
    return ClientSecret(
        scram=scram_verifier(password),
        scrypt=scrypt_hash(password),
        md5=md5_secret(password, user),
    )
