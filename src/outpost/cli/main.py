"""The `outpost` command: noun-verb groups, one module per group."""

from __future__ import annotations

import sys
import traceback

import click

from outpost import __version__
from outpost.cli.backup import backup
from outpost.cli.config_cmd import config
from outpost.cli.connections import connections
from outpost.cli.context import CliContext
from outpost.cli.hq import hq
from outpost.cli.key import key
from outpost.cli.login import login
from outpost.cli.misc import completion, status
from outpost.cli.pooler import pooler
from outpost.cli.query import query
from outpost.cli.serve import serve
from outpost.errors import OutpostError

_DEBUG = {"on": False}


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.option(
    "-c",
    "--config",
    "config_path",
    metavar="PATH",
    help="Config file (default: OUTPOST_CONFIG, /etc/outpost/agent.json as root, else "
    "$XDG_CONFIG_HOME/outpost/agent.json, ~/.config/outpost/agent.json, "
    "/etc/outpost/agent.json).",
)
@click.option("--debug", is_flag=True, help="Show tracebacks on errors.")
@click.version_option(__version__, "-V", "--version", prog_name="outpost")
@click.pass_context
def cli(ctx: click.Context, config_path: str | None, debug: bool) -> None:
    """Outpost: a self-hosted database agent.

    It keeps database credentials encrypted next to the databases, dials out to Outpost HQ,
    and runs signed jobs there.
    """
    _DEBUG["on"] = debug
    ctx.obj = CliContext(config_arg=config_path, debug=debug)


for command in (
    config,
    key,
    connections,
    query,
    backup,
    serve,
    login,
    hq,
    pooler,
    status,
    completion,
):
    cli.add_command(command)


def main(argv: list[str] | None = None) -> None:
    """Entry point: exit 0 on success, 1 on failure, 2 on a usage error."""
    try:
        result = cli.main(args=argv, prog_name="outpost", standalone_mode=False)
    except click.exceptions.Exit as exc:
        sys.exit(exc.exit_code)
    except click.exceptions.Abort:
        click.echo("Aborted.", err=True)
        sys.exit(1)
    except click.ClickException as exc:
        exc.show()
        sys.exit(exc.exit_code)
    except OutpostError as exc:
        if _DEBUG["on"]:
            traceback.print_exc()
        click.echo(f"Error: {exc.message}", err=True)
        sys.exit(exc.exit_code)
    except KeyboardInterrupt:
        click.echo("Interrupted.", err=True)
        sys.exit(130)
    except Exception as exc:
        if _DEBUG["on"]:
            traceback.print_exc()
        click.echo(
            f"Error: unexpected {type(exc).__name__}: {exc} (run with --debug for details).",
            err=True,
        )
        sys.exit(1)
    sys.exit(result if isinstance(result, int) else 0)
