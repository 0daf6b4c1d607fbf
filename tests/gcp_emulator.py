"""A local emulation of the two Google endpoints the GCP credential sources talk to.

- ``POST /token``: Google's OAuth 2.0 token endpoint for service accounts (the JWT-bearer
  grant google-auth sends). The assertion's RS256 signature is checked against the public
  key of a service-account key this emulator made (``service_account_key``), so google-auth
  runs for real: it reads the key file, signs a JWT and exchanges it for an access token.
- ``GET /v1/projects/P/secrets/S/versions/V:access``: Secret Manager's REST API v1. Answers
  ``{"name", "payload": {"data": base64, "dataCrc32c": "decimal"}}``, and Google's error
  shape ``{"error": {"code", "message", "status"}}`` for 401 (no or unknown token), 403
  (missing IAM role or token scope), 404 (no such secret or version) and 400 (a disabled
  version).

This is an emulation written from Google's public REST documentation, not Google's service:
it checks what the agent sends and answers like Google does for the cases the tests need.
Everything listens on 127.0.0.1 with a free port.
"""

from __future__ import annotations

import base64
import http.server
import json
import re
import secrets
import threading
import time
import urllib.parse
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import padding, rsa

CLOUD_PLATFORM = "https://www.googleapis.com/auth/cloud-platform"
JWT_BEARER = "urn:ietf:params:oauth:grant-type:jwt-bearer"
#: the audience a service account's JWT names, whatever token_uri it is sent to
TOKEN_AUDIENCE = "https://oauth2.googleapis.com/token"
_ACCESS = re.compile(r"/v1/projects/([^/]+)/secrets/([^/]+)/versions/([^/:]+):access")


def crc32c(data: bytes) -> int:
    """CRC-32C (Castagnoli), bit by bit: a reference independent of the agent's table-driven
    one, so a mistake in either shows up as a mismatch."""
    crc = 0xFFFFFFFF
    for byte in data:
        crc ^= byte
        for _ in range(8):
            crc = (crc >> 1) ^ (0x82F63B78 if crc & 1 else 0)
    return crc ^ 0xFFFFFFFF


def _b64url_decode(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


@dataclass
class Version:
    data: bytes
    state: str = "ENABLED"  # or DISABLED, DESTROYED


@dataclass
class Secret:
    versions: dict[int, Version] = field(default_factory=dict)
    #: service-account emails granted roles/secretmanager.secretAccessor; None: everyone
    accessors: set[str] | None = None
    #: send a wrong dataCrc32c (a payload damaged on the way)
    corrupt_checksum: bool = False
    #: leave dataCrc32c out (versions created before checksums existed)
    omit_checksum: bool = False


@dataclass
class Token:
    email: str
    scopes: set[str]
    expires_at: float


class GCPEmulator:
    """State and controls; ``run_emulator()`` serves it over HTTP."""

    def __init__(self) -> None:
        self.url = ""  # set when serving
        self.lock = threading.Lock()
        self.secrets: dict[tuple[str, str], Secret] = {}
        self.project_numbers: dict[str, int] = {}
        self.public_keys: dict[str, tuple[str, rsa.RSAPublicKey]] = {}  # key id -> (email, key)
        self.tokens: dict[str, Token] = {}  # the tokens Secret Manager accepts
        self.issued: dict[str, Token] = {}  # every token ever issued, revoked or not
        self.token_lifetime = 3600
        #: issue this access token every time (tests that need to know it in advance)
        self.fixed_token: str | None = None
        #: Secret Manager refuses every token (401 UNAUTHENTICATED)
        self.unauthenticated = False
        #: projects where the Secret Manager API is not enabled (403 SERVICE_DISABLED)
        self.api_disabled: set[str] = set()
        #: every request as (method, path, Authorization header)
        self.requests: list[tuple[str, str, str]] = []

    # --- controls --------------------------------------------------------------------

    @property
    def token_uri(self) -> str:
        return f"{self.url}/token"

    def project_number(self, project: str) -> int:
        return self.project_numbers.setdefault(project, 100000000000 + len(self.project_numbers))

    def add_secret(
        self, project: str, secret: str, *values: str | bytes, accessors: set[str] | None = None
    ) -> Secret:
        with self.lock:
            entry = self.secrets.setdefault((project, secret), Secret(accessors=accessors))
            for value in values:
                data = value.encode() if isinstance(value, str) else value
                entry.versions[len(entry.versions) + 1] = Version(data)
            return entry

    def service_account_key(
        self, email: str = "outpost-agent@outpost-test.iam.gserviceaccount.com"
    ) -> dict[str, Any]:
        """A new service-account key (the JSON Google's console downloads), its token_uri
        pointing at this emulator, its public key registered here."""
        private = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        key_id = secrets.token_hex(20)
        with self.lock:
            self.public_keys[key_id] = (email, private.public_key())
        pem = private.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        ).decode()
        return {
            "type": "service_account",
            "project_id": email.split("@")[1].split(".")[0],
            "private_key_id": key_id,
            "private_key": pem,
            "client_email": email,
            "client_id": str(secrets.randbelow(10**20)),
            "auth_uri": f"{self.url}/auth",
            "token_uri": self.token_uri,
            "auth_provider_x509_cert_url": f"{self.url}/certs",
            "client_x509_cert_url": f"{self.url}/certs/{email}",
        }

    def write_key_file(self, path: Path, **kwargs: Any) -> Path:
        path.write_text(json.dumps(self.service_account_key(**kwargs)))
        path.chmod(0o600)
        return path

    def delete_keys(self) -> None:
        """Every key is deleted: Google refuses the JWTs they sign (invalid_grant)."""
        with self.lock:
            self.public_keys.clear()

    def revoke_tokens(self) -> None:
        """Every access token issued so far is revoked (401 UNAUTHENTICATED from then on)."""
        with self.lock:
            self.tokens.clear()

    def issued_tokens(self) -> list[str]:
        with self.lock:
            return list(self.issued)

    def count(self, method: str, prefix: str) -> int:
        with self.lock:
            return sum(1 for m, p, _ in self.requests if m == method and p.startswith(prefix))

    # --- the endpoints ---------------------------------------------------------------

    def handle_token(self, form: dict[str, str]) -> tuple[int, dict[str, Any]]:
        def refuse(error: str, description: str) -> tuple[int, dict[str, Any]]:
            return 400, {"error": error, "error_description": description}

        if form.get("grant_type") != JWT_BEARER:
            return refuse("unsupported_grant_type", "Invalid grant_type.")
        parts = form.get("assertion", "").split(".")
        if len(parts) != 3:
            return refuse("invalid_request", "Invalid JWT.")
        try:
            header = json.loads(_b64url_decode(parts[0]))
            claims = json.loads(_b64url_decode(parts[1]))
            signature = _b64url_decode(parts[2])
        except ValueError:
            return refuse("invalid_request", "Invalid JWT.")
        with self.lock:
            known = self.public_keys.get(str(header.get("kid")))
        if header.get("alg") != "RS256" or known is None:
            return refuse("invalid_grant", "Invalid JWT Signature.")
        email, public_key = known
        try:
            public_key.verify(
                signature,
                f"{parts[0]}.{parts[1]}".encode(),
                padding.PKCS1v15(),
                hashes.SHA256(),
            )
        except InvalidSignature:
            return refuse("invalid_grant", "Invalid JWT Signature.")
        now = time.time()
        if claims.get("iss") != email or claims.get("aud") != TOKEN_AUDIENCE:
            return refuse("invalid_grant", "Invalid JWT: Token must be a short-lived token.")
        if not float(claims.get("iat", 0)) - 300 <= now <= float(claims.get("exp", 0)) + 300:
            return refuse("invalid_grant", "Invalid JWT: Token must be a short-lived token.")
        scopes = set(str(claims.get("scope", "")).split())
        if not scopes:
            return refuse("invalid_scope", "Empty or missing scope not allowed.")
        with self.lock:
            token = self.fixed_token or "ya29.emu-" + secrets.token_urlsafe(32)
            self.tokens[token] = self.issued[token] = Token(
                email, scopes, now + self.token_lifetime
            )
        return 200, {
            "access_token": token,
            "expires_in": self.token_lifetime,
            "token_type": "Bearer",
        }

    def handle_access(
        self, project: str, secret_id: str, version_id: str, authorization: str
    ) -> tuple[int, dict[str, Any]]:
        def error(code: int, status: str, message: str) -> tuple[int, dict[str, Any]]:
            return code, {"error": {"code": code, "message": message, "status": status}}

        scheme, _, token_text = authorization.partition(" ")
        with self.lock:
            token = self.tokens.get(token_text) if scheme.lower() == "bearer" else None
            if self.unauthenticated or token is None or token.expires_at <= time.time():
                return error(
                    401,
                    "UNAUTHENTICATED",
                    "Request had invalid authentication credentials. Expected OAuth 2 access "
                    "token, login cookie or other valid authentication credential. See "
                    "https://developers.google.com/identity/sign-in/web/devconsole-project.",
                )
            if CLOUD_PLATFORM not in token.scopes:
                return error(
                    403, "PERMISSION_DENIED", "Request had insufficient authentication scopes."
                )
            number = self.project_number(project)
            if project in self.api_disabled:
                code, body = error(
                    403,
                    "PERMISSION_DENIED",
                    f"Secret Manager API has not been used in project {number} before or it is "
                    f"disabled. Enable it by visiting https://console.developers.google.com/apis/"
                    f"api/secretmanager.googleapis.com/overview?project={number} then retry.",
                )
                body["error"]["details"] = [
                    {
                        "@type": "type.googleapis.com/google.rpc.ErrorInfo",
                        "reason": "SERVICE_DISABLED",
                        "domain": "googleapis.com",
                    }
                ]
                return code, body
            secret = self.secrets.get((project, secret_id))
            if (
                secret is not None
                and secret.accessors is not None
                and token.email not in secret.accessors
            ):
                return error(
                    403,
                    "PERMISSION_DENIED",
                    f"Permission 'secretmanager.versions.access' denied for resource "
                    f"'projects/{project}/secrets/{secret_id}/versions/{version_id}' "
                    f"(or it may not exist).",
                )
            if secret is None:
                return error(
                    404,
                    "NOT_FOUND",
                    f"Secret [projects/{number}/secrets/{secret_id}] not found or has no versions.",
                )
            if version_id == "latest":
                enabled = [n for n, v in secret.versions.items() if v.state == "ENABLED"]
                if not enabled:
                    return error(
                        404,
                        "NOT_FOUND",
                        f"Secret [projects/{number}/secrets/{secret_id}] not found or has no "
                        f"versions.",
                    )
                number_of_version = max(enabled)
            elif version_id.isdigit() and int(version_id) in secret.versions:
                number_of_version = int(version_id)
            else:
                return error(
                    404,
                    "NOT_FOUND",
                    f"Secret Version [projects/{number}/secrets/{secret_id}/versions/"
                    f"{version_id}] not found.",
                )
            version = secret.versions[number_of_version]
            name = f"projects/{number}/secrets/{secret_id}/versions/{number_of_version}"
            if version.state != "ENABLED":
                return error(
                    400,
                    "FAILED_PRECONDITION",
                    f"Secret Version [{name}] is in {version.state} state.",
                )
            payload: dict[str, Any] = {"data": base64.b64encode(version.data).decode()}
            if not secret.omit_checksum:
                checksum = crc32c(version.data) ^ (0xFF if secret.corrupt_checksum else 0)
                payload["dataCrc32c"] = str(checksum)  # int64 as a JSON string, like Google
            return 200, {"name": name, "payload": payload}


class _Handler(http.server.BaseHTTPRequestHandler):
    server: _Server
    protocol_version = "HTTP/1.1"

    def log_message(self, format: str, *args: object) -> None:
        pass

    def _send(self, code: int, body: dict[str, Any]) -> None:
        data = json.dumps(body).encode()
        self.send_response(code)
        self.send_header("Content-Type", "application/json; charset=UTF-8")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def _record(self) -> str:
        emulator = self.server.emulator
        path = urllib.parse.urlsplit(self.path).path
        with emulator.lock:
            emulator.requests.append((self.command, path, self.headers.get("Authorization", "")))
        return path

    def do_POST(self) -> None:
        path = self._record()
        length = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(length).decode()
        if path != "/token":
            self._send(404, {"error": {"code": 404, "message": "Not Found", "status": "NOT_FOUND"}})
            return
        form = dict(urllib.parse.parse_qsl(body))
        self._send(*self.server.emulator.handle_token(form))

    def do_GET(self) -> None:
        path = self._record()
        match = _ACCESS.fullmatch(urllib.parse.unquote(path))
        if match is None:
            message = f"The requested URL {path} was not found on this server."
            self._send(404, {"error": {"code": 404, "message": message, "status": "NOT_FOUND"}})
            return
        authorization = self.headers.get("Authorization", "")
        project, secret, version = match.groups()
        self._send(*self.server.emulator.handle_access(project, secret, version, authorization))


class _Server(http.server.ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, emulator: GCPEmulator) -> None:
        super().__init__(("127.0.0.1", 0), _Handler)
        self.emulator = emulator


@contextmanager
def run_emulator() -> Iterator[GCPEmulator]:
    """Serve a fresh emulator on 127.0.0.1 and a free port until the block ends."""
    emulator = GCPEmulator()
    server = _Server(emulator)
    thread = threading.Thread(
        target=server.serve_forever, args=(0.05,), name="gcp-emulator", daemon=True
    )
    thread.start()
    emulator.url = f"http://127.0.0.1:{server.server_port}"
    try:
        yield emulator
    finally:
        server.shutdown()
        server.server_close()
        thread.join(10)
