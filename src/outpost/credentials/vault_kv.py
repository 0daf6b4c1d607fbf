"""``vault:MOUNT/PATH#field`` — one field of a secret in a Vault KV secrets engine (v1 or v2).

The mount and its KV version are found the way the ``vault kv`` command finds them, with
``sys/internal/ui/mounts/MOUNT/PATH`` (which any token that may read the path may call), so a
mount whose name has slashes (``team/kv/app/db``) works too. ``vault:kv1:MOUNT/PATH#field`` and
``vault:kv2:MOUNT/PATH#field`` skip that look-up; there the mount is the first path segment.

The field is required: ``#password`` is the key ``password`` of the secret's data, taken as it
is (dots and all); ``#.db.password`` is a dot-path into a nested JSON value, as in the other
sources. Values are cached for ``credentials.cache_ttl`` seconds.
"""

from __future__ import annotations

import json
import re
from typing import Any

from outpost.credentials.base import (
    Credential,
    CredentialContext,
    CredentialSource,
    read_dot_path,
)
from outpost.credentials.vault_common import VaultSession, session_for
from outpost.errors import UsageError

#: How many field names an error about a missing field lists.
MAX_FIELDS_LISTED = 10


class VaultKVSource(CredentialSource):
    kind = "vault"
    extra = "vault"

    def validate(self) -> None:
        rest = self.argument.strip()
        self.version: int | None = None
        match = re.match(r"kv([12]):", rest)
        if match:
            self.version = int(match.group(1))
            rest = rest[match.end() :]
        path, sep, fld = rest.partition("#")
        path = path.strip("/")
        example = "write vault:MOUNT/PATH#field, e.g. vault:secret/app/db#password"
        if not sep or not fld:
            raise UsageError(
                f"{self.reference!r} names no field; {example} (or a dot-path #.a.b into a "
                "nested value)."
            )
        if "/" not in path or "//" in path:
            raise UsageError(f"{self.reference!r} needs a mount and a secret path; {example}.")
        if fld.startswith(".") and (fld == "." or ".." in fld):
            raise UsageError(
                f"Bad dot-path {fld!r} in {self.reference}: write it as #.field or #.a.b."
            )
        self.path = path
        self.field = fld

    # --- locating the secret -------------------------------------------------------------

    def _locate(self, session: VaultSession, ctx: CredentialContext) -> tuple[str, int, str]:
        """(mount, KV version, path inside the mount)."""
        if self.version is not None:
            mount, _, sub = self.path.partition("/")
            return mount, self.version, sub
        known = session.kv_mounts.get(self.path)
        if known is None:
            first, _, rest = self.path.partition("/")
            answer = session.request(
                self,
                ctx,
                "GET",
                f"sys/internal/ui/mounts/{self.path}",
                capability="read",
                denied=lambda: (
                    f"Vault shows no secrets engine at {self.path} to this token: the mount "
                    "does not exist or no policy grants read on the secret (for KV v2 "
                    f'path "{first}/data/{rest}", for KV v1 path "{self.path}")'
                ),
            )
            data = (answer.get("data") or {}) if isinstance(answer, dict) else {}
            mount = str(data.get("path") or "").strip("/")
            kind = str(data.get("type") or "")
            if not mount or not (self.path + "/").startswith(mount + "/"):
                raise self.error(ctx, f"Vault shows no secrets engine mounted at {self.path}")
            if kind not in ("kv", "generic"):
                hint = "; use vault-db: for database credentials" if kind == "database" else ""
                raise self.error(ctx, f"{mount}/ is a {kind} secrets engine, not KV{hint}")
            options = data.get("options") or {}
            version = 2 if str(options.get("version") or "1") == "2" else 1
            known = (mount, version)
            session.kv_mounts[self.path] = known
        mount, version = known
        sub = self.path[len(mount) :].strip("/")
        if not sub:
            raise self.error(ctx, f"{self.path} is the mount itself; name a secret under it")
        return mount, version, sub

    # --- reading -------------------------------------------------------------------------

    def fetch(self, ctx: CredentialContext) -> Credential:
        session = session_for(self, ctx)
        mount, version, sub = self._locate(session, ctx)
        api_path = f"{mount}/data/{sub}" if version == 2 else f"{mount}/{sub}"
        label = f"KV v{version} secret {mount}/{sub}"
        answer = session.request(
            self,
            ctx,
            "GET",
            api_path,
            capability="read",
            not_found=(
                f"Vault has no {label}"
                + (" (or its latest version is deleted or destroyed)" if version == 2 else "")
            ),
        )
        data: Any = answer.get("data") if isinstance(answer, dict) else None
        if version == 2:
            data = data.get("data") if isinstance(data, dict) else None
        if not isinstance(data, dict):
            raise self.error(ctx, f"Vault returned no data for the {label}")
        value = self._field(ctx, data, label)
        return Credential(password=value, fetched_at=self.clock())

    def _field(self, ctx: CredentialContext, data: dict[str, Any], label: str) -> str:
        if self.field.startswith("."):
            return read_dot_path(self, ctx, json.dumps(data), self.field)
        if self.field not in data:
            names = sorted(str(k) for k in data)
            listed = ", ".join(names[:MAX_FIELDS_LISTED])
            if len(names) > MAX_FIELDS_LISTED:
                listed += ", ..."
            return_hint = f" (its fields: {listed})" if names else " (it has no fields)"
            raise self.error(ctx, f"the {label} has no field {self.field!r}{return_hint}")
        value = data[self.field]
        if value is None:
            raise self.error(ctx, f"the field {self.field!r} of the {label} is null")
        if isinstance(value, dict | list):
            raise self.error(
                ctx,
                f"the field {self.field!r} of the {label} is an object, not a value; use a "
                f"dot-path such as #.{self.field}.KEY",
            )
        return str(value)
