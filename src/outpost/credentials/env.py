"""``env:NAME`` — an environment variable of the agent process, read at every connect."""

from __future__ import annotations

import os
import re

from outpost.credentials.base import Credential, CredentialContext, CredentialSource
from outpost.errors import UsageError


class EnvSource(CredentialSource):
    kind = "env"
    cacheable = False

    def validate(self) -> None:
        if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", self.argument):
            raise UsageError(f"{self.reference!r}: {self.argument!r} is not a variable name.")

    def fetch(self, ctx: CredentialContext) -> Credential:
        value = os.environ.get(self.argument)
        if value is None:
            raise self.error(ctx, f"the agent's environment has no variable {self.argument}")
        return Credential(password=value, fetched_at=self.clock())
