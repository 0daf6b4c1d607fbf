"""The long-poll transport: ``POST /agent/v1/poll`` over plain HTTPS, for networks whose proxy
blocks WebSockets.

One request is always held open at HQ (``wait`` seconds, about one heartbeat interval) to
receive; what the agent has to say is sent at once in further requests with ``wait`` 0, whose
answers may carry messages too. The first request of a session carries ``Hello`` and its answer
``Welcome``. Every answer, even an empty one, shows HQ is alive.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time

import httpx
from pydantic import ValidationError

from outpost.link.errors import LinkDown, TokenRejected
from outpost.link.login import POLL_PATH, Endpoint, describe_transport_error, error_of
from outpost.link.transport import TransportName
from outpost.protocol import AgentMessage, Hello, HQMessage, PollRequest, PollResponse

log = logging.getLogger("outpost.link")

#: messages per sending request
BATCH = 64


class PollTransport:
    name: TransportName = "poll"

    def __init__(self, client: httpx.AsyncClient, endpoint: Endpoint, wait: float) -> None:
        self._client = client
        self._endpoint = endpoint
        self._url = endpoint.url + POLL_PATH
        self.wait = wait
        self._inbox: asyncio.Queue[HQMessage | BaseException] = asyncio.Queue()
        self._outbox: list[AgentMessage] = []
        self._outbox_ready = asyncio.Event()
        self._last_seen = time.monotonic()
        self._tasks: list[asyncio.Task[None]] = []
        self._failed: BaseException | None = None

    @property
    def last_seen(self) -> float:
        return self._last_seen

    def start(self) -> None:
        self._tasks = [
            asyncio.create_task(self._receive_loop(), name="hq-poll-receive"),
            asyncio.create_task(self._send_loop(), name="hq-poll-send"),
        ]

    async def post(self, messages: list[AgentMessage], wait: float) -> list[HQMessage]:
        """One poll request; raises TokenRejected on 401 and LinkDown on anything else."""
        body = PollRequest(messages=messages, wait=wait).model_dump_json()
        try:
            response = await self._client.post(
                self._url,
                content=body,
                headers={"Content-Type": "application/json"},
                timeout=httpx.Timeout(10.0, read=wait + max(self.wait, 5.0)),
            )
        except httpx.HTTPError as exc:
            raise LinkDown(describe_transport_error(exc, self._endpoint.url)) from None
        if response.status_code == 401:
            error = error_of(response)
            raise TokenRejected(error.code, error.message, self._endpoint.url)
        if response.status_code != 200:
            raise LinkDown(
                f"HQ at {self._endpoint.url} answered a poll with HTTP {response.status_code}"
            )
        self._last_seen = time.monotonic()
        try:
            return PollResponse.model_validate_json(response.content).messages
        except ValidationError:
            raise LinkDown(
                f"HQ at {self._endpoint.url} sent a poll answer this agent does not understand"
            ) from None

    def _fail(self, exc: BaseException) -> None:
        if self._failed is None:
            self._failed = exc
            self._inbox.put_nowait(exc)

    def _deliver(self, messages: list[HQMessage]) -> None:
        for message in messages:
            self._inbox.put_nowait(message)

    async def _receive_loop(self) -> None:
        try:
            while True:
                self._deliver(await self.post([], self.wait))
        except (LinkDown, TokenRejected) as exc:
            self._fail(exc)

    async def _send_loop(self) -> None:
        try:
            while True:
                await self._outbox_ready.wait()
                self._outbox_ready.clear()
                while self._outbox:
                    batch, self._outbox = self._outbox[:BATCH], self._outbox[BATCH:]
                    self._deliver(await self.post(batch, 0.0))
        except (LinkDown, TokenRejected) as exc:
            self._fail(exc)

    async def send(self, message: AgentMessage) -> None:
        if self._failed is not None:
            raise LinkDown("the link to HQ dropped")
        self._outbox.append(message)
        self._outbox_ready.set()

    async def receive(self) -> HQMessage:
        item = await self._inbox.get()
        if isinstance(item, BaseException):
            self._inbox.put_nowait(item)  # every later receive fails the same way
            raise item
        return item

    async def close(self) -> None:
        self._fail(LinkDown("the link to HQ was closed by the agent"))
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        await self._client.aclose()


async def open_poll(endpoint: Endpoint, token: str, hello: Hello, *, wait: float) -> PollTransport:
    """Start a long-poll session: the first request carries ``Hello``; its answer (with
    ``Welcome``) is queued for the caller."""
    client = httpx.AsyncClient(
        verify=endpoint.verify(),
        headers={"Authorization": f"Bearer {token}", "User-Agent": "outpost-agent"},
    )
    transport = PollTransport(client, endpoint, wait)
    try:
        transport._deliver(await transport.post([hello], 0.0))
    except BaseException:
        await client.aclose()
        raise
    transport.start()
    return transport
