"""uvicorn inside an event loop whose owner handles the signals (the agent's API, HQ, the
pooler's metrics endpoint)."""

from __future__ import annotations

import contextlib
from collections.abc import Generator

import uvicorn


class EmbeddedServer(uvicorn.Server):
    """uvicorn without its own signal handling: the runtime owns the signals."""

    @contextlib.contextmanager
    def capture_signals(self) -> Generator[None, None, None]:
        yield
