"""The GCP credential sources: ``gcp-secretmanager`` and ``gcp-cloudsql-iam``.

Secret Manager runs against ``tests/gcp_emulator.py``, a local HTTP server that speaks the
REST API v1 and Google's OAuth token endpoint (an emulation, not Google's service). google-auth
runs for real: it reads a service-account key file the emulator made, signs a JWT and trades it
for an access token at the emulator. The Cloud SQL IAM refresh logic is tested with a fake
clock and fake Google credentials whose refreshes are counted, and end to end: the token the
emulator issues is the password of a role in a throwaway PostgreSQL cluster.
"""

from __future__ import annotations

import json
import logging
import random
import sys
import threading
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from outpost.config import CredentialsConfig
from outpost.credentials import parse_reference
from outpost.credentials.base import Credential, CredentialContext, CredentialError
from outpost.credentials.cache import CredentialCache
from outpost.credentials.gcp_cloudsql_iam import SQL_LOGIN_SCOPE, CloudSQLIAMSource
from outpost.credentials.gcp_secretmanager import (
    CLOUD_PLATFORM_SCOPE,
    GCPSecretManagerSource,
    crc32c,
)
from outpost.errors import UsageError
from tests import gcp_emulator
from tests.gcp_emulator import GCPEmulator, run_emulator
from tests.helpers import Agent, refused_port
from tests.integration.conftest import PgCluster

pytestmark = pytest.mark.integration

PROJECT = "outpost-test"
PASSWORD = "S3cr3t-pw-" + uuid.uuid4().hex[:8]
JSON_SECRET = json.dumps({"db": {"user": "app", "password": PASSWORD}, "port": 5432})
CTX = CredentialContext(connection="orders db", driver="postgres", host="db", port=5432)


class FakeClock:
    def __init__(self, now: float) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def no_adc(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    """No Application Default Credentials anywhere: no env var, an empty gcloud config dir,
    and not on Google Compute Engine (so google-auth never probes the metadata server)."""
    from google.auth.compute_engine import _metadata

    for name in ("GOOGLE_APPLICATION_CREDENTIALS", "GOOGLE_CLOUD_PROJECT", "GCLOUD_PROJECT"):
        monkeypatch.delenv(name, raising=False)
    gcloud = tmp_path / "gcloud-config"
    gcloud.mkdir()
    monkeypatch.setenv("CLOUDSDK_CONFIG", str(gcloud))
    monkeypatch.setattr(_metadata, "is_on_gce", lambda request: False)
    return gcloud


@pytest.fixture
def emulator(no_adc: Path) -> Iterator[GCPEmulator]:
    with run_emulator() as emu:
        emu.add_secret(PROJECT, "db-password", PASSWORD)
        emu.add_secret(PROJECT, "db-json", JSON_SECRET)
        yield emu


@pytest.fixture
def key_file(emulator: GCPEmulator, tmp_path: Path) -> Path:
    return emulator.write_key_file(tmp_path / "agent-sa.json")


@pytest.fixture
def config(emulator: GCPEmulator, key_file: Path) -> CredentialsConfig:
    return CredentialsConfig(
        gcp={"secretmanager_url": emulator.url, "credentials_file": str(key_file)}
    )


def ref(name: str) -> str:
    return f"gcp-secretmanager:projects/{PROJECT}/secrets/{name}"


def fetch(reference: str, config: CredentialsConfig) -> Credential:
    return parse_reference(reference, config).fetch(CTX)


def fails(reference: str, config: CredentialsConfig) -> str:
    with pytest.raises(CredentialError) as info:
        fetch(reference, config)
    message = str(info.value)
    assert message.startswith(
        f"Cannot get the password for connection 'orders db' from {reference}"
    )
    assert "\n" not in message and message.endswith(".")
    return message


# --- Secret Manager: values ---------------------------------------------------------------


def test_plain_secret_with_a_service_account_key(
    emulator: GCPEmulator, config: CredentialsConfig
) -> None:
    cred = fetch(ref("db-password"), config)
    assert cred.password == PASSWORD
    assert cred.expires_at is None  # cached for credentials.cache_ttl
    assert PASSWORD not in repr(cred)
    # google-auth traded a signed JWT for a token, and the token went to Secret Manager
    assert emulator.count("POST", "/token") == 1
    (token,) = emulator.issued_tokens()
    assert emulator.issued[token].scopes == {CLOUD_PLATFORM_SCOPE}
    method, path, authorization = emulator.requests[-1]
    assert (method, path) == (
        "GET",
        f"/v1/projects/{PROJECT}/secrets/db-password/versions/latest:access",
    )
    assert authorization == f"Bearer {token}"


def test_versions_and_latest(emulator: GCPEmulator, config: CredentialsConfig) -> None:
    emulator.add_secret(PROJECT, "rotated", "first", "second", "third")
    assert fetch(ref("rotated"), config).password == "third"
    assert fetch(ref("rotated/versions/latest"), config).password == "third"
    assert fetch(ref("rotated/versions/1"), config).password == "first"
    assert fetch(ref("rotated/versions/2"), config).password == "second"


def test_dot_path_reads_a_json_field(config: CredentialsConfig) -> None:
    assert fetch(ref("db-json#.db.password"), config).password == PASSWORD
    assert fetch(ref("db-json#.db.user"), config).password == "app"
    assert fetch(ref("db-json#.port"), config).password == "5432"
    assert fetch(ref("db-json/versions/1#.db.password"), config).password == PASSWORD


def test_dot_path_missing_field_and_not_json(config: CredentialsConfig) -> None:
    message = fails(ref("db-json#.db.pasword"), config)
    assert "the secret has no field .db.pasword" in message
    message = fails(ref("db-json#.db"), config)
    assert "is an object" in message
    message = fails(ref("db-password#.password"), config)
    assert "the secret is not JSON, so dot-path .password cannot be read" in message
    assert PASSWORD not in message


def test_a_trailing_newline_is_dropped(emulator: GCPEmulator, config: CredentialsConfig) -> None:
    emulator.add_secret(PROJECT, "echoed", PASSWORD + "\n")
    assert fetch(ref("echoed"), config).password == PASSWORD


def test_binary_secret(emulator: GCPEmulator, config: CredentialsConfig) -> None:
    emulator.add_secret(PROJECT, "binary", b"\xff\xfe\x00\x01")
    assert "holds binary data, not UTF-8 text" in fails(ref("binary"), config)


# --- Secret Manager: references -----------------------------------------------------------


@pytest.mark.parametrize(
    "argument",
    [
        "db-password",
        f"{PROJECT}/db-password",
        f"projects/{PROJECT}",
        f"projects/{PROJECT}/secrets",
        f"projects/{PROJECT}/secrets/",
        f"projects/{PROJECT}/secret/db-password",
        f"projects/{PROJECT}/secrets/db-password/versions",
        f"projects/{PROJECT}/secrets/db-password/versions/",
        f"projects/{PROJECT}/secrets/db-password/versions/0",
        f"projects/{PROJECT}/secrets/db-password/versions/1/extra",
        f"projects/{PROJECT}/secrets/db-password:access",
        f"projects/{PROJECT}/secrets/db password",
        "projects/Bad Project/secrets/db-password",
        f"/projects/{PROJECT}/secrets/db-password",
    ],
)
def test_bad_resource_name(argument: str) -> None:
    reference = f"gcp-secretmanager:{argument}"
    with pytest.raises(UsageError) as info:
        parse_reference(reference, CredentialsConfig())
    assert str(info.value) == (
        f"{reference!r} does not name a Secret Manager secret; write "
        "gcp-secretmanager:projects/PROJECT/secrets/SECRET[/versions/VERSION][#.field]."
    )


@pytest.mark.parametrize("path", ["", "password", ".", ".db..password", "db.password"])
def test_bad_dot_path(path: str) -> None:
    reference = f"{ref('db-json')}#{path}"
    with pytest.raises(UsageError) as info:
        parse_reference(reference, CredentialsConfig())
    assert str(info.value) == (
        f"Bad dot-path {path!r} in {reference}: write it as #.field or #.a.b."
    )


def test_good_references_parse_without_the_sdk(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "google.auth", None)
    for argument, version in [
        ("projects/p-1/secrets/S_2", "latest"),
        ("projects/123456789/secrets/pw/versions/42", "42"),
        ("projects/example.com:proj/secrets/pw/versions/prod#.password", "prod"),
    ]:
        source = parse_reference(f"gcp-secretmanager:{argument}", CredentialsConfig())
        assert isinstance(source, GCPSecretManagerSource)
        assert source.version == version
        assert source.reference == f"gcp-secretmanager:{argument}"


# --- Secret Manager: errors ---------------------------------------------------------------


def test_not_found(emulator: GCPEmulator, config: CredentialsConfig) -> None:
    message = fails(ref("no-such-secret"), config)
    assert message.endswith(
        f"not found: Secret Manager has no secret no-such-secret in project {PROJECT}, or it "
        "has no enabled version."
    )
    message = fails(ref("db-password/versions/7"), config)
    assert message.endswith(
        f"not found: Secret Manager has no projects/{PROJECT}/secrets/db-password/versions/7."
    )


def test_permission_denied(emulator: GCPEmulator, config: CredentialsConfig) -> None:
    emulator.add_secret(PROJECT, "locked", PASSWORD, accessors={"someone-else@x.iam"})
    message = fails(ref("locked"), config)
    assert message.endswith(
        "permission denied: the agent's Google identity "
        "(outpost-agent@outpost-test.iam.gserviceaccount.com) needs the role "
        f"roles/secretmanager.secretAccessor on secret locked or project {PROJECT} (or the "
        "secret does not exist: Google does not say which)."
    )


def test_api_not_enabled(emulator: GCPEmulator, config: CredentialsConfig) -> None:
    emulator.api_disabled.add(PROJECT)
    message = fails(ref("db-password"), config)
    assert "permission denied: the Secret Manager API is not enabled in the project (Google " in (
        message
    )
    assert "secretmanager.googleapis.com/overview?project=" in message


def test_disabled_version(emulator: GCPEmulator, config: CredentialsConfig) -> None:
    secret = emulator.add_secret(PROJECT, "old", "v1", "v2")
    secret.versions[1].state = "DISABLED"
    message = fails(ref("old/versions/1"), config)
    assert message.endswith(
        f"projects/{PROJECT}/secrets/old/versions/1 is disabled, so it cannot be read; enable "
        "it or name another version."
    )
    assert fetch(ref("old"), config).password == "v2"


def test_credentials_refused_by_secret_manager(
    emulator: GCPEmulator, config: CredentialsConfig
) -> None:
    emulator.unauthenticated = True
    message = fails(ref("db-password"), config)
    assert "refused the agent's Google credentials (401 UNAUTHENTICATED)" in message
    assert emulator.count("POST", "/token") == 1  # a brand-new token is not retried


def test_a_revoked_token_is_replaced_once(emulator: GCPEmulator, config: CredentialsConfig) -> None:
    source = parse_reference(ref("db-password"), config)
    assert source.fetch(CTX).password == PASSWORD
    emulator.revoke_tokens()
    assert source.fetch(CTX).password == PASSWORD
    assert emulator.count("POST", "/token") == 2
    assert emulator.count("GET", "/v1/") == 3  # ok, 401, ok


def test_token_without_the_cloud_platform_scope(
    emulator: GCPEmulator, config: CredentialsConfig
) -> None:
    sql_token = parse_reference("gcp-cloudsql-iam", config).fetch(CTX).password
    credentials = SimpleNamespace(token=sql_token, expiry=None, refresh=None)
    source = GCPSecretManagerSource(
        f"projects/{PROJECT}/secrets/db-password", config, credentials=credentials
    )
    with pytest.raises(CredentialError) as info:
        source.fetch(CTX)
    assert "permission denied: the access token lacks the cloud-platform scope" in str(info.value)


def test_key_refused_by_google(emulator: GCPEmulator, config: CredentialsConfig) -> None:
    emulator.delete_keys()
    message = fails(ref("db-password"), config)
    assert (
        "Google refused to issue an access token (invalid_grant: Invalid JWT Signature)" in message
    )


def test_crc32c_mismatch(emulator: GCPEmulator, config: CredentialsConfig) -> None:
    emulator.add_secret(PROJECT, "damaged", PASSWORD).corrupt_checksum = True
    message = fails(ref("damaged"), config)
    assert "fails its CRC32C check" in message
    assert PASSWORD not in message


def test_payload_without_a_checksum_is_accepted(
    emulator: GCPEmulator, config: CredentialsConfig
) -> None:
    emulator.add_secret(PROJECT, "legacy", PASSWORD).omit_checksum = True
    assert fetch(ref("legacy"), config).password == PASSWORD


def test_crc32c_matches_an_independent_implementation() -> None:
    assert crc32c(b"") == 0
    assert crc32c(b"123456789") == 0xE3069283  # the standard check value
    rng = random.Random(5)
    for size in (1, 7, 64, 1000, 65536):
        data = rng.randbytes(size)
        assert crc32c(data) == gcp_emulator.crc32c(data)


def test_secret_manager_unreachable(key_file: Path) -> None:
    port = refused_port()
    config = CredentialsConfig(
        gcp={"secretmanager_url": f"http://127.0.0.1:{port}", "credentials_file": str(key_file)}
    )
    message = fails(ref("db-password"), config)
    assert (
        f"Secret Manager at http://127.0.0.1:{port} is unreachable (Connection refused)" in message
    )


def test_token_endpoint_unreachable(emulator: GCPEmulator, tmp_path: Path) -> None:
    key = emulator.service_account_key()
    key["token_uri"] = f"http://127.0.0.1:{refused_port()}/token"
    path = tmp_path / "key.json"
    path.write_text(json.dumps(key))
    config = CredentialsConfig(
        gcp={"secretmanager_url": emulator.url, "credentials_file": str(path)}
    )
    message = fails(ref("db-password"), config)
    assert "Google's token endpoint is unreachable (Connection refused)" in message


def test_plain_http_is_only_for_localhost(key_file: Path) -> None:
    config = CredentialsConfig(
        gcp={
            "secretmanager_url": "http://secretmanager.example.com",
            "credentials_file": str(key_file),
        }
    )
    message = fails(ref("db-password"), config)
    assert "is plain http; an access token is only sent over https" in message


def test_no_default_credentials(emulator: GCPEmulator, no_adc: Path) -> None:
    config = CredentialsConfig(gcp={"secretmanager_url": emulator.url})
    message = fails(ref("db-password"), config)
    assert "no Google credentials were found" in message
    assert "credentials.gcp.credentials_file" in message
    assert "GOOGLE_APPLICATION_CREDENTIALS" in message
    assert "gcloud auth application-default login" in message
    assert emulator.requests == []


@pytest.mark.filterwarnings("ignore:.*load_credentials_from_file:DeprecationWarning")
def test_application_default_credentials_from_the_environment(
    emulator: GCPEmulator, key_file: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("GOOGLE_APPLICATION_CREDENTIALS", str(key_file))
    config = CredentialsConfig(gcp={"secretmanager_url": emulator.url})
    assert fetch(ref("db-password"), config).password == PASSWORD


def test_credentials_file_missing_or_broken(emulator: GCPEmulator, tmp_path: Path) -> None:
    missing = tmp_path / "nope.json"
    config = CredentialsConfig(
        gcp={"secretmanager_url": emulator.url, "credentials_file": str(missing)}
    )
    message = fails(ref("db-password"), config)
    assert f"the Google credentials file {missing} (credentials.gcp.credentials_file)" in message
    assert message.endswith("cannot be used: it does not exist.")

    def use(text: str) -> str:
        path = tmp_path / "key.json"
        path.write_text(text)
        config = CredentialsConfig(
            gcp={"secretmanager_url": emulator.url, "credentials_file": str(path)}
        )
        return fails(ref("db-password"), config)

    assert use("{not json").endswith("cannot be used: it is not a JSON file.")
    external = {"type": "external_account", "audience": "//iam.googleapis.com/x"}
    assert use(json.dumps(external)).endswith(
        "it holds 'external_account' credentials; give a service-account key or an "
        "authorized-user file here, or set GOOGLE_APPLICATION_CREDENTIALS to the file instead."
    )
    key = emulator.service_account_key()
    del key["client_email"]
    assert "missing fields" in use(json.dumps(key))
    key = emulator.service_account_key()
    key["private_key"] = "-----BEGIN PRIVATE KEY-----\nnot a key\n-----END PRIVATE KEY-----\n"
    assert "cannot be used:" in use(json.dumps(key))
    assert emulator.requests == []


@pytest.mark.parametrize("kind", ["gcp-secretmanager", "gcp-cloudsql-iam"])
def test_missing_extra(kind: str, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setitem(sys.modules, "google.auth", None)  # as if google-auth were absent
    reference = ref("db-password") if kind == "gcp-secretmanager" else kind
    source = parse_reference(reference, CredentialsConfig())
    with pytest.raises(CredentialError) as info:
        source.fetch(CTX)
    assert str(info.value) == (
        f"The {kind} credential source needs the Python package 'google-auth'; install it "
        "with: pip install 'outpost-agent[gcp]'"
    )


def test_cached_for_cache_ttl(emulator: GCPEmulator, key_file: Path) -> None:
    clock = FakeClock(datetime.now(UTC).timestamp())
    config = CredentialsConfig(
        cache_ttl=300,
        gcp={"secretmanager_url": emulator.url, "credentials_file": str(key_file)},
    )
    cache = CredentialCache(config, clock)
    reference = ref("db-password")
    cred, provenance = cache.get(parse_reference(reference, config, clock), CTX)
    assert cred.password == PASSWORD and not provenance.cached
    clock.now += 299
    cred, provenance = cache.get(parse_reference(reference, config, clock), CTX)
    assert cred.password == PASSWORD and provenance.cached
    assert emulator.count("GET", "/v1/") == 1
    assert PASSWORD not in provenance.describe()
    emulator.add_secret(PROJECT, "db-password", "rotated-" + PASSWORD)
    clock.now += 2
    cred, provenance = cache.get(parse_reference(reference, config, clock), CTX)
    assert cred.password == "rotated-" + PASSWORD and not provenance.cached
    assert emulator.count("GET", "/v1/") == 2


def test_no_secret_in_errors_or_logs(
    emulator: GCPEmulator,
    config: CredentialsConfig,
    key_file: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG)
    emulator.add_secret(PROJECT, "damaged", JSON_SECRET).corrupt_checksum = True
    emulator.add_secret(PROJECT, "locked", JSON_SECRET, accessors={"x@y.iam"})
    seen: list[str] = []
    good = [ref("db-password"), ref("db-json#.db.password")]
    bad = [
        ref("db-json#.db.nope"),
        ref("db-json#.db"),
        ref("db-password#.password"),
        ref("damaged#.db.password"),
        ref("locked#.db.password"),
        ref("db-json/versions/9#.db.password"),
    ]
    for reference in good:
        source = parse_reference(reference, config)
        assert isinstance(source, GCPSecretManagerSource)
        cred = source.fetch(CTX)
        seen += [repr(source), repr(cred), repr(source.auth.token(CTX, 60))]
    for reference in bad:
        seen.append(fails(reference, config))
    emulator.unauthenticated = True
    seen.append(fails(ref("db-json#.db.password"), config))
    key_secret = json.loads(key_file.read_text())["private_key"].splitlines()[1]
    tokens = emulator.issued_tokens()
    assert tokens
    assert "read projects/100000000000/secrets/db-json/versions/1 from Secret Manager" in (
        caplog.text
    )
    text = "\n".join(seen) + "\n" + caplog.text
    for secret in [PASSWORD, JSON_SECRET, key_secret, *tokens]:
        assert secret not in text


# --- Cloud SQL IAM ------------------------------------------------------------------------


class FakeGoogleCredentials:
    """Like google-auth's credentials: ``token``, ``expiry`` (naive UTC) and ``refresh()``.

    Each refresh is counted and issues ``token-N`` valid ``lifetime`` seconds from the fake
    clock's now. With ``gate`` set, a refresh waits for it (to hold one in flight).
    """

    def __init__(self, clock: FakeClock, lifetime: float = 3600) -> None:
        self.clock = clock
        self.lifetime = lifetime
        self.token: str | None = None
        self.expiry: datetime | None = None
        self.refreshes = 0
        self.failure: Exception | None = None
        self.gate: threading.Event | None = None
        self.entered = threading.Event()
        self._count = threading.Lock()

    def refresh(self, request: Any) -> None:
        with self._count:
            self.refreshes += 1
            n = self.refreshes
        self.entered.set()
        if self.gate is not None:
            assert self.gate.wait(30)
        if self.failure is not None:
            raise self.failure
        self.token = f"token-{n}"
        expiry = datetime.fromtimestamp(self.clock() + self.lifetime, UTC)
        self.expiry = expiry.replace(tzinfo=None)


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock(1_700_000_000.0)


@pytest.fixture
def fake(clock: FakeClock) -> FakeGoogleCredentials:
    return FakeGoogleCredentials(clock)


def sql_source(
    config: CredentialsConfig, clock: FakeClock, fake: FakeGoogleCredentials
) -> CloudSQLIAMSource:
    """A new source for each connect, as the agent makes them, sharing one credentials."""
    return CloudSQLIAMSource("", config, clock, credentials=fake)


def test_cloudsql_token_and_refresh_margin(clock: FakeClock, fake: FakeGoogleCredentials) -> None:
    config = CredentialsConfig(refresh_margin=60)
    cache = CredentialCache(config, clock)
    start = clock.now
    cred, provenance = cache.get(sql_source(config, clock, fake), CTX)
    assert cred.password == "token-1" and fake.refreshes == 1
    assert cred.expires_at == start + 3600 and cred.fetched_at == start
    assert provenance.reference == "gcp-cloudsql-iam"
    assert provenance.expires_in_seconds == 3600
    assert "token-1" not in repr(cred) and "token-1" not in provenance.describe()

    clock.now = start + 3539  # still fresh: no refresh
    cred, provenance = cache.get(sql_source(config, clock, fake), CTX)
    assert cred.password == "token-1" and provenance.cached and fake.refreshes == 1

    clock.now = start + 3541  # inside the 60 s margin: refreshed early
    cred, provenance = cache.get(sql_source(config, clock, fake), CTX)
    assert cred.password == "token-2" and not provenance.cached and fake.refreshes == 2
    assert cred.expires_at == clock.now + 3600

    clock.now += 10_000  # long expired (the agent was idle): refreshed again
    cred, _ = cache.get(sql_source(config, clock, fake), CTX)
    assert cred.password == "token-3" and fake.refreshes == 3


def test_cloudsql_source_refreshes_only_inside_the_margin(
    clock: FakeClock, fake: FakeGoogleCredentials
) -> None:
    config = CredentialsConfig(refresh_margin=300)
    source = sql_source(config, clock, fake)
    assert source.fetch(CTX).password == "token-1"
    clock.now += 3000  # 600 s left > 300: the same token
    assert source.fetch(CTX).password == "token-1" and fake.refreshes == 1
    clock.now += 301  # 299 s left
    assert source.fetch(CTX).password == "token-2" and fake.refreshes == 2


def test_cloudsql_one_refresh_in_flight(clock: FakeClock, fake: FakeGoogleCredentials) -> None:
    config = CredentialsConfig(refresh_margin=60)
    cache = CredentialCache(config, clock)
    fake.gate = threading.Event()
    results: list[str] = []
    errors: list[BaseException] = []
    started = threading.Barrier(9)

    def connect() -> None:
        started.wait(10)
        try:
            cred, _ = cache.get(sql_source(config, clock, fake), CTX)
            results.append(cred.password)
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=connect) for _ in range(8)]
    for thread in threads:
        thread.start()
    started.wait(10)
    assert fake.entered.wait(10)  # one refresh is in flight, the others queue behind it
    fake.gate.set()
    for thread in threads:
        thread.join(30)
    assert not errors and results == ["token-1"] * 8
    assert fake.refreshes == 1

    # the source's own lock: concurrent fetches on one source share one refresh too
    clock.now += 3590
    fake.gate = threading.Event()
    fake.entered.clear()
    source = sql_source(config, clock, fake)
    direct: list[str] = []
    workers = [
        threading.Thread(target=lambda: direct.append(source.fetch(CTX).password)) for _ in range(6)
    ]
    for worker in workers:
        worker.start()
    assert fake.entered.wait(10)
    fake.gate.set()
    for worker in workers:
        worker.join(30)
    assert direct == ["token-2"] * 6 and fake.refreshes == 2


def test_cloudsql_failed_refresh(clock: FakeClock, fake: FakeGoogleCredentials) -> None:
    from google.auth import exceptions

    refresh_error: Any = exceptions.RefreshError
    transport_error: Any = exceptions.TransportError
    config = CredentialsConfig()
    fake.failure = refresh_error(
        "invalid_grant: Token has been expired or revoked.",
        {"error": "invalid_grant", "error_description": "Token has been expired or revoked."},
    )
    with pytest.raises(CredentialError) as info:
        sql_source(config, clock, fake).fetch(CTX)
    assert str(info.value) == (
        "Cannot get the password for connection 'orders db' from gcp-cloudsql-iam: Google "
        "refused to issue an access token (invalid_grant: Token has been expired or revoked); "
        "check that the agent's service account and its key are still valid, or log in again "
        "with `gcloud auth application-default login`."
    )
    fake.failure = transport_error("Failed to retrieve http://metadata/token: timed out")
    with pytest.raises(CredentialError) as info:
        sql_source(config, clock, fake).fetch(CTX)
    assert "Google's token endpoint is unreachable (Failed to retrieve" in str(info.value)


def test_cloudsql_expired_token(clock: FakeClock) -> None:
    fake = FakeGoogleCredentials(clock, lifetime=-5)  # the machine's clock is off
    with pytest.raises(CredentialError) as info:
        sql_source(CredentialsConfig(), clock, fake).fetch(CTX)
    assert (
        "gcp-cloudsql-iam: the access token Google's credentials gave has already expired"
        in str(info.value)
    )


def test_cloudsql_takes_no_argument() -> None:
    with pytest.raises(UsageError, match="gcp-cloudsql-iam takes no argument"):
        parse_reference("gcp-cloudsql-iam:x", CredentialsConfig())
    source = parse_reference("gcp-cloudsql-iam", CredentialsConfig())
    assert isinstance(source, CloudSQLIAMSource) and source.reference == "gcp-cloudsql-iam"


def test_cloudsql_real_google_auth(emulator: GCPEmulator, config: CredentialsConfig) -> None:
    """google-auth itself: the key file's JWT asks for the sqlservice.login scope only."""
    before = datetime.now(UTC).timestamp()
    cred = parse_reference("gcp-cloudsql-iam", config).fetch(CTX)
    (token,) = emulator.issued_tokens()
    assert cred.password == token
    assert emulator.issued[token].scopes == {SQL_LOGIN_SCOPE}
    assert cred.expires_at is not None
    assert before + 3600 - 60 <= cred.expires_at <= datetime.now(UTC).timestamp() + 3600 + 1


# --- end to end: the `outpost` command with a real PostgreSQL -----------------------------


def _role(cluster: PgCluster, name: str, password: str) -> None:
    escaped = password.replace("'", "''")
    cluster.superuser_execute(
        f"DROP ROLE IF EXISTS {name}", f"CREATE ROLE {name} LOGIN PASSWORD '{escaped}'"
    )


def _pg_flags(cluster: PgCluster, user: str) -> list[str]:
    return [
        "--host",
        cluster.host,
        "--port",
        str(cluster.port),
        "--user",
        user,
        "--database",
        cluster.database,
        "--ssl",
        "verify-full",
        "--ssl-root-cert",
        str(cluster.ca_path),
    ]


def _files_text(root: Path) -> bytes:
    return b"".join(p.read_bytes() for p in root.rglob("*") if p.is_file())


def test_cli_secret_manager_end_to_end(
    emulator: GCPEmulator, key_file: Path, pg_tls_cluster: PgCluster, tmp_path: Path
) -> None:
    role = f"gcp_sm_{uuid.uuid4().hex[:8]}"
    first, second = f"first-{uuid.uuid4().hex}", f"second-{uuid.uuid4().hex}"
    _role(pg_tls_cluster, role, first)
    emulator.add_secret(PROJECT, role, json.dumps({"password": first}))
    agent = Agent(
        tmp_path / "agent",
        config={
            "credentials": {
                "gcp": {"secretmanager_url": emulator.url, "credentials_file": str(key_file)}
            }
        },
    )
    reference = f"gcp-secretmanager:projects/{PROJECT}/secrets/{role}#.password"
    try:
        added = agent.ok(
            "connections", "add", "postgres", "--name", "GCP PG",
            *_pg_flags(pg_tls_cluster, role), "--password-from", reference,
        )  # fmt: skip
        assert 'Added connection "GCP PG" (slug gcp-pg).' in added.out
        test = agent.ok("connections", "test", "gcp-pg", "--format", "json").json
        assert test["up"] is True, test
        assert test["password_source"].startswith(reference)
        shown = agent.ok("connections", "show", "gcp-pg", "--format", "json")

        # rotated at the source: a new secret version and a new database password
        emulator.add_secret(PROJECT, role, json.dumps({"password": second}))
        _role(pg_tls_cluster, role, second)
        test = agent.ok("connections", "test", "gcp-pg", "--format", "json").json
        assert test["up"] is True, test

        # the secret is gone: one sentence naming the source and the reason
        emulator.secrets.pop((PROJECT, role))
        failed = agent.run("connections", "test", "gcp-pg", "--format", "json")
        report = json.loads(failed.out)
        assert report["up"] is False
        assert report["error"].startswith(
            f"Cannot get the password for connection 'GCP PG' from {reference}: not found"
        )
        everything = (
            added.out + added.err + shown.out + failed.out + failed.err + agent.log()
        ).encode() + _files_text(agent.root)
        for secret in (first, second, *emulator.issued_tokens()):
            assert secret.encode() not in everything
    finally:
        pg_tls_cluster.superuser_execute(f"DROP ROLE IF EXISTS {role}")


def test_cli_cloudsql_iam_end_to_end(
    emulator: GCPEmulator, key_file: Path, pg_tls_cluster: PgCluster, tmp_path: Path
) -> None:
    """The token Google's default credentials give is the password (the role's password
    stands in for Cloud SQL's IAM check)."""
    role = f"gcp_iam_{uuid.uuid4().hex[:8]}"
    token = f"ya29.emu-fixed-{uuid.uuid4().hex}"
    emulator.fixed_token = token
    _role(pg_tls_cluster, role, token)
    agent = Agent(tmp_path / "agent")
    env = {
        "GOOGLE_APPLICATION_CREDENTIALS": str(key_file),  # Application Default Credentials
        "CLOUDSDK_CONFIG": str(tmp_path / "gcloud-config"),
        "NO_GCE_CHECK": "true",
    }
    try:
        added = agent.ok(
            "connections", "add", "postgres", "--name", "Cloud SQL",
            *_pg_flags(pg_tls_cluster, role), "--password-from", "gcp-cloudsql-iam",
            env=env,
        )  # fmt: skip
        assert 'Added connection "Cloud SQL" (slug cloud-sql).' in added.out
        test = agent.ok("connections", "test", "cloud-sql", "--format", "json", env=env).json
        assert test["up"] is True, test
        assert test["password_source"].startswith("gcp-cloudsql-iam (fetched ")
        assert "expires in" in test["password_source"]
        assert emulator.issued[token].scopes == {SQL_LOGIN_SCOPE}
        assert token.encode() not in _files_text(agent.root) + added.out.encode()

        # without credentials: a clear sentence, no token
        env.pop("GOOGLE_APPLICATION_CREDENTIALS")
        failed = agent.run("connections", "test", "cloud-sql", "--format", "json", env=env)
        report = json.loads(failed.out)
        assert report["up"] is False
        assert report["error"].startswith(
            "Cannot get the password for connection 'Cloud SQL' from gcp-cloudsql-iam: no "
            "Google credentials were found"
        )
    finally:
        pg_tls_cluster.superuser_execute(f"DROP ROLE IF EXISTS {role}")
