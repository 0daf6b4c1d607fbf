"""Logging in to HQ: the URL and TLS rules, ``POST /agent/v1/login``, and pinning HQ's key.

An agent is associated with one HQ once and for good: a login to a different HQ (another
``hq_id``) is refused; a login to the same HQ with a re-issued token replaces the stored token.
"""

from __future__ import annotations

import ipaddress
import ssl
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

import httpx
from pydantic import ValidationError

from outpost.crypto import Key
from outpost.link.association import (
    ASSOCIATION_FILE,
    TOKEN_FILE,
    Association,
    load_association,
    save_association,
    save_token,
)
from outpost.link.errors import LinkDown, LinkError, TokenRejected
from outpost.protocol import Error, LoginResponse, load_public_key

LOGIN_PATH = "/agent/v1/login"
WS_PATH = "/agent/v1/ws"
POLL_PATH = "/agent/v1/poll"


def is_loopback(host: str) -> bool:
    if host.lower() == "localhost" or host.lower().endswith(".localhost"):
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def check_url(url: str, *, allow_insecure: bool, what: str = "hq.url") -> str:
    """Normalise an HQ base URL; refuse plain HTTP to a non-loopback host unless allowed."""
    parts = urlsplit(url.strip())
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise LinkError(
            f"{what} {url!r} is not an HQ address; give https://HOST[:PORT] "
            "(or http:// on loopback)."
        )
    if parts.query or parts.fragment:
        raise LinkError(f"{what} {url!r} must not carry a query or fragment; give the base URL.")
    if parts.scheme == "http" and not allow_insecure and not is_loopback(parts.hostname):
        raise LinkError(
            f"{what} {url!r} is plain HTTP to a host that is not loopback, so the token and "
            "the jobs would cross the network unencrypted; use https://, or set "
            "hq.allow_insecure (outpost login --allow-insecure) to accept that."
        )
    return url.strip().rstrip("/")


def ssl_context(url: str, ca_file: str | None) -> ssl.SSLContext | None:
    """Verify HQ with the system CAs, or with CA_FILE alone when given; None for http://."""
    if not url.startswith("https://"):
        return None
    if ca_file is not None:
        path = Path(ca_file).expanduser()
        if not path.is_file():
            raise LinkError(f"hq.ca_file {path} does not exist; fix the path or remove it.")
        try:
            return ssl.create_default_context(cafile=str(path))
        except (ssl.SSLError, OSError) as exc:
            raise LinkError(
                f"hq.ca_file {path} is not a PEM CA certificate ({exc}); give the CA that "
                "signed HQ's certificate."
            ) from None
    return ssl.create_default_context()


@dataclass(frozen=True)
class Endpoint:
    """Where and how to reach HQ."""

    url: str
    ca_file: str | None = None
    allow_insecure: bool = False

    def context(self) -> ssl.SSLContext | None:
        return ssl_context(self.url, self.ca_file)

    def verify(self) -> ssl.SSLContext | bool:
        return self.context() or True


def error_of(response: httpx.Response) -> Error:
    """HQ's ``Error`` body, or one made up from the status when the body is something else."""
    try:
        return Error.model_validate_json(response.content)
    except ValidationError:
        pass
    try:
        data = response.json()
        if isinstance(data, dict) and isinstance(data.get("detail"), dict):
            return Error.model_validate(data["detail"])
    except (ValueError, ValidationError):
        pass
    return Error(code=f"http_{response.status_code}", message=f"HTTP {response.status_code}")


def describe_transport_error(exc: Exception, url: str) -> str:
    if isinstance(exc, httpx.ConnectError) and "CERTIFICATE_VERIFY_FAILED" in str(exc):
        return (
            f"HQ at {url} presented a certificate that does not verify ({exc}); give the CA "
            "that signed it with --ca-file (hq.ca_file)"
        )
    if isinstance(exc, httpx.TimeoutException):
        return f"HQ at {url} did not answer in time"
    return f"cannot reach HQ at {url}: {exc or type(exc).__name__}"


def request_login(endpoint: Endpoint, token: str, timeout: float = 15.0) -> LoginResponse:
    """``POST /agent/v1/login``: who the token belongs to, and HQ's signing key.

    Raises TokenRejected on 401, LinkDown when HQ cannot be reached, LinkError otherwise.
    """
    url = endpoint.url + LOGIN_PATH
    try:
        with httpx.Client(verify=endpoint.verify(), timeout=timeout) as client:
            response = client.post(url, headers={"Authorization": f"Bearer {token}"})
    except httpx.HTTPError as exc:
        raise LinkDown(describe_transport_error(exc, endpoint.url)) from None
    if response.status_code == 401:
        error = error_of(response)
        raise TokenRejected(error.code, error.message, endpoint.url)
    if response.status_code >= 500:
        raise LinkDown(f"HQ at {endpoint.url} answered the login with HTTP {response.status_code}")
    if response.status_code != 200:
        error = error_of(response)
        raise LinkError(
            f"HQ at {endpoint.url} refused the login (HTTP {response.status_code}: "
            f"{error.message.rstrip('.')}); check that --hq is the address of Outpost HQ."
        )
    try:
        login = LoginResponse.model_validate_json(response.content)
        load_public_key(login.signing_key)
    except ValueError:
        raise LinkError(
            f"{url} did not answer like Outpost HQ (unexpected login response); check --hq."
        ) from None
    return login


def associate(
    data_dir: Path, key: Key | None, endpoint: Endpoint, token: str, login: LoginResponse
) -> Association:
    """Store the association (pinning HQ's key) and the token; refuse a different HQ."""
    current = load_association(data_dir)
    undo = (
        f"to move this agent to another HQ, stop it and remove {data_dir / ASSOCIATION_FILE} "
        f"and {data_dir / TOKEN_FILE} first"
    )
    if current is not None and current.hq_id != login.hq_id:
        raise LinkError(
            f"This agent is associated with HQ {current.hq_id} at {current.url} as "
            f"{current.agent_name!r}; {endpoint.url} is another HQ ({login.hq_id}), so the login "
            f"is refused; {undo}."
        )
    if current is not None and current.signing_key != login.signing_key:
        raise LinkError(
            f"HQ {login.hq_id} at {endpoint.url} presents another signing key than the one "
            f"pinned at the first login, so the login is refused; if HQ's key was replaced on "
            f"purpose, {undo}."
        )
    association = Association(
        url=endpoint.url,
        agent_name=login.agent_name,
        hq_id=login.hq_id,
        signing_key=login.signing_key,
        ca_file=str(Path(endpoint.ca_file).expanduser().resolve()) if endpoint.ca_file else None,
        allow_insecure=endpoint.allow_insecure,
        associated_at=current.associated_at if current is not None else 0.0,
    )
    data_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    save_token(data_dir, key, token)
    save_association(data_dir, association)
    return load_association(data_dir) or association


def login(
    data_dir: Path,
    key: Key | None,
    endpoint: Endpoint,
    token: str,
    timeout: float = 15.0,
) -> Association:
    """Check the URL, log in, and store the association; see ``associate``."""
    endpoint = Endpoint(
        check_url(endpoint.url, allow_insecure=endpoint.allow_insecure, what="--hq"),
        endpoint.ca_file,
        endpoint.allow_insecure,
    )
    try:
        response = request_login(endpoint, token, timeout)
    except LinkDown as exc:
        text = str(exc)
        hint = "" if "--ca-file" in text else "; check --hq and try again"
        raise LinkError(f"{text[:1].upper()}{text[1:]}{hint}.") from None
    return associate(data_dir, key, endpoint, token, response)
