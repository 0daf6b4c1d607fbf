"""Credential source registry: ``KIND:ARGUMENT`` references resolved to source objects.

Built-in kinds plus any registered under the ``outpost.credentials`` entry-point group.
"""

from __future__ import annotations

import time

from outpost.config import CredentialsConfig
from outpost.credentials.base import Clock, CredentialSource
from outpost.errors import UsageError
from outpost.registry import Registry

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


REGISTRY: Registry[CredentialSource] = Registry(
    "outpost.credentials", "credential source", CredentialSource, BUILTIN
)


def source_kinds() -> list[str]:
    return REGISTRY.names()


def source_class(kind: str) -> type[CredentialSource]:
    return REGISTRY.get(kind)


def parse_reference(
    reference: str, config: CredentialsConfig, clock: Clock = time.time
) -> CredentialSource:
    """``env:NAME`` -> EnvSource("NAME"); a UsageError for anything malformed."""
    reference = reference.strip()
    kinds = sorted(REGISTRY.names(), key=len, reverse=True)  # vault-db before vault
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
        f"KIND one of: {', '.join(REGISTRY.names())}."
    )
