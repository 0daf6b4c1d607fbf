"""`outpost pooler routes add|list|remove`, `hash-password`, `encrypt-password`."""

from __future__ import annotations

import base64
import datetime as dt

import click

from outpost.cli.connections import read_password
from outpost.cli.context import CliContext, pass_cli
from outpost.cli.output import format_option, print_json, print_table
from outpost.errors import OutpostError, UsageError

ROUTE_COLUMNS = ["DATABASE", "SCHEMA", "USER", "TO", "AUTH", "CREATED"]


def _password_options(f: click.decorators.FC) -> click.decorators.FC:
    env = click.option(
        "--password-env", metavar="NAME", help="Read the password from this environment variable."
    )
    file = click.option("--password-file", metavar="PATH", help="Read the password from this file.")
    return file(env(f))


def _read(file: str | None, env: str | None, *, what: str, confirm: bool) -> str:
    """The password from --password-file, --password-env, or a prompt (never a flag value)."""
    password = read_password(None, None, file, env)
    if password is None:
        password = click.prompt(
            what, hide_input=True, confirmation_prompt=confirm, err=True, default=None
        )
    if not password:
        raise UsageError(f"The {what.lower()} is empty; give a non-empty one.")
    return str(password)


def _when(epoch: float) -> str:
    return dt.datetime.fromtimestamp(epoch, dt.UTC).strftime("%Y-%m-%d %H:%M:%SZ")


@click.group()
def routes() -> None:
    """Pooler routes kept in the agent's encrypted store: (database, schema) -> connection.

    A client connecting to DATABASE with schema SCHEMA (startup parameter schema_search_path,
    or options=-csearch_path=SCHEMA; "public" when it gives none) as USER with its password
    is sent to the postgres or redshift connection SLUG, with search_path set to SCHEMA.
    """


@routes.command("add")
@click.option("--database", required=True, help="The database name clients connect to.")
@click.option("--schema", required=True, help="The tenant schema (the server's search_path).")
@click.option("--user", required=True, help="The user name clients log in with.")
@click.option(
    "--to", "to", required=True, metavar="SLUG", help="The postgres/redshift connection to use."
)
@_password_options
@format_option()
@pass_cli
def add_route(
    cli: CliContext,
    database: str,
    schema: str,
    user: str,
    to: str,
    password_file: str | None,
    password_env: str | None,
    fmt: str,
) -> None:
    """Add a route; the client password is prompted for unless given by file or env var.

    Only verifiers of the password are stored (SCRAM-SHA-256, scrypt, md5), sealed with the
    agent key; never the password.
    """
    password = _read(password_file, password_env, what="Client password", confirm=True)
    with cli.route_admin() as admin:
        info = admin.add_route(database, schema, user, password, to)
    if fmt == "json":
        print_json(info.model_dump(mode="json"))
    else:
        click.echo(
            f"Added pooler route {info.database}/{info.schema_name} for user {info.user} "
            f"to connection {info.to}."
        )


@routes.command("list")
@format_option()
@pass_cli
def list_routes(cli: CliContext, fmt: str) -> None:
    """List the routes in the store (never a password)."""
    with cli.route_admin() as admin:
        infos = admin.list_routes()
    if fmt == "json":
        print_json([i.model_dump(mode="json") for i in infos])
        return
    rows = [
        [i.database, i.schema_name, i.user, i.to, ", ".join(i.auth), _when(i.created_at)]
        for i in infos
    ]
    print_table(ROUTE_COLUMNS, rows)


@routes.command("remove")
@click.option("--database", required=True, help="The route's database name.")
@click.option("--schema", required=True, help="The route's schema.")
@format_option()
@pass_cli
def remove_route(cli: CliContext, database: str, schema: str, fmt: str) -> None:
    """Remove the route for (DATABASE, SCHEMA)."""
    with cli.route_admin() as admin:
        info = admin.remove_route(database, schema)
    if fmt == "json":
        print_json(info.model_dump(mode="json"))
    else:
        click.echo(f"Removed pooler route {info.database}/{info.schema_name}.")


@click.command("hash-password")
@_password_options
def hash_password(password_file: str | None, password_env: str | None) -> None:
    """Print a client password's scrypt hash: perseus_auth.source_pass_hashed.

    The same format as Perseus's genhash (easy-scrypt DerivePassphrase, base64), so rows made
    by either tool work with both.
    """
    from outpost.pooler.passwords import scrypt_hash

    password = _read(password_file, password_env, what="Client password", confirm=True)
    click.echo(scrypt_hash(password))


@click.command("encrypt-password")
@_password_options
@click.option(
    "--kms/--agent-key",
    "kms",
    default=None,
    help="Encrypt with AWS KMS (pooler.aws_kms_key_arn) or with the agent key (key_path). "
    "Default: KMS when pooler.aws_kms_key_arn is set, else the agent key.",
)
@click.option(
    "--kms-key-arn",
    metavar="ARN",
    help="The KMS key to encrypt with (implies --kms; default: pooler.aws_kms_key_arn).",
)
@pass_cli
def encrypt_password(
    cli: CliContext,
    password_file: str | None,
    password_env: str | None,
    kms: bool | None,
    kms_key_arn: str | None,
) -> None:
    """Print a destination password encrypted: perseus_auth.dest_pass_enc.

    With the agent key: base64 of an Outpost envelope (AES-256-CBC + HMAC-SHA256). With KMS:
    base64 of the KMS ciphertext, as Perseus's encpass prints it.
    """
    loaded = cli.loaded()
    config = loaded.config
    if kms is False and kms_key_arn:
        raise UsageError("Give --agent-key or --kms-key-arn, not both.")
    arn = kms_key_arn or (config.pooler.aws_kms_key_arn if config.pooler else None)
    use_kms = bool(kms_key_arn) or (kms if kms is not None else bool(arn))
    if use_kms and not arn:
        raise UsageError(
            "--kms needs a KMS key: set pooler.aws_kms_key_arn in the configuration or give "
            "--kms-key-arn ARN."
        )
    if not use_kms and config.key_path is None:
        raise OutpostError(
            "Encrypting with the agent key needs key_path in the configuration (create a key "
            "with `outpost key generate PATH`), or use --kms with a KMS key."
        )
    password = _read(password_file, password_env, what="Destination password", confirm=True)
    if use_kms:
        from outpost.pooler.kms import kms_encrypt

        assert arn is not None
        click.echo(kms_encrypt(password, arn, config.credentials.aws))
        return
    from outpost.crypto import load_key_file, seal

    assert config.key_path is not None
    key = load_key_file(config.key_path)
    click.echo(base64.b64encode(seal(key, password.encode())).decode("ascii"))


def register_route_commands(group: click.Group) -> None:
    """Add routes, hash-password and encrypt-password to the `pooler` group."""
    group.add_command(routes)
    group.add_command(hash_password)
    group.add_command(encrypt_password)
