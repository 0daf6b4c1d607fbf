"""Errors of the HQ link."""

from __future__ import annotations

from outpost.errors import OutpostError

#: Error codes for which the agent stops instead of retrying.
FATAL_CODES = frozenset({"token_unknown", "token_revoked"})


class LinkError(OutpostError):
    """The link to HQ cannot be set up as configured (bad URL, TLS, association)."""


class LinkDown(Exception):
    """The connection to HQ failed or dropped; the session reconnects after a backoff."""


class UpgradeRefused(LinkDown):
    """The HTTP upgrade to WebSocket was refused (a proxy, or no WebSocket route): in ``auto``
    mode the agent falls back to long-polling."""


class TokenRejected(OutpostError):
    """HQ refused the agent's token (unknown or revoked): the agent stops."""

    def __init__(self, code: str, message: str, url: str = "") -> None:
        where = f" at {url}" if url else ""
        text = (
            f"HQ{where} rejected this agent's token ({code}): {message.rstrip('.')}; "
            "ask an HQ admin for a new token and run `outpost login --hq URL --token-file FILE`."
        )
        super().__init__(text)
        self.code = code
        self.detail = message
