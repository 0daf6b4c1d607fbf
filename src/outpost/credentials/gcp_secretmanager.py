"""``gcp-secretmanager:projects/P/secrets/S[/versions/V][#.dot.path]`` — a secret version
from Google Cloud Secret Manager.

The value is read with Secret Manager's REST API v1 (``GET .../versions/V:access``) over httpx,
authorised by an OAuth access token from google-auth: the service-account key (or
authorized-user file) named by ``credentials.gcp.credentials_file``, otherwise Application
Default Credentials. The payload's CRC32C checksum, when Google sends one, is
checked with the small pure-Python CRC32C below (``google-crc32c`` is not a dependency).

``GoogleAuth`` (the credentials and their token, refreshed under a lock) is shared with the
``gcp-cloudsql-iam`` source.
"""

from __future__ import annotations

import base64
import binascii
import json
import logging
import os
import re
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any
from urllib.parse import urlsplit

import httpx

from outpost.config import CredentialsConfig
from outpost.credentials.base import (
    Clock,
    Credential,
    CredentialContext,
    CredentialError,
    CredentialSource,
    read_dot_path,
    split_dot_path,
)
from outpost.errors import UsageError

log = logging.getLogger("outpost.credentials")

CLOUD_PLATFORM_SCOPE = "https://www.googleapis.com/auth/cloud-platform"
#: seconds a Secret Manager request waits for Google (connect, read)
REQUEST_TIMEOUT = 15.0
#: a token with less left than this is refreshed before a Secret Manager request
TOKEN_MARGIN = 60.0

NO_CREDENTIALS = (
    "no Google credentials were found; set credentials.gcp.credentials_file to a "
    "service-account key file, or set GOOGLE_APPLICATION_CREDENTIALS, or run "
    "`gcloud auth application-default login`, or run the agent on Google Cloud with a "
    "service account attached"
)

_PROJECT = r"[a-z0-9][a-z0-9.:-]{0,62}"  # an id, a number, or a domain-scoped example.com:id
_RESOURCE_ID = r"[A-Za-z0-9_-]{1,255}"
_VERSION = r"latest|[1-9][0-9]{0,18}|[A-Za-z][A-Za-z0-9_-]{0,62}"  # a number or an alias
_NAME = re.compile(
    rf"projects/(?P<project>{_PROJECT})/secrets/(?P<secret>{_RESOURCE_ID})"
    rf"(?:/versions/(?P<version>{_VERSION}))?"
)


# --- CRC32C -------------------------------------------------------------------------------


def _crc32c_table() -> tuple[int, ...]:
    table = []
    for n in range(256):
        crc = n
        for _ in range(8):
            crc = (crc >> 1) ^ (0x82F63B78 if crc & 1 else 0)  # Castagnoli, reflected
        table.append(crc)
    return tuple(table)


_CRC32C_TABLE = _crc32c_table()


def crc32c(data: bytes) -> int:
    """CRC-32C (Castagnoli) of DATA, as Google computes ``dataCrc32c`` (secrets are at most
    64 KiB, so a table-driven loop in Python is fast enough)."""
    crc = 0xFFFFFFFF
    table = _CRC32C_TABLE
    for byte in data:
        crc = table[(crc ^ byte) & 0xFF] ^ (crc >> 8)
    return crc ^ 0xFFFFFFFF


# --- Google credentials -------------------------------------------------------------------


def _short(exc: BaseException) -> str:
    """A one-line reason from a google-auth or transport exception (never a token: these
    messages carry OAuth error codes and socket errors only)."""
    text = str(exc.args[0]) if exc.args else str(exc)
    errno = re.search(r"\[Errno -?\d+\] ([^'\")\]]+)", text)
    if errno:
        text = errno.group(1)
    text = " ".join(text.split()).rstrip(".")
    return text[:200] if text else type(exc).__name__


def _epoch(expiry: Any) -> float | None:
    """google-auth's ``expiry`` (a naive UTC datetime) as epoch seconds."""
    if not isinstance(expiry, datetime):
        return None
    moment: datetime = expiry if expiry.tzinfo is not None else expiry.replace(tzinfo=UTC)
    return moment.timestamp()


@dataclass(frozen=True)
class AccessToken:
    """An OAuth access token; ``repr`` never shows it."""

    token: str = field(repr=False)
    expires_at: float | None
    quota_project: str | None = None
    refreshed: bool = False  # obtained just now, not reused
    identity: str | None = None  # the service account's email, when the credentials know it

    def headers(self) -> dict[str, str]:
        headers = {"Authorization": f"Bearer {self.token}"}
        if self.quota_project:
            headers["x-goog-user-project"] = self.quota_project
        return headers


class GoogleAuth:
    """Google credentials for one source and their access token.

    The credentials come from ``credentials.gcp.credentials_file`` (a service-account key or
    an authorized-user file) or, without it, from Application Default Credentials (which also
    covers workload identity federation and the metadata server on Google Cloud). ``token()``
    refreshes when there is no token yet or it expires within ``margin`` seconds by the
    source's clock; a lock keeps that to one refresh at a time. Tests may pass ready-made
    ``credentials`` (any object with ``token``, ``expiry`` and ``refresh(request)``, like
    google-auth's).
    """

    def __init__(
        self, source: CredentialSource, scopes: Sequence[str], credentials: Any = None
    ) -> None:
        self.source = source
        self.scopes = list(scopes)
        self._credentials = credentials
        self._lock = threading.Lock()

    def _load(self, ctx: CredentialContext | None) -> Any:
        try:
            import google.auth
            import google.auth.exceptions
        except ImportError:
            raise self.source.missing_extra("google-auth") from None
        path = self.source.config.gcp.credentials_file
        try:
            if path:
                return self._load_file(ctx, os.path.expanduser(path))
            credentials, _ = google.auth.default(scopes=self.scopes)
        except google.auth.exceptions.DefaultCredentialsError as exc:
            if path:
                raise self._file_error(ctx, path, _short(exc)) from None
            raise self.source.error(ctx, NO_CREDENTIALS) from None
        except google.auth.exceptions.GoogleAuthError as exc:
            raise self.source.error(
                ctx, f"Google's credentials could not be loaded: {_short(exc)}"
            ) from None
        return credentials

    def _file_error(self, ctx: CredentialContext | None, path: str, reason: str) -> CredentialError:
        return self.source.error(
            ctx,
            f"the Google credentials file {path} (credentials.gcp.credentials_file) cannot be "
            f"used: {reason}",
        )

    def _load_file(self, ctx: CredentialContext | None, path: str) -> Any:
        """A service-account key or an authorized-user file, loaded by its own type (other
        kinds, such as workload identity federation, go through GOOGLE_APPLICATION_CREDENTIALS
        and Application Default Credentials)."""
        try:
            with open(path, encoding="utf-8") as handle:
                info = json.load(handle)
        except FileNotFoundError:
            raise self._file_error(ctx, path, "it does not exist") from None
        except PermissionError:
            raise self._file_error(
                ctx, path, f"the agent (uid {os.geteuid()}) may not read it"
            ) from None
        except (OSError, ValueError):
            raise self._file_error(ctx, path, "it is not a JSON file") from None
        kind = info.get("type") if isinstance(info, dict) else None
        try:
            if kind == "service_account":
                from google.oauth2 import service_account

                key_type: Any = service_account.Credentials
                return key_type.from_service_account_info(info, scopes=self.scopes)
            if kind == "authorized_user":
                from google.oauth2 import credentials as user_credentials

                user_type: Any = user_credentials.Credentials
                return user_type.from_authorized_user_info(info, scopes=self.scopes)
        except ValueError as exc:  # missing fields, a private key that does not parse
            raise self._file_error(ctx, path, _short(exc)) from None
        raise self._file_error(
            ctx,
            path,
            f"it holds {kind!r} credentials; give a service-account key or an authorized-user "
            f"file here, or set GOOGLE_APPLICATION_CREDENTIALS to the file instead",
        )

    def _refresh(self, ctx: CredentialContext | None, credentials: Any) -> None:
        try:
            import google.auth.exceptions
        except ImportError:
            raise self.source.missing_extra("google-auth") from None
        try:
            import google.auth.transport.requests
        except ImportError:
            raise self.source.missing_extra("requests") from None
        try:
            credentials.refresh(google.auth.transport.requests.Request())
        except google.auth.exceptions.RefreshError as exc:
            raise self.source.error(
                ctx,
                f"Google refused to issue an access token ({_short(exc)}); check that the "
                f"agent's service account and its key are still valid, or log in again with "
                f"`gcloud auth application-default login`",
            ) from None
        except google.auth.exceptions.TransportError as exc:
            raise self.source.error(
                ctx, f"Google's token endpoint is unreachable ({_short(exc)})"
            ) from None
        except google.auth.exceptions.GoogleAuthError as exc:
            raise self.source.error(
                ctx, f"the access token could not be refreshed ({_short(exc)})"
            ) from None

    def token(
        self, ctx: CredentialContext | None, margin: float, *, force: bool = False
    ) -> AccessToken:
        """A token with more than MARGIN seconds left (FORCE: a new one in any case)."""
        with self._lock:
            if self._credentials is None:
                self._credentials = self._load(ctx)
            credentials = self._credentials
            expires_at = _epoch(getattr(credentials, "expiry", None))
            refreshed = False
            if (
                force
                or not getattr(credentials, "token", None)
                or (expires_at is not None and expires_at - self.source.clock() <= margin)
            ):
                self._refresh(ctx, credentials)
                refreshed = True
                expires_at = _epoch(getattr(credentials, "expiry", None))
            token = getattr(credentials, "token", None)
            if not token:
                raise self.source.error(ctx, "Google's credentials gave no access token")
            if expires_at is not None and expires_at <= self.source.clock():
                raise self.source.error(
                    ctx,
                    "the access token Google's credentials gave has already expired "
                    "(check the agent machine's clock)",
                )
            quota = getattr(credentials, "quota_project_id", None)
            email = getattr(credentials, "service_account_email", None)
            return AccessToken(
                str(token),
                expires_at,
                quota_project=quota if isinstance(quota, str) else None,
                refreshed=refreshed,
                identity=email if isinstance(email, str) and "@" in email else None,
            )


# --- the source ---------------------------------------------------------------------------


def _google_error(response: httpx.Response) -> tuple[str, str, set[str]]:
    """(status, message, reasons) from Google's ``{"error": {"code", "message", "status",
    "details"}}`` body. Square brackets are dropped from the message (Google writes
    ``Secret [projects/1/secrets/s]``; the CLI's tables would take them for markup)."""
    try:
        body = response.json()
    except ValueError:
        return "", "", set()
    error = body.get("error") if isinstance(body, dict) else None
    if not isinstance(error, dict):
        return "", "", set()
    message = " ".join(str(error.get("message") or "").split())[:300].rstrip(".")
    message = message.replace("[", "").replace("]", "")
    details = error.get("details")
    reasons = {
        str(d["reason"])
        for d in (details if isinstance(details, list) else [])
        if isinstance(d, dict) and d.get("reason")
    }
    return str(error.get("status") or ""), message, reasons


class GCPSecretManagerSource(CredentialSource):
    kind = "gcp-secretmanager"
    extra = "gcp"

    def __init__(
        self,
        argument: str,
        config: CredentialsConfig,
        clock: Clock = time.time,
        *,
        credentials: Any = None,
    ) -> None:
        super().__init__(argument, config, clock)
        self.auth = GoogleAuth(self, [CLOUD_PLATFORM_SCOPE], credentials)

    def validate(self) -> None:
        name, path = split_dot_path(self.argument)
        match = _NAME.fullmatch(name)
        if match is None:
            raise UsageError(
                f"{self.reference!r} does not name a Secret Manager secret; write "
                f"gcp-secretmanager:projects/PROJECT/secrets/SECRET[/versions/VERSION]"
                f"[#.field]."
            )
        if path is not None and (not path.startswith(".") or path == "." or ".." in path):
            raise UsageError(
                f"Bad dot-path {path!r} in {self.reference}: write it as #.field or #.a.b."
            )
        self.project = match["project"]
        self.secret = match["secret"]
        self.version = match["version"] or "latest"
        self.dot_path = path

    @property
    def version_name(self) -> str:
        return f"projects/{self.project}/secrets/{self.secret}/versions/{self.version}"

    def _base_url(self, ctx: CredentialContext) -> str:
        base = self.config.gcp.secretmanager_url.rstrip("/")
        parts = urlsplit(base)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise self.error(
                ctx, f"credentials.gcp.secretmanager_url {base!r} is not an http(s) URL"
            )
        if parts.scheme == "http" and parts.hostname not in ("127.0.0.1", "::1", "localhost"):
            raise self.error(
                ctx,
                f"credentials.gcp.secretmanager_url {base} is plain http; an access token is "
                f"only sent over https (or to an emulator on localhost)",
            )
        return base

    def fetch(self, ctx: CredentialContext) -> Credential:
        base = self._base_url(ctx)
        url = f"{base}/v1/{self.version_name}:access"
        token = self.auth.token(ctx, TOKEN_MARGIN)
        response = self._get(ctx, base, url, token)
        if response.status_code == 401 and not token.refreshed:
            # a token revoked before its expiry: get a new one and try once more
            token = self.auth.token(ctx, TOKEN_MARGIN, force=True)
            response = self._get(ctx, base, url, token)
        if response.status_code != 200:
            raise self._http_error(ctx, base, token, response)
        data, name = self._payload(ctx, response)
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError:
            raise self.error(ctx, f"{name} holds binary data, not UTF-8 text") from None
        log.debug("read %s from Secret Manager", name)
        if self.dot_path is None:
            text = text.rstrip("\r\n")  # `echo pw | gcloud secrets create` adds a newline
        value = read_dot_path(self, ctx, text, self.dot_path)
        return Credential(password=value, fetched_at=self.clock())

    def _get(
        self, ctx: CredentialContext, base: str, url: str, token: AccessToken
    ) -> httpx.Response:
        headers = {"Accept": "application/json", **token.headers()}
        try:
            with httpx.Client(timeout=REQUEST_TIMEOUT) as client:
                return client.get(url, headers=headers)
        except httpx.TimeoutException:
            raise self.error(
                ctx, f"Secret Manager at {base} did not answer within {REQUEST_TIMEOUT:.0f} s"
            ) from None
        except httpx.TransportError as exc:
            raise self.error(
                ctx, f"Secret Manager at {base} is unreachable ({_short(exc)})"
            ) from None

    def _http_error(
        self, ctx: CredentialContext, base: str, token: AccessToken, response: httpx.Response
    ) -> CredentialError:
        status, message, reasons = _google_error(response)
        said = f" (Google says: {message})" if message else ""
        code = response.status_code
        if code == 404:
            if self.version == "latest":
                return self.error(
                    ctx,
                    f"not found: Secret Manager has no secret {self.secret} in project "
                    f"{self.project}, or it has no enabled version",
                )
            return self.error(ctx, f"not found: Secret Manager has no {self.version_name}")
        if code == 403:
            if "SERVICE_DISABLED" in reasons or "has not been used in project" in message:
                return self.error(
                    ctx,
                    f"permission denied: the Secret Manager API is not enabled in the "
                    f"project{said}",
                )
            if "scope" in message.lower():
                return self.error(
                    ctx,
                    f"permission denied: the access token lacks the cloud-platform scope{said}",
                )
            who = f" ({token.identity})" if token.identity else ""
            return self.error(
                ctx,
                f"permission denied: the agent's Google identity{who} needs the role "
                f"roles/secretmanager.secretAccessor on secret {self.secret} or project "
                f"{self.project} (or the secret does not exist: Google does not say which)",
            )
        if code == 401:
            return self.error(
                ctx,
                f"Secret Manager refused the agent's Google credentials (401 "
                f"{status or 'UNAUTHENTICATED'}); check the service-account key or run "
                f"`gcloud auth application-default login` again",
            )
        if code == 400 and status == "FAILED_PRECONDITION":
            state = re.search(r"is in (\w+) state", message)
            if state:
                return self.error(
                    ctx,
                    f"{self.version_name} is {state.group(1).lower()}, so it cannot be read; "
                    f"enable it or name another version",
                )
            return self.error(ctx, f"{self.version_name} cannot be read{said}")
        return self.error(
            ctx,
            f"Secret Manager at {base} answered HTTP {code}{' ' + status if status else ''}{said}",
        )

    def _payload(self, ctx: CredentialContext, response: httpx.Response) -> tuple[bytes, str]:
        """The payload's bytes (checksum checked) and the version's full name."""
        bad = self.error(ctx, "Secret Manager's answer is not a secret payload")
        try:
            body = response.json()
        except ValueError:
            raise bad from None
        payload = body.get("payload") if isinstance(body, dict) else None
        if not isinstance(payload, dict) or not isinstance(payload.get("data", ""), str):
            raise bad
        name = str(body.get("name") or self.version_name)
        try:
            data = base64.b64decode(payload.get("data", ""), validate=True)
        except (binascii.Error, ValueError):
            raise bad from None
        expected = payload.get("dataCrc32c")
        if expected is not None:
            try:
                matches = int(expected) == crc32c(data)
            except (TypeError, ValueError):
                matches = False
            if not matches:
                raise self.error(
                    ctx,
                    f"the payload of {name} fails its CRC32C check, so it was damaged on the "
                    f"way; try again",
                )
        return data, name
