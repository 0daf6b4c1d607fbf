"""Driver registry: built-in drivers plus any registered under the ``outpost.drivers``
entry-point group by third parties."""

from __future__ import annotations

import functools
import importlib
from importlib.metadata import entry_points

from outpost.drivers.base import Driver
from outpost.errors import UsageError

BUILTIN: dict[str, str] = {
    "postgres": "outpost.drivers.postgres:PostgresDriver",
    "redshift": "outpost.drivers.redshift:RedshiftDriver",
    "mysql": "outpost.drivers.mysql:MySQLDriver",
    "mssql": "outpost.drivers.mssql:MSSQLDriver",
    "sqlite": "outpost.drivers.sqlite:SQLiteDriver",
    "csv": "outpost.drivers.csv:CSVDriver",
}


@functools.cache
def _targets() -> dict[str, str]:
    """Built-ins plus entry points, read once per process (scanning them takes milliseconds)."""
    targets = dict(BUILTIN)
    for ep in entry_points(group="outpost.drivers"):
        targets.setdefault(ep.name, ep.value)
    return targets


def driver_names() -> list[str]:
    return sorted(_targets())


def get_driver(name: str) -> type[Driver]:
    """The driver class registered as NAME, or a UsageError listing the known ones."""
    targets = _targets()
    if name not in targets:
        raise UsageError(f"Unknown driver {name!r}; choose one of: {', '.join(sorted(targets))}.")
    module_name, _, attr = targets[name].partition(":")
    module = importlib.import_module(module_name)
    cls = getattr(module, attr)
    if not (isinstance(cls, type) and issubclass(cls, Driver)):
        raise UsageError(f"Driver {name!r} ({targets[name]}) is not an outpost Driver.")
    return cls
