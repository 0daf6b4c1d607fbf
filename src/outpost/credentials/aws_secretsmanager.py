"""``aws-secretsmanager:NAME_OR_ARN[?version_stage=STAGE|version_id=ID][#.dot.path]`` — a secret
from AWS Secrets Manager (``GetSecretValue``), optionally one field of a JSON secret.

The region is the ARN's when an ARN is given (a secret can only be read in its own region), else
``credentials.aws.region``, else ``AWS_REGION`` / ``AWS_DEFAULT_REGION``, else the region of the
AWS profile. ``credentials.aws.endpoint_url`` points the client at a VPC endpoint or an emulator,
``credentials.aws.profile`` picks a profile; AWS credentials come from boto3's usual chain.

The helpers at the bottom (session, region, error mapping, log filter) are shared with
``aws_rds_iam``.
"""

from __future__ import annotations

import logging
import os
import re
import threading
from typing import Any
from urllib.parse import parse_qsl

from outpost.credentials.base import (
    Credential,
    CredentialContext,
    CredentialError,
    CredentialSource,
    read_dot_path,
    split_dot_path,
)
from outpost.errors import UsageError

log = logging.getLogger("outpost.credentials")

#: Characters Secrets Manager allows in a secret name.
_NAME = r"[A-Za-z0-9/_+=.@-]+"
_ARN = re.compile(
    r"arn:(?P<partition>[a-z-]+):secretsmanager:(?P<region>[a-z0-9-]+):\d{12}:secret:" + _NAME
)
#: What the reference may say after ``?``: reference key -> GetSecretValue parameter.
_QUERY_KEYS = {"version_stage": "VersionStage", "version_id": "VersionId"}


class SecretsManagerSource(CredentialSource):
    kind = "aws-secretsmanager"
    extra = "aws"

    secret_id: str
    path: str | None
    version: dict[str, str]

    def validate(self) -> None:
        rest, self.path = split_dot_path(self.argument)
        self.secret_id, sep, query = rest.partition("?")
        if not self.secret_id:
            raise UsageError(
                f"{self.reference!r}: give the secret's name or ARN "
                "(aws-secretsmanager:NAME_OR_ARN[#.field])."
            )
        if not (_ARN.fullmatch(self.secret_id) or re.fullmatch(_NAME, self.secret_id)):
            raise UsageError(
                f"{self.reference!r}: {self.secret_id!r} is not a secret name (letters, digits "
                "and /_+=.@-) or a Secrets Manager ARN."
            )
        self.version = {}
        if sep:
            try:
                pairs = parse_qsl(query, keep_blank_values=True, strict_parsing=True)
            except ValueError:
                pairs = [("", "")]
            for key, value in pairs:
                if key not in _QUERY_KEYS or not value or _QUERY_KEYS[key] in self.version:
                    raise UsageError(
                        f"{self.reference!r}: after '?' write version_stage=STAGE (such as "
                        "AWSPREVIOUS) or version_id=ID, once each."
                    )
                self.version[_QUERY_KEYS[key]] = value
        if self.path is not None:
            check_dot_path(self, self.path)

    def fetch(self, ctx: CredentialContext) -> Credential:
        session = aws_session(self, ctx)
        match = _ARN.fullmatch(self.secret_id)
        region = match.group("region") if match else resolve_region(self, ctx, session)
        endpoint = self.config.aws.endpoint_url
        client = make_client(self, ctx, session, "secretsmanager", region, endpoint)
        try:
            response = client.get_secret_value(SecretId=self.secret_id, **self.version)
        except Exception as exc:
            raise self._aws_error(ctx, exc, region) from None
        finally:
            client.close()
        text = response.get("SecretString")
        if text is None:
            data = response.get("SecretBinary")
            if data is None:
                raise self.error(ctx, "the secret version has no value")
            try:
                text = bytes(data).decode("utf-8")
            except UnicodeDecodeError:
                raise self.error(ctx, "the secret is binary and not UTF-8 text") from None
        value = read_dot_path(self, ctx, str(text), self.path)
        log.debug("fetched %s (region %s)", self.reference, region)
        return Credential(password=value, fetched_at=self.clock())

    def _aws_error(self, ctx: CredentialContext, exc: Exception, region: str) -> Exception:
        code = client_error_code(exc)
        if code == "ResourceNotFoundException":
            stage = self.version.get("VersionStage") or self.version.get("VersionId")
            if stage:
                return self.error(
                    ctx,
                    f"the secret, or its version {stage}, does not exist (region {region})",
                )
            return self.error(ctx, f"the secret does not exist (region {region})")
        if code in ("AccessDeniedException", "AccessDenied"):
            return self.error(
                ctx,
                "access denied (the agent's AWS identity needs secretsmanager:GetSecretValue "
                "on it)",
            )
        if code == "DecryptionFailure":
            return self.error(
                ctx,
                "Secrets Manager cannot decrypt the secret with its KMS key (the agent's AWS "
                "identity needs kms:Decrypt on that key)",
            )
        return aws_error(self, ctx, exc, "Secrets Manager", self.config.aws.endpoint_url)


# --- shared with aws_rds_iam -------------------------------------------------------------

_session_lock = threading.Lock()


def check_dot_path(source: CredentialSource, path: str) -> None:
    """The dot-path's shape, checked when the reference is given (same rule as read_dot_path)."""
    if not path.startswith(".") or path == "." or ".." in path or path.endswith("."):
        raise UsageError(
            f"Bad dot-path {path!r} in {source.reference}: write it as #.field or #.a.b."
        )


def aws_session(source: CredentialSource, ctx: CredentialContext | None = None) -> Any:
    """A boto3 session with ``credentials.aws.profile``; says which extra is missing."""
    try:
        import boto3
        import botocore.exceptions
    except ImportError:
        raise source.missing_extra("boto3") from None
    quiet_botocore_debug()
    profile = source.config.aws.profile
    try:
        with _session_lock:  # creating sessions is not thread-safe in botocore
            return boto3.session.Session(profile_name=profile)
    except botocore.exceptions.ProfileNotFound:
        raise source.error(
            ctx,
            f"the AWS profile {profile!r} (credentials.aws.profile) is not in the agent's AWS "
            "config files",
        ) from None


def resolve_region(source: CredentialSource, ctx: CredentialContext | None, session: Any) -> str:
    """``credentials.aws.region``, else AWS_REGION / AWS_DEFAULT_REGION, else the profile's."""
    region = (
        source.config.aws.region
        or os.environ.get("AWS_REGION")
        or os.environ.get("AWS_DEFAULT_REGION")
        or (session.region_name if session is not None else None)
    )
    if not region:
        raise source.error(
            ctx,
            'no AWS region is set: set "credentials.aws.region" in the agent\'s config, or '
            "AWS_REGION in its environment",
        )
    return str(region)


def make_client(
    source: CredentialSource,
    ctx: CredentialContext | None,
    session: Any,
    service: str,
    region: str,
    endpoint: str | None = None,
) -> Any:
    try:
        return session.client(
            service, region_name=region, endpoint_url=endpoint, config=client_config()
        )
    except ValueError as exc:  # botocore: "Invalid endpoint: ..."
        raise source.error(ctx, f"credentials.aws.endpoint_url: {exc}") from None
    except Exception as exc:
        raise aws_error(source, ctx, exc, service, endpoint) from None


def client_config() -> Any:
    """Short timeouts and a few retries: a connect should fail in seconds, not minutes."""
    from botocore.config import Config

    return Config(
        connect_timeout=5,
        read_timeout=15,
        retries={"mode": "standard", "max_attempts": 3},
        user_agent_extra="outpost-agent",
    )


def client_error_parts(exc: BaseException) -> tuple[str | None, str]:
    """An AWS error's code and message.

    A JSON service's error that came back as an XML document (some emulators and proxies answer
    so) leaves botocore with the HTTP status as the code; the real code is inside the XML.
    """
    response = getattr(exc, "response", None)
    if not isinstance(response, dict):
        return None, ""
    error = response.get("Error", {})
    code = str(error.get("Code") or "") or None
    message = str(error.get("Message") or "")
    if (code is None or code.isdigit()) and "<Code>" in message:
        inner = re.search(r"<Code>([^<]+)</Code>", message)
        text = re.search(r"<Message>([^<]*)</Message>", message)
        code = inner.group(1) if inner else code
        message = text.group(1) if text else ""
    return code, message.strip().rstrip(".")


def client_error_code(exc: BaseException) -> str | None:
    return client_error_parts(exc)[0]


def aws_error(
    source: CredentialSource,
    ctx: CredentialContext | None,
    exc: Exception,
    service: str,
    endpoint: str | None,
) -> Exception:
    """One sentence for the errors every AWS call can meet (credentials, network, others)."""
    import botocore.exceptions as bx

    code, message = client_error_parts(exc)
    if isinstance(exc, bx.ClientError):
        if code in ("ExpiredTokenException", "ExpiredToken", "RequestExpired"):
            return source.error(
                ctx,
                "the agent's AWS session token has expired; refresh its AWS credentials",
            )
        if code in (
            "UnrecognizedClientException",
            "InvalidClientTokenId",
            "InvalidSignatureException",
            "SignatureDoesNotMatch",
        ):
            return source.error(
                ctx, f"AWS rejected the agent's AWS credentials ({code}); check its key or role"
            )
        return source.error(ctx, f"{service} refused the request ({code}: {message})")
    if isinstance(exc, bx.NoCredentialsError):
        return source.error(
            ctx,
            "the agent has no AWS credentials: give it an instance or task role, "
            "AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, or a profile (credentials.aws.profile)",
        )
    if isinstance(exc, bx.PartialCredentialsError | bx.CredentialRetrievalError):
        return source.error(ctx, f"the agent's AWS credentials cannot be loaded ({exc})")
    if isinstance(exc, bx.EndpointConnectionError | bx.ConnectionError | bx.HTTPClientError):
        where = getattr(exc, "kwargs", {}).get("endpoint_url") or endpoint or "its endpoint"
        return source.error(ctx, f"cannot reach {service} at {str(where).rstrip('/')}")
    if isinstance(exc, bx.BotoCoreError | bx.ClientError):
        return source.error(ctx, f"the AWS SDK failed ({exc})")
    if isinstance(exc, CredentialError | UsageError):
        return exc
    return source.error(ctx, f"the AWS SDK failed ({type(exc).__name__})")


class _DropDebug(logging.Filter):
    """botocore logs response bodies (a secret) and signatures (an RDS token) at DEBUG."""

    def filter(self, record: logging.LogRecord) -> bool:
        return record.levelno > logging.DEBUG


_DROP_DEBUG = _DropDebug()


def quiet_botocore_debug() -> None:
    """Keep secrets out of the agent's log even at ``log.level: debug``."""
    for name in ("botocore.parsers", "botocore.auth", "botocore.endpoint"):
        logger = logging.getLogger(name)
        if _DROP_DEBUG not in logger.filters:
            logger.addFilter(_DROP_DEBUG)
