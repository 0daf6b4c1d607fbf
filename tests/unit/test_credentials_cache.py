"""The credential cache: expiry, refresh margin, one fetch in flight, leases, references."""

from __future__ import annotations

import threading
import time

import pytest

from outpost.config import CredentialsConfig
from outpost.credentials import parse_reference, source_kinds
from outpost.credentials.base import (
    Credential,
    CredentialContext,
    CredentialError,
    CredentialSource,
    read_dot_path,
)
from outpost.credentials.cache import CredentialCache
from outpost.errors import UsageError

CTX = CredentialContext(connection="db", driver="postgres", host="h", port=5432, user="u")


class Clock:
    def __init__(self) -> None:
        self.now = 1_000_000.0

    def __call__(self) -> float:
        return self.now


class Counting(CredentialSource):
    kind = "counting"

    def __init__(self, config: CredentialsConfig, clock: Clock) -> None:
        super().__init__("x", config, clock)
        self.lifetime: float | None = 900.0
        self.delay = 0.0
        self.fetches = 0
        self.renewals = 0
        self.revoked: list[str] = []

    def fetch(self, ctx: CredentialContext) -> Credential:
        self.fetches += 1
        if self.delay:
            time.sleep(self.delay)  # a slow fetch, so concurrent callers overlap
        now = self.clock()
        expires = None if self.lifetime is None else now + self.lifetime
        return Credential(password=f"pw{self.fetches}", fetched_at=now, expires_at=expires)


class Leased(Counting):
    def fetch(self, ctx: CredentialContext) -> Credential:
        self.fetches += 1
        now = self.clock()
        return Credential(
            password=f"pw{self.fetches}",
            username="v-user",
            fetched_at=now,
            expires_at=now + 600,
            lease_id=f"lease-{self.fetches}",
            renewable=True,
            lease_seconds=600,
        )

    def renew(self, credential: Credential) -> Credential | None:
        self.renewals += 1
        now = self.clock()
        return Credential(
            password=credential.password,
            username=credential.username,
            fetched_at=credential.fetched_at,
            expires_at=now + 600,
            lease_id=credential.lease_id,
            renewable=True,
            lease_seconds=600,
        )

    def revoke(self, credential: Credential) -> None:
        assert credential.lease_id is not None
        self.revoked.append(credential.lease_id)


def test_expiring_value_is_refreshed_before_it_expires() -> None:
    clock = Clock()
    config = CredentialsConfig(refresh_margin=60)
    cache = CredentialCache(config, clock)
    source = Counting(config, clock)
    assert cache.get(source, CTX)[0].password == "pw1"
    clock.now += 800  # 100 s left, more than the 60 s margin
    cred, prov = cache.get(source, CTX)
    assert cred.password == "pw1" and prov.cached and source.fetches == 1
    assert prov.age_seconds == 800 and prov.expires_in_seconds == 100
    clock.now += 41  # 59 s left: inside the margin
    assert cache.get(source, CTX)[0].password == "pw2"
    assert source.fetches == 2


def test_values_without_expiry_use_cache_ttl() -> None:
    clock = Clock()
    config = CredentialsConfig(cache_ttl=300)
    cache = CredentialCache(config, clock)
    source = Counting(config, clock)
    source.lifetime = None
    cache.get(source, CTX)
    clock.now += 299
    assert cache.get(source, CTX)[1].cached
    clock.now += 2
    assert not cache.get(source, CTX)[1].cached
    assert source.fetches == 2


def test_one_fetch_in_flight() -> None:
    clock = Clock()
    config = CredentialsConfig()
    cache = CredentialCache(config, clock)
    source = Counting(config, clock)
    source.delay = 0.2
    results: list[str] = []
    threads = [
        threading.Thread(target=lambda: results.append(cache.get(source, CTX)[0].password))
        for _ in range(8)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert results == ["pw1"] * 8
    assert source.fetches == 1


def test_leases_are_renewed_in_use_and_revoked_on_close() -> None:
    clock = Clock()
    config = CredentialsConfig(refresh_margin=60)
    cache = CredentialCache(config, clock)
    source = Leased(config, clock)
    first = cache.get(source, CTX)[0]
    assert first.username == "v-user"
    clock.now += 550  # inside the margin: renew rather than fetch
    again = cache.get(source, CTX)[0]
    assert (source.fetches, source.renewals) == (1, 1)
    assert again.lease_id == first.lease_id and again.expires_at == clock.now + 600
    cache.close()
    assert source.revoked == ["lease-1"]


def test_invalidate_forces_a_fetch() -> None:
    clock = Clock()
    config = CredentialsConfig()
    cache = CredentialCache(config, clock)
    source = Counting(config, clock)
    cache.get(source, CTX)
    cache.invalidate(source, CTX)
    assert cache.get(source, CTX)[0].password == "pw2"


def test_credential_repr_hides_values() -> None:
    cred = Credential(password="hunter2", username="scott", fetched_at=1.0)
    assert "hunter2" not in repr(cred) and "scott" not in repr(cred)


@pytest.mark.parametrize(
    ("reference", "message"),
    [
        ("nope:x", "is not a credential source"),
        ("env:", "env needs an argument"),
        ("env:1BAD", "is not a variable name"),
        ("file:relative/path", "give an absolute path"),
        ("aws-rds-iam:extra", "takes no argument"),
    ],
)
def test_bad_references(reference: str, message: str) -> None:
    with pytest.raises(UsageError, match=message):
        parse_reference(reference, CredentialsConfig())


def test_every_builtin_kind_is_registered() -> None:
    assert {
        "env",
        "file",
        "aws-secretsmanager",
        "aws-rds-iam",
        "gcp-secretmanager",
        "gcp-cloudsql-iam",
        "vault",
        "vault-db",
    } <= set(source_kinds())


def test_dot_paths() -> None:
    source = parse_reference("env:X", CredentialsConfig())
    doc = '{"password": "p1", "db": {"password": "p2", "port": 5432}, "list": ["a"]}'
    assert read_dot_path(source, CTX, doc, None) == doc
    assert read_dot_path(source, CTX, doc, ".password") == "p1"
    assert read_dot_path(source, CTX, doc, ".db.password") == "p2"
    assert read_dot_path(source, CTX, doc, ".db.port") == "5432"
    with pytest.raises(CredentialError) as err:
        read_dot_path(source, CTX, doc, ".db.user")
    assert str(err.value) == (
        "Cannot get the password for connection 'db' from env:X: the secret has no field .db.user."
    )
    assert "p1" not in str(err.value) and "p2" not in str(err.value)
    with pytest.raises(CredentialError, match="is an object"):
        read_dot_path(source, CTX, doc, ".db")
    with pytest.raises(CredentialError, match="not JSON"):
        read_dot_path(source, CTX, "plain-secret", ".password")
    with pytest.raises(UsageError, match="Bad dot-path"):
        read_dot_path(source, CTX, doc, "password")
