"""EngineLoop: asyncio's loop on the forwarding engine's epoll set (``outpost.pooler.loop``).

The selector keeps the selectors contract (register, modify, unregister, select, get_map, the
errors); asyncio runs on it (timers, call_soon_threadsafe from a thread, signals, executors,
streams); and ``Engine.select`` forwards between links in C without returning to the loop until
Python is needed.
"""

from __future__ import annotations

import asyncio
import os
import selectors
import signal
import socket
import struct
import threading
import time
from collections.abc import Iterator

import pytest

from outpost.pooler._engine import Engine, Link, PoolCore
from outpost.pooler.loop import EngineLoop, EngineSelector


@pytest.fixture
def selector() -> Iterator[EngineSelector]:
    engine = Engine(lambda *args: None)
    sel = EngineSelector(engine)
    yield sel
    sel.close()
    engine.close()


def test_the_selector_keeps_the_selectors_contract(selector: EngineSelector) -> None:
    a, b = socket.socketpair()
    with a, b:
        key = selector.register(a, selectors.EVENT_READ, "data")
        assert (key.fileobj, key.fd, key.events, key.data) == (a, a.fileno(), 1, "data")
        assert selector.select(0) == []
        b.sendall(b"x")
        assert selector.select(5) == [(key, selectors.EVENT_READ)]
        key = selector.modify(a, selectors.EVENT_READ | selectors.EVENT_WRITE, "more")
        assert key.data == "more"
        assert selector.select(5) == [(key, selectors.EVENT_READ | selectors.EVENT_WRITE)]
        key = selector.modify(a, selectors.EVENT_WRITE)
        assert selector.select(5) == [(key, selectors.EVENT_WRITE)]
        mapping = selector.get_map()
        assert len(mapping) == 1 and mapping[a] is key and mapping[a.fileno()] is key
        assert list(mapping) == [a.fileno()]
        with pytest.raises(KeyError, match="already registered"):
            selector.register(a.fileno(), selectors.EVENT_READ)
        with pytest.raises(ValueError, match="invalid events"):
            selector.register(b, 0)
        with pytest.raises(ValueError, match="invalid file object"):
            selector.register(object(), selectors.EVENT_READ)
        assert selector.unregister(a) is key
        with pytest.raises(KeyError, match="not registered"):
            selector.unregister(a)
        with pytest.raises(KeyError, match="not registered"):
            selector.get_map()[a]
        assert selector.select(0) == []  # (no longer watched)


def test_asyncio_runs_on_the_engine_loop() -> None:
    """Timers, a wake-up from another thread while the loop waits, a signal handler, the
    default executor, and a TCP server and client on loopback."""

    async def main() -> list[str]:
        loop = asyncio.get_running_loop()
        seen: list[str] = []
        started = time.monotonic()
        await asyncio.sleep(0.05)
        assert time.monotonic() - started >= 0.05
        seen.append("timer")
        woken = loop.create_future()
        threading.Timer(0.05, lambda: loop.call_soon_threadsafe(woken.set_result, "thread")).start()
        seen.append(await asyncio.wait_for(woken, 10))
        got_signal = loop.create_future()
        loop.add_signal_handler(signal.SIGUSR1, got_signal.set_result, "signal")
        try:
            os.kill(os.getpid(), signal.SIGUSR1)
            seen.append(await asyncio.wait_for(got_signal, 10))
        finally:
            loop.remove_signal_handler(signal.SIGUSR1)
        seen.append(await loop.run_in_executor(None, lambda: "executor"))

        async def echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            writer.write(await reader.readline())
            await writer.drain()
            writer.close()

        server = await asyncio.start_server(echo, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(b"streams\n")
        seen.append((await asyncio.wait_for(reader.readline(), 10)).decode().strip())
        writer.close()
        server.close()
        await server.wait_closed()
        return seen

    with asyncio.Runner(loop_factory=EngineLoop) as runner:
        assert isinstance(runner.get_loop(), EngineLoop)
        assert runner.run(main()) == ["timer", "thread", "signal", "executor", "streams"]


class _Owner:
    def __init__(self) -> None:
        self.data: list[bytes] = []

    def _on_data(self, data: bytes) -> None:
        self.data.append(data)

    def connection_lost(self, exc: object) -> None:
        pass


def _linked(engine: Engine, owner: _Owner, *, server: bool) -> tuple[Link, socket.socket]:
    ours, theirs = socket.socketpair()
    ours.setblocking(False)
    link = Link(owner, server, True)
    link.adopt(engine, os.dup(ours.fileno()), {})
    ours.close()
    theirs.settimeout(5)
    return link, theirs


def test_select_forwards_in_c_and_returns_when_python_is_needed() -> None:
    """While links only forward, one select call goes on in C until its time is up (the loop's
    Python never runs); bytes for Python (a client with no server connection) end it at once."""
    engine = Engine(lambda *args: None)
    client_owner, server_owner = _Owner(), _Owner()
    client, app = _linked(engine, client_owner, server=False)
    server, db = _linked(engine, server_owner, server=True)
    try:
        core = PoolCore(set())
        client.core = server.core = core
        client.pair(server)
        query = b"Q" + struct.pack("!I", 13) + b"select 1\0"
        answers: list[bytes] = []

        def talk() -> None:
            for _ in range(3):
                app.sendall(query)
                assert db.recv(100) == query
                db.sendall(b"C\0\0\0\x0dSELECT 1\0")
                answers.append(app.recv(100))

        thread = threading.Thread(target=talk)
        thread.start()
        assert engine.select(2.0) == []  # three round trips, all in C
        thread.join(10)
        assert answers == [b"C\0\0\0\x0dSELECT 1\0"] * 3
        assert client_owner.data == server_owner.data == []
        client.unpair()
        started = time.monotonic()
        threading.Timer(0.05, lambda: app.sendall(query)).start()
        assert engine.select(30.0) == []
        assert time.monotonic() - started < 20  # back for Python long before the time is up
        assert client_owner.data == [query]
    finally:
        engine.close()
        app.close()
        db.close()
