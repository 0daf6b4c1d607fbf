"""``aws-rds-iam`` — an RDS IAM authentication token for the connection's host, port and user,
made by boto3 (``generate_db_auth_token``, a SigV4-signed URL computed locally, no network).

Tokens live 15 minutes; the credential says so (``expires_at``) and the cache makes a new one
``credentials.refresh_margin`` seconds before. RDS accepts them only over TLS, so a connection
whose ``ssl`` is ``disable`` (the postgres and mysql drivers' default) is refused.

The region is the connection's ``region`` option when it has one, else the one in an RDS host
name (``db.abc.eu-west-1.rds.amazonaws.com``), else ``credentials.aws.region``, else
``AWS_REGION`` / ``AWS_DEFAULT_REGION``, else the AWS profile's.
"""

from __future__ import annotations

import logging
import re

from outpost.credentials.aws_secretsmanager import (
    aws_error,
    aws_session,
    make_client,
    resolve_region,
)
from outpost.credentials.base import (
    Credential,
    CredentialContext,
    CredentialError,
    CredentialSource,
)

log = logging.getLogger("outpost.credentials")

#: How long RDS accepts a token.
TOKEN_SECONDS = 900
#: ssl modes that do not encrypt (``disable`` in every built-in driver; libpq's weak modes too).
_PLAINTEXT = frozenset({"disable", "allow", "prefer"})
#: The ssl default of drivers that do not start from ``disable``.
_SSL_DEFAULTS = {"redshift": "require", "mssql": "verify"}
_DEFAULT_PORTS = {"postgres": 5432, "mysql": 3306}
#: Drivers RDS IAM authentication cannot serve, and why.
_UNSUPPORTED = {
    "mssql": "RDS for SQL Server has no IAM database authentication",
    "redshift": "Redshift uses its own IAM credentials (GetClusterCredentials), not RDS tokens",
}
_RDS_HOST = re.compile(r".+\.(?P<region>[a-z]{2}(?:-[a-z]+)+-\d+)\.rds\.amazonaws\.com(?:\.cn)?")


class RDSIAMSource(CredentialSource):
    kind = "aws-rds-iam"
    takes_argument = False
    extra = "aws"

    def _target(self, ctx: CredentialContext) -> tuple[str, int, str]:
        """Host, port and user, once the connection is known to be fit for a token."""
        if ctx.driver in _UNSUPPORTED:
            raise self.error(ctx, _UNSUPPORTED[ctx.driver])
        if not ctx.host:
            raise self.error(ctx, "the connection has no host (--host), and a token is per host")
        if not ctx.user:
            raise self.error(
                ctx, "the connection has no user (--user), and a token is per database user"
            )
        port = ctx.port or _DEFAULT_PORTS.get(ctx.driver)
        if not port:
            raise self.error(ctx, "the connection has no port (--port), and a token is per port")
        ssl = str(ctx.options.get("ssl") or _SSL_DEFAULTS.get(ctx.driver, "disable"))
        if ssl in _PLAINTEXT:
            raise self.error(
                ctx,
                f"RDS accepts IAM tokens only over TLS and the connection has --ssl {ssl}; "
                "use --ssl require or stricter (verify-full with the RDS CA bundle is best)",
            )
        return ctx.host, int(port), ctx.user

    def _region(self, ctx: CredentialContext, session: object | None) -> str:
        explicit = ctx.options.get("region")
        if explicit:
            return str(explicit)
        match = _RDS_HOST.fullmatch(ctx.host or "")
        if match:
            return match.group("region")
        return resolve_region(self, ctx, session)

    def _region_without_sdk(self, ctx: CredentialContext) -> str:
        try:
            return self._region(ctx, None)
        except CredentialError:  # only the profile's region is left: it needs boto3
            return self._region(ctx, aws_session(self, ctx))

    def cache_key(self, ctx: CredentialContext) -> str:
        host, port, user = self._target(ctx)
        return f"{self.kind}:{user}@{host}:{port}?region={self._region_without_sdk(ctx)}"

    def fetch(self, ctx: CredentialContext) -> Credential:
        host, port, user = self._target(ctx)
        session = aws_session(self, ctx)
        region = self._region(ctx, session)
        client = make_client(self, ctx, session, "rds", region)
        now = self.clock()  # before signing: the token's 15 minutes start at its X-Amz-Date
        try:
            token = client.generate_db_auth_token(
                DBHostname=host, Port=port, DBUsername=user, Region=region
            )
        except Exception as exc:
            raise aws_error(self, ctx, exc, "RDS", None) from None
        finally:
            client.close()
        log.debug("made an RDS IAM token for %s@%s:%s (region %s)", user, host, port, region)
        return Credential(password=str(token), fetched_at=now, expires_at=now + TOKEN_SECONDS)
