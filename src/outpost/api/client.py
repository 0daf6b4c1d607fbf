"""The CLI's client for a running agent's local API (same operations as AgentService)."""

from __future__ import annotations

import json
import socket
from pathlib import Path
from typing import Any, TypeVar

import httpx
from pydantic import BaseModel, TypeAdapter

from outpost.api.models import (
    AgentStatus,
    ConnectionDetail,
    ConnectionInfo,
    QueryReport,
    TestReport,
)
from outpost.errors import (
    ConflictError,
    DriverError,
    KeyError_,
    NotFoundError,
    OutpostError,
    ReadOnlyError,
    UsageError,
)
from outpost.pooler.route_admin import RouteInfo

M = TypeVar("M", bound=BaseModel)
_KINDS: dict[str, type[OutpostError]] = {
    cls.__name__: cls
    for cls in (UsageError, NotFoundError, ConflictError, ReadOnlyError, DriverError, KeyError_)
}


class AgentClient:
    """Talks to `outpost serve` over its local API, with the token from the data dir."""

    def __init__(self, url: str, token: str, timeout: float = 600.0) -> None:
        self.url = url
        # TCP_NODELAY: httpx writes headers and body separately; with Nagle on, the body
        # waits for the server's delayed ACK (~40 ms a request on Linux loopback).
        transport = httpx.HTTPTransport(
            socket_options=[(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)]
        )
        self._http = httpx.Client(
            base_url=url,
            headers={"Authorization": f"Bearer {token}"},
            timeout=timeout,
            transport=transport,
        )

    @classmethod
    def from_data_dir(cls, data_dir: Path) -> AgentClient:
        from outpost.api.runtime import API_FILE, TOKEN_FILE

        try:
            info = json.loads((data_dir / API_FILE).read_text())
            token = (data_dir / TOKEN_FILE).read_text().strip()
        except (OSError, ValueError):
            raise OutpostError(
                f"The agent running on data dir {data_dir} has not published its API address "
                "yet (or this user cannot read it); try again in a moment."
            ) from None
        return cls(str(info["url"]), token)

    def close(self) -> None:
        self._http.close()

    def _call(
        self,
        method: str,
        path: str,
        body: dict[str, Any] | None = None,
        params: dict[str, str] | None = None,
    ) -> httpx.Response:
        try:
            response = self._http.request(method, path, json=body, params=params)
        except httpx.HTTPError as exc:
            raise OutpostError(
                f"Cannot reach the running agent at {self.url}: {exc}; is `outpost serve` "
                "still running?"
            ) from None
        if response.status_code >= 400:
            try:
                data = response.json()
                message, kind = str(data["error"]), str(data.get("kind", ""))
            except (ValueError, KeyError, TypeError):
                message, kind = f"The agent answered {response.status_code}.", ""
            raise _KINDS.get(kind, OutpostError)(message)
        return response

    def _model(self, model: type[M], method: str, path: str, body: Any = None) -> M:
        return model.model_validate(self._call(method, path, body).json())

    # --- the same operations as AgentService --------------------------------------------

    def list_connections(self) -> list[ConnectionInfo]:
        data = self._call("GET", "/v1/connections").json()
        return TypeAdapter(list[ConnectionInfo]).validate_python(data)

    def get_connection(self, slug: str) -> ConnectionDetail:
        return self._model(ConnectionDetail, "GET", f"/v1/connections/{slug}")

    def add_connection(
        self, driver_name: str, name: str, options: dict[str, Any], *, verify: bool = True
    ) -> ConnectionInfo:
        body = {"driver": driver_name, "name": name, "options": options, "verify": verify}
        return self._model(ConnectionInfo, "POST", "/v1/connections", body)

    def rename_connection(self, slug: str, new_name: str) -> ConnectionInfo:
        return self._model(ConnectionInfo, "PATCH", f"/v1/connections/{slug}", {"name": new_name})

    def edit_connection_options(
        self, slug: str, changes: dict[str, Any], *, verify: bool = True
    ) -> ConnectionInfo:
        body = {"options": changes, "verify": verify}
        return self._model(ConnectionInfo, "PATCH", f"/v1/connections/{slug}", body)

    def delete_connection(self, slug: str) -> ConnectionInfo:
        return self._model(ConnectionInfo, "DELETE", f"/v1/connections/{slug}")

    def test_connection(self, slug: str) -> TestReport:
        return self._model(TestReport, "POST", f"/v1/connections/{slug}/test")

    def query(
        self,
        slug: str,
        sql: str,
        params: list[Any] | None = None,
        *,
        max_rows: int | None = None,
        timeout: float | None = None,
        allow_writes: bool = False,
    ) -> QueryReport:
        body = {
            "sql": sql,
            "params": params,
            "max_rows": max_rows,
            "timeout": timeout,
            "allow_writes": allow_writes,
        }
        return self._model(QueryReport, "POST", f"/v1/connections/{slug}/query", body)

    def backup_bytes(self) -> bytes:
        return self._call("POST", "/v1/backup").content

    def status(self) -> AgentStatus:
        return self._model(AgentStatus, "GET", "/v1/status")

    # --- pooler routes (the same methods as outpost.pooler.route_admin.LocalRouteAdmin) ----

    def list_routes(self) -> list[RouteInfo]:
        data = self._call("GET", "/v1/pooler/routes").json()
        return TypeAdapter(list[RouteInfo]).validate_python(data)

    def add_route(self, database: str, schema: str, user: str, password: str, to: str) -> RouteInfo:
        body = {"database": database, "schema": schema, "user": user, "password": password}
        body["to"] = to
        return self._model(RouteInfo, "POST", "/v1/pooler/routes", body)

    def remove_route(self, database: str, schema: str) -> RouteInfo:
        params = {"database": database, "schema": schema}
        response = self._call("DELETE", "/v1/pooler/routes", params=params)
        return RouteInfo.model_validate(response.json())
