"""The agent-facing endpoints: login, the WebSocket link and the long-poll fallback."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from typing import Any

from fastapi import APIRouter, Request, WebSocket
from fastapi.responses import JSONResponse
from starlette.websockets import WebSocketState

from outpost.hq.core import HQCore
from outpost.hq.dispatch import (
    CLOSE_UNAUTHORIZED,
    Session,
    error_reason,
    parse_agent_message,
)
from outpost.hq.tokens import bearer, token_hash
from outpost.protocol import (
    Error,
    Heartbeat,
    Hello,
    HQMessage,
    LoginResponse,
    PollRequest,
    PollResponse,
    public_key_b64,
)

log = logging.getLogger("outpost.hq.link")

CLOSE_BAD_HELLO = 4400

router = APIRouter(prefix="/agent/v1", tags=["agent link"])

_401: dict[int | str, dict[str, Any]] = {
    401: {"model": Error, "description": "unknown or revoked agent token"}
}


async def authenticate(core: HQCore, header: str | None) -> tuple[str | None, Error | None]:
    """The agent's name, or the Error that says why its token is refused."""
    token = bearer(header)
    if token is None:
        return None, Error(
            code="token_unknown", message="Send the agent token as Authorization: Bearer TOKEN."
        )
    found = await core.db.run(core.db.store.agent_by_token, token_hash(token))
    if found is None:
        return None, Error(
            code="token_unknown",
            message="HQ does not know this agent token; ask an HQ admin for a new one.",
        )
    name, revoked = found
    if revoked:
        return None, Error(
            code="token_revoked",
            message=f"Agent {name}'s token was revoked; ask an HQ admin to re-issue it.",
        )
    return name, None


def _core(request: Request | WebSocket) -> HQCore:
    core: HQCore = request.app.state.hq
    return core


def _refused(error: Error) -> JSONResponse:
    return JSONResponse(error.model_dump(), status_code=401)


@router.post("/login", response_model=LoginResponse, responses=_401)
async def login(request: Request) -> Any:
    """Who this agent token belongs to, and HQ's signing key to pin."""
    core = _core(request)
    name, error = await authenticate(core, request.headers.get("authorization"))
    if error is not None or name is None:
        return _refused(error or Error(code="token_unknown", message="Unknown token."))
    return LoginResponse(
        agent_name=name,
        hq_id=core.hq_id,
        signing_key=public_key_b64(core.key),
        heartbeat_interval=core.settings.heartbeat_interval,
    )


@router.post("/poll", response_model=PollResponse, responses=_401)
async def poll(body: PollRequest, request: Request) -> Any:
    """The long-poll link: the agent's messages in, HQ's messages out (held up to ``wait`` s)."""
    core = _core(request)
    dispatcher = core.dispatcher
    name, error = await authenticate(core, request.headers.get("authorization"))
    if error is not None or name is None:
        return _refused(error or Error(code="token_unknown", message="Unknown token."))
    hello = next((m for m in body.messages if isinstance(m, Hello)), None)
    session = dispatcher.session(name)
    if hello is not None or session is None or session.transport != "poll":
        session = await dispatcher.open_session(name, "poll", hello)
    session.polls += 1
    try:
        session.touch()
        for message in body.messages:
            if message is not hello:
                await dispatcher.handle(session, message)
        await dispatcher.flush(session)
        messages = session.drain()
        if not messages and not session.closed:
            messages = await _wait_for_messages(
                session, min(body.wait, core.settings.heartbeat_interval)
            )
    finally:
        session.polls -= 1
        session.touch()
    if not messages:
        messages = [Heartbeat(sent_at=time.time())]
    return PollResponse(messages=messages)


async def _wait_for_messages(session: Session, wait: float) -> list[HQMessage]:
    try:
        first = await asyncio.wait_for(session.queue.get(), wait)
    except TimeoutError:
        return []
    if first is None:
        session.queue.put_nowait(None)
        return []
    return [first, *session.drain()]


@router.websocket("/ws")
async def websocket_link(websocket: WebSocket) -> None:
    """The WebSocket link: Hello first, then messages both ways until either side closes."""
    core = _core(websocket)
    dispatcher = core.dispatcher
    name, error = await authenticate(core, websocket.headers.get("authorization"))
    await websocket.accept()
    if error is not None or name is None:
        assert error is not None
        await websocket.close(CLOSE_UNAUTHORIZED, error_reason(error.code, error.message))
        return
    try:
        first = await asyncio.wait_for(websocket.receive(), core.settings.dead_after)
    except TimeoutError:
        first = {"type": "timeout"}
    text = first.get("text") or first.get("bytes")
    hello = parse_agent_message(text) if text else None
    if not isinstance(hello, Hello):
        if first.get("type") != "websocket.disconnect":
            await websocket.close(
                CLOSE_BAD_HELLO, error_reason("hello_expected", "send Hello first")
            )
        return
    session = await dispatcher.open_session(name, "websocket", hello)
    sender = asyncio.create_task(_send_loop(websocket, session))
    receiver = asyncio.create_task(_receive_loop(websocket, session, core))
    try:
        await asyncio.wait({sender, receiver}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for task in (sender, receiver):
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        await dispatcher.close_session(session)
        if websocket.application_state == WebSocketState.CONNECTED:
            with contextlib.suppress(Exception):
                await websocket.close(session.close_code, session.close_reason)


async def _send_loop(websocket: WebSocket, session: Session) -> None:
    while True:
        message = await session.queue.get()
        if message is None:
            with contextlib.suppress(Exception):
                await websocket.close(session.close_code, session.close_reason)
            return
        try:
            await websocket.send_text(message.model_dump_json())
        except Exception:  # the link is gone
            return


async def _receive_loop(websocket: WebSocket, session: Session, core: HQCore) -> None:
    while True:
        try:
            frame = await websocket.receive()
        except Exception:
            return
        if frame["type"] == "websocket.disconnect":
            return
        data = frame.get("text") or frame.get("bytes")
        if not data:
            continue
        message = parse_agent_message(data)
        session.touch()
        if message is None:
            continue
        try:
            await core.dispatcher.handle(session, message)
        except Exception:
            # e.g. the database went away: drop the link; the agent reconnects and HQ re-sends
            log.exception("could not handle a %s from agent %s", message.type, session.agent)
            return
