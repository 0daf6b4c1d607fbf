"""`outpost hq agents|connections|query|inspect|test|jobs`: the HQ API from the command line.

Every command takes HQ's address and an admin token: `--hq URL` (env OUTPOST_HQ_URL, default
http://127.0.0.1:9700), `--token TOKEN` (env OUTPOST_HQ_ADMIN_TOKEN) and `--ca-file PEM` (env
OUTPOST_HQ_CA_FILE) for an HQ whose certificate the system does not trust.
"""

from __future__ import annotations

import functools
import json
import os
import sys
import threading
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, TypeVar, cast, get_args

import click
from click.core import ParameterSource
from rich import box
from rich.markup import escape
from rich.status import Status
from rich.table import Table

from outpost.cli.output import cell, console, format_option, print_csv, print_json, warn
from outpost.client import HQClient, JobWaitTimeout
from outpost.errors import OutpostError, UsageError
from outpost.hq.api_models import Agent, AgentWithToken, Job
from outpost.protocol import FINAL_STATES, JobKind, JobState

F = TypeVar("F", bound=Callable[..., Any])

DEFAULT_HQ_URL = "http://127.0.0.1:9700"
AGENT_COLUMNS = [
    "NAME",
    "ONLINE",
    "LAST SEEN",
    "VERSION",
    "TRANSPORT",
    "READ ONLY",
    "CONNECTIONS",
    "REVOKED",
]
CONNECTION_COLUMNS = ["AGENT", "NAME", "SLUG", "DRIVER", "ON AGENT", "UP"]
JOB_COLUMNS = ["ID", "AGENT", "CONNECTION", "KIND", "STATE", "CREATED", "SECONDS", "ERROR"]
INSPECT_COLUMNS = ["SCHEMA", "TABLE", "COLUMN", "TYPE", "NULLABLE", "DEFAULT", "KEY"]
TEST_COLUMNS = ["AGENT", "SLUG", "UP", "SERVER VERSION", "SECONDS", "ERROR"]


# -- HQ's address and token -----------------------------------------------------------------


@dataclass(frozen=True)
class HQTarget:
    """Where HQ is and how to log in; ``client()`` opens an :class:`HQClient`."""

    url: str
    token: str = field(repr=False)
    ca_file: str | None = None

    def client(self) -> HQClient:
        return HQClient(self.url, self.token, ca_file=self.ca_file)


def _hq_options(f: F) -> F:
    """Add --hq, --token and --ca-file to a command and hand it an ``HQTarget`` as ``hq``."""

    @functools.wraps(f)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        ctx = click.get_current_context()
        url = kwargs.pop("hq_url")
        token = kwargs.pop("hq_token")
        ca_file = kwargs.pop("hq_ca_file")
        if not token:
            raise UsageError(
                "No admin token: give --token or set OUTPOST_HQ_ADMIN_TOKEN (create one with "
                "`outpost hq admin create`)."
            )
        if ctx.get_parameter_source("hq_token") == ParameterSource.COMMANDLINE:
            warn(
                "a token given as --token VALUE is visible in the process list and shell "
                "history; prefer the OUTPOST_HQ_ADMIN_TOKEN environment variable."
            )
        return f(*args, hq=HQTarget(url, token, ca_file or None), **kwargs)

    options = [
        click.option(
            "--hq",
            "hq_url",
            metavar="URL",
            envvar="OUTPOST_HQ_URL",
            default=DEFAULT_HQ_URL,
            show_default=True,
            help="HQ's address (env OUTPOST_HQ_URL).",
        ),
        click.option(
            "--token",
            "hq_token",
            metavar="TOKEN",
            envvar="OUTPOST_HQ_ADMIN_TOKEN",
            help="An admin API token (env OUTPOST_HQ_ADMIN_TOKEN; a value given here is visible "
            "in the process list).",
        ),
        click.option(
            "--ca-file",
            "hq_ca_file",
            metavar="PEM",
            envvar="OUTPOST_HQ_CA_FILE",
            help="Trust this CA for HQ's TLS certificate (env OUTPOST_HQ_CA_FILE).",
        ),
    ]
    result: Any = wrapper
    for option in reversed(options):
        result = option(result)
    return cast(F, result)


class AgentConn(click.ParamType):  # type: ignore[type-arg]
    """``AGENT/CONN``: an agent's name and one of its connection slugs."""

    name = "AGENT/CONN"

    def convert(
        self, value: Any, param: click.Parameter | None, ctx: click.Context | None
    ) -> tuple[str, str]:
        if isinstance(value, tuple):
            return cast(tuple[str, str], value)
        agent, sep, slug = str(value).partition("/")
        if not sep or not agent or not slug or "/" in slug:
            self.fail(
                f"{value!r} is not AGENT/CONN; give the agent's name and the connection's slug, "
                "e.g. warehouse/shop.",
                param,
                ctx,
            )
        return agent, slug


AGENT_CONN = AgentConn()


class JobId(click.ParamType):  # type: ignore[type-arg]
    """A job's id: a UUID as HQ prints it."""

    name = "ID"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> str:
        try:
            return str(uuid.UUID(str(value).strip()))
        except ValueError:
            self.fail(
                f"{value!r} is not a job id (a UUID such as 5f0e8a7c-1b7d-4c55-9b43-0a0a0a0a0a0a); "
                "find it with `outpost hq jobs list`.",
                param,
                ctx,
            )


JOB_ID = JobId()


# -- formatting -----------------------------------------------------------------------------

#: Columns of HQ's tables kept on one line (a job id must be copyable whole); the others fold.
WHOLE = frozenset(
    {"ID", "KIND", "STATE", "CREATED", "SECONDS", "ONLINE", "LAST SEEN", "UP", "ON AGENT"}
)


def print_table(
    columns: list[str], rows: list[list[Any]] | list[tuple[Any, ...]], *, data: bool = False
) -> None:
    """``outpost.cli.output.print_table`` with headers kept whole and the WHOLE columns never
    folded; ``data``: a query result, where every column may fold."""
    # escape: errors and SQL values contain [brackets] that rich would eat as markup
    table = Table(box=box.ASCII2, show_lines=False, header_style="bold", pad_edge=True)
    texts = [[escape(cell(v)) for v in row] for row in rows]
    for i, column in enumerate(columns):
        width = len(column)
        if not data and column in WHOLE:
            width = max([width, *(len(t[i]) for t in texts)])
        table.add_column(column, overflow="fold", min_width=None if data else width)
    for text in texts:
        table.add_row(*text)
    console().print(table)


def when(ts: float | None) -> str:
    """A unix time as local date and time, to the second; empty for none."""
    if ts is None:
        return ""
    return datetime.fromtimestamp(ts).strftime("%Y-%m-%d %H:%M:%S")


def seconds(start: float | None, end: float | None) -> str:
    if start is None or end is None:
        return ""
    return f"{max(end - start, 0.0):.3f}"


def yes_no(value: bool | None) -> str:
    return "" if value is None else ("Yes" if value else "No")


def agent_row(agent: Agent) -> list[Any]:
    return [
        agent.name,
        yes_no(agent.online),
        when(agent.last_seen),
        agent.version,
        agent.transport,
        yes_no(agent.read_only),
        agent.connections,
        yes_no(agent.revoked),
    ]


def job_row(job: Job) -> list[Any]:
    return [
        job.id,
        job.agent,
        job.connection,
        job.kind,
        job.state,
        when(job.created_at),
        seconds(job.started_at, job.finished_at),
        job.error,
    ]


def _key(column: str, table: dict[str, Any]) -> str:
    """PK / FK markers of one column: ``PK``, ``FK public.customers(id)``."""
    marks: list[str] = []
    pk = table.get("primary_key") or {}
    if column in (pk.get("columns") or []):
        marks.append("PK")
    for fk in table.get("foreign_keys") or []:
        columns = list(fk.get("columns") or [])
        if column not in columns:
            continue
        referred = list(fk.get("referred_columns") or [])
        target = referred[columns.index(column)] if len(referred) == len(columns) else ""
        where = ".".join(p for p in (fk.get("referred_schema"), fk.get("referred_table")) if p)
        marks.append(f"FK {where}({target})" if target else f"FK {where}")
    return ", ".join(marks)


def inspect_rows(document: dict[str, Any]) -> list[list[Any]]:
    """One row per column of every table and view: SCHEMA, TABLE, COLUMN, TYPE, NULLABLE,
    DEFAULT, KEY (views are marked ``NAME (view)``)."""
    rows: list[list[Any]] = []
    for schema in document.get("schemas") or []:
        for kind in ("tables", "views"):
            for table in schema.get(kind) or []:
                label = table["name"] if kind == "tables" else f"{table['name']} (view)"
                for column in table.get("columns") or []:
                    rows.append(
                        [
                            schema.get("name"),
                            label,
                            column.get("name"),
                            column.get("type"),
                            yes_no(column.get("nullable")),
                            column.get("default"),
                            _key(str(column.get("name")), table),
                        ]
                    )
    return rows


def _plural(n: int, word: str) -> str:
    return f"{n} {word}{'' if n == 1 else 's'}"


def result_summary(job: Job) -> str:
    """A job's result in one line (an inspect document is summarised, not printed)."""
    result = job.result
    if result is None:
        return ""
    if job.kind == "inspect":
        schemas = result.get("schemas") or []
        tables = sum(len(s.get("tables") or []) for s in schemas)
        views = sum(len(s.get("views") or []) for s in schemas)
        return (
            f"{_plural(len(schemas), 'schema')}, {_plural(tables, 'table')}, "
            f"{_plural(views, 'view')} (see `outpost hq jobs show {job.id} --format json`)"
        )
    return json.dumps(result, default=str)


def job_fields(job: Job) -> list[tuple[str, Any]]:
    return [
        ("id", job.id),
        ("agent", job.agent),
        ("connection", job.connection),
        ("kind", job.kind),
        ("state", job.state),
        ("params", job.params or None),
        ("created", when(job.created_at)),
        ("sent", when(job.sent_at)),
        ("started", when(job.started_at)),
        ("finished", when(job.finished_at)),
        ("expires", when(job.expires_at)),
        ("timeout", f"{job.timeout:g} s"),
        ("attempts", job.attempts),
        ("error", job.error),
        ("result", result_summary(job)),
    ]


def login_line(url: str, token: str) -> str:
    return f"outpost login --hq {url} --token {token}"


def print_token(hq: HQTarget, created: AgentWithToken, fmt: str, headline: str) -> None:
    login = login_line(hq.url.strip().rstrip("/"), created.token)
    if fmt == "json":
        print_json({**created.model_dump(mode="json"), "login": login})
        return
    click.echo(headline)
    click.echo("Enrolment token (shown once; HQ keeps only its hash):")
    click.echo(f"  {created.token}")
    click.echo("On the agent's machine, run:")
    click.echo(f"  {login}")


# -- waiting for a job ----------------------------------------------------------------------


class Spinner:
    """A spinner on standard error while waiting for a job: on a terminal only, and only once
    the wait has lasted a second."""

    def __init__(self, label: str, delay: float = 1.0) -> None:
        self.label = label
        self.enabled = os.isatty(2)
        self._status: Status | None = None
        self._timer: threading.Timer | None = None
        self._lock = threading.Lock()
        self._closed = False
        self.delay = delay
        self.job: Job | None = None

    def __enter__(self) -> Spinner:
        if self.enabled:
            self._status = Status(self.label, console=console(stderr=True))
            self._timer = threading.Timer(self.delay, self._start)
            self._timer.daemon = True
            self._timer.start()
        return self

    def _start(self) -> None:
        with self._lock:
            if not self._closed and self._status is not None:
                self._status.start()

    def update(self, job: Job) -> None:
        self.job = job
        if self._status is not None:
            self._status.update(f"{self.label} ({job.state})")

    def __exit__(self, *exc: object) -> None:
        if self._timer is not None:
            self._timer.cancel()
        with self._lock:
            self._closed = True
            if self._status is not None:
                self._status.stop()


@contextmanager
def waiting(client: HQClient, label: str) -> Iterator[Spinner]:
    """Show a spinner while a job runs; say what became of the job if the wait ends early."""
    spinner = Spinner(label)
    try:
        with spinner:
            yield spinner
    except JobWaitTimeout as exc:
        job = exc.job
        reason = ""
        if job.state in ("queued", "sent"):
            try:
                online = client.agent(job.agent).online
            except OutpostError:
                online = True
            if not online:
                reason = f" (agent {job.agent!r} is offline)"
        raise OutpostError(
            f"{exc.message.removesuffix('.')}{reason}: see it later with `outpost hq jobs show "
            f"{job.id}`, or cancel it with `outpost hq jobs cancel {job.id}`."
        ) from None
    except KeyboardInterrupt:
        if spinner.job is None:
            click.echo("The job keeps going at HQ; see `outpost hq jobs list`.", err=True)
        else:
            job_id = spinner.job.id
            click.echo(
                f"Job {job_id} keeps going at HQ; cancel it with "
                f"`outpost hq jobs cancel {job_id}`.",
                err=True,
            )
        raise


# -- commands -------------------------------------------------------------------------------


@click.group()
def agents() -> None:
    """Agents enrolled with HQ: list, create (prints an enrolment token), revoke, re-issue."""


@agents.command("list")
@format_option()
@_hq_options
def agents_list(hq: HQTarget, fmt: str) -> None:
    """List agents: NAME, ONLINE, LAST SEEN, VERSION, TRANSPORT, READ ONLY, CONNECTIONS."""
    with hq.client() as client:
        found = client.agents()
    if fmt == "json":
        print_json([a.model_dump(mode="json") for a in found])
        return
    print_table(AGENT_COLUMNS, [agent_row(a) for a in found])


@agents.command("show")
@click.argument("name")
@format_option()
@_hq_options
def agents_show(hq: HQTarget, name: str, fmt: str) -> None:
    """Show one agent."""
    with hq.client() as client:
        agent = client.agent(name)
    if fmt == "json":
        print_json(agent.model_dump(mode="json"))
        return
    print_table(AGENT_COLUMNS, [agent_row(agent)])


@agents.command("create")
@click.argument("name")
@format_option()
@_hq_options
def agents_create(hq: HQTarget, name: str, fmt: str) -> None:
    """Create an agent and print its enrolment token (once) and the `outpost login` line.

    NAME: 1 to 63 letters, digits, '.', '_' or '-', starting with a letter or digit.
    """
    with hq.client() as client:
        created = client.create_agent(name)
    print_token(hq, created, fmt, f'Created agent "{created.agent.name}".')


@agents.command("revoke")
@click.argument("name")
@format_option()
@_hq_options
def agents_revoke(hq: HQTarget, name: str, fmt: str) -> None:
    """Revoke an agent's token; a connected agent is cut off within one heartbeat."""
    with hq.client() as client:
        agent = client.revoke_agent(name)
    if fmt == "json":
        print_json(agent.model_dump(mode="json"))
        return
    click.echo(
        f'Revoked the token of agent "{agent.name}"; give it a new one with '
        f"`outpost hq agents token {agent.name}`."
    )


@agents.command("token")
@click.argument("name")
@format_option()
@_hq_options
def agents_token(hq: HQTarget, name: str, fmt: str) -> None:
    """Issue a new enrolment token for an agent; the old one stops working."""
    with hq.client() as client:
        created = client.reissue_token(name)
    print_token(
        hq,
        created,
        fmt,
        f'New token for agent "{created.agent.name}"; the old one no longer works.',
    )


@click.group("connections")
def hq_connections() -> None:
    """Connections the agents report (names, slugs, drivers, UP; never credentials)."""


@hq_connections.command("list")
@click.option("--agent", metavar="NAME", help="Only this agent's connections.")
@format_option()
@_hq_options
def connections_list(hq: HQTarget, agent: str | None, fmt: str) -> None:
    """List connections: AGENT, NAME, SLUG, DRIVER, ON AGENT, UP."""
    with hq.client() as client:
        found = client.connections(agent)
    if fmt == "json":
        print_json([c.model_dump(mode="json") for c in found])
        return
    print_table(
        CONNECTION_COLUMNS,
        [(c.agent, c.name, c.slug, c.driver, yes_no(c.on_agent), yes_no(c.up)) for c in found],
    )


@hq_connections.command("declare")
@click.argument("target", metavar="AGENT/CONN", type=AGENT_CONN)
@click.option("--name", required=True, help="The connection's name.")
@click.option("--driver", required=True, help="Its driver (postgres, mysql, sqlite, ...).")
@format_option()
@_hq_options
def connections_declare(
    hq: HQTarget, target: tuple[str, str], name: str, driver: str, fmt: str
) -> None:
    """Declare a connection at HQ; it shows ON AGENT = No until the agent reports it."""
    agent, slug = target
    with hq.client() as client:
        conn = client.declare_connection(agent, slug, name, driver)
    if fmt == "json":
        print_json(conn.model_dump(mode="json"))
        return
    click.echo(f'Declared connection "{conn.name}" ({conn.agent}/{conn.slug}).')


@hq_connections.command("delete")
@click.argument("target", metavar="AGENT/CONN", type=AGENT_CONN)
@_hq_options
def connections_delete(hq: HQTarget, target: tuple[str, str]) -> None:
    """Remove a connection declared at HQ."""
    agent, slug = target
    with hq.client() as client:
        client.delete_connection(agent, slug)
    click.echo(f"Deleted connection {agent}/{slug} at HQ.")


def _wait_option(default_help: str) -> Callable[[F], F]:
    return click.option(
        "--wait",
        type=click.FloatRange(min=0),
        default=None,
        metavar="SECONDS",
        help=f"How long to wait for the job to finish ({default_help}); it keeps going at HQ "
        "after that.",
    )


@click.command("query")
@click.argument("target", metavar="AGENT/CONN", type=AGENT_CONN)
@click.argument("sql")
@click.option(
    "--param",
    "params",
    multiple=True,
    metavar="VALUE",
    help="A query parameter, in order (the driver's placeholder: %s for postgres "
    "and mysql, ? for sqlite and csv).",
)
@click.option(
    "--max-rows", type=click.IntRange(1, 10_000_000), default=1000, show_default=True,
    help="Return at most this many rows.",
)  # fmt: skip
@click.option(
    "--timeout", type=click.FloatRange(min=0, min_open=True, max=86_400), default=30.0,
    show_default=True, help="Seconds the query may run on the agent.",
)  # fmt: skip
@click.option("--write", is_flag=True, help="Allow writes (refused when the agent is read_only).")
@_wait_option("default: 60, or --timeout + 10 when longer")
@format_option(("table", "json", "csv"))
@_hq_options
def hq_query(
    hq: HQTarget,
    target: tuple[str, str],
    sql: str,
    params: tuple[str, ...],
    max_rows: int,
    timeout: float,
    write: bool,
    wait: float | None,
    fmt: str,
) -> None:
    """Run SQL on an agent's connection through HQ and print the rows (SQL "-" reads stdin).

    Runs in a read-only transaction unless --write is given. Exit 1 when the job fails.
    """
    agent, slug = target
    if sql == "-":
        sql = sys.stdin.read()
    if not sql.strip():
        raise UsageError("The SQL text is empty; give a statement to run.")
    wait = max(60.0, timeout + 10) if wait is None else wait
    with hq.client() as client, waiting(client, f"Waiting for {agent}/{slug}") as spinner:
        outcome = client.run_query(
            agent,
            slug,
            sql,
            list(params) or None,
            max_rows=max_rows,
            timeout=timeout,
            wait=wait,
            allow_writes=write,
            on_poll=spinner.update,
        )
    if fmt == "json":
        print_json(
            {
                "job_id": outcome.job.id,
                "agent": agent,
                "connection": slug,
                "columns": outcome.columns,
                "rows": outcome.rows,
                "row_count": outcome.row_count,
                "truncated": outcome.truncated,
                "duration_seconds": outcome.duration_seconds,
                "notices": outcome.notices,
            }
        )
        return
    if fmt == "csv":
        print_csv(outcome.columns, outcome.rows)
    elif outcome.columns:
        print_table(outcome.columns, outcome.rows, data=True)
        click.echo(f"({_plural(len(outcome.rows), 'row')})", err=True)
    else:
        click.echo(f"OK, {outcome.row_count} row(s) affected.")
    for notice in outcome.notices:
        click.echo(f"Notice: {notice}", err=True)
    if outcome.truncated:
        warn(f"the result was cut at {len(outcome.rows)} rows; raise --max-rows to see more.")


@click.command("inspect")
@click.argument("target", metavar="AGENT/CONN", type=AGENT_CONN)
@click.option(
    "--schema", "schemas", multiple=True, metavar="NAME", help="Only this schema (repeatable)."
)
@_wait_option("default: 60")
@format_option()
@_hq_options
def hq_inspect(
    hq: HQTarget, target: tuple[str, str], schemas: tuple[str, ...], wait: float | None, fmt: str
) -> None:
    """Inspect a connection's schema through HQ: tables, views, columns, keys.

    The table format lists one row per column; --format json prints the whole document
    (indexes, foreign keys, view definitions).
    """
    agent, slug = target
    with hq.client() as client, waiting(client, f"Inspecting {agent}/{slug}") as spinner:
        document = client.inspect(
            agent, slug, list(schemas) or None, wait=60.0 if wait is None else wait,
            on_poll=spinner.update,
        )  # fmt: skip
    if fmt == "json":
        print_json(document)
        return
    print_table(INSPECT_COLUMNS, inspect_rows(document))


@click.command("test")
@click.argument("target", metavar="AGENT/CONN", type=AGENT_CONN)
@_wait_option("default: 60")
@format_option()
@_hq_options
def hq_test(hq: HQTarget, target: tuple[str, str], wait: float | None, fmt: str) -> None:
    """Have the agent connect to one of its connections (exit 1 if it is down)."""
    agent, slug = target
    with hq.client() as client, waiting(client, f"Testing {agent}/{slug}") as spinner:
        report = client.test(
            agent, slug, wait=60.0 if wait is None else wait, on_poll=spinner.update
        )
    if fmt == "json":
        print_json({"agent": agent, "connection": slug, **report})
    else:
        duration = report.get("duration_seconds")
        print_table(
            TEST_COLUMNS,
            [
                [
                    agent,
                    slug,
                    yes_no(report.get("up")),
                    report.get("server_version"),
                    "" if duration is None else f"{float(duration):.3f}",
                    report.get("error"),
                ]
            ],
        )
    if not report.get("up"):
        raise click.exceptions.Exit(1)


@click.group()
def jobs() -> None:
    """Jobs HQ has queued for agents: list, show, rows, cancel."""


@jobs.command("list")
@click.option("--agent", metavar="NAME", help="Only this agent's jobs.")
@click.option("--connection", metavar="SLUG", help="Only jobs on this connection slug.")
@click.option(
    "--state", type=click.Choice(list(get_args(JobState))), help="Only jobs in this state."
)
@click.option("--kind", type=click.Choice(list(get_args(JobKind))), help="Only jobs of this kind.")
@click.option(
    "--limit", type=click.IntRange(1, 1000), default=50, show_default=True,
    help="At most this many jobs, newest first.",
)  # fmt: skip
@format_option()
@_hq_options
def jobs_list(
    hq: HQTarget,
    agent: str | None,
    connection: str | None,
    state: JobState | None,
    kind: JobKind | None,
    limit: int,
    fmt: str,
) -> None:
    """List jobs, newest first: ID, AGENT, CONNECTION, KIND, STATE, CREATED, SECONDS, ERROR."""
    with hq.client() as client:
        found = client.jobs(agent=agent, connection=connection, state=state, kind=kind, limit=limit)
    if fmt == "json":
        print_json([j.model_dump(mode="json") for j in found])
        return
    print_table(JOB_COLUMNS, [job_row(j) for j in found])


@jobs.command("show")
@click.argument("job_id", metavar="ID", type=JOB_ID)
@click.option(
    "--wait", type=click.FloatRange(0, 60), default=None, metavar="SECONDS",
    help="Wait up to this long (at most 60) for the job to finish first.",
)  # fmt: skip
@format_option()
@_hq_options
def jobs_show(hq: HQTarget, job_id: str, wait: float | None, fmt: str) -> None:
    """Show one job: its state, times, parameters, error and result."""
    with hq.client() as client:
        job = client.job(job_id, wait=wait)
    if fmt == "json":
        print_json(job.model_dump(mode="json"))
        return
    print_table(["FIELD", "VALUE"], job_fields(job))


@jobs.command("rows")
@click.argument("job_id", metavar="ID", type=JOB_ID)
@format_option(("table", "json", "csv"))
@_hq_options
def jobs_rows(hq: HQTarget, job_id: str, fmt: str) -> None:
    """Print every row of a finished query job (paged out of HQ)."""
    with hq.client() as client:
        job = client.job(job_id)
        if job.kind != "query":
            article = "an" if job.kind[0] in "aeiou" else "a"
            raise UsageError(
                f"Job {job_id} is {article} {job.kind} job; only query jobs have rows."
            )
        if job.state not in FINAL_STATES:
            raise OutpostError(
                f"Job {job_id} is still {job.state}; its rows come when it has finished (wait "
                f"for it with `outpost hq jobs show {job_id} --wait 60`)."
            )
        client.finished(job)  # a failed job: its error
        columns = [str(c) for c in (job.result or {}).get("columns") or []]
        rows = list(client.iter_rows(job_id)) if columns else []
    if fmt == "json":
        print_json({"job_id": job_id, "columns": columns, "rows": rows})
    elif fmt == "csv":
        print_csv(columns, rows)
    else:
        print_table(columns, rows, data=True)
        click.echo(f"({_plural(len(rows), 'row')})", err=True)


@jobs.command("cancel")
@click.argument("job_id", metavar="ID", type=JOB_ID)
@format_option()
@_hq_options
def jobs_cancel(hq: HQTarget, job_id: str, fmt: str) -> None:
    """Cancel a job: a queued one at once, a running one once its agent has stopped it."""
    with hq.client() as client:
        job = client.cancel(job_id)
    if fmt == "json":
        print_json(job.model_dump(mode="json"))
        return
    if job.state == "cancelled":
        click.echo(f"Cancelled job {job.id}.")
    else:
        click.echo(f"Asked agent {job.agent!r} to cancel job {job.id} (now {job.state}).")


def register_client_commands(group: click.Group) -> None:
    """Add the API client commands to the `hq` group."""
    for command in (agents, hq_connections, hq_query, hq_inspect, hq_test, jobs):
        group.add_command(command)
