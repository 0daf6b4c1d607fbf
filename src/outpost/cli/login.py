"""`outpost login --hq URL --token TOKEN`: associate this agent with one Outpost HQ."""

from __future__ import annotations

import contextlib
import json
import os
from pathlib import Path

import click
from click.core import ParameterSource

from outpost.cli.context import CliContext, pass_cli
from outpost.cli.output import format_option, print_json, print_table, warn
from outpost.crypto import load_key_file
from outpost.errors import UsageError
from outpost.link.association import ASSOCIATION_FILE, TOKEN_FILE
from outpost.link.login import Endpoint
from outpost.link.login import login as do_login


def read_token(
    value: str | None,
    source: ParameterSource | None,
    file: str | None,
    env: str | None,
    configured: str | None,
) -> str:
    """The token from one of --token-file, --token-env, --token, hq.token, or a prompt."""
    given = [
        n
        for n, v in (("--token", value), ("--token-file", file), ("--token-env", env))
        if v is not None
    ]
    if len(given) > 1:
        raise UsageError(f"Give the token one way only, not {' and '.join(given)}.")
    token: str | None
    if file is not None:
        try:
            token = Path(file).expanduser().read_text().strip()
        except OSError as exc:
            raise UsageError(f"Cannot read --token-file {file}: {exc.strerror}.") from None
    elif env is not None:
        if env not in os.environ:
            raise UsageError(f"--token-env {env}: environment variable {env} is not set.")
        token = os.environ[env].strip()
    elif value is not None:
        if source == ParameterSource.COMMANDLINE:
            warn(
                "a token given as --token VALUE is visible in the process list and shell "
                "history; prefer --token alone (prompt), --token-file or --token-env."
            )
        token = value.strip()
    elif configured is not None:
        token = configured.strip()
    else:
        token = str(click.prompt("Agent token", hide_input=True)).strip()
    if not token:
        raise UsageError(
            "The agent token is empty; give the token HQ showed when the agent was created."
        )
    return token


def running_agent_pid(data_dir: Path) -> int | None:
    """The pid of `outpost serve` on this data dir, if one runs."""
    from outpost.api.runtime import API_FILE

    with contextlib.suppress(OSError, ValueError, KeyError, TypeError):
        pid = int(json.loads((data_dir / API_FILE).read_text())["pid"])
        os.kill(pid, 0)
        return pid
    return None


@click.command()
@click.option(
    "--hq",
    "hq_url",
    metavar="URL",
    help="HQ's address, e.g. https://hq.example.com (default: hq.url).",
)
@click.option(
    "--token",
    metavar="TOKEN",
    prompt="Agent token",
    hide_input=True,
    prompt_required=False,
    default=None,
    show_default=False,
    help="The agent token HQ showed once; give the flag alone to be prompted (a value given "
    "here is visible in the process list). Default: hq.token / OUTPOST_HQ_TOKEN, else a prompt.",
)
@click.option("--token-file", metavar="PATH", help="Read the token from this file.")
@click.option("--token-env", metavar="NAME", help="Read the token from this environment variable.")
@click.option(
    "--ca-file",
    metavar="PEM",
    help="Verify HQ's certificate with this CA instead of the system CAs (default: hq.ca_file).",
)
@click.option(
    "--allow-insecure",
    is_flag=True,
    help="Allow plain http:// to an HQ that is not on loopback (the token and jobs then cross "
    "the network unencrypted).",
)
@format_option()
@pass_cli
@click.pass_context
def login(
    ctx: click.Context,
    cli: CliContext,
    hq_url: str | None,
    token: str | None,
    token_file: str | None,
    token_env: str | None,
    ca_file: str | None,
    allow_insecure: bool,
    fmt: str,
) -> None:
    """Associate this agent with an Outpost HQ, once and for good.

    Logs in with the agent token an HQ admin created, pins HQ's signing key, and stores the
    association in the data dir (hq.json) and the token sealed with the agent key (hq.token).
    Logging in again to the same HQ with a re-issued token is fine; another HQ is refused.
    A running agent picks the login up at its next reconnect, or at once on SIGHUP.
    """
    cfg = cli.loaded().config
    url = hq_url or cfg.hq.url
    if not url:
        raise UsageError("Give HQ's address with --hq URL (or set hq.url).")
    configured = cfg.hq.token.get_secret_value() if cfg.hq.token is not None else None
    secret = read_token(token, ctx.get_parameter_source("token"), token_file, token_env, configured)
    key = load_key_file(cfg.key_path) if cfg.key_path else None
    from outpost.state.store import prepare_data_dir

    data_dir = prepare_data_dir(cfg.data_dir)
    endpoint = Endpoint(
        url,
        ca_file or cfg.hq.ca_file,
        allow_insecure or cfg.hq.allow_insecure,
    )
    association = do_login(data_dir, key, endpoint, secret)
    pid = running_agent_pid(data_dir)
    if key is None:
        warn(
            f"no key_path is set, so the token is stored unencrypted in {data_dir / TOKEN_FILE} "
            "(mode 0600); set key_path and log in again to seal it."
        )
    if fmt == "json":
        print_json(
            {
                **association.model_dump(mode="json", exclude={"associated_at"}),
                "association_file": str(data_dir / ASSOCIATION_FILE),
                "token_file": str(data_dir / TOKEN_FILE),
                "token_sealed": key is not None,
                "running_agent_pid": pid,
            }
        )
        return
    print_table(
        ["HQ", "HQ ID", "AGENT", "SIGNING KEY"],
        [[association.url, association.hq_id, association.agent_name, association.signing_key]],
    )
    click.echo(
        f"Logged in to HQ at {association.url} as agent {association.agent_name!r}; "
        "HQ's signing key is pinned."
    )
    if pid is not None:
        click.echo(
            f"The running agent (pid {pid}) connects at its next reconnect; "
            f"`kill -HUP {pid}` makes it connect now."
        )
    else:
        click.echo("Run `outpost serve` to connect.")
