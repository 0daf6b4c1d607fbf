"""`outpost query SLUG "SQL"`."""

from __future__ import annotations

import sys

import click

from outpost.cli.context import CliContext, pass_cli
from outpost.cli.output import print_csv, print_json, print_table, warn
from outpost.errors import UsageError


@click.command()
@click.argument("slug")
@click.argument("sql")
@click.option(
    "--format",
    "fmt",
    type=click.Choice(["table", "json", "csv"]),
    default="table",
    show_default=True,
    help="Output format.",
)
@click.option(
    "--max-rows",
    type=click.IntRange(min=1),
    default=None,
    help="Return at most this many rows (default: query.max_rows, 1000).",
)
@click.option(
    "--timeout",
    type=click.FloatRange(min=0, min_open=True),
    default=None,
    help="Statement timeout in seconds (default: query.timeout, 30).",
)
@click.option(
    "--param",
    "params",
    multiple=True,
    metavar="VALUE",
    help="A query parameter, in order (the driver's placeholder: %s for postgres "
    "and mysql, ? for sqlite and csv).",
)
@click.option("--write", is_flag=True, help="Allow writes (refused when the agent is read_only).")
@pass_cli
def query(
    cli: CliContext,
    slug: str,
    sql: str,
    fmt: str,
    max_rows: int | None,
    timeout: float | None,
    params: tuple[str, ...],
    write: bool,
) -> None:
    """Run SQL on a connection and print the rows (SQL "-" reads standard input).

    Runs in a read-only transaction unless --write is given.
    """
    if sql == "-":
        sql = sys.stdin.read()
    if not sql.strip():
        raise UsageError("The SQL text is empty; give a statement to run.")
    with cli.backend() as backend:
        report = backend.query(
            slug,
            sql,
            list(params) or None,
            max_rows=max_rows,
            timeout=timeout,
            allow_writes=write,
        )
    if fmt == "json":
        print_json(report.model_dump(mode="json"))
        return
    if fmt == "csv":
        print_csv(report.columns, report.rows)
    elif report.columns:
        print_table(report.columns, report.rows)
        click.echo(f"({len(report.rows)} row{'s' if len(report.rows) != 1 else ''})", err=True)
    else:
        click.echo(f"OK, {report.row_count} row(s) affected.")
    if report.truncated:
        warn(f"the result was cut at {len(report.rows)} rows; raise --max-rows to see more.")
