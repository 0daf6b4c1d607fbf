"""The in-memory credential cache: at most one fetch in flight per source, values kept until
their expiry (or ``credentials.cache_ttl`` when the source gives none), short-lived tokens
refreshed ``credentials.refresh_margin`` seconds before they expire, Vault leases renewed while
in use and revoked on close."""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass

from outpost.config import CredentialsConfig
from outpost.credentials.base import (
    Clock,
    Credential,
    CredentialContext,
    CredentialError,
    CredentialSource,
)

log = logging.getLogger("outpost.credentials")


@dataclass(frozen=True)
class Provenance:
    """Where a password came from, for `connections test` (never the value)."""

    reference: str
    kind: str
    age_seconds: float
    expires_in_seconds: float | None
    cached: bool

    def describe(self) -> str:
        text = f"{self.reference} ({'cached, ' if self.cached else ''}fetched "
        text += f"{self.age_seconds:.0f} s ago"
        if self.expires_in_seconds is not None:
            text += f", expires in {self.expires_in_seconds:.0f} s"
        return text + ")"


class CredentialCache:
    def __init__(self, config: CredentialsConfig, clock: Clock = time.time) -> None:
        self.config = config
        self.clock = clock
        self._values: dict[str, tuple[CredentialSource, Credential]] = {}
        self._locks: dict[str, threading.Lock] = {}
        self._guard = threading.Lock()

    def _lock_for(self, key: str) -> threading.Lock:
        with self._guard:
            return self._locks.setdefault(key, threading.Lock())

    def _fresh(self, source: CredentialSource, cred: Credential) -> bool:
        now = self.clock()
        if cred.expires_at is not None:
            lifetime = max(cred.expires_at - cred.fetched_at, 0.0)
            margin = min(self.config.refresh_margin, lifetime / 2)
            return now < cred.expires_at - margin
        if not source.cacheable or self.config.cache_ttl <= 0:
            return False
        return now < cred.fetched_at + self.config.cache_ttl

    def get(
        self, source: CredentialSource, ctx: CredentialContext
    ) -> tuple[Credential, Provenance]:
        key = source.cache_key(ctx)
        with self._lock_for(key):  # at most one fetch in flight per key
            cached = self._values.get(key)
            if cached is not None and self._fresh(source, cached[1]):
                return cached[1], self._provenance(source, cached[1], True)
            cred: Credential | None = None
            if cached is not None and cached[1].renewable and cached[1].lease_id:
                try:
                    cred = source.renew(cached[1])
                except CredentialError as exc:
                    log.warning("%s", exc)
                    cred = None
            if cred is None:
                cred = source.fetch(ctx)
            if source.cacheable or cred.expires_at is not None:
                self._values[key] = (source, cred)
            return cred, self._provenance(source, cred, False)

    def _provenance(self, source: CredentialSource, cred: Credential, cached: bool) -> Provenance:
        now = self.clock()
        return Provenance(
            reference=source.reference,
            kind=source.kind,
            age_seconds=max(now - cred.fetched_at, 0.0),
            expires_in_seconds=None if cred.expires_at is None else cred.expires_at - now,
            cached=cached,
        )

    def invalidate(self, source: CredentialSource, ctx: CredentialContext) -> None:
        """Forget a value (say, after the database refused it) so the next get fetches."""
        with self._guard:
            self._values.pop(source.cache_key(ctx), None)

    def close(self) -> None:
        """Revoke leases and close every source (the agent is stopping)."""
        with self._guard:
            values = list(self._values.values())
            self._values.clear()
        for source, cred in values:
            if cred.lease_id:
                try:
                    source.revoke(cred)
                except CredentialError as exc:
                    log.warning("%s", exc)
            source.close()
