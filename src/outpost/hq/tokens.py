"""Admin and agent tokens: random, shown once, stored only as their SHA-256."""

from __future__ import annotations

import hashlib
import secrets

ADMIN_PREFIX = "opa_"
AGENT_PREFIX = "opt_"


def new_token(prefix: str) -> str:
    """``prefix`` + 32 random bytes, urlsafe base64 without padding."""
    return prefix + secrets.token_urlsafe(32)


def token_hash(token: str) -> str:
    """What HQ stores instead of the token: its SHA-256, hex."""
    return hashlib.sha256(token.encode("utf-8", "surrogatepass")).hexdigest()


def bearer(header: str | None) -> str | None:
    """The token of an ``Authorization: Bearer TOKEN`` header, or None."""
    if not header:
        return None
    scheme, _, value = header.partition(" ")
    if scheme.lower() != "bearer" or not value.strip():
        return None
    return value.strip()
