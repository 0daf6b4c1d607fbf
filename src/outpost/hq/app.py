"""HQ's HTTP app (FastAPI): the admin REST API (/api/v1), the agent link (/agent/v1), health,
metrics, OpenAPI and the dashboard's static files (/ui/)."""

from __future__ import annotations

import contextlib
import json
import logging
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Annotated, Any

from fastapi import APIRouter, Depends, FastAPI, Query, Request, Response
from fastapi import Path as PathParam
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.utils import get_openapi
from fastapi.responses import JSONResponse, PlainTextResponse, RedirectResponse
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from fastapi.staticfiles import StaticFiles
from starlette.exceptions import HTTPException as StarletteHTTPException

from outpost import __version__
from outpost.errors import ConflictError, NotFoundError, OutpostError, UsageError
from outpost.hq import agent_api
from outpost.hq.api_models import (
    Agent,
    AgentCreate,
    AgentList,
    AgentWithToken,
    Connection,
    ConnectionDeclare,
    ConnectionList,
    ErrorBody,
    HQInfo,
    Job,
    JobCreate,
    JobList,
    Rows,
)
from outpost.hq.core import HQCore
from outpost.hq.db import AgentRow, new_job_id
from outpost.hq.metrics import CONTENT_TYPE
from outpost.hq.settings import HQSettings
from outpost.hq.signing import make_signed_job
from outpost.hq.tokens import AGENT_PREFIX, new_token, token_hash
from outpost.protocol import FINAL_STATES, JobKind, JobState, public_key_b64

log = logging.getLogger("outpost.hq.api")

WEB_DIR = Path(__file__).parent / "web"
NAME_RE = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,62}$"
SLUG_RE = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,199}$"
JOB_ID_RE = r"^[0-9a-fA-F-]{1,36}$"

AgentName = Annotated[str, PathParam(pattern=NAME_RE, description="the agent's name")]
Slug = Annotated[str, PathParam(pattern=SLUG_RE, description="the connection's slug")]
JobId = Annotated[str, PathParam(pattern=JOB_ID_RE, description="the job's id (uuid)")]


class ApiError(Exception):
    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(message)
        self.status, self.code, self.message = status, code, message


def _error(status: int, code: str, message: str) -> JSONResponse:
    return JSONResponse({"code": code, "message": message}, status_code=status)


def _errors(*codes: int) -> dict[int | str, dict[str, Any]]:
    text = {
        400: "bad request",
        401: "missing or unknown admin token",
        404: "not found",
        409: "conflict",
        422: "invalid request",
    }
    return {c: {"model": ErrorBody, "description": text[c]} for c in (401, 422, *codes)}


# -- auth --------------------------------------------------------------------------------------

_bearer = HTTPBearer(auto_error=False, description="an admin token (outpost hq admin create)")


def get_core(request: Request) -> HQCore:
    core: HQCore = request.app.state.hq
    return core


Core = Annotated[HQCore, Depends(get_core)]


async def require_admin(
    core: Core,
    credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)],
) -> None:
    if credentials is None or not credentials.credentials:
        raise ApiError(
            401,
            "unauthorized",
            "Send an admin token as Authorization: Bearer TOKEN; create one with "
            "`outpost hq admin create`.",
        )
    digest = token_hash(credentials.credentials)
    if digest in core.admin_hashes:
        return
    if await core.db.run(core.db.store.admin_exists, digest):
        core.admin_hashes.add(digest)
        return
    raise ApiError(
        401,
        "token_unknown",
        "HQ does not know this admin token; create one with `outpost hq admin create`.",
    )


# -- conversions -------------------------------------------------------------------------------


def agent_model(core: HQCore, row: AgentRow) -> Agent:
    session = core.dispatcher.session(row.name)
    return Agent(
        name=row.name,
        online=session is not None,
        last_seen=session.last_seen_wall if session is not None else row.last_seen,
        version=row.version,
        read_only=row.read_only,
        transport=session.transport if session is not None else None,
        created_at=row.created_at,
        revoked=row.revoked,
        connections=row.connections,
    )


def connection_model(row: Any) -> Connection:
    return Connection(
        agent=row["agent"],
        slug=row["slug"],
        name=row["name"],
        driver=row["driver"],
        up=row["up"],
        checked_at=row["checked_at"],
        on_agent=bool(row["on_agent"]),
    )


def job_model(row: Any) -> Job:
    return Job(
        id=row["id"],
        agent=row["agent"],
        connection=row["connection"],
        kind=row["kind"],
        state=row["state"],
        params=json.loads(row["params"]),
        created_at=row["created_at"],
        sent_at=row["sent_at"],
        started_at=row["started_at"],
        finished_at=row["finished_at"],
        expires_at=row["expires_at"],
        timeout=row["timeout"],
        error=row["error"],
        result=None if row["result"] is None else json.loads(row["result"]),
        attempts=row["attempts"],
    )


def _check_text(value: Any, what: str) -> None:
    """Strings HQ stores or signs: no NUL character, valid Unicode."""
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            raise UsageError(f"{what} is not valid Unicode text; fix its characters.") from None
        if "\x00" in value:
            raise UsageError(f"{what} contains a NUL character; remove it.")
    elif isinstance(value, list):
        for item in value:
            _check_text(item, what)
    elif isinstance(value, dict):
        for key, item in value.items():
            _check_text(key, what)
            _check_text(item, what)


def _job_params(body: JobCreate) -> dict[str, Any]:
    if body.kind == "query":
        return {
            "sql": body.sql,
            "params": body.params or [],
            "max_rows": body.max_rows,
            "allow_writes": body.allow_writes,
        }
    if body.kind == "inspect":
        return {"schemas": body.schemas}
    return {}


# -- routes ------------------------------------------------------------------------------------

api = APIRouter(prefix="/api/v1", dependencies=[Depends(require_admin)], responses=_errors())


@api.get("/hq", response_model=HQInfo, tags=["hq"])
async def hq_info(core: Core) -> HQInfo:
    """HQ's id, version, public signing key and how many agents are online."""
    return HQInfo(
        hq_id=core.hq_id,
        version=__version__,
        signing_key=public_key_b64(core.key),
        agents_online=len(core.dispatcher.sessions),
    )


@api.post(
    "/agents",
    response_model=AgentWithToken,
    status_code=201,
    tags=["agents"],
    responses=_errors(409),
)
async def create_agent(body: AgentCreate, core: Core) -> AgentWithToken:
    """Enrol an agent: its token is shown once (HQ keeps only its SHA-256)."""
    token = new_token(AGENT_PREFIX)
    row = await core.db.run(core.db.store.create_agent, body.name, token_hash(token))
    log.info("agent %s created", body.name, extra={"agent": body.name})
    return AgentWithToken(agent=agent_model(core, row), token=token)


@api.get("/agents", response_model=AgentList, tags=["agents"])
async def list_agents(core: Core) -> AgentList:
    rows = await core.db.run(core.db.store.list_agents)
    return AgentList(agents=[agent_model(core, r) for r in rows])


@api.get("/agents/{name}", response_model=Agent, tags=["agents"], responses=_errors(404))
async def get_agent(name: AgentName, core: Core) -> Agent:
    return agent_model(core, await core.db.run(core.db.store.get_agent, name))


@api.post("/agents/{name}/revoke", response_model=Agent, tags=["agents"], responses=_errors(404))
async def revoke_agent(name: AgentName, core: Core) -> Agent:
    """Revoke the agent's token; a connected agent gets Disconnect and is cut off."""
    row = await core.db.run(core.db.store.set_revoked, name)
    await core.dispatcher.disconnect(
        name, "token_revoked", f"agent {name}'s token was revoked at HQ"
    )
    log.info("agent %s revoked", name, extra={"agent": name})
    return agent_model(core, row)


@api.post(
    "/agents/{name}/token", response_model=AgentWithToken, tags=["agents"], responses=_errors(404)
)
async def reissue_token(name: AgentName, core: Core) -> AgentWithToken:
    """A new token for the agent; the old one stops working and the agent is un-revoked."""
    token = new_token(AGENT_PREFIX)
    row = await core.db.run(core.db.store.set_revoked, name, token_hash(token))
    await core.dispatcher.disconnect(
        name, "token_revoked", f"agent {name}'s token was replaced at HQ; log in again"
    )
    log.info("agent %s got a new token", name, extra={"agent": name})
    return AgentWithToken(agent=agent_model(core, row), token=token)


@api.get("/connections", response_model=ConnectionList, tags=["connections"])
async def list_connections(
    core: Core, agent: Annotated[str | None, Query(pattern=NAME_RE)] = None
) -> ConnectionList:
    rows = await core.db.run(core.db.store.list_connections, agent)
    return ConnectionList(connections=[connection_model(r) for r in rows])


@api.put(
    "/agents/{name}/connections/{slug}",
    response_model=Connection,
    tags=["connections"],
    responses=_errors(404),
)
async def declare_connection(
    name: AgentName, slug: Slug, body: ConnectionDeclare, core: Core
) -> Connection:
    """Declare a connection at HQ; on_agent stays false until the agent reports the slug."""
    _check_text(body.name, "The connection name")
    _check_text(body.driver, "The driver")
    row = await core.db.run(core.db.store.declare_connection, name, slug, body.name, body.driver)
    return connection_model(row)


@api.delete(
    "/agents/{name}/connections/{slug}",
    status_code=204,
    tags=["connections"],
    responses=_errors(404),
)
async def undeclare_connection(name: AgentName, slug: Slug, core: Core) -> Response:
    await core.db.run(core.db.store.undeclare_connection, name, slug)
    return Response(status_code=204)


@api.post("/jobs", response_model=Job, status_code=201, tags=["jobs"], responses=_errors(404, 409))
async def create_job(body: JobCreate, core: Core) -> Job:
    """Queue a signed job for an agent; it is sent when the agent is online and has room."""
    import re

    if not re.match(NAME_RE, body.agent):
        raise NotFoundError(f"There is no agent {body.agent!r}; list them with GET /api/v1/agents.")
    if not re.match(SLUG_RE, body.connection):
        raise UsageError(
            f"'connection' must be a connection slug (letters, digits, '.', '_', '-'), "
            f"not {body.connection!r}."
        )
    params = _job_params(body)
    _check_text(params, "The job's parameters")
    agent = await core.db.run(core.db.store.get_agent, body.agent)
    if agent.revoked:
        raise ConflictError(
            f"Agent {agent.name!r} is revoked; re-issue its token first "
            f"(`outpost hq agents token {agent.name}`, or POST /api/v1/agents/{agent.name}/token)."
        )
    job_id = new_job_id()
    now = time.time()
    signed_params = {**params, "timeout": body.timeout} if body.kind == "query" else params
    job_body, signed = make_signed_job(
        core.key,
        job_id=job_id,
        agent=agent.name,
        connection=body.connection,
        kind=body.kind,
        params=signed_params,
        timeout=body.timeout,
        expires_in=body.expires_in,
        now=now,
    )
    await core.db.run(
        core.db.store.create_job,
        job_id=job_id,
        agent=agent.name,
        connection=body.connection,
        kind=body.kind,
        params=params,
        body=signed.body,
        signature=signed.signature,
        created_at=now,
        expires_at=job_body.expires_at,
        timeout=body.timeout,
    )
    core.dispatcher.job_created(job_id, body.kind)
    await core.dispatcher.pump(agent.name)
    return job_model(await core.db.run(core.db.store.get_job, job_id))


@api.get("/jobs", response_model=JobList, tags=["jobs"])
async def list_jobs(
    core: Core,
    agent: Annotated[str | None, Query(pattern=NAME_RE)] = None,
    connection: Annotated[str | None, Query(pattern=SLUG_RE)] = None,
    state: JobState | None = None,
    kind: JobKind | None = None,
    limit: Annotated[int, Query(ge=1, le=1000)] = 50,
    before: Annotated[
        float | None, Query(allow_inf_nan=False, description="only jobs created before this")
    ] = None,
) -> JobList:
    """Jobs, newest first; page with before=<created_at of the last one>."""
    rows = await core.db.run(
        core.db.store.list_jobs,
        agent=agent,
        connection=connection,
        state=state,
        kind=kind,
        before=before,
        limit=limit,
    )
    return JobList(jobs=[job_model(r) for r in rows])


@api.get("/jobs/{job_id}", response_model=Job, tags=["jobs"], responses=_errors(404))
async def get_job(
    job_id: JobId,
    core: Core,
    wait: Annotated[
        float | None,
        Query(ge=0, le=60, allow_inf_nan=False, description="hold until final or this many s"),
    ] = None,
) -> Job:
    row = await core.db.run(core.db.store.get_job, job_id)
    if wait and row["state"] not in FINAL_STATES:
        latest: dict[str, Any] = {"row": row}

        async def final() -> bool:
            latest["row"] = await core.db.run(core.db.store.get_job, job_id)
            return latest["row"]["state"] in FINAL_STATES

        await core.dispatcher.wait_change(job_id, wait, final)
        row = latest["row"]
    return job_model(row)


@api.get("/jobs/{job_id}/rows", response_model=Rows, tags=["jobs"], responses=_errors(404))
async def job_rows(
    job_id: JobId,
    core: Core,
    offset: Annotated[int, Query(ge=0, le=2**31 - 1)] = 0,
    limit: Annotated[int, Query(ge=1, le=10_000)] = 1000,
) -> Response:
    """A page of a query job's rows."""
    row = await core.db.run(core.db.store.get_job, job_id)
    result = json.loads(row["result"]) if row["result"] else {}
    columns = [
        c if isinstance(c, str) else str(c.get("name")) if isinstance(c, dict) else str(c)
        for c in (result.get("columns") or [])
    ]
    total = row["row_count"]
    if total is None:
        total = await core.db.run(core.db.store.stored_rows, job_id)
    pages = await core.db.run(core.db.store.pages, job_id, offset, limit)
    rows: list[Any] = []
    for first, data in pages:
        chunk = json.loads(data)
        rows.extend(chunk[max(0, offset - first) : offset + limit - first])
    rows = rows[:limit]
    end = offset + len(rows)
    content = {
        "job_id": job_id,
        "columns": columns,
        "rows": rows,
        "offset": offset,
        "limit": limit,
        "row_count": int(total),
        "next_offset": end if end < total and rows else None,
    }
    return JSONResponse(content)


@api.post("/jobs/{job_id}/cancel", response_model=Job, tags=["jobs"], responses=_errors(404, 409))
async def cancel_job(job_id: JobId, core: Core) -> Job:
    """Cancel a job: queued ones at once; running ones once the agent stops them."""
    if not await core.dispatcher.cancel(job_id):
        row = await core.db.run(core.db.store.get_job, job_id)
        raise ConflictError(
            f"Job {job_id} is already {row['state']}; only jobs not yet final can be cancelled."
        )
    return job_model(await core.db.run(core.db.store.get_job, job_id))


# -- the app -----------------------------------------------------------------------------------


def create_app(settings: HQSettings, core: HQCore | None = None) -> FastAPI:
    """HQ's ASGI app. ``core`` is opened here (at startup) unless the caller opened it."""

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        hq = core or HQCore.open(settings)
        app.state.hq = hq
        hq.dispatcher.start()
        hq.ready = True
        try:
            yield
        finally:
            hq.ready = False
            await hq.dispatcher.stop()
            hq.close()

    app = FastAPI(
        title="Outpost HQ",
        version=__version__,
        description="The control plane Outpost agents dial out to. Every /api/v1 route needs "
        "`Authorization: Bearer ADMIN_TOKEN`.",
        lifespan=lifespan,
    )

    @app.exception_handler(ApiError)
    async def _api_error(request: Request, exc: ApiError) -> JSONResponse:
        return _error(exc.status, exc.code, exc.message)

    @app.exception_handler(OutpostError)
    async def _outpost_error(request: Request, exc: OutpostError) -> JSONResponse:
        if isinstance(exc, NotFoundError):
            return _error(404, "not_found", exc.message)
        if isinstance(exc, ConflictError):
            return _error(409, "conflict", exc.message)
        if isinstance(exc, UsageError):
            return _error(422, "invalid", exc.message)
        return _error(400, "bad_request", exc.message)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        return _error(422, "invalid", validation_message(exc))

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code, "http_error")
        message = str(exc.detail)
        if exc.status_code == 404 and message == "Not Found":
            message = f"There is nothing at {request.url.path}; see /docs for the API."
        return _error(exc.status_code, code, message)

    @app.get("/healthz", tags=["health"])
    async def healthz() -> dict[str, str]:
        """HQ is alive."""
        return {"status": "ok"}

    @app.get("/readyz", tags=["health"], responses={503: {"model": ErrorBody}})
    async def readyz(request: Request) -> Response:
        """HQ is ready: started and its database answers."""
        hq: HQCore | None = getattr(request.app.state, "hq", None)
        if hq is None or not hq.ready:
            return _error(503, "starting", "HQ is starting or stopping.")
        try:
            await hq.db.run(hq.db.store.ping)
        except Exception as exc:
            log.warning("readiness: the database does not answer: %s", type(exc).__name__)
            return _error(503, "database_unavailable", "HQ's database does not answer.")
        return JSONResponse({"status": "ready"})

    @app.get("/metrics", tags=["health"], response_class=PlainTextResponse)
    async def metrics(core: Core) -> Response:
        """Prometheus metrics."""
        return Response(core.dispatcher.metrics.render(), media_type=CONTENT_TYPE)

    @app.get("/", include_in_schema=False)
    async def root() -> RedirectResponse:
        return RedirectResponse("/ui/")

    app.include_router(api)
    app.include_router(agent_api.router)
    _document_rules(app)
    with contextlib.suppress(OSError):  # an installed package may be read-only
        WEB_DIR.mkdir(exist_ok=True)
    app.mount("/ui", StaticFiles(directory=WEB_DIR, html=True, check_dir=False), name="ui")
    return app


def _document_rules(app: FastAPI) -> None:
    """Put the name and slug rules the models check in code into the OpenAPI document."""

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            spec = get_openapi(
                title=app.title,
                version=app.version,
                description=app.description,
                routes=app.routes,
            )
            schemas = spec.get("components", {}).get("schemas", {})
            for model, field, pattern in (
                ("AgentCreate", "name", NAME_RE),
                ("JobCreate", "agent", NAME_RE),
                ("JobCreate", "connection", SLUG_RE),
            ):
                prop = schemas.get(model, {}).get("properties", {}).get(field)
                if prop is not None:
                    prop["pattern"] = pattern
            app.openapi_schema = spec
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]


def validation_message(exc: RequestValidationError) -> str:
    """The first problem of a bad request as one sentence."""
    errors = list(exc.errors())
    if not errors:
        return "The request is not valid."
    first = errors[0]
    loc = [str(p) for p in first.get("loc", ())]
    if loc == ["body"] and first.get("type") in ("model_attributes_type", "dict_type", "missing"):
        return "The request body must be a JSON object sent as Content-Type: application/json."
    where = ".".join(p for p in loc if p != "body")
    msg = str(first.get("msg", "is not valid")).removeprefix("Value error, ").rstrip(".")
    more = f" ({len(errors) - 1} more problem(s))" if len(errors) > 1 else ""
    return f"Invalid request: {where + ': ' if where else ''}{msg}{more}."
