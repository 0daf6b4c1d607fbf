"""The Amazon Redshift driver: the PostgreSQL driver over Redshift's PostgreSQL protocol.

Redshift speaks the protocol of PostgreSQL 8.0, so everything here is what the PostgreSQL driver
does minus what Redshift lacks; the driver relies only on what Redshift documents: ``BEGIN READ
ONLY``, ``SET LOCAL statement_timeout``, protocol-level cancel and Parse/Describe. Results are
streamed by libpq on the client side (no ``DECLARE`` cursor, which Redshift would materialize on
the leader node). Its defaults differ: no default host, port 5439, and TLS required.
"""

from __future__ import annotations

from typing import ClassVar

from pydantic import Field

from outpost.drivers.base import DriverOptions
from outpost.drivers.postgres import PostgresDriver, PostgresOptions, SslMode

_SSL_HELP = (
    "The SSL mode for connecting to the database: disable (no encryption), require "
    "(encrypted, the certificate chain is not checked), verify-ca or require-ca (encrypted, "
    "the certificate chain is checked), verify-full (encrypted, the chain and host name are "
    "checked); require or verify-ca suit most Redshift clusters"
)


class RedshiftOptions(PostgresOptions):
    """Options of the redshift driver (the flags of ``connections add redshift``)."""

    host: str = Field(min_length=1, description="The service host name (the cluster endpoint)")
    port: int = Field(5439, ge=1, le=65535, description="The service port")
    ssl: SslMode = Field("require", description=_SSL_HELP)


class RedshiftDriver(PostgresDriver):
    """Amazon Redshift (all versions)."""

    name: ClassVar[str] = "redshift"
    display_name: ClassVar[str] = "Amazon Redshift"
    options_model: ClassVar[type[DriverOptions]] = RedshiftOptions
    # SHOW server_version says 8.0.2 on every cluster; version() names the Redshift build.
    version_sql: ClassVar[str] = "SELECT version()"
