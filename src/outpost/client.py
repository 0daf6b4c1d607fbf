"""A Python client for Outpost HQ's REST API (``/api/v1``): sync, typed, on httpx.

    from outpost.client import HQClient

    with HQClient("https://hq.example.com", "opa_...") as hq:
        created = hq.create_agent("warehouse")      # created.token is shown once
        outcome = hq.run_query("warehouse", "shop", "SELECT id, total FROM orders")
        print(outcome.columns, outcome.rows)

Every error is an :class:`outpost.errors.OutpostError` carrying one sentence: HQ's own message
for a refused request (404 -> :class:`NotFoundError`, 409 -> :class:`ConflictError`, 400/422 ->
:class:`UsageError`), :class:`AuthenticationError` when HQ refuses the admin token,
:class:`HQUnreachableError` when HQ cannot be reached, :class:`JobFailedError` when a job this
client waited for ends failed, expired or cancelled, and :class:`JobWaitTimeout` when it is
still running when the wait is over.
"""

from __future__ import annotations

import math
import socket
import ssl
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, TypeVar
from urllib.parse import quote

import httpx
from pydantic import BaseModel, ValidationError

from outpost import __version__
from outpost.errors import ConflictError, NotFoundError, OutpostError, UsageError
from outpost.hq.api_models import (
    Agent,
    AgentList,
    AgentWithToken,
    Connection,
    ConnectionList,
    HQInfo,
    Job,
    JobCreate,
    JobList,
    Rows,
)
from outpost.protocol import FINAL_STATES, JobKind, JobState

__all__ = [
    "AuthenticationError",
    "HQClient",
    "HQUnreachableError",
    "JobFailedError",
    "JobWaitTimeout",
    "QueryOutcome",
]

M = TypeVar("M", bound=BaseModel)

#: The longest ``?wait=`` HQ accepts on ``GET /api/v1/jobs/{id}``; longer waits loop.
MAX_SERVER_WAIT = 60.0
#: Rows per ``/rows`` request (HQ's maximum).
ROWS_PAGE = 10_000


class AuthenticationError(OutpostError):
    """HQ refused the admin token (HTTP 401/403)."""


class HQUnreachableError(OutpostError):
    """No answer from HQ: connection refused, DNS, TLS or a timeout."""


class JobFailedError(OutpostError):
    """A job this client waited for ended failed, expired or cancelled; ``job`` is its end."""

    def __init__(self, message: str, job: Job) -> None:
        super().__init__(message)
        self.job = job


class JobWaitTimeout(OutpostError):
    """A job this client waited for is not final when the wait is over; it keeps going at HQ."""

    def __init__(self, message: str, job: Job) -> None:
        super().__init__(message)
        self.job = job


@dataclass(frozen=True)
class QueryOutcome:
    """A finished query job and every row of its result (fetched through ``/rows`` paging)."""

    job: Job
    columns: list[str]
    rows: list[list[Any]]

    @property
    def _result(self) -> dict[str, Any]:
        return self.job.result or {}

    @property
    def row_count(self) -> int:
        """Rows returned, or rows affected by a statement that returns none."""
        return int(self._result.get("row_count", len(self.rows)))

    @property
    def truncated(self) -> bool:
        """True when the result was cut at ``max_rows``."""
        return bool(self._result.get("truncated", False))

    @property
    def duration_seconds(self) -> float | None:
        value = self._result.get("duration_seconds")
        return None if value is None else float(value)

    @property
    def notices(self) -> list[str]:
        return [str(n) for n in self._result.get("notices") or []]


def _segment(value: str) -> str:
    """A value as one URL path segment (agent names and slugs never contain '/', but be safe)."""
    return quote(value, safe="")


def _reason(exc: BaseException, url: str) -> str:
    """Why a request got no answer, and what to check, without the exception class noise."""
    text = str(exc) or type(exc).__name__
    if "certificate verify failed" in text and "mismatch" in text:
        return "its TLS certificate is for another host name; connect by the name it was issued for"
    if "CERTIFICATE_VERIFY_FAILED" in text or "certificate verify failed" in text:
        return "its TLS certificate is not trusted; give the CA that signed it with --ca-file"
    if "WRONG_VERSION_NUMBER" in text or "record layer failure" in text:
        return "it does not speak HTTPS on that port; is the address http:// instead?"
    if "Server disconnected without sending a response" in text and url.startswith("http://"):
        return "the server hung up; does HQ serve HTTPS there (https://)?"
    if "Connection refused" in text:
        return "connection refused; is `outpost hq serve` running there?"
    if "Name or service not known" in text or "nodename nor servname" in text:
        return "the host name does not resolve"
    return f"{text.rstrip('.')}; is `outpost hq serve` running there?"


def _error_message(response: httpx.Response) -> tuple[str, str]:
    """(code, one sentence) from HQ's error body; FastAPI's own 422 shape is understood too."""
    try:
        data = response.json()
    except ValueError:
        data = None
    if isinstance(data, dict):
        if isinstance(data.get("message"), str):
            return str(data.get("code", "")), str(data["message"])
        detail = data.get("detail")
        if isinstance(detail, str):
            return "", detail
        if isinstance(detail, list) and detail and isinstance(detail[0], dict):
            first = detail[0]
            where = ".".join(str(p) for p in first.get("loc", []) if p != "body")
            msg = str(first.get("msg", "is not valid")).removeprefix("Value error, ")
            return "invalid", f"{where}: {msg}" if where else msg
    return "", f"HQ answered HTTP {response.status_code} {response.reason_phrase}".rstrip()


def _sentence(text: str) -> str:
    text = text.strip()
    return text if text.endswith((".", "!", "?")) else text + "."


class HQClient:
    """Talks to Outpost HQ's REST API with an admin token.

    ``url`` is HQ's base address (``https://hq.example.com`` or ``http://127.0.0.1:9700``);
    ``ca_file`` a PEM bundle to trust for HQ's certificate (else the system CAs), ``verify=False``
    turns certificate checks off; ``timeout`` bounds each request (a job wait adds its own time).
    """

    def __init__(
        self,
        url: str,
        token: str,
        *,
        ca_file: str | None = None,
        timeout: float = 30.0,
        verify: bool = True,
    ) -> None:
        self.url = url.strip().rstrip("/")
        parsed = httpx.URL(self.url) if "://" in self.url else None
        if parsed is None or parsed.scheme not in ("http", "https") or not parsed.host:
            raise UsageError(
                f"HQ address {url!r} is not a URL; give it as http(s)://HOST[:PORT], "
                "e.g. http://127.0.0.1:9700."
            )
        if not token or not token.strip():
            raise UsageError("The admin token is empty; create one with `outpost hq admin create`.")
        if any(c.isspace() for c in token.strip()):
            raise UsageError("The admin token contains white space; copy it again as printed.")
        self.timeout = timeout
        tls: ssl.SSLContext | bool = verify
        if ca_file is not None and verify:
            try:
                tls = ssl.create_default_context(cafile=ca_file)
            except ssl.SSLError:
                raise UsageError(
                    f"Cannot read the CA file {ca_file}: it holds no PEM certificate."
                ) from None
            except OSError as exc:
                reason = exc.strerror or str(exc)
                raise UsageError(f"Cannot read the CA file {ca_file}: {reason}.") from None
        # TCP_NODELAY: httpx writes headers and body separately; with Nagle on, the body
        # waits for the server's delayed ACK (~40 ms a request on Linux loopback).
        transport = httpx.HTTPTransport(
            verify=tls, socket_options=[(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)]
        )
        self._http = httpx.Client(
            base_url=self.url,
            headers={
                "Authorization": f"Bearer {token.strip()}",
                "User-Agent": f"outpost/{__version__}",
            },
            timeout=timeout,
            transport=transport,
        )

    # -- plumbing ---------------------------------------------------------------------------

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> HQClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _request(
        self,
        method: str,
        path: str,
        *,
        json: Any = None,
        params: dict[str, Any] | None = None,
        extra_time: float = 0.0,
    ) -> httpx.Response:
        query = {k: v for k, v in (params or {}).items() if v is not None}
        timeout = self.timeout + extra_time
        try:
            response = self._http.request(method, path, json=json, params=query, timeout=timeout)
        except httpx.TimeoutException:
            raise HQUnreachableError(
                f"HQ at {self.url} did not answer within {timeout:g} s; is it overloaded, "
                "or is the address wrong?"
            ) from None
        except httpx.HTTPError as exc:
            raise HQUnreachableError(
                f"Cannot reach HQ at {self.url}: {_sentence(_reason(exc, self.url))}"
            ) from None
        if response.status_code < 400:
            return response
        _code, message = _error_message(response)
        status = response.status_code
        if status in (401, 403):
            text = f"HQ at {self.url} refused the admin token: {message.rstrip('.')}"
            if "outpost hq admin create" not in message:
                text += "; check it, or create one with `outpost hq admin create`"
            raise AuthenticationError(text + ".")
        if status == 404:
            raise NotFoundError(_sentence(message))
        if status == 409:
            raise ConflictError(_sentence(message))
        if status in (400, 422):
            raise UsageError(_sentence(message))
        raise OutpostError(f"HQ at {self.url} failed on {method} {path}: {_sentence(message)}")

    def _model(
        self,
        model: type[M],
        method: str,
        path: str,
        *,
        json: Any = None,
        params: dict[str, Any] | None = None,
        extra_time: float = 0.0,
    ) -> M:
        response = self._request(method, path, json=json, params=params, extra_time=extra_time)
        try:
            # extra="ignore": a newer HQ may add fields; this client keeps working
            return model.model_validate(response.json(), extra="ignore")
        except (ValueError, ValidationError) as exc:
            raise OutpostError(
                f"HQ at {self.url} sent an answer to {method} {path} this client does not "
                f"understand ({str(exc).splitlines()[0]}); is it an Outpost HQ of a matching "
                "version?"
            ) from None

    # -- HQ, agents -------------------------------------------------------------------------

    def info(self) -> HQInfo:
        """HQ's id, version, public signing key and how many agents are online."""
        return self._model(HQInfo, "GET", "/api/v1/hq")

    def agents(self) -> list[Agent]:
        return self._model(AgentList, "GET", "/api/v1/agents").agents

    def agent(self, name: str) -> Agent:
        return self._model(Agent, "GET", f"/api/v1/agents/{_segment(name)}")

    def create_agent(self, name: str) -> AgentWithToken:
        """Create an agent; the answer carries its enrolment token, which HQ never shows again."""
        return self._model(AgentWithToken, "POST", "/api/v1/agents", json={"name": name})

    def revoke_agent(self, name: str) -> Agent:
        """Revoke the agent's token; a connected agent is cut off within one heartbeat."""
        return self._model(Agent, "POST", f"/api/v1/agents/{_segment(name)}/revoke")

    def reissue_token(self, name: str) -> AgentWithToken:
        """A new enrolment token for the agent; the old one stops working, revocation ends."""
        return self._model(AgentWithToken, "POST", f"/api/v1/agents/{_segment(name)}/token")

    # -- connections ------------------------------------------------------------------------

    def connections(self, agent: str | None = None) -> list[Connection]:
        """Connections agents report and connections declared at HQ, optionally of one agent."""
        params = {"agent": agent}
        return self._model(ConnectionList, "GET", "/api/v1/connections", params=params).connections

    def declare_connection(self, agent: str, slug: str, name: str, driver: str) -> Connection:
        """Declare a connection at HQ (``on_agent`` stays false until the agent reports it)."""
        path = f"/api/v1/agents/{_segment(agent)}/connections/{_segment(slug)}"
        return self._model(Connection, "PUT", path, json={"name": name, "driver": driver})

    def delete_connection(self, agent: str, slug: str) -> None:
        """Remove a connection declared at HQ."""
        self._request("DELETE", f"/api/v1/agents/{_segment(agent)}/connections/{_segment(slug)}")

    # -- jobs -------------------------------------------------------------------------------

    def create_job(self, job: JobCreate | None = None, /, **fields: Any) -> Job:
        """Queue a job: ``create_job(JobCreate(...))`` or ``create_job(agent=..., kind=...)``."""
        if job is None:
            try:
                job = JobCreate(**fields)
            except ValidationError as exc:
                error = exc.errors()[0]
                where = ".".join(str(p) for p in error["loc"])
                msg = str(error["msg"]).removeprefix("Value error, ")
                raise UsageError(_sentence(f"{where}: {msg}" if where else msg)) from None
        elif fields:
            raise UsageError("Give create_job a JobCreate or keyword fields, not both.")
        body = job.model_dump(mode="json", exclude_none=True)
        return self._model(Job, "POST", "/api/v1/jobs", json=body)

    def jobs(
        self,
        *,
        agent: str | None = None,
        connection: str | None = None,
        state: JobState | None = None,
        kind: JobKind | None = None,
        limit: int = 50,
        before: float | None = None,
    ) -> list[Job]:
        """Jobs, newest first; ``before`` (a job's created_at) pages to older ones."""
        params = {
            "agent": agent,
            "connection": connection,
            "state": state,
            "kind": kind,
            "limit": limit,
            "before": None if before is None else repr(before),
        }
        return self._model(JobList, "GET", "/api/v1/jobs", params=params).jobs

    def job(self, job_id: str, wait: float | None = None) -> Job:
        """One job; with ``wait`` (0-60 s) HQ answers when it is final or the wait is over."""
        params = None if wait is None else {"wait": f"{wait:g}"}
        return self._model(
            Job, "GET", f"/api/v1/jobs/{_segment(job_id)}", params=params, extra_time=wait or 0.0
        )

    def wait_job(
        self,
        job_id: str,
        wait: float = 60.0,
        *,
        on_poll: Callable[[Job], None] | None = None,
    ) -> Job:
        """The job once it is final, asking HQ to hold each request (long-poll) until then.

        Raises :class:`JobWaitTimeout` if it is not final after ``wait`` seconds; it does not
        raise for a failed job (see :meth:`finished`). ``on_poll`` sees every answer.
        """
        deadline = time.monotonic() + max(wait, 0.0)
        pause = 0.0
        while True:
            started = time.monotonic()
            step = min(MAX_SERVER_WAIT, max(deadline - started, 0.0))
            try:
                job = self.job(job_id, wait=math.floor(step * 10) / 10)
            except HQUnreachableError:
                # HQ restarting: keep asking until the wait is over, then say so
                if time.monotonic() >= deadline:
                    raise
                pause = min(max(pause * 2, 0.25), 2.0)
                time.sleep(min(pause, max(deadline - time.monotonic(), 0.0)))
                continue
            if on_poll is not None:
                on_poll(job)
            if job.state in FINAL_STATES:
                return job
            now = time.monotonic()
            if now >= deadline:
                raise JobWaitTimeout(
                    f"Job {job.id} ({job.kind} on {job.agent}/{job.connection}) is still "
                    f"{job.state} after {wait:g} s; it keeps going at HQ.",
                    job,
                )
            # an HQ that answers at once instead of holding the request: do not hammer it
            pause = 0.0 if now - started >= 1.0 else min(max(pause * 2, 0.1), 1.0)
            time.sleep(min(pause, deadline - now))

    def finished(
        self, job: Job, wait: float = 60.0, *, on_poll: Callable[[Job], None] | None = None
    ) -> Job:
        """Wait for ``job`` and return it when it succeeded; raise :class:`JobFailedError` when it
        ended failed, expired or cancelled. ``on_poll`` sees ``job`` first, then every answer."""
        if on_poll is not None:
            on_poll(job)
        if job.state not in FINAL_STATES:
            job = self.wait_job(job.id, wait, on_poll=on_poll)
        if job.state != "succeeded":
            raise JobFailedError(_failure(job), job)
        return job

    def rows(self, job_id: str, offset: int = 0, limit: int = 1000) -> Rows:
        """One page of a query job's rows."""
        params = {"offset": offset, "limit": limit}
        return self._model(Rows, "GET", f"/api/v1/jobs/{_segment(job_id)}/rows", params=params)

    def iter_rows(self, job_id: str, page_size: int = ROWS_PAGE) -> Iterator[list[Any]]:
        """Every row of a query job's result, a page at a time."""
        offset: int | None = 0
        while offset is not None:
            page = self.rows(job_id, offset, page_size)
            yield from page.rows
            following = page.next_offset
            if following is not None and following <= offset:
                raise OutpostError(
                    f"HQ at {self.url} sent rows of job {job_id} out of order (next_offset "
                    f"{following} after offset {offset}); is it an Outpost HQ of a matching "
                    "version?"
                )
            offset = following

    def cancel(self, job_id: str) -> Job:
        """Cancel a job: a queued one at once, a sent or running one once its agent stops it."""
        return self._model(Job, "POST", f"/api/v1/jobs/{_segment(job_id)}/cancel")

    # -- one call per kind: create, wait, fetch ---------------------------------------------

    def run_query(
        self,
        agent: str,
        connection: str,
        sql: str,
        params: list[Any] | None = None,
        max_rows: int = 1000,
        timeout: float = 30,
        wait: float = 60,
        allow_writes: bool = False,
        *,
        on_poll: Callable[[Job], None] | None = None,
    ) -> QueryOutcome:
        """Run SQL on an agent's connection and return the job with every row of its result."""
        job = self.create_job(
            agent=agent,
            connection=connection,
            kind="query",
            sql=sql,
            params=params,
            max_rows=max_rows,
            timeout=timeout,
            allow_writes=allow_writes,
        )
        job = self.finished(job, wait, on_poll=on_poll)
        result = job.result or {}
        columns = [str(c) for c in result.get("columns") or []]
        rows = list(self.iter_rows(job.id)) if columns else []
        return QueryOutcome(job=job, columns=columns, rows=rows)

    def inspect(
        self,
        agent: str,
        connection: str,
        schemas: list[str] | None = None,
        wait: float = 60,
        *,
        on_poll: Callable[[Job], None] | None = None,
    ) -> dict[str, Any]:
        """The connection's schema document (driver, database, schemas with tables and views)."""
        job = self.create_job(agent=agent, connection=connection, kind="inspect", schemas=schemas)
        job = self.finished(job, wait, on_poll=on_poll)
        return job.result or {}

    def test(
        self,
        agent: str,
        connection: str,
        wait: float = 60,
        *,
        on_poll: Callable[[Job], None] | None = None,
    ) -> dict[str, Any]:
        """Have the agent connect: ``{up, server_version, duration_seconds, error}``."""
        job = self.create_job(agent=agent, connection=connection, kind="test")
        job = self.finished(job, wait, on_poll=on_poll)
        return job.result or {}


def _failure(job: Job) -> str:
    """One sentence for a job that did not succeed."""
    where = f"{job.kind} job {job.id} on {job.agent}/{job.connection}"
    if job.error:
        return _sentence(f"The {where} {job.state}: {job.error}")
    if job.state == "expired":
        return (
            f"The {where} expired before agent {job.agent!r} started it; is the agent running "
            "and connected to HQ?"
        )
    if job.state == "cancelled":
        return f"The {where} was cancelled."
    return f"The {where} {job.state}."
