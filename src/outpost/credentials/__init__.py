"""Credential source registry: ``KIND:ARGUMENT`` references resolved to source objects.

Built-in kinds plus any registered under the ``outpost.credentials`` entry-point group.
"""

from __future__ import annotations

import functools
import importlib
import time
from importlib.metadata import entry_points

from outpost.config import CredentialsConfig
from outpost.credentials.base import Clock, CredentialSource
from outpost.errors import UsageError

BUILTIN: dict[str, str] = {
    "env": "outpost.credentials.env:EnvSource",
    "file": "outpost.credentials.file:FileSource",
    "aws-secretsmanager": "outpost.credentials.aws_secretsmanager:SecretsManagerSource",
    "aws-rds-iam": "outpost.credentials.aws_rds_iam:RDSIAMSource",
    "gcp-secretmanager": "outpost.credentials.gcp_secretmanager:GCPSecretManagerSource",
    "gcp-cloudsql-iam": "outpost.credentials.gcp_cloudsql_iam:CloudSQLIAMSource",
    "vault": "outpost.credentials.vault_kv:VaultKVSource",
    "vault-db": "outpost.credentials.vault_db:VaultDatabaseSource",
}


@functools.cache
def _targets() -> dict[str, str]:
    targets = dict(BUILTIN)
    for ep in entry_points(group="outpost.credentials"):
        targets.setdefault(ep.name, ep.value)
    return targets


def source_kinds() -> list[str]:
    return sorted(_targets())


def source_class(kind: str) -> type[CredentialSource]:
    targets = _targets()
    if kind not in targets:
        raise UsageError(
            f"Unknown credential source {kind!r}; choose one of: {', '.join(sorted(targets))}."
        )
    module_name, _, attr = targets[kind].partition(":")
    cls = getattr(importlib.import_module(module_name), attr)
    if not (isinstance(cls, type) and issubclass(cls, CredentialSource)):
        raise UsageError(f"Credential source {kind!r} is not an outpost CredentialSource.")
    return cls


def parse_reference(
    reference: str, config: CredentialsConfig, clock: Clock = time.time
) -> CredentialSource:
    """``env:NAME`` -> EnvSource("NAME"); a UsageError for anything malformed."""
    reference = reference.strip()
    kinds = sorted(_targets(), key=len, reverse=True)  # vault-db before vault
    for kind in kinds:
        if reference == kind or reference.startswith(kind + ":"):
            cls = source_class(kind)
            argument = reference[len(kind) + 1 :] if reference != kind else ""
            if cls.takes_argument and not argument:
                raise UsageError(
                    f"--password-from {reference!r}: {kind} needs an argument ({kind}:...)."
                )
            if not cls.takes_argument and argument:
                raise UsageError(f"--password-from {reference!r}: {kind} takes no argument.")
            return cls(argument, config, clock)
    raise UsageError(
        f"--password-from {reference!r} is not a credential source; write KIND:ARGUMENT with "
        f"KIND one of: {', '.join(sorted(_targets()))}."
    )
