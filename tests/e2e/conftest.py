"""Fixtures for end-to-end tests: a real Chromium driven by Playwright, and for the dashboard a
module-wide ``outpost hq serve`` on SQLite with a real agent (``outpost serve``) logged in to it.

The browser is the system's Chromium (``/usr/bin/chromium``); no browser is ever downloaded.
Where it is missing the browser tests skip with the reason (a failure under
``OUTPOST_REQUIRE_SERVICES=1``).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from playwright.sync_api import Browser, sync_playwright

from outpost.sample_data import create_sample_database
from tests.conftest import service_missing
from tests.helpers import Agent, wait_for
from tests.hq_helpers import HQ

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--headless=new",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    """The system's Chromium, headless, through Playwright's sync API. Module scope: Playwright's
    sync API keeps an event loop running in the main thread until it stops, which would break
    every later test that runs its own loop."""
    if not CHROMIUM.exists():
        service_missing(f"Chromium is not installed at {CHROMIUM}; install the chromium package")
    with sync_playwright() as playwright:
        chromium = playwright.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        try:
            yield chromium
        finally:
            chromium.close()


@pytest.fixture(scope="module")
def hq_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[HQ]:
    """One HQ on SQLite per test module, with an admin token; tests use their own agent names."""
    with HQ(tmp_path_factory.mktemp("hq")).running() as server:
        yield server


@dataclass
class ShopAgent:
    """A real agent logged in to HQ, serving the sample shop database as "Sample shop"."""

    name: str
    agent: Agent
    database: Path
    slug: str = "sample-shop"


@pytest.fixture(scope="module")
def shop_agent(hq_server: HQ, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ShopAgent]:
    """`outpost connections add sqlite` + `outpost login --hq URL --token T` + `outpost serve`."""
    root = tmp_path_factory.mktemp("agent")
    database = root / "shop.sqlite"
    create_sample_database(database)
    agent = Agent(root / "agent")
    agent.ok("connections", "add", "sqlite", "--name", "Sample shop", "--source-url", str(database))
    name = "shop-agent"
    token = hq_server.create_agent(name)
    agent.ok("login", "--hq", hq_server.url, "--token", token)
    with agent.serving():

        def reported() -> bool:
            with hq_server.api() as api:
                online = api.get(f"/api/v1/agents/{name}").json().get("online") is True
                conns = api.get("/api/v1/connections", params={"agent": name}).json()
            listed = conns.get("connections", [])
            return online and any(c["slug"] == "sample-shop" and c["on_agent"] for c in listed)

        wait_for(reported, 60, f"agent {name} online at HQ with its connection")
        yield ShopAgent(name, agent, database)
