"""What the session needs of a transport (WebSocket or long-poll)."""

from __future__ import annotations

from typing import Literal, Protocol

from outpost.protocol import AgentMessage, HQMessage

TransportName = Literal["websocket", "poll"]


class Transport(Protocol):
    """An open link to HQ. ``receive`` and ``send`` raise ``LinkDown`` when it drops and
    ``TokenRejected`` when HQ refuses the token."""

    name: TransportName

    @property
    def last_seen(self) -> float:
        """``time.monotonic()`` when HQ last said anything (a message, or an empty poll)."""
        ...

    async def send(self, message: AgentMessage) -> None: ...

    async def receive(self) -> HQMessage: ...

    async def close(self) -> None: ...
