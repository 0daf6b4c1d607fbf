"""The agent's local HTTP API (Starlette): the CLI backend, health, metrics.

Every route but ``/healthz``, ``/readyz`` and ``/metrics`` needs the bearer token kept in
``data_dir/api.token`` (mode 0600), so only users who can read the data dir can act.
Blocking work runs in a thread pool with a bound (``query.workers``).
"""

from __future__ import annotations

import hmac
import logging
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import anyio
import anyio.to_thread
from pydantic import BaseModel, ValidationError
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from outpost.api.metrics import AgentMetrics
from outpost.api.service import AgentService
from outpost.errors import (
    ConflictError,
    DriverError,
    KeyError_,
    NotFoundError,
    OutpostError,
    ReadOnlyError,
    UsageError,
)
from outpost.pooler.route_admin import LocalRouteAdmin

log = logging.getLogger("outpost.api")
T = TypeVar("T")

_STATUS: list[tuple[type[OutpostError], int]] = [
    (UsageError, 400),
    (NotFoundError, 404),
    (ConflictError, 409),
    (ReadOnlyError, 403),
    (DriverError, 502),
    (KeyError_, 500),
]


def error_response(exc: OutpostError) -> JSONResponse:
    status = next((code for cls, code in _STATUS if isinstance(exc, cls)), 400)
    return JSONResponse({"error": exc.message, "kind": type(exc).__name__}, status_code=status)


class AgentState:
    """What the app needs at run time; ``ready`` turns true once startup is complete."""

    def __init__(self, service: AgentService, token: str, workers: int) -> None:
        self.service = service
        self.token = token
        self.limiter = anyio.CapacityLimiter(workers)
        self.metrics = AgentMetrics(service)
        self.ready = False
        self.draining = False

    async def run(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        return await anyio.to_thread.run_sync(lambda: fn(*args, **kwargs), limiter=self.limiter)


def _dump(value: Any) -> Any:
    if isinstance(value, BaseModel):
        return value.model_dump(mode="json")
    if isinstance(value, list):
        return [_dump(v) for v in value]
    return value


def create_app(state: AgentState) -> Starlette:
    Handler = Callable[[Request], Awaitable[Any]]

    def authed(handler: Handler) -> Callable[[Request], Awaitable[Response]]:
        async def endpoint(request: Request) -> Response:
            header = request.headers.get("authorization", "")
            given = header.removeprefix("Bearer ").strip()
            if not given or not hmac.compare_digest(given, state.token):
                return JSONResponse(
                    {
                        "error": "Missing or wrong API token; the CLI reads it from "
                        "data_dir/api.token.",
                        "kind": "AuthError",
                    },
                    status_code=401,
                )
            try:
                result = await handler(request)
            except OutpostError as exc:
                return error_response(exc)
            except ValidationError as exc:
                return error_response(UsageError(f"Bad request body: {exc.errors()[0]['msg']}."))
            if isinstance(result, Response):
                return result
            return JSONResponse(_dump(result))

        return endpoint

    async def body(request: Request) -> dict[str, Any]:
        try:
            data = await request.json()
        except ValueError:
            raise UsageError("The request body is not JSON.") from None
        if not isinstance(data, dict):
            raise UsageError("The request body must be a JSON object.")
        return data

    svc = state.service

    async def list_connections(request: Request) -> Any:
        return await state.run(svc.list_connections)

    async def add_connection(request: Request) -> Any:
        data = await body(request)
        return await state.run(
            svc.add_connection,
            str(data.get("driver", "")),
            str(data.get("name", "")),
            dict(data.get("options") or {}),
            verify=bool(data.get("verify", True)),
        )

    async def get_connection(request: Request) -> Any:
        return await state.run(svc.get_connection, request.path_params["slug"])

    async def edit_connection(request: Request) -> Any:
        slug = request.path_params["slug"]
        data = await body(request)
        if "name" in data:
            return await state.run(svc.rename_connection, slug, str(data["name"]))
        return await state.run(
            svc.edit_connection_options,
            slug,
            dict(data.get("options") or {}),
            verify=bool(data.get("verify", True)),
        )

    async def delete_connection(request: Request) -> Any:
        return await state.run(svc.delete_connection, request.path_params["slug"])

    async def test_connection(request: Request) -> Any:
        report = await state.run(svc.test_connection, request.path_params["slug"])
        driver = (await state.run(svc.store.connection, report.slug)).driver
        state.metrics.check_duration.labels(driver).observe(report.duration_seconds)
        state.metrics.checks.labels(driver, "up" if report.up else "down").inc()
        return report

    async def query(request: Request) -> Any:
        data = await body(request)
        slug = request.path_params["slug"]
        driver = (await state.run(svc.store.connection, slug)).driver
        try:
            report = await state.run(
                svc.query,
                slug,
                str(data.get("sql", "")),
                data.get("params"),
                max_rows=data.get("max_rows"),
                timeout=data.get("timeout"),
                allow_writes=bool(data.get("allow_writes", False)),
            )
        except OutpostError:
            state.metrics.queries.labels(driver, "error").inc()
            raise
        state.metrics.queries.labels(driver, "ok").inc()
        return report

    def route_admin() -> LocalRouteAdmin:
        return LocalRouteAdmin(svc.store, svc.key)  # the key as of now (rotation changes it)

    async def list_routes(request: Request) -> Any:
        return await state.run(route_admin().list_routes)

    async def add_route(request: Request) -> Any:
        data = await body(request)
        return await state.run(
            route_admin().add_route,
            str(data.get("database") or ""),
            str(data.get("schema") or ""),
            str(data.get("user") or ""),
            str(data.get("password") or ""),
            str(data.get("to") or ""),
        )

    async def remove_route(request: Request) -> Any:
        return await state.run(
            route_admin().remove_route,
            request.query_params.get("database", ""),
            request.query_params.get("schema", ""),
        )

    async def backup(request: Request) -> Any:
        data = await state.run(svc.backup_bytes)
        return Response(data, media_type="application/octet-stream")

    async def status(request: Request) -> Any:
        return await state.run(svc.status)

    async def healthz(request: Request) -> Response:
        return JSONResponse({"status": "ok"})

    async def readyz(request: Request) -> Response:
        if state.ready and not state.draining:
            return JSONResponse({"status": "ready"})
        reason = "draining" if state.draining else "starting"
        return JSONResponse({"status": reason}, status_code=503)

    async def metrics(request: Request) -> Response:
        data = await state.run(state.metrics.render)
        return Response(data, media_type="text/plain; version=0.0.4; charset=utf-8")

    routes = [
        Route("/healthz", healthz),
        Route("/readyz", readyz),
        Route("/metrics", metrics),
        Route("/v1/status", authed(status)),
        Route("/v1/connections", authed(list_connections), methods=["GET"]),
        Route("/v1/connections", authed(add_connection), methods=["POST"]),
        Route("/v1/connections/{slug}", authed(get_connection), methods=["GET"]),
        Route("/v1/connections/{slug}", authed(edit_connection), methods=["PATCH"]),
        Route("/v1/connections/{slug}", authed(delete_connection), methods=["DELETE"]),
        Route("/v1/connections/{slug}/test", authed(test_connection), methods=["POST"]),
        Route("/v1/connections/{slug}/query", authed(query), methods=["POST"]),
        Route("/v1/backup", authed(backup), methods=["POST"]),
        Route("/v1/pooler/routes", authed(list_routes), methods=["GET"]),
        Route("/v1/pooler/routes", authed(add_route), methods=["POST"]),
        Route("/v1/pooler/routes", authed(remove_route), methods=["DELETE"]),
    ]
    return Starlette(routes=routes)
