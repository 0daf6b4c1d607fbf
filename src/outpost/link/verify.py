"""The first checks on a job from HQ: its signature and its addressee.

HQ's Ed25519 signature must verify over the exact body bytes with the key pinned at login,
and the job must name this agent. The executor then checks the job id (a known id is answered
from memory), the expiry, the nonce and ``read_only`` (``outpost.jobs.checks``).
"""

from __future__ import annotations

import json
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from outpost.jobs.checks import JobRefused
from outpost.protocol import JobBody, SignatureError, SignedJob, verify_job

__all__ = ["JobRefused", "check_signature", "unverified_job_id"]


def unverified_job_id(signed: SignedJob) -> str | None:
    """The job id in a body whose signature did not check out (only to address the refusal)."""
    try:
        data: Any = json.loads(signed.body)
    except ValueError:
        return None
    job_id = data.get("job_id") if isinstance(data, dict) else None
    return job_id if isinstance(job_id, str) and job_id else None


def check_signature(signed: SignedJob, public_key: Ed25519PublicKey, agent_name: str) -> JobBody:
    """Verify the signature with the pinned key and that the job is meant for AGENT_NAME."""
    try:
        body = verify_job(public_key, signed)
    except SignatureError as exc:
        raise JobRefused(unverified_job_id(signed), str(exc)) from None
    if body.agent != agent_name:
        raise JobRefused(
            body.job_id,
            f"the job is signed for agent {body.agent!r}, and this agent is {agent_name!r}",
        )
    return body
