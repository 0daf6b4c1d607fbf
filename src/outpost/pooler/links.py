"""Handing a logged-in connection to the forwarding engine (``_engine.c``).

A plain TCP connection's socket moves from its asyncio transport to the engine, which then
reads, frames and forwards in C (raw mode); the transport is dropped without closing the socket.
A TLS connection keeps its transport (the engine writes through it; its protocol feeds what it
receives to ``Link.feed``).
"""

from __future__ import annotations

import asyncio
import logging
import os

from outpost.pooler._engine import Engine, Link

log = logging.getLogger("outpost.pooler")
#: what a Link in raw mode answers to get_extra_info: nothing kept (idle memory)
NO_EXTRA: dict[str, object] = {}


class _Detached(asyncio.Protocol):
    """What is left of a transport whose socket went to the engine."""

    def connection_lost(self, exc: Exception | None) -> None:
        pass


def hand_over(
    link: Link, transport: asyncio.Transport, engine: Engine | None, *, tls: bool
) -> asyncio.Transport | Link:
    """Give LINK its I/O; returns what the protocol writes to from now on."""
    if engine is not None and not tls and not transport.get_write_buffer_size():
        sock = transport.get_extra_info("socket")
        if sock is not None:
            fd = os.dup(sock.fileno())
            try:
                # no extra info kept: the protocol already has its addresses (idle memory)
                link.adopt(engine, fd, NO_EXTRA)
            except (OSError, RuntimeError) as exc:
                os.close(fd)
                log.debug("the engine could not take the socket (%s); keeping asyncio's", exc)
            else:
                transport.pause_reading()
                transport.set_protocol(_Detached())
                transport.abort()  # closes asyncio's descriptor; the engine has its own
                return link
    link.use_transport(transport)
    return transport
