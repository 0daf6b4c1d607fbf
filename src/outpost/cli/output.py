"""Printing data: tables with rich (in the ASCII shape users know), JSON and CSV."""

from __future__ import annotations

import csv
import json
import sys
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

import click
from rich import box
from rich.console import Console
from rich.markup import escape
from rich.table import Table

F = TypeVar("F", bound=Callable[..., Any])

FORMATS = ("table", "json")


def format_option(choices: Sequence[str] = FORMATS) -> Callable[[F], F]:
    return click.option(
        "--format",
        "fmt",
        type=click.Choice(list(choices)),
        default="table",
        show_default=True,
        help="Output format.",
    )


def console(stderr: bool = False) -> Console:
    return Console(stderr=stderr, soft_wrap=True, highlight=False)


def cell(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, bool):
        return "Yes" if value else "No"
    if isinstance(value, dict | list):
        return json.dumps(value)
    return str(value)


def print_table(columns: Sequence[str], rows: Sequence[Sequence[Any]]) -> None:
    table = Table(box=box.ASCII2, show_lines=False, header_style="bold", pad_edge=True)
    for column in columns:
        table.add_column(column, overflow="fold")
    for row in rows:
        # escape: database and cloud errors contain [brackets] that rich would eat as markup
        table.add_row(*(escape(cell(v)) for v in row))
    console().print(table)


def print_json(data: Any) -> None:
    click.echo(json.dumps(data, indent=2, default=str))


def print_csv(columns: Sequence[str], rows: Sequence[Sequence[Any]]) -> None:
    writer = csv.writer(sys.stdout, lineterminator="\n")
    writer.writerow(columns)
    for row in rows:
        writer.writerow(["" if v is None else v for v in row])


def warn(message: str) -> None:
    click.echo(f"Warning: {message}", err=True)
