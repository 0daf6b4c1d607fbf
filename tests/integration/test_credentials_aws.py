"""The AWS credential sources: ``aws-secretsmanager`` against moto in server mode (a real HTTP
API on 127.0.0.1, started here as its own process), ``aws-rds-iam`` tokens checked field by
field and by signature, refreshed with a fake clock, and sent as the password over TLS to a real
PostgreSQL (the ``pg_tls_cluster`` fixture).

Every test runs with fake AWS credentials and private AWS config files, with the EC2 metadata
service turned off, so nothing outside 127.0.0.1 is ever asked.
"""

from __future__ import annotations

import calendar
import contextlib
import hashlib
import hmac
import http.server
import importlib.util
import json
import logging
import os
import secrets
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl, quote, urlsplit

import httpx
import pytest

from outpost.config import CredentialsConfig, load_config
from outpost.credentials import parse_reference
from outpost.credentials.base import Credential, CredentialContext, CredentialError
from outpost.credentials.cache import CredentialCache
from outpost.errors import UsageError
from tests.conftest import service_missing
from tests.helpers import Agent, free_port, refused_port, wait_for
from tests.integration.conftest import PgCluster

pytestmark = pytest.mark.integration

ACCESS_KEY = "AKIAOUTPOSTTEST00001"
SECRET_KEY = "outpost-test-secret-access-key"
REGION = "us-east-1"
MOTO_START_DEADLINE = 30.0


# --- fixtures -----------------------------------------------------------------------------


@dataclass
class Moto:
    """A moto server process on 127.0.0.1."""

    url: str
    log_path: Path

    def client(self, service: str, **kwargs: Any) -> Any:
        import boto3

        return boto3.client(
            service,
            endpoint_url=self.url,
            region_name=kwargs.pop("region_name", REGION),
            aws_access_key_id=kwargs.pop("aws_access_key_id", ACCESS_KEY),
            aws_secret_access_key=kwargs.pop("aws_secret_access_key", SECRET_KEY),
            **kwargs,
        )

    def enforce_iam(self, on: bool) -> None:
        """moto's IAM policy checks: on for every request from now, or off again."""
        response = httpx.post(f"{self.url}/moto-api/reset-auth", content=b"0" if on else b"inf")
        response.raise_for_status()

    def ready(self) -> bool:
        try:
            return httpx.get(f"{self.url}/moto-api/data.json", timeout=1).status_code == 200
        except httpx.HTTPError:
            return False


def _start_moto(base: Path, env: dict[str, str]) -> tuple[Moto, subprocess.Popen[bytes]]:
    """One try: a free port, the server process, a readiness wait with a deadline."""
    port = free_port()
    moto = Moto(f"http://127.0.0.1:{port}", base / "moto.log")
    with open(moto.log_path, "ab") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
            stdout=log,
            stderr=subprocess.STDOUT,
            env=env,
        )
    with contextlib.suppress(AssertionError):
        wait_for(
            lambda: moto.ready() or proc.poll() is not None, MOTO_START_DEADLINE, "moto server"
        )
    return moto, proc


def _stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@pytest.fixture(scope="module")
def moto_server() -> Iterator[Moto]:
    """``python -m moto.server`` on 127.0.0.1 and a free port, stopped at the end."""
    # not imported here: importing moto hooks it into botocore in this process
    missing = [m for m in ("boto3", "moto.server", "flask") if importlib.util.find_spec(m) is None]
    if missing:
        service_missing(f"moto[server] and boto3 are needed for these tests ({missing} missing)")
    base = Path(tempfile.mkdtemp(prefix="outpost-moto-"))
    env = {k: v for k, v in os.environ.items() if k != "INITIAL_NO_AUTH_ACTION_COUNT"}
    try:
        for _attempt in range(3):  # a free port can be taken between the probe and the bind
            moto, proc = _start_moto(base, env)
            if proc.poll() is None and moto.ready():
                break
            _stop(proc)
        else:
            pytest.fail(f"the moto server did not start: {moto.log_path.read_text()}")
        try:
            yield moto
        finally:
            _stop(proc)
    finally:
        shutil.rmtree(base, ignore_errors=True)


@pytest.fixture
def aws_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """Fake AWS credentials and region; no AWS config files, profile or metadata service."""
    for name in list(os.environ):
        if name.startswith("AWS_"):
            monkeypatch.delenv(name)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", ACCESS_KEY)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", SECRET_KEY)
    monkeypatch.setenv("AWS_REGION", REGION)
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "no-aws-config"))
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "no-aws-credentials"))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")


@pytest.fixture
def moto(moto_server: Moto, aws_env: None) -> Moto:
    return moto_server


@pytest.fixture
def debug_logs(caplog: pytest.LogCaptureFixture) -> pytest.LogCaptureFixture:
    """Every logger at DEBUG (botocore included), to check that no secret is logged."""
    caplog.set_level(logging.DEBUG)
    return caplog


class FakeClock:
    def __init__(self, now: float = 1_800_000_000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


def config(moto: Moto | None = None, **aws: Any) -> CredentialsConfig:
    settings: dict[str, Any] = {"region": REGION}
    if moto is not None:
        settings["endpoint_url"] = moto.url
    settings.update(aws)
    return CredentialsConfig.model_validate({"aws": settings})


CTX = CredentialContext(connection="app-db", driver="postgres", host="db.internal", port=5432)


def unique(prefix: str) -> str:
    return f"outpost/{prefix}-{uuid.uuid4().hex[:8]}"


def fresh_secret() -> str:
    return "pw-" + secrets.token_urlsafe(18)


def fetch(reference: str, cfg: CredentialsConfig, ctx: CredentialContext = CTX) -> Credential:
    return parse_reference(reference, cfg).fetch(ctx)


def fetch_error(reference: str, cfg: CredentialsConfig, ctx: CredentialContext = CTX) -> str:
    with pytest.raises(CredentialError) as info:
        fetch(reference, cfg, ctx)
    return str(info.value)


def assert_hidden(values: list[str], *texts: str) -> None:
    for value in values:
        for text in texts:
            assert value not in text, "a secret value leaked into an error or a log line"


# --- aws-secretsmanager -------------------------------------------------------------------


def test_plain_secret(moto: Moto, debug_logs: pytest.LogCaptureFixture) -> None:
    name, value = unique("plain"), fresh_secret()
    moto.client("secretsmanager").create_secret(Name=name, SecretString=value)
    debug_logs.clear()  # the test's own calls above log the value; the source's must not

    cred = fetch(f"aws-secretsmanager:{name}", config(moto))

    assert cred.password == value
    assert cred.expires_at is None  # cached for credentials.cache_ttl, not by expiry
    assert value not in repr(cred)
    assert_hidden([value], debug_logs.text)


def test_json_secret_dot_paths_by_name_and_arn(
    moto: Moto, debug_logs: pytest.LogCaptureFixture
) -> None:
    name, password, nested = unique("json"), fresh_secret(), fresh_secret()
    document = {"username": "app", "password": password, "db": {"password": nested, "port": 5432}}
    arn = moto.client("secretsmanager").create_secret(Name=name, SecretString=json.dumps(document))[
        "ARN"
    ]
    cfg = config(moto)

    assert fetch(f"aws-secretsmanager:{name}#.password", cfg).password == password
    assert fetch(f"aws-secretsmanager:{name}#.db.password", cfg).password == nested
    assert fetch(f"aws-secretsmanager:{name}#.db.port", cfg).password == "5432"
    # an ARN is read in its own region, whatever the configured one
    other_region = config(moto, region="eu-west-1")
    assert fetch(f"aws-secretsmanager:{arn}#.password", other_region).password == password
    assert fetch(f"aws-secretsmanager:{name}", cfg).password == json.dumps(document)
    assert_hidden([password, nested], debug_logs.text)


def test_version_stage_and_id(moto: Moto) -> None:
    name, old, new = unique("rotated"), fresh_secret(), fresh_secret()
    sm = moto.client("secretsmanager")
    first = sm.create_secret(Name=name, SecretString=json.dumps({"password": old}))["VersionId"]
    sm.put_secret_value(SecretId=name, SecretString=json.dumps({"password": new}))
    cfg = config(moto)

    assert fetch(f"aws-secretsmanager:{name}#.password", cfg).password == new
    previous = f"aws-secretsmanager:{name}?version_stage=AWSPREVIOUS#.password"
    assert fetch(previous, cfg).password == old
    assert fetch(f"aws-secretsmanager:{name}?version_id={first}#.password", cfg).password == old
    message = fetch_error(f"aws-secretsmanager:{name}?version_stage=NOSUCHSTAGE", cfg)
    assert "version NOSUCHSTAGE, does not exist" in message
    assert_hidden([old, new], message)


def test_binary_secret(moto: Moto) -> None:
    name, value = unique("binary"), fresh_secret()
    sm = moto.client("secretsmanager")
    sm.create_secret(Name=name, SecretBinary=json.dumps({"password": value}).encode())
    assert fetch(f"aws-secretsmanager:{name}#.password", config(moto)).password == value

    raw = unique("not-utf8")
    sm.create_secret(Name=raw, SecretBinary=b"\xff\xfe" + value.encode())
    message = fetch_error(f"aws-secretsmanager:{raw}", config(moto))
    assert message.endswith("the secret is binary and not UTF-8 text.")
    assert_hidden([value], message)


def test_cached_for_cache_ttl(moto: Moto) -> None:
    """A value is reused for credentials.cache_ttl seconds, then fetched again."""
    name, first, second = unique("cached"), fresh_secret(), fresh_secret()
    sm = moto.client("secretsmanager")
    sm.create_secret(Name=name, SecretString=first)
    cfg = CredentialsConfig.model_validate(
        {"cache_ttl": 300, "aws": {"region": REGION, "endpoint_url": moto.url}}
    )
    clock = FakeClock()
    cache = CredentialCache(cfg, clock=clock)
    source = parse_reference(f"aws-secretsmanager:{name}", cfg, clock)

    cred, provenance = cache.get(source, CTX)
    assert (cred.password, provenance.cached) == (first, False)
    sm.put_secret_value(SecretId=name, SecretString=second)
    clock.advance(299)
    cred, provenance = cache.get(source, CTX)
    assert (cred.password, provenance.cached) == (first, True)
    clock.advance(2)
    cred, provenance = cache.get(source, CTX)
    assert (cred.password, provenance.cached) == (second, False)
    cache.close()


def test_missing_secret(moto: Moto) -> None:
    message = fetch_error("aws-secretsmanager:outpost/no-such-secret#.password", config(moto))
    assert message == (
        "Cannot get the password for connection 'app-db' from "
        "aws-secretsmanager:outpost/no-such-secret#.password: the secret does not exist "
        "(region us-east-1)."
    )


def test_missing_field(moto: Moto, debug_logs: pytest.LogCaptureFixture) -> None:
    name, value = unique("fields"), fresh_secret()
    moto.client("secretsmanager").create_secret(
        Name=name, SecretString=json.dumps({"password": value, "db": {"user": "app"}})
    )
    cfg = config(moto)
    debug_logs.clear()

    message = fetch_error(f"aws-secretsmanager:{name}#.db.password", cfg)
    assert message.endswith("the secret has no field .db.password.")
    assert name in message and "app-db" in message
    assert "is an object" in fetch_error(f"aws-secretsmanager:{name}#.db", cfg)
    assert "no field .password.x" in fetch_error(f"aws-secretsmanager:{name}#.password.x", cfg)
    plain = unique("plain-text")
    moto.client("secretsmanager").create_secret(Name=plain, SecretString=value)
    debug_logs.clear()
    text = fetch_error(f"aws-secretsmanager:{plain}#.password", cfg)
    assert "is not JSON" in text
    assert_hidden([value], message, text, debug_logs.text)


@pytest.mark.parametrize(
    "reference",
    [
        "aws-secretsmanager:prod/db#password",
        "aws-secretsmanager:prod/db#.",
        "aws-secretsmanager:prod/db#.a..b",
        "aws-secretsmanager:prod/db#.a.",
    ],
)
def test_bad_dot_path_is_a_usage_error(reference: str) -> None:
    with pytest.raises(UsageError, match=r"Bad dot-path .* write it as #\.field or #\.a\.b"):
        parse_reference(reference, config())


@pytest.mark.parametrize(
    "reference",
    [
        "aws-secretsmanager:prod/db?stage=AWSPREVIOUS",
        "aws-secretsmanager:prod/db?version_stage=",
        "aws-secretsmanager:prod/db?version_stage=A&version_stage=B",
        "aws-secretsmanager:prod db",
        "aws-secretsmanager:#.password",
    ],
)
def test_bad_reference_is_a_usage_error(reference: str) -> None:
    with pytest.raises(UsageError, match="aws-secretsmanager"):
        parse_reference(reference, config())


def test_access_denied(moto: Moto, monkeypatch: pytest.MonkeyPatch) -> None:
    """moto enforces IAM policies once /moto-api/reset-auth is told so: an identity without
    secretsmanager:GetSecretValue is refused, one with it reads the secret."""
    name, value = unique("guarded"), fresh_secret()
    moto.client("secretsmanager").create_secret(Name=name, SecretString=value)
    iam = moto.client("iam")
    keys = {}
    for user in (f"outsider-{uuid.uuid4().hex[:6]}", f"reader-{uuid.uuid4().hex[:6]}"):
        iam.create_user(UserName=user)
        keys[user.split("-")[0]] = iam.create_access_key(UserName=user)["AccessKey"]
        if user.startswith("reader"):
            policy = {
                "Version": "2012-10-17",
                "Statement": [
                    {"Effect": "Allow", "Action": "secretsmanager:GetSecretValue", "Resource": "*"}
                ],
            }
            iam.put_user_policy(
                UserName=user, PolicyName="read-secrets", PolicyDocument=json.dumps(policy)
            )
    reference = f"aws-secretsmanager:{name}"
    moto.enforce_iam(True)
    try:
        for who in ("outsider", "reader", "unknown"):
            key = keys.get(who, {"AccessKeyId": "AKIANOSUCHKEY0000000", "SecretAccessKey": "x"})
            monkeypatch.setenv("AWS_ACCESS_KEY_ID", key["AccessKeyId"])
            monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", key["SecretAccessKey"])
            if who == "reader":
                assert fetch(reference, config(moto)).password == value
            elif who == "outsider":
                assert fetch_error(reference, config(moto)) == (
                    f"Cannot get the password for connection 'app-db' from {reference}: access "
                    "denied (the agent's AWS identity needs secretsmanager:GetSecretValue on it)."
                )
            else:
                message = fetch_error(reference, config(moto))
                assert "AWS rejected the agent's AWS credentials (InvalidClientTokenId)" in message
    finally:
        moto.enforce_iam(False)


def test_no_region(moto: Moto, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("AWS_REGION")
    name, value = unique("region"), fresh_secret()
    arn = moto.client("secretsmanager").create_secret(Name=name, SecretString=value)["ARN"]
    cfg = config(moto, region=None)

    message = fetch_error(f"aws-secretsmanager:{name}", cfg)
    assert message.endswith(
        'no AWS region is set: set "credentials.aws.region" in the agent\'s config, or '
        "AWS_REGION in its environment."
    )
    assert fetch(f"aws-secretsmanager:{arn}", cfg).password == value  # the ARN names it
    monkeypatch.setenv("AWS_DEFAULT_REGION", REGION)
    assert fetch(f"aws-secretsmanager:{name}", cfg).password == value


def test_unreachable_endpoint(aws_env: None) -> None:
    port = refused_port()
    cfg = CredentialsConfig.model_validate(
        {"aws": {"region": REGION, "endpoint_url": f"http://127.0.0.1:{port}"}}
    )
    message = fetch_error("aws-secretsmanager:prod/db#.password", cfg)
    assert message.endswith(f"cannot reach Secrets Manager at http://127.0.0.1:{port}.")


def test_no_aws_credentials(moto: Moto, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("AWS_ACCESS_KEY_ID")
    monkeypatch.delenv("AWS_SECRET_ACCESS_KEY")
    message = fetch_error("aws-secretsmanager:prod/db", config(moto))
    assert "the agent has no AWS credentials" in message

    monkeypatch.setenv("AWS_ACCESS_KEY_ID", ACCESS_KEY)
    message = fetch_error("aws-secretsmanager:prod/db", config(moto))
    assert "the agent's AWS credentials cannot be loaded" in message

    message = fetch_error("aws-secretsmanager:prod/db", config(moto, profile="nope"))
    assert message.startswith(
        "Cannot get the password for connection 'app-db' from aws-secretsmanager:prod/db: the "
        "AWS profile 'nope' (credentials.aws.profile) is not in the agent's AWS config files."
    )


def test_missing_extra(aws_env: None, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "boto3", None)  # `import boto3` now raises ImportError
    for reference in ("aws-secretsmanager:prod/db", "aws-rds-iam"):
        ctx = CredentialContext(
            "app-db", "postgres", "db.internal", 5432, "app", {"ssl": "require"}
        )
        message = fetch_error(reference, config(), ctx)
        kind = reference.split(":")[0]
        assert message == (
            f"The {kind} credential source needs the Python package 'boto3'; install it with: "
            "pip install 'outpost-agent[aws]'"
        )


class _ErrorHandler(http.server.BaseHTTPRequestHandler):
    """Answers every request the way Secrets Manager answers an error (JSON, __type)."""

    code = "DecryptionFailure"

    def log_message(self, format: str, *args: object) -> None:
        pass

    def do_POST(self) -> None:
        self.rfile.read(int(self.headers.get("Content-Length") or 0))
        body = json.dumps({"__type": self.code, "message": "refused by the test server"})
        self.send_response(400)
        self.send_header("Content-Type", "application/x-amz-json-1.1")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body.encode())


@contextlib.contextmanager
def error_endpoint(code: str) -> Iterator[str]:
    handler = type("Handler", (_ErrorHandler,), {"code": code})
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_port}"
    finally:
        server.shutdown()
        server.server_close()
        thread.join(10)


@pytest.mark.parametrize(
    ("code", "reason"),
    [
        ("DecryptionFailure", "Secrets Manager cannot decrypt the secret with its KMS key"),
        ("AccessDeniedException", "access denied (the agent's AWS identity needs"),
        ("ExpiredTokenException", "the agent's AWS session token has expired"),
        ("InternalServiceError", "Secrets Manager refused the request (InternalServiceError"),
    ],
)
def test_errors_moto_cannot_produce(aws_env: None, code: str, reason: str) -> None:
    """moto has no KMS decryption failures or expired sessions (and answers access denied in
    XML): a small HTTP server answers as Secrets Manager does, in its JSON error format."""
    with error_endpoint(code) as url:
        cfg = CredentialsConfig.model_validate({"aws": {"region": REGION, "endpoint_url": url}})
        message = fetch_error("aws-secretsmanager:prod/db#.password", cfg)
    assert message.startswith(
        "Cannot get the password for connection 'app-db' from "
        f"aws-secretsmanager:prod/db#.password: {reason}"
    )
    assert message.count(".") <= 3  # one sentence (the reference has one dot)


# --- aws-rds-iam --------------------------------------------------------------------------


def _sign(key: bytes, text: str) -> bytes:
    return hmac.new(key, text.encode(), hashlib.sha256).digest()


def check_rds_token(token: str, secret_access_key: str = SECRET_KEY) -> dict[str, str]:
    """The token's query fields, after checking its SigV4 signature with our own code (not
    botocore's): the canonical GET request for host:port/, the query sorted, only the host
    header signed, an empty body."""
    parts = urlsplit("https://" + token)
    assert parts.path == "/"
    params = dict(parse_qsl(parts.query, keep_blank_values=True))
    signature = params.pop("X-Amz-Signature")

    def enc(text: str) -> str:
        return quote(text, safe="-_.~")

    query = "&".join(f"{enc(k)}={enc(v)}" for k, v in sorted(params.items()))
    empty = hashlib.sha256(b"").hexdigest()
    request = "\n".join(["GET", "/", query, f"host:{parts.netloc}", "", "host", empty])
    scope = params["X-Amz-Credential"].split("/", 1)[1]
    to_sign = "\n".join(
        [
            "AWS4-HMAC-SHA256",
            params["X-Amz-Date"],
            scope,
            hashlib.sha256(request.encode()).hexdigest(),
        ]
    )
    key = ("AWS4" + secret_access_key).encode()
    for part in scope.split("/"):
        key = _sign(key, part)
    assert hmac.compare_digest(
        hmac.new(key, to_sign.encode(), hashlib.sha256).hexdigest(), signature
    )
    params["host"] = parts.netloc
    params["X-Amz-Signature"] = signature
    return params


def rds_ctx(**changes: Any) -> CredentialContext:
    values: dict[str, Any] = {
        "connection": "orders",
        "driver": "postgres",
        "host": "orders.c1abc2def3gh.eu-west-1.rds.amazonaws.com",
        "port": 5432,
        "user": "iam_app",
        "options": {"ssl": "verify-full"},
    }
    values.update(changes)
    return CredentialContext(**values)


def test_rds_token_fields(aws_env: None, debug_logs: pytest.LogCaptureFixture) -> None:
    clock = FakeClock()
    source = parse_reference("aws-rds-iam", config(), clock)
    before = time.time()
    cred = source.fetch(rds_ctx())

    fields = check_rds_token(cred.password)
    assert fields["host"] == "orders.c1abc2def3gh.eu-west-1.rds.amazonaws.com:5432"
    assert fields["Action"] == "connect"
    assert fields["DBUser"] == "iam_app"
    assert fields["X-Amz-Expires"] == "900"
    assert fields["X-Amz-SignedHeaders"] == "host"
    key_id, day, region, service, terminator = fields["X-Amz-Credential"].split("/")
    # the region comes from the RDS host name, ahead of credentials.aws.region (us-east-1)
    assert (key_id, region, service, terminator) == (
        ACCESS_KEY,
        "eu-west-1",
        "rds-db",
        "aws4_request",
    )
    signed_at = calendar.timegm(time.strptime(fields["X-Amz-Date"], "%Y%m%dT%H%M%SZ"))
    assert day == fields["X-Amz-Date"][:8]
    assert before - 5 <= signed_at <= time.time() + 5
    assert (cred.fetched_at, cred.expires_at) == (clock.now, clock.now + 900)
    assert cred.password not in repr(cred)
    assert_hidden([cred.password, fields["X-Amz-Signature"]], debug_logs.text)

    # a host that is not an RDS name: the region is the connection's, then the config's
    other = source.fetch(rds_ctx(host="10.0.0.7", port=3306, user="a b+c", driver="mysql"))
    fields = check_rds_token(other.password)
    assert (fields["host"], fields["DBUser"]) == ("10.0.0.7:3306", "a b+c")
    assert fields["X-Amz-Credential"].split("/")[2] == REGION
    third = source.fetch(
        rds_ctx(host="10.0.0.7", options={"ssl": "require", "region": "sa-east-1"})
    )
    assert check_rds_token(third.password)["X-Amz-Credential"].split("/")[2] == "sa-east-1"


def test_rds_token_refreshed_before_expiry(aws_env: None) -> None:
    """With refresh_margin 60, a token made at t is used until t+840, then made again."""
    clock = FakeClock()
    cfg = CredentialsConfig.model_validate({"refresh_margin": 60, "aws": {"region": REGION}})
    cache = CredentialCache(cfg, clock=clock)
    source = parse_reference("aws-rds-iam", cfg, clock)
    start = clock.now

    first, provenance = cache.get(source, rds_ctx())
    assert (first.fetched_at, provenance.cached, provenance.expires_in_seconds) == (
        start,
        False,
        900,
    )
    clock.advance(839)
    again, provenance = cache.get(source, rds_ctx())
    assert again is first and provenance.cached
    assert provenance.expires_in_seconds == 61
    clock.advance(2)
    renewed, provenance = cache.get(source, rds_ctx())
    assert not provenance.cached
    assert (renewed.fetched_at, renewed.expires_at) == (start + 841, start + 841 + 900)
    check_rds_token(renewed.password)
    cache.close()


def test_rds_cache_key(aws_env: None) -> None:
    source = parse_reference("aws-rds-iam", config())
    base = source.cache_key(rds_ctx())
    assert base == source.cache_key(rds_ctx(connection="other-name"))
    for changed in (
        rds_ctx(host="other.c1abc2def3gh.eu-west-1.rds.amazonaws.com"),
        rds_ctx(port=5433),
        rds_ctx(user="someone_else"),
        rds_ctx(options={"ssl": "require", "region": "eu-central-1"}),
    ):
        assert source.cache_key(changed) != base
    assert "iam_app" in base and "5432" in base and "eu-west-1" in base


@pytest.mark.parametrize(
    ("driver", "options"),
    [
        ("postgres", {}),
        ("postgres", {"ssl": "disable"}),
        ("mysql", {}),
        ("mysql", {"ssl": "disable"}),
    ],
)
def test_rds_refused_without_tls(aws_env: None, driver: str, options: dict[str, str]) -> None:
    ssl = options.get("ssl", "disable")
    message = fetch_error("aws-rds-iam", config(), rds_ctx(driver=driver, options=options))
    assert message == (
        "Cannot get the password for connection 'orders' from aws-rds-iam: RDS accepts IAM "
        f"tokens only over TLS and the connection has --ssl {ssl}; use --ssl require or "
        "stricter (verify-full with the RDS CA bundle is best)."
    )
    source = parse_reference("aws-rds-iam", config())
    with pytest.raises(CredentialError, match="only over TLS"):  # a cached token is no way round
        source.cache_key(rds_ctx(driver=driver, options=options))


def test_rds_other_refusals(aws_env: None, monkeypatch: pytest.MonkeyPatch) -> None:
    cfg = config()
    assert "has no host (--host)" in fetch_error("aws-rds-iam", cfg, rds_ctx(host=None))
    assert "has no user (--user)" in fetch_error("aws-rds-iam", cfg, rds_ctx(user=None))
    assert "RDS for SQL Server has no IAM" in fetch_error(
        "aws-rds-iam", cfg, rds_ctx(driver="mssql")
    )
    assert "Redshift uses its own IAM" in fetch_error(
        "aws-rds-iam", cfg, rds_ctx(driver="redshift")
    )
    with pytest.raises(UsageError, match="aws-rds-iam takes no argument"):
        parse_reference("aws-rds-iam:something", cfg)

    monkeypatch.delenv("AWS_REGION")
    message = fetch_error("aws-rds-iam", config(region=None), rds_ctx(host="10.0.0.7"))
    assert message.endswith(
        'no AWS region is set: set "credentials.aws.region" in the '
        "agent's config, or AWS_REGION in its environment."
    )
    monkeypatch.delenv("AWS_ACCESS_KEY_ID")
    monkeypatch.delenv("AWS_SECRET_ACCESS_KEY")
    assert "the agent has no AWS credentials" in fetch_error("aws-rds-iam", cfg, rds_ctx())


def test_rds_cli_refuses_a_connection_without_tls(aws_env: None, tmp_path: Path) -> None:
    agent = Agent(tmp_path / "agent", config={"credentials": {"aws": {"region": REGION}}})
    result = agent.fails(
        "connections",
        "add",
        "postgres",
        "--name",
        "orders",
        "--host",
        "orders.c1abc2def3gh.eu-west-1.rds.amazonaws.com",
        "--user",
        "iam_app",
        "--password-from",
        "aws-rds-iam",
    )
    assert "RDS accepts IAM tokens only over TLS" in result.err
    assert "--ssl require" in result.err
    assert agent.list_json() == []


@contextlib.contextmanager
def rds_like_hba(cluster: PgCluster, role: str) -> Iterator[None]:
    """Make ROLE log in the way RDS IAM users do: the password in clear text inside TLS
    (``hostssl ... password``), and never without TLS (``host ... reject``)."""
    hba = cluster.data_dir / "pg_hba.conf"
    original = hba.read_text()
    hba.write_text(f"hostssl all {role} all password\nhost all {role} all reject\n" + original)
    try:
        cluster.superuser_execute("SELECT pg_reload_conf()")
        yield
    finally:
        hba.write_text(original)
        cluster.superuser_execute("SELECT pg_reload_conf()")


def _refused_without_tls(cluster: PgCluster, role: str) -> bool:
    import psycopg

    try:
        psycopg.connect(
            host=cluster.host,
            port=cluster.port,
            user=role,
            password="x",
            dbname=cluster.database,
            sslmode="disable",
            connect_timeout=5,
        ).close()
    except psycopg.OperationalError as exc:
        return "rejects connection" in str(exc)
    return False


def test_rds_token_sent_as_the_password_over_tls(
    pg_tls_cluster: PgCluster, aws_env: None, tmp_path: Path
) -> None:
    """End to end through the agent service, against a real PostgreSQL with TLS.

    PostgreSQL cannot check an RDS token's signature, so the test makes the token it *will*
    check: the role's password is set to the token the agent made, and the role is made to log
    in as RDS IAM users do (``hostssl ... password``: the password travels in clear text inside
    the TLS session; any login without TLS is rejected). What is shown:

    - before the role's password is the token, the agent's login is refused: the server really
      compares what the agent sends with the role's password;
    - afterwards the agent logs in with the cached token (it is the same value, taken from the
      agent's own cache, that the first attempt sent), and ``pg_stat_ssl`` for that very
      session says it is encrypted: the token reached the server as the password over TLS.
    """
    from outpost.api.service import AgentService

    cluster = pg_tls_cluster
    role = f"outpost_iam_{uuid.uuid4().hex[:6]}"
    cluster.superuser_execute(f"CREATE ROLE {role} LOGIN PASSWORD 'not-the-token'")
    config_path = tmp_path / "agent.json"
    config_path.write_text(
        json.dumps({"data_dir": str(tmp_path / "data"), "credentials": {"aws": {"region": REGION}}})
    )
    options = {
        "host": cluster.host,
        "port": cluster.port,
        "user": role,
        "database": cluster.database,
        "ssl": "verify-full",
        "ssl_root_cert": str(cluster.ca_path),
        "password_from": "aws-rds-iam",
    }
    with rds_like_hba(cluster, role):
        wait_for(lambda: _refused_without_tls(cluster, role), 20, "pg_hba.conf to be reloaded")
        service = AgentService.open(load_config(str(config_path)))
        try:
            slug = service.add_connection("postgres", "orders", options, verify=False).slug
            refused = service.test_connection(slug)
            assert not refused.up
            assert refused.error is not None and "authentication failed for user" in refused.error

            # the token the agent made (and sent) above, read from the agent's own cache
            ctx = CredentialContext(
                connection="orders",
                driver="postgres",
                host=cluster.host,
                port=cluster.port,
                user=role,
                options={k: v for k, v in options.items() if k != "password_from"},
            )
            token, provenance = service.credentials.get(
                parse_reference("aws-rds-iam", service.config.credentials), ctx
            )
            assert provenance.cached
            fields = check_rds_token(token.password)
            assert (fields["host"], fields["DBUser"]) == (f"localhost:{cluster.port}", role)
            cluster.superuser_execute(f"ALTER ROLE {role} PASSWORD '{token.password}'")

            report = service.test_connection(slug)
            assert report.up, report.error
            assert report.password_source is not None
            assert report.password_source.startswith("aws-rds-iam (cached, fetched")
            result = service.query(
                slug,
                "SELECT current_user, s.ssl, s.version FROM pg_stat_ssl s "
                "WHERE s.pid = pg_backend_pid()",
            )
            assert result.rows[0][:2] == [role, True]
            assert str(result.rows[0][2]).startswith("TLS")
            assert_hidden([token.password], report.model_dump_json(), result.model_dump_json())
        finally:
            service.close()
            cluster.superuser_execute(f"DROP ROLE IF EXISTS {role}")


# --- aws-secretsmanager end to end through the CLI ------------------------------------------


def test_secretsmanager_end_to_end_cli(
    pg_tls_cluster: PgCluster, moto: Moto, tmp_path: Path
) -> None:
    """`outpost connections add ... --password-from aws-secretsmanager:NAME#.password` against
    the throwaway PostgreSQL (scram-sha-256, TLS); a password rotated at the source and in the
    database is picked up by the next connect; a wrong one at the source fails; no secret in
    any output or in the agent's data dir."""
    cluster = pg_tls_cluster
    role = f"outpost_sm_{uuid.uuid4().hex[:6]}"
    first, second, wrong = fresh_secret(), fresh_secret(), fresh_secret()
    cluster.superuser_execute(f"CREATE ROLE {role} LOGIN PASSWORD '{first}'")
    name = unique("pg")
    sm = moto.client("secretsmanager")
    sm.create_secret(Name=name, SecretString=json.dumps({"username": role, "password": first}))
    agent = Agent(
        tmp_path / "agent",
        config={"credentials": {"aws": {"region": REGION, "endpoint_url": moto.url}}},
    )
    outputs: list[str] = []
    try:
        added = agent.ok(
            "connections",
            "add",
            "postgres",
            "--name",
            "orders",
            "--host",
            cluster.host,
            "--port",
            str(cluster.port),
            "--user",
            role,
            "--database",
            cluster.database,
            "--ssl",
            "verify-full",
            "--ssl-root-cert",
            str(cluster.ca_path),
            "--password-from",
            f"aws-secretsmanager:{name}#.password",
        )
        outputs += [added.out, added.err]
        slug = agent.list_json()[0]["slug"]
        tested = agent.ok("connections", "test", slug, "--format", "json")
        outputs += [tested.out, tested.err]
        assert tested.json["up"] is True
        assert tested.json["password_source"].startswith(f"aws-secretsmanager:{name}#.password")

        cluster.superuser_execute(f"ALTER ROLE {role} PASSWORD '{second}'")
        sm.put_secret_value(
            SecretId=name, SecretString=json.dumps({"username": role, "password": second})
        )
        rotated = agent.ok("connections", "test", slug)
        outputs += [rotated.out, rotated.err]
        assert "PASSWORD FROM" in rotated.out

        sm.put_secret_value(
            SecretId=name, SecretString=json.dumps({"username": role, "password": wrong})
        )
        failed = agent.fails("connections", "test", slug, "--format", "json")
        outputs += [failed.out, failed.err]
        assert "authentication failed for user" in failed.json["error"]

        sm.delete_secret(SecretId=name, ForceDeleteWithoutRecovery=True)
        gone = agent.fails("connections", "test", slug, "--format", "json")
        outputs += [gone.out, gone.err]
        assert gone.json["error"] == (
            f"Cannot get the password for connection 'orders' from "
            f"aws-secretsmanager:{name}#.password: the secret does not exist (region us-east-1)."
        )
        shown = agent.ok("connections", "list", "--format", "json")
        outputs += [shown.out, shown.err]
    finally:
        cluster.superuser_execute(f"DROP ROLE IF EXISTS {role}")
    assert_hidden([first, second, wrong], *outputs)
    for path in agent.data_dir.rglob("*"):
        if path.is_file():
            data = path.read_bytes()
            assert not any(v.encode() in data for v in (first, second, wrong)), path
