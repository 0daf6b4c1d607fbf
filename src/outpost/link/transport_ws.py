"""The WebSocket transport: ``GET /agent/v1/ws`` with ``Authorization: Bearer TOKEN``.

The agent sends ``Hello`` first; every frame is one JSON message. A rejected token is an HTTP
401 on the upgrade or close code 4401 with an ``Error`` body as the reason. Any other HTTP
status on the upgrade (a proxy that blocks WebSockets, say) is ``UpgradeRefused``, which lets
``auto`` mode fall back to long-polling.
"""

from __future__ import annotations

import logging
import ssl
import time
from typing import Any

from pydantic import ValidationError
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed, InvalidHandshake, InvalidStatus

from outpost.link.errors import LinkDown, TokenRejected, UpgradeRefused
from outpost.link.login import WS_PATH, Endpoint
from outpost.link.transport import TransportName
from outpost.protocol import AgentMessage, Error, Hello, HQMessage, hq_message

log = logging.getLogger("outpost.link")

CLOSE_TOKEN_REJECTED = 4401
MAX_FRAME = 16 * 1024 * 1024


def ws_url(base: str) -> str:
    scheme, rest = base.split("://", 1)
    return f"{'wss' if scheme == 'https' else 'ws'}://{rest.rstrip('/')}{WS_PATH}"


def _error(body: bytes | bytearray | str | None, fallback: str) -> Error:
    try:
        return Error.model_validate_json(
            bytes(body) if isinstance(body, bytearray) else body or b""
        )
    except ValidationError:
        return Error(code="token_unknown", message=fallback)


class WebSocketTransport:
    name: TransportName = "websocket"

    def __init__(self, ws: ClientConnection, url: str) -> None:
        self._ws = ws
        self._url = url
        self._last_seen = time.monotonic()

    @property
    def last_seen(self) -> float:
        return self._last_seen

    def _closed(self, exc: ConnectionClosed) -> Exception:
        frame = exc.rcvd
        if frame is not None and frame.code == CLOSE_TOKEN_REJECTED:
            error = _error(frame.reason, "HQ closed the link: the token was refused")
            return TokenRejected(error.code, error.message, self._url)
        if frame is None:
            return LinkDown("the link to HQ dropped")
        reason = f": {frame.reason}" if frame.reason else ""
        return LinkDown(f"HQ closed the link (code {frame.code}{reason})")

    async def send(self, message: AgentMessage) -> None:
        try:
            await self._ws.send(message.model_dump_json())
        except ConnectionClosed as exc:
            raise self._closed(exc) from None

    async def receive(self) -> HQMessage:
        while True:
            try:
                frame = await self._ws.recv()
            except ConnectionClosed as exc:
                raise self._closed(exc) from None
            self._last_seen = time.monotonic()
            try:
                return hq_message.validate_json(frame)
            except ValidationError as exc:
                log.warning("ignored a message from HQ this agent does not understand: %s", exc)

    async def close(self) -> None:
        await self._ws.close()


async def open_websocket(
    endpoint: Endpoint, token: str, hello: Hello, *, open_timeout: float = 10.0
) -> WebSocketTransport:
    """Connect, authenticate, send ``Hello``; the caller waits for ``Welcome``."""
    url = ws_url(endpoint.url)
    context = endpoint.context()
    extra: dict[str, Any] = {"ssl": context} if context is not None else {}
    try:
        ws = await connect(
            url,
            additional_headers={"Authorization": f"Bearer {token}"},
            open_timeout=open_timeout,
            ping_interval=None,  # the session's heartbeats notice a dead link
            close_timeout=2,
            max_size=MAX_FRAME,
            user_agent_header="outpost-agent",
            **extra,
        )
    except InvalidStatus as exc:
        status = exc.response.status_code
        if status == 401:
            error = _error(exc.response.body, "HQ refused the token")
            raise TokenRejected(error.code, error.message, endpoint.url) from None
        if status in (408, 429, 502, 503, 504):
            raise LinkDown(
                f"HQ at {endpoint.url} answered the WebSocket upgrade with HTTP {status}"
            ) from None
        raise UpgradeRefused(
            f"the WebSocket upgrade at {url} was refused with HTTP {status}"
        ) from None
    except InvalidHandshake as exc:
        raise UpgradeRefused(f"the WebSocket upgrade at {url} failed: {exc}") from None
    except TimeoutError:
        raise LinkDown(
            f"HQ at {endpoint.url} did not complete the WebSocket handshake in time"
        ) from None
    except ssl.SSLCertVerificationError as exc:
        raise LinkDown(
            f"HQ at {endpoint.url} presented a certificate that does not verify "
            f"({exc.verify_message}); give the CA that signed it in hq.ca_file"
        ) from None
    except OSError as exc:
        raise LinkDown(f"cannot reach HQ at {endpoint.url}: {exc.strerror or exc}") from None
    transport = WebSocketTransport(ws, endpoint.url)
    try:
        await transport.send(hello)
    except BaseException:
        await ws.close()
        raise
    return transport
