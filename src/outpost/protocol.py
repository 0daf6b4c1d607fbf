"""The messages Outpost HQ and its agents exchange, shared by ``link/`` (agent) and ``hq/``.

Every message is one JSON object with a ``type`` field. Over WebSocket each frame is one
message (text frame). Over the long-poll fallback the agent POSTs ``PollRequest`` (its outbound
messages) and receives ``PollResponse`` (HQ's messages for it).

Endpoints HQ serves for agents (the agent authenticates with ``Authorization: Bearer TOKEN``):

- ``POST /agent/v1/login``  -> ``LoginResponse`` (who the token belongs to, HQ's signing key)
- ``GET  /agent/v1/ws``     WebSocket; first agent frame ``Hello``, first HQ frame ``Welcome``
- ``POST /agent/v1/poll``   body ``PollRequest``, answer ``PollResponse``; HQ holds the request up
  to ``wait`` seconds when it has nothing to send. The first poll of a session carries ``Hello``.

A rejected token is HTTP 401 (or WebSocket close code 4401) with an ``Error`` body whose
``code`` says why (``token_unknown``, ``token_revoked``); the agent then stops instead of
retrying. Jobs are ``SignedJob``: ``body`` is a ``JobBody`` serialised by ``canonical_json`` and
``signature`` is HQ's Ed25519 signature of exactly those bytes (base64).
"""

from __future__ import annotations

import base64
import json
from typing import Annotated, Any, Literal

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from cryptography.hazmat.primitives.serialization import (
    Encoding,
    NoEncryption,
    PrivateFormat,
    PublicFormat,
)
from pydantic import BaseModel, ConfigDict, Field, TypeAdapter

PROTOCOL_VERSION = 1

JobKind = Literal["test", "query", "inspect"]
JobState = Literal["queued", "sent", "running", "succeeded", "failed", "expired", "cancelled"]
FINAL_STATES: frozenset[str] = frozenset({"succeeded", "failed", "expired", "cancelled"})

#: Rows per ``ResultChunk``; HQ stores each chunk as one page.
CHUNK_ROWS = 1000


class _Message(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


# -- metadata ---------------------------------------------------------------------------------


class ConnectionMeta(_Message):
    """What an agent tells HQ about one connection, and nothing more (no host, user, option)."""

    slug: str
    name: str
    driver: str
    up: bool | None = None  # None: never checked
    checked_at: float | None = None  # unix seconds of the last check


# -- agent -> HQ ------------------------------------------------------------------------------


class Hello(_Message):
    type: Literal["hello"] = "hello"
    protocol: int = PROTOCOL_VERSION
    agent_version: str
    read_only: bool
    connections: list[ConnectionMeta]
    #: job ids the agent has finished but whose result HQ has not acknowledged yet, and job ids
    #: still running; lets HQ reconcile after either side restarted
    running: list[str] = Field(default_factory=list)


class Heartbeat(_Message):
    """Sent both ways every ``heartbeat_interval`` seconds; the peer answers nothing."""

    type: Literal["heartbeat"] = "heartbeat"
    sent_at: float


class ConnectionsReport(_Message):
    """The agent's full connection list, sent when it changes (add/delete/UP flips)."""

    type: Literal["connections"] = "connections"
    connections: list[ConnectionMeta]


class JobAccepted(_Message):
    """The signature checked out and the job is running (state ``running``)."""

    type: Literal["job_accepted"] = "job_accepted"
    job_id: str
    started_at: float


class JobRejected(_Message):
    """The agent refused to run the job (bad signature, expired, replayed nonce, read-only...)."""

    type: Literal["job_rejected"] = "job_rejected"
    job_id: str
    reason: str


class ResultChunk(_Message):
    """Rows of a query result, in order; ``seq`` starts at 0. Sent before ``JobFinished``."""

    type: Literal["result_chunk"] = "result_chunk"
    job_id: str
    seq: int
    rows: list[list[Any]]


class JobFinished(_Message):
    """The job's end. ``result`` holds the non-row part (columns, row_count, the inspect
    document, the test report); rows came in ``ResultChunk`` messages (``chunks`` of them)."""

    type: Literal["job_finished"] = "job_finished"
    job_id: str
    state: Literal["succeeded", "failed", "cancelled"]
    finished_at: float
    duration_seconds: float
    result: dict[str, Any] | None = None
    error: str | None = None
    chunks: int = 0


# -- HQ -> agent ------------------------------------------------------------------------------


class Welcome(_Message):
    type: Literal["welcome"] = "welcome"
    agent_name: str
    heartbeat_interval: float
    max_concurrent_jobs: int


class JobBody(_Message):
    """What HQ signs. ``params`` by kind: test {} ; query {sql, params, max_rows, timeout,
    allow_writes} ; inspect {schemas: list[str] | None}."""

    job_id: str
    agent: str  # the agent's name: a job signed for one agent is refused by every other
    connection: str  # slug
    kind: JobKind
    params: dict[str, Any] = Field(default_factory=dict)
    issued_at: float
    expires_at: float
    timeout: float  # seconds the job may run
    nonce: str  # 128 random bits, hex


class SignedJob(_Message):
    type: Literal["job"] = "job"
    body: str  # canonical_json(JobBody)
    signature: str  # base64 Ed25519 signature of body's UTF-8 bytes


class CancelJob(_Message):
    type: Literal["cancel"] = "cancel"
    job_id: str


class ResultAck(_Message):
    """HQ stored the job's final result: the agent may forget it (it keeps the id)."""

    type: Literal["result_ack"] = "result_ack"
    job_id: str


class Disconnect(_Message):
    """HQ is closing the link for good (token revoked): the agent stops with ``reason``."""

    type: Literal["disconnect"] = "disconnect"
    code: str
    reason: str


AgentMessage = Annotated[
    Hello | Heartbeat | ConnectionsReport | JobAccepted | JobRejected | ResultChunk | JobFinished,
    Field(discriminator="type"),
]
HQMessage = Annotated[
    Welcome | Heartbeat | SignedJob | CancelJob | ResultAck | Disconnect,
    Field(discriminator="type"),
]

agent_message: TypeAdapter[AgentMessage] = TypeAdapter(AgentMessage)
hq_message: TypeAdapter[HQMessage] = TypeAdapter(HQMessage)


# -- HTTP bodies ------------------------------------------------------------------------------


class LoginResponse(_Message):
    agent_name: str
    hq_id: str
    signing_key: str  # HQ's Ed25519 public key, raw 32 bytes, base64
    heartbeat_interval: float


class PollRequest(_Message):
    messages: list[AgentMessage] = Field(default_factory=list)
    wait: float = Field(20.0, ge=0, le=60)


class PollResponse(_Message):
    messages: list[HQMessage] = Field(default_factory=list)


class Error(_Message):
    code: str
    message: str


# -- canonical JSON and signatures ------------------------------------------------------------


def canonical_json(value: Any) -> str:
    """Sorted keys, no whitespace, UTF-8: the bytes both sides sign and verify."""
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False)


def generate_signing_key() -> Ed25519PrivateKey:
    return Ed25519PrivateKey.generate()


def private_key_bytes(key: Ed25519PrivateKey) -> bytes:
    return key.private_bytes(Encoding.Raw, PrivateFormat.Raw, NoEncryption())


def public_key_b64(key: Ed25519PrivateKey | Ed25519PublicKey) -> str:
    public = key.public_key() if isinstance(key, Ed25519PrivateKey) else key
    return base64.b64encode(public.public_bytes(Encoding.Raw, PublicFormat.Raw)).decode()


def load_public_key(b64: str) -> Ed25519PublicKey:
    return Ed25519PublicKey.from_public_bytes(base64.b64decode(b64, validate=True))


def sign_job(key: Ed25519PrivateKey, body: JobBody) -> SignedJob:
    text = canonical_json(body.model_dump(mode="json"))
    signature = base64.b64encode(key.sign(text.encode())).decode()
    return SignedJob(body=text, signature=signature)


class SignatureError(ValueError):
    """A job whose signature does not verify against the pinned key, or whose body is bad."""


def verify_job(public_key: Ed25519PublicKey, job: SignedJob) -> JobBody:
    """Check the signature over the exact body bytes, then parse the body. Expiry, agent name
    and nonce freshness are the caller's to check (they need a clock and memory)."""
    try:
        signature = base64.b64decode(job.signature, validate=True)
        public_key.verify(signature, job.body.encode())
    except (InvalidSignature, ValueError) as exc:
        raise SignatureError("the job's signature does not match HQ's pinned key") from exc
    try:
        return JobBody.model_validate_json(job.body)
    except ValueError as exc:
        raise SignatureError("the signed job body is not a valid job") from exc
