"""Checks on signed jobs: signature with the pinned key, addressee, expiry, parameters."""

from __future__ import annotations

import time
import uuid
from typing import Any

import pytest

from outpost.jobs.checks import JobRefused, check_fresh, check_params
from outpost.link.verify import check_signature
from outpost.protocol import (
    JobBody,
    SignedJob,
    generate_signing_key,
    load_public_key,
    public_key_b64,
    sign_job,
)

HQ_KEY = generate_signing_key()
PINNED = load_public_key(public_key_b64(HQ_KEY))


def body(**changes: Any) -> JobBody:
    now = time.time()
    data: dict[str, Any] = {
        "job_id": str(uuid.uuid4()),
        "agent": "edge-1",
        "connection": "sales",
        "kind": "query",
        "params": {"sql": "select 1", "max_rows": 10},
        "issued_at": now,
        "expires_at": now + 300,
        "timeout": 30.0,
        "nonce": uuid.uuid4().hex,
    }
    data.update(changes)
    return JobBody(**data)


def test_good_signature_gives_the_body() -> None:
    job = body()
    assert check_signature(sign_job(HQ_KEY, job), PINNED, "edge-1") == job


def test_job_signed_by_another_key_is_refused_with_its_id() -> None:
    job = body()
    signed = sign_job(generate_signing_key(), job)
    with pytest.raises(JobRefused) as info:
        check_signature(signed, PINNED, "edge-1")
    assert info.value.job_id == job.job_id
    assert "signature does not match" in info.value.reason


def test_tampered_body_is_refused() -> None:
    signed = sign_job(HQ_KEY, body())
    tampered = SignedJob(
        body=signed.body.replace("select 1", "drop table t"), signature=signed.signature
    )
    with pytest.raises(JobRefused, match="signature"):
        check_signature(tampered, PINNED, "edge-1")


def test_garbage_signature_and_body_are_refused_without_id() -> None:
    with pytest.raises(JobRefused) as info:
        check_signature(SignedJob(body="not json", signature="@@"), PINNED, "edge-1")
    assert info.value.job_id is None


def test_job_for_another_agent_is_refused() -> None:
    signed = sign_job(HQ_KEY, body(agent="edge-2"))
    with pytest.raises(JobRefused, match=r"signed for agent 'edge-2'.*this agent is 'edge-1'"):
        check_signature(signed, PINNED, "edge-1")


def test_expired_job_is_refused() -> None:
    now = time.time()
    with pytest.raises(JobRefused, match="expired"):
        check_fresh(body(expires_at=now - 1), now, nonce_seen=False)
    check_fresh(body(expires_at=now + 1), now, nonce_seen=False)


def test_replayed_nonce_is_refused() -> None:
    with pytest.raises(JobRefused, match="nonce was already used"):
        check_fresh(body(), time.time(), nonce_seen=True)


def test_read_only_wins_over_allow_writes() -> None:
    writes = body(params={"sql": "delete from t", "allow_writes": True})
    with pytest.raises(JobRefused, match="read-only"):
        check_params(writes, read_only=True)
    check_params(writes, read_only=False)


@pytest.mark.parametrize(
    ("kind", "params", "reason"),
    [
        ("query", {}, "non-empty 'sql'"),
        ("query", {"sql": "  "}, "non-empty 'sql'"),
        ("query", {"sql": "select 1", "params": "x"}, "'params' must be a list"),
        ("query", {"sql": "select 1", "max_rows": 0}, "'max_rows'"),
        ("inspect", {"schemas": "public"}, "'schemas'"),
    ],
)
def test_malformed_params_are_refused(kind: str, params: dict[str, Any], reason: str) -> None:
    with pytest.raises(JobRefused, match=reason):
        check_params(body(kind=kind, params=params), read_only=False)
