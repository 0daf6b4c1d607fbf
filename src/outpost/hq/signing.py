"""HQ's Ed25519 signing key (DATA_DIR/signing.key, raw 32 bytes, mode 0600) and job signing."""

from __future__ import annotations

import os
import secrets
import time
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from outpost.errors import KeyError_
from outpost.protocol import (
    JobBody,
    JobKind,
    SignedJob,
    generate_signing_key,
    private_key_bytes,
    sign_job,
)


def load_or_create_key(path: Path) -> Ed25519PrivateKey:
    """Read the signing key, or create it (mode 0600) when the file does not exist yet."""
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return _create(path)
    except OSError as exc:
        raise KeyError_(f"Cannot read HQ's signing key {path}: {exc.strerror}.") from None
    if len(data) != 32:
        raise KeyError_(
            f"HQ's signing key {path} is not a raw 32-byte Ed25519 key; restore the original "
            "file (agents pin its public key)."
        )
    return Ed25519PrivateKey.from_private_bytes(data)


def _create(path: Path) -> Ed25519PrivateKey:
    key = generate_signing_key()
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    tmp = path.with_name(path.name + f".{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as fh:
        fh.write(private_key_bytes(key))
        fh.flush()
        os.fsync(fh.fileno())
    try:
        # link() fails when another process created the key first: use theirs.
        os.link(tmp, path)
    except FileExistsError:
        return load_or_create_key(path)
    finally:
        tmp.unlink()
    return key


def new_nonce() -> str:
    """128 random bits, hex."""
    return secrets.token_hex(16)


def make_signed_job(
    key: Ed25519PrivateKey,
    *,
    job_id: str,
    agent: str,
    connection: str,
    kind: JobKind,
    params: dict[str, Any],
    timeout: float,
    expires_in: float,
    now: float | None = None,
) -> tuple[JobBody, SignedJob]:
    """A fresh job body (new nonce) and its signature."""
    issued = time.time() if now is None else now
    body = JobBody(
        job_id=job_id,
        agent=agent,
        connection=connection,
        kind=kind,
        params=params,
        issued_at=issued,
        expires_at=issued + expires_in,
        timeout=timeout,
        nonce=new_nonce(),
    )
    return body, sign_job(key, body)
