"""Backends registered by name: built-in ones plus those of an entry-point group.

Drivers (``outpost.drivers``), credential sources (``outpost.credentials``) and, later,
snapshot targets (``outpost.targets``) are each one ``Registry``, so a third-party package adds
a backend by declaring an entry point.
"""

from __future__ import annotations

import functools
import importlib
from importlib.metadata import entry_points
from typing import Generic, TypeVar, cast

from outpost.errors import UsageError

T = TypeVar("T")


class Registry(Generic[T]):
    # ``base`` is a plain ``type``: mypy refuses an abstract class where ``type[T]`` is expected
    def __init__(self, group: str, what: str, base: type, builtin: dict[str, str]) -> None:
        self.group = group
        self.what = what  # "driver", "credential source": for messages
        self.base = base
        self.builtin = builtin

    @functools.cached_property
    def targets(self) -> dict[str, str]:
        """Built-ins plus entry points, read once per process (a scan takes milliseconds)."""
        targets = dict(self.builtin)
        for ep in entry_points(group=self.group):
            targets.setdefault(ep.name, ep.value)
        return targets

    def names(self) -> list[str]:
        return sorted(self.targets)

    def get(self, name: str) -> type[T]:
        """The class registered as NAME, or a UsageError listing the known names."""
        if name not in self.targets:
            raise UsageError(
                f"Unknown {self.what} {name!r}; choose one of: {', '.join(self.names())}."
            )
        module_name, _, attr = self.targets[name].partition(":")
        cls = getattr(importlib.import_module(module_name), attr)
        if not (isinstance(cls, type) and issubclass(cls, self.base)):
            raise UsageError(
                f"The {self.what} {name!r} ({self.targets[name]}) is not a {self.base.__name__}."
            )
        return cast("type[T]", cls)
