"""The bodies of HQ's REST API (``/api/v1``), shared by the server, ``outpost.client`` and the CLI.

Times are unix seconds (float). Field descriptions end up in ``/openapi.json``.
"""

from __future__ import annotations

import re
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from outpost.protocol import JobKind, JobState

NAME_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,62}$")
NAME_RULE = "1 to 63 letters, digits, '.', '_' or '-', starting with a letter or digit"


def check_name(value: str, what: str = "agent name") -> str:
    if not NAME_PATTERN.match(value):
        raise ValueError(f"{what} {value!r} is not valid: use {NAME_RULE}")
    return value


class _Body(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ErrorBody(_Body):
    code: str = Field(description="machine-readable reason, e.g. not_found, token_revoked")
    message: str = Field(description="one sentence naming the thing and what to do")


class HQInfo(_Body):
    hq_id: str
    version: str
    signing_key: str = Field(description="HQ's Ed25519 public key, raw bytes, base64")
    agents_online: int


class AgentCreate(_Body):
    name: str

    @field_validator("name")
    @classmethod
    def _name(cls, value: str) -> str:
        return check_name(value)


class Agent(_Body):
    name: str
    online: bool
    last_seen: float | None = None
    version: str | None = None
    read_only: bool | None = None
    transport: Literal["websocket", "poll"] | None = None
    created_at: float
    revoked: bool
    connections: int = Field(0, description="connections the agent reports")


class AgentWithToken(_Body):
    agent: Agent
    token: str = Field(description="the enrolment token, shown once; HQ keeps only its hash")


class AgentList(_Body):
    agents: list[Agent]


class ConnectionDeclare(_Body):
    name: str = Field(min_length=1, max_length=200)
    driver: str = Field(min_length=1, max_length=40)


class Connection(_Body):
    agent: str
    slug: str
    name: str
    driver: str
    up: bool | None = None
    checked_at: float | None = None
    on_agent: bool = Field(description="false: declared at HQ but not configured on the agent")


class ConnectionList(_Body):
    connections: list[Connection]


class JobCreate(_Body):
    agent: str
    connection: str = Field(description="the connection's slug on that agent")
    kind: JobKind
    sql: str | None = Field(None, description="query: the statement")
    params: list[Any] | None = Field(None, description="query: positional parameters")
    max_rows: int = Field(1000, ge=1, le=10_000_000)
    timeout: float = Field(30.0, gt=0, le=86_400, description="seconds the job may run")
    expires_in: float = Field(
        300.0, gt=0, le=30 * 86_400, description="seconds a job may wait to start"
    )
    allow_writes: bool = False
    schemas: list[str] | None = Field(None, description="inspect: only these schemas")

    @model_validator(mode="after")
    def _by_kind(self) -> JobCreate:
        if self.kind == "query" and not (self.sql and self.sql.strip()):
            raise ValueError("a query job needs a non-empty 'sql'")
        if self.kind != "query" and (self.sql is not None or self.params is not None):
            raise ValueError(f"'sql' and 'params' are only for query jobs, not {self.kind}")
        return self


class Job(_Body):
    id: str
    agent: str
    connection: str
    kind: JobKind
    state: JobState
    params: dict[str, Any] = Field(default_factory=dict)
    created_at: float
    sent_at: float | None = None
    started_at: float | None = None
    finished_at: float | None = None
    expires_at: float
    timeout: float
    error: str | None = None
    result: dict[str, Any] | None = None
    attempts: int = 0


class JobList(_Body):
    jobs: list[Job]


class Rows(_Body):
    job_id: str
    columns: list[str]
    rows: list[list[Any]]
    offset: int
    limit: int
    row_count: int
    next_offset: int | None = None
