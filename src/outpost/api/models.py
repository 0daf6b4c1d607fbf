"""Data the agent's API returns, shared by the local backend and the HTTP client."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ConnectionInfo(_Model):
    """One row of `outpost connections list`: what may be shown (no secret)."""

    name: str
    slug: str
    driver: str
    driver_name: str
    on_agent: bool = True
    up: bool | None = None
    checked_at: float | None = None
    error: str | None = None
    server_version: str | None = None
    check_seconds: float | None = None


class ConnectionDetail(ConnectionInfo):
    """A connection with its options, secrets replaced by ********."""

    options: dict[str, Any]
    encrypted: bool
    password_source: str | None = None


class TestReport(_Model):
    slug: str
    name: str
    up: bool
    server_version: str | None = None
    duration_seconds: float
    error: str | None = None
    #: where the password came from (source, age of the cached value), never the value
    password_source: str | None = None


class QueryReport(_Model):
    slug: str
    columns: list[str]
    rows: list[list[Any]]
    row_count: int
    truncated: bool
    duration_seconds: float
    notices: list[str] = []


class AgentStatus(_Model):
    version: str
    data_dir: str
    config_file: str | None
    encrypted: bool
    key_path: str | None
    read_only: bool
    connections: int
    connections_up: int
    started_at: float | None
    pid: int | None = None
    api_url: str | None = None
    warnings: list[str] = []
