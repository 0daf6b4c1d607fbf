"""Checks on a job whose signature checked out, before the agent runs it.

The job has not expired, its nonce is fresh, its parameters are well formed, and it asks
nothing the agent's ``read_only`` setting forbids. Each refusal carries one sentence HQ records
as "rejected by agent: REASON". (The signature and the agent name are checked first, by
``outpost.link.verify``.)
"""

from __future__ import annotations

from outpost.protocol import JobBody


class JobRefused(Exception):
    """The agent will not run this job; ``reason`` is sent to HQ in ``JobRejected``."""

    def __init__(self, job_id: str | None, reason: str) -> None:
        super().__init__(reason)
        self.job_id = job_id
        self.reason = reason


def check_fresh(body: JobBody, now: float, *, nonce_seen: bool) -> None:
    """A job past its expiry, or carrying a nonce already used, is refused."""
    if body.expires_at <= now:
        raise JobRefused(
            body.job_id,
            f"the job expired {now - body.expires_at:.1f}s before it reached the agent",
        )
    if nonce_seen:
        raise JobRefused(body.job_id, "the job's nonce was already used (a replayed job)")


def check_params(body: JobBody, *, read_only: bool) -> None:
    """The job's parameters are well formed, and ``read_only`` wins over ``allow_writes``."""
    params = body.params
    if body.kind == "query":
        sql = params.get("sql")
        if not isinstance(sql, str) or not sql.strip():
            raise JobRefused(body.job_id, "a query job needs a non-empty 'sql' parameter")
        if params.get("params") is not None and not isinstance(params.get("params"), list):
            raise JobRefused(body.job_id, "a query job's 'params' must be a list")
        max_rows = params.get("max_rows")
        if max_rows is not None and (
            isinstance(max_rows, bool) or not isinstance(max_rows, int) or max_rows < 1
        ):
            raise JobRefused(body.job_id, "a query job's 'max_rows' must be a positive integer")
        if params.get("allow_writes") and read_only:
            raise JobRefused(
                body.job_id,
                "the agent is read-only (read_only: true) and the job asks to allow writes",
            )
    if body.kind == "inspect":
        schemas = params.get("schemas")
        if schemas is not None and not (
            isinstance(schemas, list) and all(isinstance(s, str) for s in schemas)
        ):
            raise JobRefused(body.job_id, "an inspect job's 'schemas' must be a list of names")
    if body.timeout <= 0:
        raise JobRefused(body.job_id, "the job's timeout must be positive")
