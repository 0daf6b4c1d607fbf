"""`outpost hq agents|connections|query|inspect|test|jobs`: argument handling and the errors a
user sees before (or instead of) HQ answering. An unreachable HQ is a real refused port."""

from __future__ import annotations

import io
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import pytest

from outpost.cli.main import main
from tests.helpers import refused_port

TOKEN = "opa_unit-test-token-that-must-never-be-printed"


@dataclass
class Run:
    code: int
    out: str
    err: str


class Outpost(Protocol):
    def __call__(self, *args: str, env: dict[str, str] | None = None, stdin: str = "") -> Run: ...


@pytest.fixture
def outpost(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> Outpost:
    """Run `outpost ARGS` in-process with a clean HQ environment; returns exit code and output."""
    for name in ("OUTPOST_HQ_URL", "OUTPOST_HQ_ADMIN_TOKEN", "OUTPOST_HQ_CA_FILE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("COLUMNS", "200")

    def run(*args: str, env: dict[str, str] | None = None, stdin: str = "") -> Run:
        for key, value in (env or {}).items():
            monkeypatch.setenv(key, value)
        monkeypatch.setattr("sys.stdin", io.StringIO(stdin))
        try:
            main(list(args))
        except SystemExit as exc:
            code = exc.code if isinstance(exc.code, int) else 1
        else:  # pragma: no cover - main always exits
            code = 0
        captured = capsys.readouterr()
        for key in env or {}:
            monkeypatch.delenv(key)
        return Run(code, captured.out, captured.err)

    return run


def refused_env() -> dict[str, str]:
    return {"OUTPOST_HQ_URL": f"http://127.0.0.1:{refused_port()}", "OUTPOST_HQ_ADMIN_TOKEN": TOKEN}


JOB_ID = "0b6c7c1e-0000-4000-8000-000000000000"
#: (command path, its arguments)
COMMANDS: list[tuple[list[str], list[str]]] = [
    (["agents", "list"], []),
    (["agents", "show"], ["a1"]),
    (["agents", "create"], ["a1"]),
    (["agents", "revoke"], ["a1"]),
    (["agents", "token"], ["a1"]),
    (["connections", "list"], []),
    (["connections", "declare"], ["a1/shop", "--name", "Shop", "--driver", "postgres"]),
    (["connections", "delete"], ["a1/shop"]),
    (["query"], ["a1/shop", "SELECT 1"]),
    (["inspect"], ["a1/shop"]),
    (["test"], ["a1/shop"]),
    (["jobs", "list"], []),
    (["jobs", "show"], [JOB_ID]),
    (["jobs", "rows"], [JOB_ID]),
    (["jobs", "cancel"], [JOB_ID]),
]
COMMAND_IDS = [" ".join(path) for path, _ in COMMANDS]


@pytest.mark.parametrize(("path", "args"), COMMANDS, ids=COMMAND_IDS)
def test_unreachable_hq_is_one_sentence(outpost: Outpost, path: list[str], args: list[str]) -> None:
    env = refused_env()
    result = outpost("hq", *path, *args, env=env)
    assert result.code == 1
    assert result.err.strip() == (
        f"Error: Cannot reach HQ at {env['OUTPOST_HQ_URL']}: connection refused; is "
        "`outpost hq serve` running there?"
    )
    assert "Traceback" not in result.err
    assert TOKEN not in result.out + result.err


@pytest.mark.parametrize(("path", "args"), COMMANDS, ids=COMMAND_IDS)
def test_every_command_needs_an_admin_token(
    outpost: Outpost, path: list[str], args: list[str]
) -> None:
    result = outpost("hq", *path, *args, "--hq", f"http://127.0.0.1:{refused_port()}")
    assert result.code == 2
    assert "No admin token: give --token or set OUTPOST_HQ_ADMIN_TOKEN" in result.err


@pytest.mark.parametrize(("path", "args"), COMMANDS, ids=COMMAND_IDS)
def test_every_command_has_format_and_hq_options(
    outpost: Outpost, path: list[str], args: list[str]
) -> None:
    result = outpost("hq", *path, "--help")
    assert result.code == 0
    for option in ("--hq URL", "--token TOKEN", "--ca-file PEM", "OUTPOST_HQ_URL"):
        assert option in result.out
    if path != ["connections", "delete"]:
        assert "--format [table|json" in result.out


def test_token_flag_warns_it_is_visible(outpost: Outpost) -> None:
    url = f"http://127.0.0.1:{refused_port()}"
    result = outpost("hq", "agents", "list", "--hq", url, "--token", TOKEN)
    assert result.code == 1
    assert "Warning: a token given as --token VALUE is visible in the process list" in result.err
    assert TOKEN not in result.out + result.err
    from_env = outpost("hq", "agents", "list", env=refused_env())
    assert "Warning" not in from_env.err


def test_hq_url_from_flag_wins_over_env(outpost: Outpost) -> None:
    port = refused_port()
    env = refused_env()
    result = outpost("hq", "jobs", "list", "--hq", f"http://127.0.0.1:{port}/", env=env)
    assert f"Cannot reach HQ at http://127.0.0.1:{port}:" in result.err


@pytest.mark.parametrize("value", ["shop", "a1/", "/shop", "a1/shop/x"])
def test_agent_conn_must_be_agent_slash_slug(outpost: Outpost, value: str) -> None:
    result = outpost("hq", "query", value, "SELECT 1", env=refused_env())
    assert result.code == 2
    assert f"Invalid value for 'AGENT/CONN': {value!r} is not AGENT/CONN" in result.err
    assert "e.g. warehouse/shop" in result.err


@pytest.mark.parametrize(("sql", "stdin"), [("", ""), ("  ", ""), ("-", "\n  \n")])
def test_empty_sql_is_a_usage_error(outpost: Outpost, sql: str, stdin: str) -> None:
    result = outpost("hq", "query", "a1/shop", sql, env=refused_env(), stdin=stdin)
    assert result.code == 2
    assert "Error: The SQL text is empty; give a statement to run." in result.err


def test_sql_from_stdin_is_sent(outpost: Outpost) -> None:
    # with SQL on stdin the command gets as far as HQ (here: a refused port)
    result = outpost("hq", "query", "a1/shop", "-", env=refused_env(), stdin="SELECT 1\n")
    assert result.code == 1
    assert "Cannot reach HQ" in result.err


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["query", "a1/shop", "SELECT 1", "--max-rows", "0"], "Invalid value for '--max-rows'"),
        (["query", "a1/shop", "SELECT 1", "--timeout", "0"], "Invalid value for '--timeout'"),
        (["query", "a1/shop", "SELECT 1", "--wait", "-1"], "Invalid value for '--wait'"),
        (["jobs", "list", "--state", "done"], "Invalid value for '--state'"),
        (["jobs", "list", "--kind", "drop"], "Invalid value for '--kind'"),
        (["jobs", "list", "--limit", "0"], "Invalid value for '--limit'"),
        (["jobs", "show", JOB_ID, "--wait", "61"], "Invalid value for '--wait'"),
        (["jobs", "show", "nope"], "Invalid value for 'ID': 'nope' is not a job id"),
        (["jobs", "cancel", "12"], "find it with `outpost hq jobs list`"),
        (["agents", "list", "--format", "xml"], "Invalid value for '--format'"),
        (["connections", "declare", "a1/shop", "--driver", "postgres"], "Missing option '--name'"),
    ],
)
def test_bad_flags_exit_2(outpost: Outpost, args: list[str], message: str) -> None:
    result = outpost("hq", *args, env=refused_env())
    assert result.code == 2
    assert message in result.err


@pytest.mark.parametrize("url", ["127.0.0.1:9700", "ftp://hq.example.com", "http://"])
def test_bad_hq_url(outpost: Outpost, url: str) -> None:
    result = outpost(
        "hq", "agents", "list", env={"OUTPOST_HQ_URL": url, "OUTPOST_HQ_ADMIN_TOKEN": TOKEN}
    )
    assert result.code == 2
    assert f"Error: HQ address {url!r} is not a URL; give it as http(s)://HOST[:PORT]" in result.err


def test_missing_ca_file(outpost: Outpost, tmp_path: Path) -> None:
    missing = tmp_path / "nope.pem"
    result = outpost("hq", "agents", "list", "--ca-file", str(missing), env=refused_env())
    assert result.code == 2
    assert f"Error: Cannot read the CA file {missing}: No such file or directory." in result.err


def test_query_json_of_refused_hq_prints_nothing_on_stdout(outpost: Outpost) -> None:
    result = outpost("hq", "query", "a1/shop", "SELECT 1", "--format", "json", env=refused_env())
    assert result.code == 1
    assert result.out == ""
