"""AWS KMS for ``perseus_auth.dest_pass_enc``: encrypt a password as Perseus's ``encpass`` does
(``Encrypt`` with the key ARN, base64 of the ciphertext blob) and decrypt it again.

Needs boto3 (``pip install 'outpost-agent[aws]'``). The key is ``pooler.aws_kms_key_arn``; the
region is the ARN's, the endpoint ``credentials.aws.endpoint_url`` (a VPC endpoint or an
emulator) and the profile ``credentials.aws.profile``; AWS credentials come from boto3's chain.
Blocking: call from a thread when on the event loop.
"""

from __future__ import annotations

import base64
import binascii
import re
import threading
from typing import Any

from outpost.config import AWSCredentialsConfig
from outpost.errors import OutpostError

_ARN = re.compile(r"arn:[a-z-]+:kms:(?P<region>[a-z0-9-]+):\d{12}:(key|alias)/.+")
_clients: dict[tuple[str | None, str | None, str | None], Any] = {}
_clients_lock = threading.Lock()


class KMSError(OutpostError):
    """KMS could not encrypt or decrypt; one sentence, never the value."""


def check_key_arn(arn: str) -> str:
    if not _ARN.fullmatch(arn):
        raise KMSError(
            f"pooler.aws_kms_key_arn {arn!r} is not a KMS key ARN "
            "(arn:aws:kms:REGION:ACCOUNT:key/ID)."
        )
    return arn


def _region(aws: AWSCredentialsConfig, arn: str | None) -> str | None:
    match = _ARN.fullmatch(arn) if arn else None
    return match.group("region") if match else aws.region


def _client(aws: AWSCredentialsConfig, arn: str | None) -> Any:
    try:
        import boto3
    except ImportError:
        raise KMSError(
            "AWS KMS needs the Python package 'boto3'; install it with: "
            "pip install 'outpost-agent[aws]'"
        ) from None
    from outpost.credentials.aws_secretsmanager import client_config, quiet_botocore_debug

    quiet_botocore_debug()
    region = _region(aws, arn)
    cache_key = (region, aws.endpoint_url, aws.profile)
    with _clients_lock:
        client = _clients.get(cache_key)
        if client is None:
            session = boto3.session.Session(profile_name=aws.profile)
            try:
                client = session.client(
                    "kms",
                    region_name=region,
                    endpoint_url=aws.endpoint_url,
                    config=client_config(),
                )
            except Exception as exc:  # NoRegionError and friends
                raise KMSError(
                    f"Cannot set up the AWS KMS client ({exc}); set credentials.aws.region or "
                    "use a key ARN with its region."
                ) from None
            _clients[cache_key] = client
    return client


def _error(exc: Exception, action: str, aws: AWSCredentialsConfig) -> KMSError:
    import botocore.exceptions as bx

    from outpost.credentials.aws_secretsmanager import client_error_parts

    code, message = client_error_parts(exc)
    if isinstance(exc, bx.ClientError):
        if code in ("InvalidCiphertextException", "IncorrectKeyException"):
            return KMSError(
                f"AWS KMS cannot {action}: the ciphertext was not made by this KMS key or "
                "account, or is corrupt."
            )
        if code in ("NotFoundException", "DisabledException", "KMSInvalidStateException"):
            return KMSError(f"AWS KMS cannot {action}: the key is missing or disabled ({code}).")
        if code in ("AccessDeniedException", "UnrecognizedClientException"):
            return KMSError(f"AWS KMS refused to {action} ({code}); check the agent's AWS rights.")
        return KMSError(f"AWS KMS refused to {action} ({code}: {message}).")
    if isinstance(exc, bx.NoCredentialsError):
        return KMSError(
            f"Cannot {action} with AWS KMS: the agent has no AWS credentials (give it a role, "
            "AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, or credentials.aws.profile)."
        )
    if isinstance(exc, bx.EndpointConnectionError | bx.ConnectionError | bx.HTTPClientError):
        where = aws.endpoint_url or "its endpoint"
        return KMSError(f"Cannot {action} with AWS KMS: cannot reach KMS at {where}.")
    return KMSError(f"Cannot {action} with AWS KMS: the AWS SDK failed ({type(exc).__name__}).")


def kms_encrypt(password: str, key_arn: str, aws: AWSCredentialsConfig) -> str:
    """Base64 of KMS ``Encrypt(KeyId=KEY_ARN, Plaintext=PASSWORD)`` (Perseus's dest_pass_enc)."""
    check_key_arn(key_arn)
    client = _client(aws, key_arn)
    try:
        blob = client.encrypt(KeyId=key_arn, Plaintext=password.encode())["CiphertextBlob"]
    except Exception as exc:
        raise _error(exc, "encrypt the password", aws) from None
    return base64.b64encode(blob).decode("ascii")


def kms_decrypt(ciphertext_b64: str, aws: AWSCredentialsConfig, key_arn: str | None) -> str:
    """The password in a base64 KMS ciphertext (the key is named by the ciphertext itself)."""
    try:
        blob = base64.b64decode(ciphertext_b64.strip(), validate=True)
    except (binascii.Error, ValueError):
        raise KMSError("The value is not base64, so it is no KMS ciphertext.") from None
    client = _client(aws, key_arn)
    kwargs: dict[str, Any] = {"CiphertextBlob": blob}
    if key_arn:
        kwargs["KeyId"] = key_arn
    try:
        plain = client.decrypt(**kwargs)["Plaintext"]
    except Exception as exc:
        raise _error(exc, "decrypt the value", aws) from None
    try:
        return bytes(plain).decode()
    except UnicodeDecodeError:
        raise KMSError("The KMS plaintext is not UTF-8 text, so it is no password.") from None
