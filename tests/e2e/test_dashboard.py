"""The HQ dashboard (/ui/) in a real Chromium against a real ``outpost hq serve`` on SQLite.

The Query and Schema views run against a real agent (``outpost serve`` logged in to that HQ)
serving the sample shop database. Each test asserts what the user sees (text in cells, the
sentences shown) and saves one screenshot per view in its pytest tmp dir.
"""

from __future__ import annotations

import re
import sqlite3
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from playwright.sync_api import Browser, Page, expect

from outpost.sample_data import SAMPLE_QUERY
from tests.e2e.conftest import ShopAgent
from tests.helpers import wait_for
from tests.hq_helpers import HQ

pytestmark = pytest.mark.integration

TIMEOUT_MS = 30_000
REFUSED = "The admin token was refused."
COMMAND = re.compile(r"^outpost login --hq (\S+) --token (opt_[A-Za-z0-9_-]+)$")

expect.set_options(timeout=TIMEOUT_MS)


@pytest.fixture
def hq(hq_server: HQ) -> HQ:
    """The module's HQ (on SQLite, started once for all the tests here)."""
    return hq_server


def call(hq: HQ, method: str, path: str, **kwargs: Any) -> httpx.Response:
    """HQ's REST API with the admin token, as the tests' own setup and cross-check."""
    with hq.api() as api:
        return api.request(method, f"/api/v1{path}", **kwargs)


def ok(hq: HQ, method: str, path: str, **kwargs: Any) -> Any:
    response = call(hq, method, path, **kwargs)
    assert response.status_code < 300, f"{method} {path}: {response.status_code} {response.text}"
    return None if response.status_code == 204 else response.json()


@pytest.fixture
def page(browser: Browser, hq: HQ) -> Iterator[Page]:
    """A fresh browser context (empty sessionStorage) per test; fails on uncaught JS errors
    and on anything the page's Content-Security-Policy blocked."""
    context = browser.new_context(
        base_url=hq.url,
        viewport={"width": 1280, "height": 800},
        permissions=["clipboard-read", "clipboard-write"],
    )
    context.set_default_timeout(TIMEOUT_MS)
    page = context.new_page()
    errors: list[str] = []
    page.on("pageerror", lambda error: errors.append(str(error)))
    page.on(
        "console",
        lambda msg: errors.append(msg.text) if "Content Security Policy" in msg.text else None,
    )
    try:
        yield page
    finally:
        context.close()
    assert errors == [], f"uncaught errors in the dashboard: {errors}"


def sign_in(page: Page, hq: HQ) -> None:
    page.goto("/")
    page.get_by_label("Admin token").fill(hq.admin_token)
    page.get_by_role("button", name="Sign in").click()
    expect(page.get_by_role("heading", name="Agents", exact=True)).to_be_visible()


def open_view(page: Page, name: str) -> None:
    page.get_by_role("link", name=name, exact=True).click()
    expect(page.get_by_role("heading", name=name, exact=True)).to_be_visible()


def cells(page: Page, table: str) -> list[list[str]]:
    """The text of every body cell of a table, row by row, as the user reads it."""
    rows: list[list[str]] = page.eval_on_selector_all(
        f"{table} tbody tr", "rows => rows.map(r => [...r.cells].map(c => c.innerText.trim()))"
    )
    return rows


def headers(page: Page, table: str) -> list[str]:
    texts: list[str] = page.eval_on_selector_all(
        f"{table} thead th", "ths => ths.map(th => th.innerText.trim())"
    )
    return texts


def wait_for_row(page: Page, table: str, row: list[str], timeout: float = 30) -> None:
    wait_for(
        lambda: row in cells(page, table), timeout, f"row {row} in {table}: {cells(page, table)}"
    )


def row_with(page: Page, table: str, first_cell: str) -> list[str]:
    return next(r for r in cells(page, table) if r and r[0] == first_cell)


def create_agent(hq: HQ, name: str) -> str:
    token: str = ok(hq, "POST", "/agents", json={"name": name})["token"]
    return token


def agent_login_status(hq: HQ, token: str) -> int:
    response = httpx.post(
        f"{hq.url}/agent/v1/login", headers={"Authorization": f"Bearer {token}"}, timeout=30
    )
    return response.status_code


# ---------------------------------------------------------------------------------------------
# Login


def test_refused_token_stays_on_login_then_sign_in_and_out(
    page: Page, hq: HQ, tmp_path: Path
) -> None:
    page.goto("/")
    expect(page).to_have_url(re.compile(r"/ui/$"))
    page.get_by_label("Admin token").fill("opa_not-a-real-token")
    page.get_by_role("button", name="Sign in").click()
    expect(page.get_by_role("alert")).to_have_text(REFUSED)
    expect(page.get_by_role("button", name="Sign in")).to_be_visible()
    expect(page.get_by_role("button", name="Sign out")).to_be_hidden()
    page.screenshot(path=tmp_path / "login.png")

    page.get_by_label("Admin token").fill(hq.admin_token)
    page.get_by_label("Admin token").press("Enter")
    expect(page.get_by_role("heading", name="Agents", exact=True)).to_be_visible()
    expect(page.get_by_text(REFUSED)).to_be_hidden()

    page.reload()  # the token is kept for the tab's session
    expect(page.get_by_role("heading", name="Agents", exact=True)).to_be_visible()

    # A kept token that HQ no longer accepts sends the user back to the login screen.
    page.evaluate(
        "Object.keys(sessionStorage).forEach(k => sessionStorage.setItem(k, 'opa_stale'))"
    )
    page.reload()
    expect(page.get_by_role("alert")).to_have_text(REFUSED)
    expect(page.get_by_role("heading", name="Agents", exact=True)).to_be_hidden()
    page.get_by_label("Admin token").fill(hq.admin_token)
    page.get_by_role("button", name="Sign in").click()
    expect(page.get_by_role("heading", name="Agents", exact=True)).to_be_visible()

    page.get_by_role("button", name="Sign out").click()
    expect(page.get_by_role("button", name="Sign in")).to_be_visible()
    expect(page.get_by_label("Admin token")).to_have_value("")
    assert page.evaluate("sessionStorage.length") == 0
    page.reload()
    expect(page.get_by_role("button", name="Sign in")).to_be_visible()
    expect(page.get_by_role("heading", name="Agents", exact=True)).to_be_hidden()


def test_an_empty_token_is_asked_for(page: Page) -> None:
    page.goto("/")
    page.get_by_role("button", name="Sign in").click()
    expect(page.get_by_role("alert")).to_have_text("Paste an admin token to sign in.")


# ---------------------------------------------------------------------------------------------
# Agents


def test_create_agent_shows_token_once_copy_and_revoke(page: Page, hq: HQ, tmp_path: Path) -> None:
    sign_in(page, hq)
    page.get_by_label("New agent name").fill("web-agent-a")
    page.get_by_role("button", name="Create agent").click()

    expect(page.get_by_text("Agent web-agent-a created.")).to_be_visible()
    command = page.locator("#agent-token-command").inner_text()
    match = COMMAND.match(command)
    assert match, command
    assert match.group(1) == hq.url
    token = match.group(2)

    page.get_by_role("button", name="Copy").click()
    expect(page.get_by_text("Copied.")).to_be_visible()
    assert page.evaluate("navigator.clipboard.readText()") == command

    wait_for_row(
        page, "#agents-table", ["web-agent-a", "offline", "never", "", "", "0", "No", "Revoke"]
    )
    assert agent_login_status(hq, token) == 200  # the token shown is the agent's real one
    assert headers(page, "#agents-table") == [
        "NAME",
        "STATUS",
        "LAST SEEN",
        "VERSION",
        "TRANSPORT",
        "CONNECTIONS",
        "REVOKED",
        "Actions",
    ]
    page.screenshot(path=tmp_path / "agents.png", full_page=True)

    # Shown once: gone after Done, and not shown again after a reload.
    page.get_by_role("button", name="Done").click()
    expect(page.locator("#agent-token")).to_be_hidden()
    assert token not in page.content()
    page.reload()
    expect(page.get_by_role("cell", name="web-agent-a", exact=True)).to_be_visible()
    assert token not in page.content()

    # Revoke asks first; Cancel (or Escape, from the keyboard) leaves the agent alone.
    page.get_by_role("button", name="Revoke web-agent-a").click()
    dialog = page.get_by_role("dialog")
    expect(dialog).to_contain_text("Revoke agent web-agent-a?")
    dialog.get_by_role("button", name="Cancel").click()
    expect(dialog).to_be_hidden()
    page.get_by_role("button", name="Revoke web-agent-a").focus()
    page.keyboard.press("Enter")
    expect(dialog).to_be_visible()
    page.keyboard.press("Escape")
    expect(dialog).to_be_hidden()
    assert row_with(page, "#agents-table", "web-agent-a")[6] == "No"
    assert ok(hq, "GET", "/agents/web-agent-a")["revoked"] is False

    page.get_by_role("button", name="Revoke web-agent-a").click()
    dialog.get_by_role("button", name="Revoke").click()
    wait_for(
        lambda: row_with(page, "#agents-table", "web-agent-a")[6:] == ["Yes", "New token"],
        30,
        "web-agent-a shown revoked",
    )
    assert ok(hq, "GET", "/agents/web-agent-a")["revoked"] is True
    assert agent_login_status(hq, token) == 401

    # A revoked agent can be given a new token (shown once again).
    page.get_by_role("button", name="New token for web-agent-a").click()
    dialog.get_by_role("button", name="Issue token").click()
    expect(page.get_by_text("New token for agent web-agent-a.")).to_be_visible()
    new_match = COMMAND.match(page.locator("#agent-token-command").inner_text())
    assert new_match and new_match.group(2) != token
    wait_for(
        lambda: row_with(page, "#agents-table", "web-agent-a")[6:] == ["No", "Revoke"],
        30,
        "web-agent-a shown not revoked",
    )
    assert agent_login_status(hq, new_match.group(2)) == 200


def test_create_agent_errors_are_one_sentence(page: Page, hq: HQ) -> None:
    create_agent(hq, "web-agent-taken")
    sign_in(page, hq)
    page.get_by_label("New agent name").fill("bad name!")
    page.get_by_role("button", name="Create agent").click()
    expect(page.locator("#agents-error")).to_have_text(
        "Agent name 'bad name!' is not valid: use 1 to 63 letters, digits, '.', '_' or '-',"
        " starting with a letter or digit."
    )

    page.get_by_label("New agent name").fill("web-agent-taken")
    page.get_by_role("button", name="Create agent").click()
    conflict = call(hq, "POST", "/agents", json={"name": "web-agent-taken"})
    assert conflict.status_code == 409
    expect(page.locator("#agents-error")).to_have_text(conflict.json()["message"])
    expect(page.locator("#agent-token")).to_be_hidden()


# ---------------------------------------------------------------------------------------------
# Connections


def test_connections_table_shows_declared_connections_as_text(
    page: Page, hq: HQ, tmp_path: Path
) -> None:
    create_agent(hq, "web-agent-c")
    create_agent(hq, "web-agent-other")
    ok(
        hq,
        "PUT",
        "/agents/web-agent-c/connections/billing",
        json={"name": "Billing", "driver": "postgres"},
    )
    hostile = '<img src=x onerror="window.__pwned = 1">'
    ok(hq, "PUT", "/agents/web-agent-c/connections/evil", json={"name": hostile, "driver": "mysql"})
    ok(
        hq,
        "PUT",
        "/agents/web-agent-other/connections/crm",
        json={"name": "CRM", "driver": "mysql"},
    )

    sign_in(page, hq)
    open_view(page, "Connections")
    assert headers(page, "#connections-table") == [
        "AGENT",
        "NAME",
        "SLUG",
        "DRIVER",
        "ON AGENT",
        "UP",
    ]
    wait_for_row(
        page, "#connections-table", ["web-agent-c", "Billing", "billing", "postgres", "No", ""]
    )
    wait_for_row(page, "#connections-table", ["web-agent-c", hostile, "evil", "mysql", "No", ""])
    assert page.evaluate("window.__pwned === undefined")
    assert page.locator("#connections-table img").count() == 0

    page.locator("#view-connections").get_by_label("Agent").select_option("web-agent-c")
    wait_for(
        lambda: {r[0] for r in cells(page, "#connections-table")} == {"web-agent-c"},
        30,
        "only web-agent-c's connections",
    )
    assert sorted(r[2] for r in cells(page, "#connections-table")) == ["billing", "evil"]
    page.screenshot(path=tmp_path / "connections.png", full_page=True)

    # The list refreshes itself: a connection declared now shows up without a reload.
    ok(
        hq,
        "PUT",
        "/agents/web-agent-c/connections/ledger",
        json={"name": "Ledger", "driver": "mssql"},
    )
    wait_for_row(page, "#connections-table", ["web-agent-c", "Ledger", "ledger", "mssql", "No", ""])


# ---------------------------------------------------------------------------------------------
# Jobs


def test_jobs_history_newest_first_paged_with_details_and_cancel(
    page: Page, hq: HQ, tmp_path: Path
) -> None:
    create_agent(hq, "web-agent-j")  # never connects: its jobs stay queued
    ok(
        hq,
        "PUT",
        "/agents/web-agent-j/connections/billing",
        json={"name": "Billing", "driver": "postgres"},
    )
    ids = [
        ok(
            hq,
            "POST",
            "/jobs",
            json={"agent": "web-agent-j", "connection": "billing", "kind": "test"},
        )["id"]
        for _ in range(27)
    ]
    newest = ids[-1]
    ok(hq, "POST", f"/jobs/{newest}/cancel")

    sign_in(page, hq)
    open_view(page, "Jobs")
    page.locator("#view-jobs").get_by_label("Agent").select_option("web-agent-j")
    first_page = [i[:8] for i in reversed(ids)][:25]
    wait_for(
        lambda: [r[0] for r in cells(page, "#jobs-table")] == first_page,
        30,
        "a first page of web-agent-j's 25 newest jobs",
    )
    assert headers(page, "#jobs-table") == [
        "JOB",
        "STATE",
        "KIND",
        "AGENT",
        "CONNECTION",
        "CREATED",
        "DURATION",
        "ERROR",
    ]
    rows = cells(page, "#jobs-table")
    assert rows[0][:5] == [newest[:8], "cancelled", "test", "web-agent-j", "billing"]
    assert all(r[1] == "queued" for r in rows[1:])
    page.screenshot(path=tmp_path / "jobs.png", full_page=True)

    page.get_by_role("button", name="Older").click()
    wait_for(lambda: len(cells(page, "#jobs-table")) == 2, 30, "the second page")
    assert [r[0] for r in cells(page, "#jobs-table")] == [ids[1][:8], ids[0][:8]]
    expect(page.get_by_text("Page 2")).to_be_visible()
    expect(page.get_by_role("button", name="Older")).to_be_disabled()
    page.get_by_role("button", name="Newest").click()
    wait_for(
        lambda: [r[0] for r in cells(page, "#jobs-table")] == first_page, 30, "the first page again"
    )

    # Details of a queued job; cancel it from there.
    queued = ids[-2]
    page.get_by_role("button", name=f"Job {queued} details").click()
    detail = page.locator("#job-detail")
    expect(detail.get_by_role("heading")).to_have_text(f"Job {queued}")
    expect(detail.locator("dd").first).to_have_text("queued")
    page.get_by_role("button", name="Cancel job").click()
    expect(detail.locator("dd").first).to_have_text("cancelled")
    expect(page.get_by_role("button", name="Cancel job")).to_be_hidden()
    assert ok(hq, "GET", f"/jobs/{queued}")["state"] == "cancelled"
    wait_for(
        lambda: cells(page, "#jobs-table")[1][1] == "cancelled", 30, "the list to show it cancelled"
    )

    page.get_by_label("State").select_option("queued")
    queued_ids = [i[:8] for i in reversed(ids[:-2])]
    wait_for(
        lambda: (
            [(r[0], r[1]) for r in cells(page, "#jobs-table")]
            == [(i, "queued") for i in queued_ids]
        ),
        30,
        "the 25 queued jobs only",
    )


def test_an_hq_that_stops_answering_is_reported(page: Page, tmp_path: Path) -> None:
    server = HQ(tmp_path / "hq")
    server.create_admin()
    server.start()
    try:
        page.goto(f"{server.url}/ui/")
        page.get_by_label("Admin token").fill(server.admin_token)
        page.get_by_role("button", name="Sign in").click()
        expect(page.get_by_role("heading", name="Agents", exact=True)).to_be_visible()
    finally:
        server.stop()
    expect(page.get_by_role("alert")).to_have_text(
        "HQ did not answer; check that it is running and reload."
    )
    expect(page.get_by_role("heading", name="Agents", exact=True)).to_be_visible()


# ---------------------------------------------------------------------------------------------
# Query and Schema, through a real agent


def test_agents_view_shows_the_connected_agent(
    page: Page, hq: HQ, shop_agent: ShopAgent, tmp_path: Path
) -> None:
    sign_in(page, hq)
    wait_for(
        lambda: any(r[:2] == [shop_agent.name, "online"] for r in cells(page, "#agents-table")),
        30,
        "the agent shown online",
    )
    seen = ok(hq, "GET", f"/agents/{shop_agent.name}")
    row = row_with(page, "#agents-table", shop_agent.name)
    assert re.fullmatch(r"just now|\d+ seconds? ago", row[2]), row
    assert row[3:] == [seen["version"], seen["transport"], "1", "No", "Revoke"]
    assert seen["version"] and seen["transport"] in ("websocket", "poll")
    expect(page.locator(".dot.online")).to_have_count(1)
    page.screenshot(path=tmp_path / "agents-online.png", full_page=True)

    open_view(page, "Connections")
    wait_for_row(
        page,
        "#connections-table",
        [shop_agent.name, "Sample shop", "sample-shop", "sqlite", "Yes", "Yes"],
    )


def sample_top_customers(database: Path) -> list[tuple[Any, ...]]:
    with sqlite3.connect(database) as conn:
        return conn.execute(SAMPLE_QUERY).fetchall()


def choose(page: Page, view: str, agent: str, slug: str) -> None:
    section = page.locator(f"#view-{view}")
    section.get_by_label("Agent").select_option(agent)
    section.get_by_label("Connection").select_option(slug)


def test_query_view_runs_sql_on_the_agent(
    page: Page, hq: HQ, shop_agent: ShopAgent, tmp_path: Path
) -> None:
    expected = sample_top_customers(shop_agent.database)
    sign_in(page, hq)
    open_view(page, "Query")
    choose(page, "query", shop_agent.name, shop_agent.slug)
    page.get_by_label("SQL").fill(SAMPLE_QUERY)
    page.get_by_label("SQL").press("Control+Enter")

    result = page.locator("#query-result table")
    expect(result).to_be_visible()
    assert headers(page, "#query-result table") == [
        "customer",
        "country",
        "orders",
        "items",
        "revenue",
    ]
    rows = cells(page, "#query-result table")
    assert [(r[0], r[1], int(r[2]), int(r[3])) for r in rows] == [
        (str(e[0]), str(e[1]), int(e[2]), int(e[3])) for e in expected
    ]
    assert [float(r[4]) for r in rows] == [float(e[4]) for e in expected]
    expect(page.locator("#query-result .summary")).to_contain_text(f"{len(expected)} rows")
    expect(page.locator("#query-status")).to_contain_text("succeeded")
    page.screenshot(path=tmp_path / "query.png", full_page=True)

    # Max rows stops the result early and says so.
    page.get_by_label("SQL").fill("SELECT id, name FROM customers ORDER BY id")
    page.get_by_label("Max rows").fill("5")
    page.get_by_role("button", name="Run").click()
    expect(page.locator("#query-result .summary")).to_contain_text("stopped at max rows (5)")
    assert [r[0] for r in cells(page, "#query-result table")] == ["1", "2", "3", "4", "5"]

    # Long results come in pages of 500 rows.
    page.get_by_label("SQL").fill(
        "WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM n WHERE i < 1200)"
        " SELECT i FROM n"
    )
    page.get_by_label("Max rows").fill("1000")
    page.get_by_role("button", name="Run").click()
    expect(page.get_by_text("Showing 500 of 1000 rows.")).to_be_visible()
    page.get_by_role("button", name="Show more rows").click()
    expect(page.locator("#query-result table tbody tr")).to_have_count(1000)
    expect(page.get_by_role("button", name="Show more rows")).to_be_hidden()
    rows = cells(page, "#query-result table")
    assert [r[0] for r in rows] == [str(i) for i in range(1, 1001)]
    expect(page.locator("#query-result .summary")).to_contain_text("stopped at max rows (1000)")

    # Result values are shown as text, never as markup.
    markup = '<img src=x onerror="window.__pwned = 1">'
    page.get_by_label("SQL").fill(f"SELECT '{markup}' AS \"<b>html</b>\", NULL AS missing")
    page.get_by_role("button", name="Run").click()
    expect(page.locator("#query-result .summary")).to_have_text(re.compile(r"^1 row\b"))
    assert headers(page, "#query-result table") == ["<b>html</b>", "missing"]
    assert cells(page, "#query-result table") == [[markup, "NULL"]]
    assert page.locator("#query-result img, #query-result b").count() == 0
    assert page.evaluate("window.__pwned === undefined")

    # A failing statement: the agent's error sentence, no table.
    page.get_by_label("SQL").fill("SELECT * FROM no_such_table")
    page.get_by_role("button", name="Run").click()
    error = page.locator("#query-error")
    expect(error).to_be_visible()
    failed = ok(hq, "GET", "/jobs", params={"agent": shop_agent.name, "kind": "query", "limit": 1})
    job = failed["jobs"][0]
    assert job["state"] == "failed"
    assert "no_such_table" in job["error"]
    expect(error).to_have_text(job["error"])
    expect(page.locator("#query-result table")).to_have_count(0)
    page.screenshot(path=tmp_path / "query-error.png", full_page=True)


def test_query_view_checks_its_inputs(page: Page, hq: HQ, shop_agent: ShopAgent) -> None:
    def query_jobs() -> int:
        params = {"agent": shop_agent.name, "kind": "query", "limit": 1000}
        return len(ok(hq, "GET", "/jobs", params=params)["jobs"])

    before = query_jobs()
    sign_in(page, hq)
    open_view(page, "Query")
    choose(page, "query", shop_agent.name, shop_agent.slug)
    page.get_by_role("button", name="Run").click()
    expect(page.locator("#query-error")).to_have_text("Type a SQL statement to run.")
    page.get_by_label("SQL").fill("SELECT 1")
    page.get_by_label("Max rows").fill("0")
    page.get_by_role("button", name="Run").click()
    expect(page.locator("#query-error")).to_have_text(
        "Max rows must be a whole number from 1 to 10000000."
    )
    page.get_by_label("Max rows").fill("10")
    page.get_by_label("Time limit (s)").fill("-1")
    page.get_by_role("button", name="Run").click()
    expect(page.locator("#query-error")).to_have_text(
        "Time limit must be a number of seconds from 1 to 86400."
    )
    assert query_jobs() == before  # nothing was sent to HQ


def test_schema_view_shows_tables_columns_keys_and_views(
    page: Page, hq: HQ, shop_agent: ShopAgent, tmp_path: Path
) -> None:
    sign_in(page, hq)
    open_view(page, "Schema")
    choose(page, "schema", shop_agent.name, shop_agent.slug)
    page.get_by_role("button", name="Inspect").click()

    tree = page.locator("#schema-result")
    expect(tree.locator("summary", has_text="order_totals")).to_be_visible()
    tables = tree.locator("details[data-table] > summary").all_inner_texts()
    assert [t.split()[1] for t in tables] == ["customers", "order_items", "orders", "products"]
    expect(tree.locator("details[data-view] > summary")).to_have_text(re.compile("order_totals"))

    orders = tree.locator("details[data-table$='.orders']")
    orders.locator("summary").click()
    columns = cells(page, "#schema-result details[data-table$='.orders'] table")
    assert [c[0] for c in columns] == ["id", "customer_id", "ordered_at", "status"]
    customer_id = columns[1]
    assert customer_id[1].upper().startswith("INTEGER")
    assert customer_id[2] == "NOT NULL"
    assert customer_id[4].startswith("FK → ") and customer_id[4].endswith("customers.id")
    assert columns[0][4] == "PK"
    expect(orders.locator(".facts")).to_contain_text("orders_customer_id (customer_id)")

    tree.get_by_label("Filter tables and views").fill("order")
    expect(tree.locator("details[data-table] > summary:visible")).to_have_count(2)
    visible = tree.locator("details.tree-item > summary:visible").all_inner_texts()
    assert [t.split()[1] for t in visible] == ["order_items", "orders", "order_totals"]
    tree.get_by_label("Filter tables and views").fill("")

    view = tree.locator("details[data-view$='.order_totals']")
    view.locator("summary").click()
    expect(view.locator("table")).to_contain_text("total_cents")
    page.screenshot(path=tmp_path / "schema.png", full_page=True)


def test_job_details_show_sql_and_result_rows(
    page: Page, hq: HQ, shop_agent: ShopAgent, tmp_path: Path
) -> None:
    sql = "SELECT sku, name FROM products ORDER BY id LIMIT 3"
    job = ok(
        hq,
        "POST",
        "/jobs",
        json={"agent": shop_agent.name, "connection": shop_agent.slug, "kind": "query", "sql": sql},
    )
    done = ok(hq, "GET", f"/jobs/{job['id']}", params={"wait": 60})
    assert done["state"] == "succeeded", done
    with sqlite3.connect(shop_agent.database) as conn:
        expected = [list(r) for r in conn.execute(sql).fetchall()]

    sign_in(page, hq)
    open_view(page, "Jobs")
    page.get_by_role("button", name=f"Job {job['id']} details").click()
    detail = page.locator("#job-detail")
    expect(detail.locator("pre.sql")).to_have_text(sql)
    expect(detail.locator("dd").first).to_have_text("succeeded")
    expect(detail.locator("table")).to_be_visible()
    assert cells(page, "#job-detail table") == expected
    page.screenshot(path=tmp_path / "job-detail.png", full_page=True)


def test_a_running_query_can_be_cancelled(page: Page, hq: HQ, shop_agent: ShopAgent) -> None:
    endless = (
        "WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM n) SELECT count(*) FROM n"
    )

    def endless_jobs() -> list[dict[str, Any]]:
        params = {"agent": shop_agent.name, "kind": "query", "limit": 1000}
        return [
            j
            for j in ok(hq, "GET", "/jobs", params=params)["jobs"]
            if j["params"]["sql"] == endless
        ]

    sign_in(page, hq)
    open_view(page, "Query")
    choose(page, "query", shop_agent.name, shop_agent.slug)
    page.get_by_label("SQL").fill(endless)
    # (the agent's SQLite statement only stops at its time limit; keep that short)
    page.get_by_label("Time limit (s)").fill("10")
    page.get_by_role("button", name="Run").click()
    expect(page.locator("#query-status")).to_contain_text(f"is running on agent {shop_agent.name}")
    expect(page.get_by_role("button", name="Run")).to_be_disabled()
    page.get_by_label("SQL").press("Control+Enter")  # one job at a time: ignored
    page.get_by_role("button", name="Cancel", exact=True).click()
    expect(page.locator("#query-status")).to_have_text(re.compile(r"^Job \w{8} cancelled\.$"))
    [job] = endless_jobs()
    assert job["state"] == "cancelled"
    assert job["timeout"] == 10
    expect(page.locator("#query-error")).to_have_text(job["error"] or "The job was cancelled.")
    expect(page.get_by_role("button", name="Run")).to_be_enabled()
    expect(page.get_by_role("button", name="Cancel", exact=True)).to_be_hidden()


def test_job_details_of_a_connection_test(page: Page, hq: HQ, shop_agent: ShopAgent) -> None:
    job = ok(
        hq,
        "POST",
        "/jobs",
        json={"agent": shop_agent.name, "connection": shop_agent.slug, "kind": "test"},
    )
    done = ok(hq, "GET", f"/jobs/{job['id']}", params={"wait": 60})
    assert done["state"] == "succeeded", done
    sign_in(page, hq)
    open_view(page, "Jobs")
    page.get_by_role("button", name=f"Job {job['id']} details").click()
    detail = page.locator("#job-detail")
    expect(detail.get_by_role("heading", name="Connection test")).to_be_visible()
    facts = dict(
        zip(
            detail.locator("dl").nth(1).locator("dt").all_inner_texts(),
            detail.locator("dl").nth(1).locator("dd").all_inner_texts(),
            strict=True,
        )
    )
    assert facts["Up"] == "Yes"
    assert facts["Server version"] == done["result"]["server_version"]
