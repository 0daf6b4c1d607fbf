"""The pooler's event loop: asyncio's own loop on the forwarding engine's epoll set.

Under uvloop the engine's epoll set is one file descriptor the loop watches: each wake-up costs
the loop's ``epoll_wait`` and then the engine's. ``EngineLoop`` is asyncio's
``SelectorEventLoop`` with ``EngineSelector``, a selector whose ``select`` is the engine's: one
``epoll_wait`` per wake-up for the clients' and servers' sockets and the loop's own file
descriptors together, the engine's work done in C, and the loop's Python run only when it has
something to do (one of its file descriptors is ready, the engine called into Python, or a
timer is due). ``outpost pooler serve`` runs on it.
"""

from __future__ import annotations

import asyncio
import selectors
from collections.abc import Mapping
from typing import Any

from outpost.pooler._engine import Engine

_FileObj = Any


def _fd_of(fileobj: _FileObj) -> int:
    if isinstance(fileobj, int):
        fd = fileobj
    else:
        try:
            fd = int(fileobj.fileno())
        except (AttributeError, TypeError, ValueError):
            raise ValueError(f"invalid file object: {fileobj!r}") from None
    if fd < 0:
        raise ValueError(f"invalid file descriptor: {fd}")
    return fd


def _check_events(events: int) -> None:
    if not events or events & ~(selectors.EVENT_READ | selectors.EVENT_WRITE):
        raise ValueError(f"invalid events: {events!r}")


class _Map(Mapping[_FileObj, selectors.SelectorKey]):
    def __init__(self, keys: dict[int, selectors.SelectorKey]) -> None:
        self._keys = keys

    def __len__(self) -> int:
        return len(self._keys)

    def __getitem__(self, fileobj: _FileObj) -> selectors.SelectorKey:
        try:
            return self._keys[_fd_of(fileobj)]
        except (KeyError, ValueError):
            raise KeyError(f"{fileobj!r} is not registered") from None

    def __iter__(self) -> Any:
        return iter(self._keys)


class EngineSelector(selectors.BaseSelector):
    """A selector on ENGINE's epoll set (see the module's docstring)."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self._keys: dict[int, selectors.SelectorKey] = {}
        self._map = _Map(self._keys)

    def register(self, fileobj: _FileObj, events: int, data: Any = None) -> selectors.SelectorKey:
        _check_events(events)
        fd = _fd_of(fileobj)
        if fd in self._keys:
            raise KeyError(f"{fileobj!r} (fd {fd}) is already registered")
        self.engine.watch(fd, events)
        key = selectors.SelectorKey(fileobj, fd, events, data)
        self._keys[fd] = key
        return key

    def unregister(self, fileobj: _FileObj) -> selectors.SelectorKey:
        fd = _fd_of(fileobj)
        key = self._keys.pop(fd, None)
        if key is None:
            raise KeyError(f"{fileobj!r} is not registered")
        self.engine.unwatch(fd)
        return key

    def modify(self, fileobj: _FileObj, events: int, data: Any = None) -> selectors.SelectorKey:
        fd = _fd_of(fileobj)
        key = self._keys.get(fd)
        if key is None:
            raise KeyError(f"{fileobj!r} is not registered")
        if events != key.events:
            _check_events(events)
            self.engine.watch(fd, events)
        key = key._replace(events=events, data=data)
        self._keys[fd] = key
        return key

    def select(self, timeout: float | None = None) -> list[tuple[selectors.SelectorKey, int]]:
        ready = self.engine.select(-1.0 if timeout is None else max(timeout, 0.0))
        keys = self._keys
        out = []
        for fd, mask in ready:
            key = keys.get(fd)
            if key is not None and mask & key.events:
                out.append((key, mask & key.events))
        return out

    def close(self) -> None:
        self._keys.clear()

    def get_map(self) -> Mapping[_FileObj, selectors.SelectorKey]:
        return self._map


class EngineLoop(asyncio.SelectorEventLoop):
    """asyncio's loop on a forwarding engine's epoll set (``engine``, for the PoolerServer)."""

    def __init__(self) -> None:
        # (the engine tells links closed outside a round through call_soon: the loop's, once
        # the loop exists)
        self.engine = Engine(lambda *args: self.call_soon(*args))
        super().__init__(EngineSelector(self.engine))

    def close(self) -> None:
        super().close()
        self.engine.close()
