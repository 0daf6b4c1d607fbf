"""``vault-db:MOUNT/creds/ROLE`` — dynamic database credentials from Vault's database secrets
engine: a user name and password made for the agent, with a lease.

The credential cache keeps them until ``credentials.refresh_margin`` seconds (at most half the
lease) before the lease ends, then asks this source to renew the lease
(``sys/leases/renew``); when the lease is not renewable, cannot be renewed any more (its max
TTL is near) or renewal fails, new credentials are fetched. Leases still held when the agent
stops are revoked (``sys/leases/revoke``), which drops the database user.

``vault-db:MOUNT/static-creds/ROLE`` reads a static role's current password (no lease: it is
cached until the role's next rotation).
"""

from __future__ import annotations

import logging
import re
from typing import Any

from outpost.credentials.base import Credential, CredentialContext, CredentialSource
from outpost.credentials.vault_common import session_for
from outpost.errors import UsageError

log = logging.getLogger("outpost.credentials")


class VaultDatabaseSource(CredentialSource):
    kind = "vault-db"
    extra = "vault"

    def validate(self) -> None:
        path = self.argument.strip().strip("/")
        match = re.fullmatch(
            r"(?P<mount>[^#?\s]+?)/(?P<kind>creds|static-creds)/(?P<role>[^/#?\s]+)", path
        )
        if match is None:
            raise UsageError(
                f"{self.reference!r} is not a database credentials path; write "
                "vault-db:MOUNT/creds/ROLE, e.g. vault-db:database/creds/app"
            )
        self.path = path
        self.static = match.group("kind") == "static-creds"

    def fetch(self, ctx: CredentialContext) -> Credential:
        session = session_for(self, ctx)
        answer = session.request(
            self,
            ctx,
            "GET",
            self.path,
            capability="read",
            not_found=f"Vault has no database secrets engine or role at {self.path}",
        )
        now = self.clock()
        data: Any = answer.get("data") if isinstance(answer, dict) else None
        username = data.get("username") if isinstance(data, dict) else None
        password = data.get("password") if isinstance(data, dict) else None
        if not isinstance(username, str) or not isinstance(password, str):
            raise self.error(ctx, f"Vault's answer for {self.path} has no username and password")
        if self.static:
            ttl = float(data.get("ttl") or 0)
            return Credential(
                password=password,
                username=username,
                fetched_at=now,
                expires_at=now + ttl if ttl > 0 else None,
            )
        assert isinstance(answer, dict)
        lease_id = str(answer.get("lease_id") or "") or None
        seconds = float(answer.get("lease_duration") or 0)
        log.info(
            "vault-db: got database credentials from %s (lease %.0f s, renewable: %s)",
            self.path,
            seconds,
            "yes" if answer.get("renewable") else "no",
        )
        return Credential(
            password=password,
            username=username,
            fetched_at=now,
            expires_at=now + seconds if seconds > 0 else None,
            lease_id=lease_id,
            renewable=bool(answer.get("renewable")) and lease_id is not None,
            lease_seconds=seconds or None,
        )

    def renew(self, credential: Credential) -> Credential | None:
        """Extend the lease; None (fetch new credentials) when it is gone or nearly at its
        max TTL. The renewed value counts as fetched now, so its freshness follows the new
        lease."""
        if not credential.lease_id or not credential.renewable:
            return None
        session = session_for(self, None)
        answer = session.request(
            self,
            None,
            "PUT",
            "sys/leases/renew",
            capability="update",
            body={"lease_id": credential.lease_id},
            rejected_ok=True,
        )
        if answer is None:  # lease not found, expired or not renewable
            log.info(
                "vault-db: the lease of %s cannot be renewed; fetching new credentials", self.path
            )
            return None
        now = self.clock()
        seconds = float(answer.get("lease_duration") or 0) if isinstance(answer, dict) else 0.0
        original = credential.lease_seconds or seconds
        if seconds <= 0 or seconds < min(self.config.refresh_margin, original / 2):
            log.info(
                "vault-db: lease of %s is near its max TTL (%.0f s left); fetching new credentials",
                self.path,
                seconds,
            )
            return None
        log.info("vault-db: renewed the lease of %s for %.0f s", self.path, seconds)
        return Credential(
            password=credential.password,
            username=credential.username,
            fetched_at=now,
            expires_at=now + seconds,
            lease_id=str(answer.get("lease_id") or credential.lease_id),
            renewable=bool(answer.get("renewable", True)),
            lease_seconds=seconds,
        )

    def revoke(self, credential: Credential) -> None:
        """Give the lease back (Vault drops the database user)."""
        if not credential.lease_id:
            return
        session = session_for(self, None)
        session.request(
            self,
            None,
            "PUT",
            "sys/leases/revoke",
            capability="update",
            body={"lease_id": credential.lease_id},
        )
        log.info("vault-db: revoked the lease of %s", self.path)
