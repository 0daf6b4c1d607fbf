"""`outpost status` and `outpost completion`."""

from __future__ import annotations

import time

import click
from click.shell_completion import get_completion_class

from outpost.cli.context import CliContext, pass_cli
from outpost.cli.output import format_option, print_json, print_table


@click.command()
@format_option()
@pass_cli
def status(cli: CliContext, fmt: str) -> None:
    """Show the agent's state: data dir, encryption, connections, warnings."""
    with cli.backend() as backend:
        st = backend.status()
    if fmt == "json":
        print_json(st.model_dump(mode="json"))
        return
    started = (
        time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(st.started_at))
        if st.started_at
        else "not running"
    )
    rows = [
        ("version", st.version),
        ("config file", st.config_file or "(built-in defaults)"),
        ("data dir", st.data_dir),
        ("encryption", f"on ({st.key_path})" if st.encrypted else "OFF (no key_path)"),
        ("read only", "yes" if st.read_only else "no"),
        ("agent", f"running since {started} at {st.api_url}" if st.api_url else started),
        ("connections", f"{st.connections} ({st.connections_up} up)"),
    ]
    print_table(["", "VALUE"], rows)
    for warning in st.warnings:
        click.echo(f"Warning: {warning}", err=True)


@click.command()
@click.argument("shell", type=click.Choice(["bash", "zsh", "fish"]))
def completion(shell: str) -> None:
    """Print the shell completion script, e.g. `eval "$(outpost completion bash)"`."""
    from outpost.cli.main import cli

    cls = get_completion_class(shell)
    assert cls is not None
    click.echo(cls(cli, {}, "outpost", "_OUTPOST_COMPLETE").source())
