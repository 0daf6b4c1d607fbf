"""HQ's signing key file, signed job bodies, tokens and database URLs."""

from __future__ import annotations

import hashlib
import json
import stat
from pathlib import Path

import pytest

from outpost.errors import KeyError_, UsageError
from outpost.hq.settings import database_url
from outpost.hq.signing import load_or_create_key, make_signed_job
from outpost.hq.tokens import ADMIN_PREFIX, AGENT_PREFIX, bearer, new_token, token_hash
from outpost.protocol import SignatureError, SignedJob, private_key_bytes, verify_job


def test_signing_key_is_created_private_and_reused(tmp_path: Path) -> None:
    path = tmp_path / "data" / "signing.key"
    key = load_or_create_key(path)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600 and path.stat().st_size == 32
    assert private_key_bytes(load_or_create_key(path)) == private_key_bytes(key)
    path.write_bytes(b"short")
    with pytest.raises(KeyError_, match="not a raw 32-byte Ed25519 key"):
        load_or_create_key(path)


def test_signed_jobs_verify_and_carry_fresh_nonces(tmp_path: Path) -> None:
    key = load_or_create_key(tmp_path / "signing.key")
    bodies = []
    for _ in range(2):
        body, signed = make_signed_job(
            key,
            job_id="j1",
            agent="a1",
            connection="pg",
            kind="test",
            params={},
            timeout=30,
            expires_in=60,
        )
        assert verify_job(key.public_key(), signed) == body
        assert body.expires_at == body.issued_at + 60 and len(body.nonce) == 32
        bodies.append(body)
    assert bodies[0].nonce != bodies[1].nonce
    tampered = json.loads(signed.body)
    tampered["agent"] = "a2"
    forged = SignedJob(body=json.dumps(tampered), signature=signed.signature)
    with pytest.raises(SignatureError):
        verify_job(key.public_key(), forged)


def test_tokens_and_their_hashes() -> None:
    admin, agent = new_token(ADMIN_PREFIX), new_token(AGENT_PREFIX)
    assert admin.startswith("opa_") and agent.startswith("opt_") and len(agent) == 47
    assert token_hash(agent) == hashlib.sha256(agent.encode()).hexdigest()
    assert bearer(f"Bearer {agent}") == agent and bearer(f"bearer  {agent} ") == agent
    assert bearer(None) is None and bearer("Basic x") is None and bearer("Bearer ") is None


def test_database_urls(tmp_path: Path) -> None:
    assert database_url(None, tmp_path).database == str(tmp_path / "hq.sqlite")
    pg = database_url("postgresql://u:pw@db:5433/hq", tmp_path)
    assert pg.drivername == "postgresql+psycopg" and pg.port == 5433
    assert database_url("postgres://u@db/hq", tmp_path).drivername == "postgresql+psycopg"
    assert database_url("sqlite:////tmp/x.db", tmp_path).database == "/tmp/x.db"
    with pytest.raises(UsageError, match="scheme 'mysql' is not supported"):
        database_url("mysql://root@db/x", tmp_path)
    with pytest.raises(UsageError, match="not a database URL"):
        database_url("just words", tmp_path)
    with pytest.raises(UsageError, match="needs a file path"):
        database_url("sqlite://", tmp_path)
