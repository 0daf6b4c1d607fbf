"""`outpost.client.HQClient` without an HQ: input checks, error sentences, and how the CLI lays
out HQ's answers (inspect table, job fields, enrolment token)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import httpx
import pytest

from outpost.cli.hq_client import (
    HQTarget,
    inspect_rows,
    job_fields,
    job_row,
    print_token,
    result_summary,
)
from outpost.client import (
    HQClient,
    HQUnreachableError,
    JobFailedError,
    QueryOutcome,
    _error_message,
    _failure,
)
from outpost.errors import UsageError
from outpost.hq.api_models import Agent, AgentWithToken, Job, JobCreate
from tests.helpers import refused_port

TOKEN = "opa_library-test-token"

DOCUMENT: dict[str, Any] = {
    "driver": "postgres",
    "database": "test",
    "schemas": [
        {
            "name": "public",
            "tables": [
                {
                    "name": "customers",
                    "comment": None,
                    "columns": [
                        {"name": "id", "type": "INTEGER", "nullable": False, "default": None}
                    ],
                    "primary_key": {"name": "customers_pkey", "columns": ["id"]},
                    "foreign_keys": [],
                    "indexes": [],
                },
                {
                    "name": "orders",
                    "comment": None,
                    "columns": [
                        {
                            "name": "id",
                            "type": "INTEGER",
                            "nullable": False,
                            "default": "nextval('orders_id_seq'::regclass)",
                        },
                        {
                            "name": "customer_id",
                            "type": "INTEGER",
                            "nullable": True,
                            "default": None,
                        },
                        {"name": "note", "type": "TEXT", "nullable": True, "default": None},
                    ],
                    "primary_key": {"name": "orders_pkey", "columns": ["id"]},
                    "foreign_keys": [
                        {
                            "name": "orders_customer_fk",
                            "columns": ["customer_id"],
                            "referred_schema": "public",
                            "referred_table": "customers",
                            "referred_columns": ["id"],
                        }
                    ],
                    "indexes": [{"name": "orders_c", "columns": ["customer_id"], "unique": False}],
                },
            ],
            "views": [
                {
                    "name": "big_orders",
                    "definition": "SELECT id FROM orders",
                    "columns": [
                        {"name": "id", "type": "INTEGER", "nullable": True, "default": None}
                    ],
                }
            ],
        }
    ],
}


def make_job(**changes: Any) -> Job:
    fields: dict[str, Any] = {
        "id": "5f0e8a7c-1b7d-4c55-9b43-0a0a0a0a0a0a",
        "agent": "warehouse",
        "connection": "shop",
        "kind": "query",
        "state": "succeeded",
        "params": {"sql": "SELECT 1", "max_rows": 1000},
        "created_at": 1_700_000_000.0,
        "started_at": 1_700_000_001.0,
        "finished_at": 1_700_000_001.25,
        "expires_at": 1_700_000_300.0,
        "timeout": 30.0,
        "result": {"columns": ["x"], "row_count": 1, "truncated": False},
    }
    fields.update(changes)
    return Job(**fields)


def test_inspect_table_has_one_row_per_column_with_keys() -> None:
    rows = inspect_rows(DOCUMENT)
    assert rows == [
        ["public", "customers", "id", "INTEGER", "No", None, "PK"],
        ["public", "orders", "id", "INTEGER", "No", "nextval('orders_id_seq'::regclass)", "PK"],
        ["public", "orders", "customer_id", "INTEGER", "Yes", None, "FK public.customers(id)"],
        ["public", "orders", "note", "TEXT", "Yes", None, ""],
        ["public", "big_orders (view)", "id", "INTEGER", "Yes", None, ""],
    ]


def test_inspect_table_of_an_empty_database() -> None:
    assert inspect_rows({"driver": "sqlite", "database": "x", "schemas": []}) == []
    assert inspect_rows({"schemas": [{"name": "main", "tables": [], "views": []}]}) == []


def test_inspect_summary_in_job_show() -> None:
    job = make_job(kind="inspect", params={"schemas": None}, result=DOCUMENT)
    summary = result_summary(job)
    assert summary.startswith("1 schema, 2 tables, 1 view")
    assert f"outpost hq jobs show {job.id} --format json" in summary


def test_job_fields_and_row() -> None:
    job = make_job(state="failed", error='relation "nope" does not exist', result=None)
    fields = dict(job_fields(job))
    assert fields["state"] == "failed"
    assert fields["error"] == 'relation "nope" does not exist'
    assert fields["timeout"] == "30 s"
    assert fields["params"] == {"sql": "SELECT 1", "max_rows": 1000}
    assert fields["result"] == ""
    row = job_row(job)
    assert row[:5] == [job.id, "warehouse", "shop", "query", "failed"]
    assert row[6] == "0.250"
    assert job_row(make_job(state="queued", started_at=None, finished_at=None))[6] == ""


def test_enrolment_token_is_printed_with_the_login_line(capsys: pytest.CaptureFixture[str]) -> None:
    agent = Agent(name="warehouse", online=False, created_at=1.0, revoked=False)
    created = AgentWithToken(agent=agent, token="opt_abc")
    target = HQTarget("https://hq.example.com", TOKEN)
    print_token(target, created, "table", 'Created agent "warehouse".')
    out = capsys.readouterr().out
    assert out.splitlines()[0] == 'Created agent "warehouse".'
    assert "  opt_abc\n" in out
    assert "  outpost login --hq https://hq.example.com --token opt_abc\n" in out
    assert TOKEN not in out
    print_token(target, created, "json", "")
    data = json.loads(capsys.readouterr().out)
    assert data["token"] == "opt_abc"
    assert data["agent"]["name"] == "warehouse"
    assert data["login"] == "outpost login --hq https://hq.example.com --token opt_abc"


@pytest.mark.parametrize(
    ("url", "token", "message"),
    [
        ("hq.example.com", TOKEN, "HQ address 'hq.example.com' is not a URL"),
        ("file:///tmp/x", TOKEN, "HQ address 'file:///tmp/x' is not a URL"),
        ("http://127.0.0.1:9700", "", "The admin token is empty"),
        ("http://127.0.0.1:9700", "opa_a b", "The admin token contains white space"),
    ],
)
def test_constructor_checks(url: str, token: str, message: str) -> None:
    with pytest.raises(UsageError) as info:
        HQClient(url, token)
    assert str(info.value).startswith(message)
    assert token not in str(info.value) or not token


def test_missing_ca_file_is_named(tmp_path: Path) -> None:
    with pytest.raises(UsageError, match=r"^Cannot read the CA file .*nope\.pem: No such file"):
        HQClient("https://127.0.0.1:9700", TOKEN, ca_file=str(tmp_path / "nope.pem"))


def test_ca_file_that_is_not_pem(tmp_path: Path) -> None:
    bad = tmp_path / "ca.pem"
    bad.write_text("not a certificate\n")
    with pytest.raises(UsageError, match=r"^Cannot read the CA file .*ca\.pem: it holds no PEM"):
        HQClient("https://127.0.0.1:9700", TOKEN, ca_file=str(bad))


def test_refused_port_names_the_url() -> None:
    url = f"http://127.0.0.1:{refused_port()}"
    with HQClient(url, TOKEN) as client, pytest.raises(HQUnreachableError) as info:
        client.agents()
    assert str(info.value) == (
        f"Cannot reach HQ at {url}: connection refused; is `outpost hq serve` running there?"
    )


def test_create_job_checks_the_body_before_sending() -> None:
    # a refused port: had the body been sent, the error would be HQUnreachableError
    with HQClient(f"http://127.0.0.1:{refused_port()}", TOKEN) as client:
        with pytest.raises(UsageError, match="a query job needs a non-empty 'sql'"):
            client.create_job(agent="a", connection="c", kind="query")
        with pytest.raises(UsageError, match=r"^kind: "):
            client.create_job(agent="a", connection="c", kind="drop")
        with pytest.raises(UsageError, match="not both"):
            client.create_job(JobCreate(agent="a", connection="c", kind="test"), agent="b")
        with pytest.raises(HQUnreachableError):
            client.create_job(JobCreate(agent="a", connection="c", kind="test"))


def _response(status: int, body: Any) -> httpx.Response:
    content = body if isinstance(body, bytes) else json.dumps(body).encode()
    return httpx.Response(status, content=content, headers={"content-type": "application/json"})


@pytest.mark.parametrize(
    ("status", "body", "expected"),
    [
        (404, {"code": "not_found", "message": "No agent named 'x'."}, "No agent named 'x'."),
        (401, {"detail": "Not authenticated"}, "Not authenticated"),
        (
            422,
            {"detail": [{"loc": ["body", "max_rows"], "msg": "Input should be >= 1"}]},
            "max_rows: Input should be >= 1",
        ),
        (
            422,
            {
                "detail": [
                    {"loc": ["body"], "msg": "Value error, a query job needs a non-empty 'sql'"}
                ]
            },
            "a query job needs a non-empty 'sql'",
        ),
        (502, b"<html>bad gateway</html>", "HQ answered HTTP 502 Bad Gateway"),
    ],
)
def test_error_bodies(status: int, body: Any, expected: str) -> None:
    assert _error_message(_response(status, body))[1] == expected


@pytest.mark.parametrize(
    ("changes", "expected"),
    [
        (
            {"state": "failed", "error": 'syntax error at or near "SELEC"'},
            'The query job {id} on warehouse/shop failed: syntax error at or near "SELEC".',
        ),
        (
            {"state": "expired", "error": None},
            "The query job {id} on warehouse/shop expired before agent 'warehouse' started it; "
            "is the agent running and connected to HQ?",
        ),
        (
            {"state": "cancelled", "error": None},
            "The query job {id} on warehouse/shop was cancelled.",
        ),
    ],
)
def test_failed_job_sentences(changes: dict[str, Any], expected: str) -> None:
    job = make_job(result=None, **changes)
    assert _failure(job) == expected.format(id=job.id)
    assert JobFailedError(_failure(job), job).job is job


def test_query_outcome_reads_the_result() -> None:
    job = make_job(
        result={
            "columns": ["x"],
            "row_count": 3,
            "truncated": True,
            "duration_seconds": 0.5,
            "notices": ["NOTICE: hi"],
        }
    )
    outcome = QueryOutcome(job=job, columns=["x"], rows=[[1], [2], [3]])
    assert (outcome.row_count, outcome.truncated, outcome.duration_seconds) == (3, True, 0.5)
    assert outcome.notices == ["NOTICE: hi"]
