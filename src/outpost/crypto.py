"""Key files and the sealed envelope: AES-256-CBC + HMAC-SHA256, encrypt-then-MAC.

Envelope layout (version 1), all lengths in bytes::

    b"OPE" | version (1) | key id (8) | IV (16) | ciphertext (16*n) | HMAC-SHA256 tag (32)

The 64-byte key is split: the first 32 bytes are the AES-256 key, the last 32 bytes the
HMAC key. The tag covers everything before it. The key id is the first 8 bytes of
HMAC-SHA256(hmac_key, b"outpost key id"), so that "wrong key" and "tampered data" are told
apart without revealing anything about the key.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import stat
from dataclasses import dataclass
from pathlib import Path

from cryptography.hazmat.primitives import padding
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

from outpost.errors import DecryptionError, KeyError_

KEY_SIZE = 64
MAGIC = b"OPE"
VERSION = 1
_HEADER = len(MAGIC) + 1 + 8 + 16
_TAG = 32


def key_id_of(key: bytes) -> str:
    """A short public fingerprint of a key (hex), stored beside data it encrypted."""
    return hmac.new(key[32:], b"outpost key id", hashlib.sha256).digest()[:8].hex()


@dataclass(frozen=True)
class Key:
    """A loaded 64-byte key and where it came from (for error messages)."""

    material: bytes
    path: str

    @property
    def id(self) -> str:
        return key_id_of(self.material)

    def __repr__(self) -> str:  # never print key material
        return f"Key(path={self.path!r}, id={self.id})"


def generate_key_file(path: Path) -> Key:
    """Write 64 random bytes to PATH with mode 0400; refuse to overwrite anything."""
    path = path.expanduser()
    if path.exists():
        raise KeyError_(
            f"Key file {path} already exists; refusing to overwrite it "
            "(move it away first if you really mean to replace it)."
        )
    if not path.parent.is_dir():
        raise KeyError_(f"Cannot write key file {path}: directory {path.parent} does not exist.")
    material = os.urandom(KEY_SIZE)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o400)
    except OSError as exc:
        raise KeyError_(f"Cannot write key file {path}: {exc.strerror}.") from None
    try:
        os.write(fd, material)
        os.fsync(fd)
    finally:
        os.close(fd)
    os.chmod(path, 0o400)
    return Key(material, str(path))


def load_key_file(path: str | Path) -> Key:
    """Read a key file, checking that it holds exactly 64 bytes."""
    p = Path(path).expanduser()
    try:
        material = p.read_bytes()
    except FileNotFoundError:
        raise KeyError_(
            f"Key file {p} does not exist; create one with `outpost key generate {p}` "
            "or fix key_path."
        ) from None
    except OSError as exc:
        raise KeyError_(f"Cannot read key file {p}: {exc.strerror}.") from None
    if len(material) != KEY_SIZE:
        raise KeyError_(
            f"Key file {p} holds {len(material)} bytes but a key is exactly {KEY_SIZE} bytes; "
            f"create one with `outpost key generate PATH`."
        )
    return Key(material, str(p))


def key_file_mode_warning(path: str | Path) -> str | None:
    """A warning when a key file is readable by group or others, else None."""
    p = Path(path).expanduser()
    try:
        mode = stat.S_IMODE(p.stat().st_mode)
    except OSError:
        return None
    if mode & 0o077:
        return f"Key file {p} has mode {mode:04o}; it should be 0400 (chmod 0400 {p})."
    return None


def seal(key: Key, plaintext: bytes) -> bytes:
    """Encrypt and authenticate PLAINTEXT with a random IV."""
    iv = os.urandom(16)
    padder = padding.PKCS7(128).padder()
    padded = padder.update(plaintext) + padder.finalize()
    encryptor = Cipher(algorithms.AES(key.material[:32]), modes.CBC(iv)).encryptor()
    ciphertext = encryptor.update(padded) + encryptor.finalize()
    body = MAGIC + bytes([VERSION]) + bytes.fromhex(key.id) + iv + ciphertext
    tag = hmac.new(key.material[32:], body, hashlib.sha256).digest()
    return body + tag


def is_sealed(data: bytes) -> bool:
    return data.startswith(MAGIC) and len(data) >= _HEADER + 16 + _TAG


def envelope_key_id(data: bytes) -> str:
    """The key id recorded in an envelope (raises DecryptionError if it is not one)."""
    if not data.startswith(MAGIC) or len(data) < _HEADER:
        raise DecryptionError("The data is not an Outpost envelope (corrupt or not encrypted).")
    return data[4:12].hex()


def open_sealed(key: Key, data: bytes, *, what: str = "encrypted data") -> bytes:
    """Check and decrypt an envelope; never returns garbage.

    WHAT names the thing in the error (for example "connection 'billing' options").
    """
    if not data.startswith(MAGIC) or len(data) < _HEADER + 16 + _TAG:
        raise DecryptionError(f"The {what} is corrupt (not a complete Outpost envelope).")
    version = data[3]
    if version != VERSION:
        raise DecryptionError(
            f"The {what} uses envelope version {version}, which this Outpost does not know; "
            "upgrade Outpost."
        )
    if data[4:12].hex() != key.id:
        raise KeyError_(
            f"The {what} was encrypted with a different key than {key.path} "
            f"(key id {data[4:12].hex()}, this key's id {key.id}); set key_path to the right key."
        )
    body, tag = data[:-_TAG], data[-_TAG:]
    expected = hmac.new(key.material[32:], body, hashlib.sha256).digest()
    if not hmac.compare_digest(tag, expected):
        raise DecryptionError(
            f"The {what} failed its integrity check: it was altered or corrupted on disk; "
            "restore it from a backup."
        )
    iv, ciphertext = data[12:28], data[28:-_TAG]
    if len(ciphertext) % 16:
        raise DecryptionError(f"The {what} is corrupt (bad ciphertext length).")
    decryptor = Cipher(algorithms.AES(key.material[:32]), modes.CBC(iv)).decryptor()
    padded = decryptor.update(ciphertext) + decryptor.finalize()
    unpadder = padding.PKCS7(128).unpadder()
    try:
        return unpadder.update(padded) + unpadder.finalize()
    except ValueError:
        raise DecryptionError(f"The {what} is corrupt (bad padding).") from None
