"""`outpost connections add|list|show|edit|delete|test`.

`connections add DRIVER` has one subcommand per registered driver, its flags built from the
driver's options model, so `outpost connections add postgres --help` lists them with their
defaults.
"""

from __future__ import annotations

import os
import types
import typing
from pathlib import Path
from typing import Any

import click
from click.core import ParameterSource
from pydantic.fields import FieldInfo
from pydantic_core import PydanticUndefined

from outpost.cli.context import CliContext, pass_cli
from outpost.cli.output import format_option, print_json, print_table, warn
from outpost.drivers import driver_names, get_driver
from outpost.drivers.base import Driver
from outpost.errors import UsageError

LIST_COLUMNS = ["NAME", "SLUG", "DRIVER", "ON AGENT", "UP"]


def read_password(
    value: str | None, source: ParameterSource | None, file: str | None, env: str | None
) -> str | None:
    """The password from exactly one of: prompt, --password-file, --password-env, --password."""
    given = [
        n
        for n, v in (("--password", value), ("--password-file", file), ("--password-env", env))
        if v is not None
    ]
    if len(given) > 1:
        raise UsageError(f"Give the password one way only, not {' and '.join(given)}.")
    if file is not None:
        try:
            return Path(file).expanduser().read_text().rstrip("\r\n")
        except OSError as exc:
            raise UsageError(f"Cannot read --password-file {file}: {exc.strerror}.") from None
    if env is not None:
        if env not in os.environ:
            raise UsageError(f"--password-env {env}: environment variable {env} is not set.")
        return os.environ[env]
    if value is not None and source == ParameterSource.COMMANDLINE:
        warn(
            "a password given as --password VALUE is visible in the process list and shell "
            "history; prefer --password alone (prompt), --password-file or --password-env."
        )
    return value


def _base_type(annotation: Any) -> Any:
    """Strip Optional[...] from a field annotation."""
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(annotation) if a is not type(None)]
        if len(args) == 1:
            return args[0]
    return annotation


def _click_type(annotation: Any) -> Any:
    base = _base_type(annotation)
    if typing.get_origin(base) is typing.Literal:
        return click.Choice([str(a) for a in typing.get_args(base)])
    if base is int:
        return click.INT
    if base is float:
        return click.FLOAT
    return click.STRING


def _help(info: FieldInfo) -> str:
    text = info.description or ""
    if info.default is not PydanticUndefined and info.default is not None:
        text += f"  [default: {info.default}]"
    elif info.is_required():
        text += "  [required]"
    return text


def _option_flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _driver_command(driver_cls: type[Driver]) -> click.Command:
    fields = driver_cls.options_model.model_fields
    password = driver_cls.password_option
    params: list[click.Parameter] = [
        click.Option(["--name"], required=True, help="A unique name for the connection."),
    ]
    for name, info in fields.items():
        base = _base_type(info.annotation)
        if name == password:
            params.append(
                click.Option(
                    [_option_flag(name), "password"],
                    prompt="Password",
                    hide_input=True,
                    prompt_required=False,
                    default=None,
                    show_default=False,
                    help="Password; give the flag alone to be prompted (a value given here is "
                    "visible in the process list).",
                )
            )
            params.append(
                click.Option(
                    ["--password-file"], metavar="PATH", help="Read the password from this file."
                )
            )
            params.append(
                click.Option(
                    ["--password-from", "password_from"],
                    metavar="SOURCE",
                    help="Fetch the password when connecting instead of storing it: env:NAME, "
                    "file:/path, aws-secretsmanager:NAME[#.path], aws-rds-iam, "
                    "gcp-secretmanager:projects/P/secrets/S[#.path], gcp-cloudsql-iam, "
                    "vault:MOUNT/PATH#field, vault-db:MOUNT/creds/ROLE.",
                )
            )
            params.append(
                click.Option(
                    ["--password-env"],
                    metavar="NAME",
                    help="Read the password from this environment variable.",
                )
            )
        elif base is bool:
            params.append(
                click.Option(
                    [f"{_option_flag(name)}/--no-{name.replace('_', '-')}", name],
                    default=None,
                    show_default=False,
                    help=_help(info),
                )
            )
        else:
            params.append(
                click.Option(
                    [_option_flag(name), name],
                    type=_click_type(info.annotation),
                    default=None,
                    show_default=False,
                    help=_help(info),
                )
            )
    params.append(
        click.Option(
            ["--no-verify"], is_flag=True, help="Save without connecting to check the options."
        )
    )
    params.append(
        click.Option(
            ["--format", "fmt"],
            type=click.Choice(["table", "json"]),
            default="table",
            show_default=True,
            help="Output format.",
        )
    )

    def callback(**kwargs: Any) -> None:
        ctx = click.get_current_context()
        cli = ctx.find_object(CliContext)
        assert cli is not None
        name = kwargs.pop("name")
        verify = not kwargs.pop("no_verify")
        fmt = kwargs.pop("fmt")
        options: dict[str, Any] = {}
        if password:
            pw = read_password(
                kwargs.pop("password", None),
                ctx.get_parameter_source("password"),
                kwargs.pop("password_file", None),
                kwargs.pop("password_env", None),
            )
            if pw is not None:
                options[password] = pw
            reference = kwargs.pop("password_from", None)
            if reference is not None:
                options["password_from"] = reference
        options.update({k: v for k, v in kwargs.items() if v is not None})
        with cli.backend() as backend:
            info = backend.add_connection(driver_cls.name, name, options, verify=verify)
        if fmt == "json":
            print_json(info.model_dump(mode="json"))
        else:
            click.echo(f'Added connection "{info.name}" (slug {info.slug}).')

    doc = (driver_cls.__doc__ or "").strip().splitlines()
    article = "an" if driver_cls.display_name[0].lower() in "aeiou" else "a"
    summary = f"Add {article} {driver_cls.display_name} connection."
    return click.Command(
        driver_cls.name,
        params=params,
        callback=callback,
        help=f"{summary} " + (doc[0] if doc else ""),
        short_help=summary,
    )


class DriverGroup(click.Group):
    """`connections add DRIVER`: one subcommand per registered driver."""

    def list_commands(self, ctx: click.Context) -> list[str]:
        return driver_names()

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        if cmd_name not in driver_names():
            return None
        return _driver_command(get_driver(cmd_name))

    def resolve_command(
        self, ctx: click.Context, args: list[str]
    ) -> tuple[str | None, click.Command | None, list[str]]:
        name = args[0] if args else ""
        if name and not name.startswith("-") and name not in driver_names():
            raise click.UsageError(
                f"Unknown driver {name!r}; choose one of: {', '.join(driver_names())}.", ctx
            )
        return super().resolve_command(ctx, args)


@click.group()
def connections() -> None:
    """Manage the database connections stored on this agent."""


connections.add_command(
    DriverGroup(
        "add",
        help="Add a connection: `outpost connections add DRIVER --name NAME ...`. "
        "The agent connects to check the options first; nothing is saved on failure.",
    )
)


def _up(value: bool | None) -> str:
    return "" if value is None else ("Yes" if value else "No")


@connections.command("list")
@format_option()
@pass_cli
def list_(cli: CliContext, fmt: str) -> None:
    """List connections: NAME, SLUG, DRIVER, ON AGENT, UP."""
    with cli.backend() as backend:
        infos = backend.list_connections()
    if fmt == "json":
        print_json([i.model_dump(mode="json") for i in infos])
        return
    print_table(
        LIST_COLUMNS,
        [(i.name, i.slug, i.driver_name, "Yes" if i.on_agent else "No", _up(i.up)) for i in infos],
    )


@connections.command()
@click.argument("slug")
@format_option()
@pass_cli
def show(cli: CliContext, slug: str, fmt: str) -> None:
    """Show one connection and its options (secrets replaced by ********)."""
    with cli.backend() as backend:
        detail = backend.get_connection(slug)
    if fmt == "json":
        print_json(detail.model_dump(mode="json"))
        return
    rows: list[tuple[str, Any]] = [
        ("name", detail.name),
        ("slug", detail.slug),
        ("driver", detail.driver_name),
        ("encrypted", "yes" if detail.encrypted else "no"),
        ("up", _up(detail.up)),
    ]
    if detail.error:
        rows.append(("last error", detail.error))
    rows += [(f"--{k.replace('_', '-')}", v) for k, v in sorted(detail.options.items())]
    print_table(["FIELD", "VALUE"], rows)


def _parse_option_args(args: list[str]) -> tuple[dict[str, Any], bool, dict[str, str | None]]:
    """Parse `--key value`, `--key=value`, `--reset key`, `--no-verify` and password flags."""
    changes: dict[str, Any] = {}
    password: dict[str, str | None] = {}
    verify = True
    i = 0
    while i < len(args):
        arg = args[i]
        if not arg.startswith("--") or arg == "--":
            raise UsageError(f"Unexpected argument {arg!r}; give options as --OPTION VALUE.")
        flag, eq, inline = arg[2:].partition("=")
        key = flag.replace("-", "_")
        if key == "no_verify":
            verify = False
            i += 1
            continue
        if key == "password" and not eq and (i + 1 == len(args) or args[i + 1].startswith("--")):
            password["prompt"] = click.prompt("Password", hide_input=True)
            i += 1
            continue
        if eq:
            value = inline
            i += 1
        else:
            if i + 1 >= len(args):
                raise UsageError(f"Option --{flag} needs a value.")
            value = args[i + 1]
            i += 2
        if key == "reset":
            changes[value.replace("-", "_")] = None
        elif key in ("password", "password_file", "password_env"):
            password[key] = value
        else:
            changes[key] = value
    return changes, verify, password


@connections.command(
    context_settings={"ignore_unknown_options": True, "allow_interspersed_args": False}
)
@click.argument("slug")
@click.argument("what", type=click.Choice(["name", "options"]))
@click.argument("args", nargs=-1, type=click.UNPROCESSED)
@pass_cli
def edit(cli: CliContext, slug: str, what: str, args: tuple[str, ...]) -> None:
    """Rename a connection or change some of its options.

    \b
    outpost connections edit SLUG name 'New name'
    outpost connections edit SLUG options --user readonly --password
    outpost connections edit SLUG options --reset ssl_root_cert --no-verify
    """
    if what == "name":
        if len(args) != 1:
            raise UsageError("Give exactly one new name: connections edit SLUG name NEW_NAME.")
        with cli.backend() as backend:
            info = backend.rename_connection(slug, args[0])
        click.echo(f'Saved connection "{info.name}".')
        return
    changes, verify, pw = _parse_option_args(list(args))
    if pw:
        if "prompt" in pw:
            value = read_password(pw["prompt"], ParameterSource.PROMPT, None, None)
        else:
            value = read_password(
                pw.get("password"),
                ParameterSource.COMMANDLINE,
                pw.get("password_file"),
                pw.get("password_env"),
            )
        changes["password"] = value
    with cli.backend() as backend:
        info = backend.edit_connection_options(slug, changes, verify=verify)
    click.echo(f'Saved connection "{info.name}".')


@connections.command()
@click.argument("slug")
@pass_cli
def delete(cli: CliContext, slug: str) -> None:
    """Delete a connection and its stored options."""
    with cli.backend() as backend:
        info = backend.delete_connection(slug)
    click.echo(f'Deleted connection "{info.name}".')


@connections.command()
@click.argument("slug")
@format_option()
@pass_cli
def test(cli: CliContext, slug: str, fmt: str) -> None:
    """Connect with the stored options and report the server version (exit 1 if down)."""
    with cli.backend() as backend:
        report = backend.test_connection(slug)
    if fmt == "json":
        print_json(report.model_dump(mode="json"))
    else:
        columns = ["NAME", "SLUG", "UP", "SERVER VERSION", "SECONDS", "ERROR"]
        row = [
            report.name,
            report.slug,
            _up(report.up),
            report.server_version,
            f"{report.duration_seconds:.3f}",
            report.error,
        ]
        if report.password_source:
            columns.insert(5, "PASSWORD FROM")
            row.insert(5, report.password_source)
        print_table(columns, [row])
    if not report.up:
        raise click.exceptions.Exit(1)
