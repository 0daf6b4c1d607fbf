"""Driver registry: built-in drivers plus any registered under the ``outpost.drivers``
entry-point group by third parties."""

from __future__ import annotations

from outpost.drivers.base import Driver
from outpost.registry import Registry

BUILTIN: dict[str, str] = {
    "postgres": "outpost.drivers.postgres:PostgresDriver",
    "redshift": "outpost.drivers.redshift:RedshiftDriver",
    "mysql": "outpost.drivers.mysql:MySQLDriver",
    "mssql": "outpost.drivers.mssql:MSSQLDriver",
    "sqlite": "outpost.drivers.sqlite:SQLiteDriver",
    "csv": "outpost.drivers.csv:CSVDriver",
}


REGISTRY: Registry[Driver] = Registry("outpost.drivers", "driver", Driver, BUILTIN)


def driver_names() -> list[str]:
    return REGISTRY.names()


def get_driver(name: str) -> type[Driver]:
    """The driver class registered as NAME, or a UsageError listing the known ones."""
    return REGISTRY.get(name)
