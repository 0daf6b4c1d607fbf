"""The Driver base class: one per database kind, registered by name.

A driver is built from validated options (a pydantic model per driver) and offers three
blocking operations: ``test`` (connect, report the server version), ``query`` (row limit,
statement timeout, read-only transaction unless writes are allowed) and ``server_version``.
Async callers run them in a bounded thread pool. Every error a driver raises is a
``DriverError`` whose message names the connection and never contains a secret option value.

``cancel()`` may be called from any other thread while an operation runs: it stops the
statement on the server (how depends on the database) and makes the operation raise
:class:`QueryCancelled`. Cancelling is sticky: a cancelled driver starts no further statement,
so build a new driver for the next operation. A driver that cannot cancel keeps the default,
which does nothing and returns False; its statements end at their statement timeout.
"""

from __future__ import annotations

import base64
import datetime as dt
import decimal
import itertools
import logging
import threading
import time
import uuid
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

from pydantic import BaseModel, ConfigDict, SecretStr, ValidationError

from outpost.errors import DriverError, OutpostError, UsageError

#: Called as progress(done_bytes, total_bytes_or_None) during a download.
Progress = Callable[[int, int | None], None]

#: Stops what one connection runs now; called by ``Driver.cancel`` from another thread.
Canceller = Callable[[], object]

log = logging.getLogger("outpost.drivers")


class QueryCancelled(DriverError):
    """The operation was stopped by ``Driver.cancel()`` (a user or HQ asked for it)."""


class DriverOptions(BaseModel):
    """Base of every driver's options. Unknown options are errors."""

    model_config = ConfigDict(extra="forbid", validate_default=True)

    def secret_values(self) -> list[str]:
        """Plain values of every SecretStr option (to scrub from messages)."""
        values: list[str] = []
        for name in type(self).model_fields:
            value = getattr(self, name)
            if isinstance(value, SecretStr) and value.get_secret_value():
                values.append(value.get_secret_value())
        return values

    def to_storable(self) -> dict[str, Any]:
        """Options as a JSON object with secrets revealed (the store encrypts the blob)."""
        data: dict[str, Any] = {}
        for name in type(self).model_fields:
            value = getattr(self, name)
            if isinstance(value, SecretStr):
                value = value.get_secret_value()
            elif isinstance(value, Path):
                value = str(value)
            data[name] = value
        return data

    def to_public(self) -> dict[str, Any]:
        """Options with secrets replaced, for display."""
        data = self.to_storable()
        for name in type(self).model_fields:
            if isinstance(getattr(self, name), SecretStr) and data.get(name):
                data[name] = "********"
        return data


@dataclass
class DriverContext:
    """What a driver may need from the agent besides its options."""

    connection: str = "connection"  # name or slug, for messages
    cache_dir: Path | None = None  # where downloads (sqlite, csv) are kept
    progress: Progress | None = None
    max_download_bytes: int = 512 * 1024 * 1024


@dataclass
class TestResult:
    server_version: str
    duration_seconds: float


@dataclass
class QueryResult:
    columns: list[str]
    rows: list[list[Any]]
    row_count: int  # rows returned, or rows affected by a write
    truncated: bool = False
    duration_seconds: float = 0.0
    notices: list[str] = field(default_factory=list)


def jsonable(value: Any) -> Any:
    """Convert a database value to something JSON can carry, keeping its meaning."""
    if value is None or isinstance(value, bool | int | float | str):
        return value
    if isinstance(value, decimal.Decimal):
        return str(value)
    if isinstance(value, dt.datetime | dt.date | dt.time):
        return value.isoformat()
    if isinstance(value, dt.timedelta):
        return value.total_seconds()
    if isinstance(value, uuid.UUID):
        return str(value)
    if isinstance(value, bytes | bytearray | memoryview):
        return "\\x" + bytes(value).hex()
    if isinstance(value, list | tuple):
        return [jsonable(v) for v in value]
    if isinstance(value, dict):
        return {str(k): jsonable(v) for k, v in value.items()}
    return str(value)


def b64_or_none(value: bytes | None) -> str | None:
    return None if value is None else base64.b64encode(value).decode()


class Driver(ABC):
    """One database kind. Subclasses set the class attributes and implement the methods."""

    #: registry name, as typed on the command line (``postgres``)
    name: ClassVar[str]
    #: human name, as shown in tables (``PostgreSQL``)
    display_name: ClassVar[str]
    #: the pydantic model of this driver's options
    options_model: ClassVar[type[DriverOptions]]
    #: the option that holds the password, if any (for --password-file etc.)
    password_option: ClassVar[str | None] = "password"  # noqa: S105 - option name
    #: the SQLAlchemy dialect that inspects this driver's schemas through ``dbapi_connect``
    #: (``postgresql+psycopg``); None when the driver offers no schema inspection
    sqlalchemy_dialect: ClassVar[str | None] = None

    def __init__(self, options: DriverOptions, context: DriverContext | None = None) -> None:
        if not isinstance(options, self.options_model):
            options = self.options_model.model_validate(options.model_dump())
        self.options = options
        self.context = context or DriverContext()
        self._cancel_lock = threading.Lock()
        self._cancel_requested = False
        self._cancellers: dict[int, Canceller] = {}
        self._canceller_ids = itertools.count()

    @classmethod
    def parse_options(cls, raw: dict[str, Any], *, connection: str = "") -> DriverOptions:
        """Validate raw options, reporting every problem in one message."""
        try:
            return cls.options_model.model_validate(raw)
        except ValidationError as exc:
            problems = []
            for err in exc.errors():
                key = ".".join(str(p) for p in err["loc"]) or "options"
                flag = "--" + key.replace("_", "-")
                if err["type"] == "extra_forbidden":
                    known = ", ".join(
                        "--" + n.replace("_", "-") for n in cls.options_model.model_fields
                    )
                    problems.append(
                        f"unknown option {flag} for the {cls.name} driver (known: {known})"
                    )
                elif err["type"] == "missing":
                    problems.append(f"option {flag} is required for the {cls.name} driver")
                else:
                    msg = err["msg"].removeprefix("Value error, ")
                    problems.append(f"option {flag}: {msg}")
            where = f" for connection {connection!r}" if connection else ""
            raise UsageError(f"Invalid options{where}: " + "; ".join(problems) + ".") from None

    # --- what every driver implements ---------------------------------------------------

    @abstractmethod
    def test(self, timeout: float | None = None) -> TestResult:
        """Connect, run a trivial statement, return the server version."""

    @abstractmethod
    def query(
        self,
        sql: str,
        params: Sequence[Any] | None = None,
        *,
        max_rows: int = 1000,
        timeout: float = 30.0,
        allow_writes: bool = False,
    ) -> QueryResult:
        """Run SQL in a read-only transaction unless ALLOW_WRITES; at most MAX_ROWS rows."""

    def server_version(self) -> str:
        return self.test().server_version

    def close(self) -> None:  # noqa: B027 - optional hook
        """Release anything the driver keeps open (nothing by default)."""

    # --- cancelling (thread-safe) --------------------------------------------------------

    def cancel(self) -> bool:
        """Stop the statement(s) this driver runs now; callable from any thread.

        True when a cancel request was sent for at least one open connection; False when
        nothing was running or the driver cannot cancel (the default). Either way the
        driver starts no further statement: what runs next raises QueryCancelled.
        """
        with self._cancel_lock:
            self._cancel_requested = True
            cancellers = list(self._cancellers.values())
        sent = False
        for canceller in cancellers:
            try:
                canceller()
            except Exception as exc:  # a closed connection, an unreachable server...
                log.debug(
                    "cancel on connection %r did not go through: %s",
                    self.context.connection,
                    self.scrub(str(exc)) or type(exc).__name__,
                )
            else:
                sent = True
        return sent

    @property
    def cancel_requested(self) -> bool:
        """Whether ``cancel()`` was called."""
        return self._cancel_requested

    def cancelled_error(self) -> QueryCancelled:
        return QueryCancelled(
            self.scrub(
                f"The operation on connection {self.context.connection!r} was cancelled "
                "before it finished."
            )
        )

    def check_cancelled(self) -> None:
        """Raise QueryCancelled once ``cancel()`` was called."""
        if self._cancel_requested:
            raise self.cancelled_error()

    def watch(self, canceller: Canceller) -> int:
        """Have ``cancel()`` call CANCELLER (until ``unwatch``); raise QueryCancelled when
        ``cancel()`` came first. Returns the id to unwatch with."""
        with self._cancel_lock:
            if self._cancel_requested:
                raise self.cancelled_error()
            key = next(self._canceller_ids)
            self._cancellers[key] = canceller
        return key

    def unwatch(self, key: int) -> None:
        with self._cancel_lock:
            self._cancellers.pop(key, None)

    @contextmanager
    def cancellable(self, canceller: Canceller) -> Iterator[None]:
        """Within the block, ``cancel()`` calls CANCELLER (see ``watch``)."""
        key = self.watch(canceller)
        try:
            yield
        finally:
            self.unwatch(key)

    def dbapi_connect(self, timeout: float | None = None) -> Any:
        """A new DB-API connection for schema inspection (``sqlalchemy_dialect``'s DBAPI).

        It reads only where the database allows saying so, and TIMEOUT (seconds; None or <= 0
        for none) limits each statement where the driver can. The caller closes it; until
        then ``cancel()`` stops its statements where the driver can cancel.
        """
        raise DriverError(
            self.scrub(
                f"Connection {self.context.connection!r} cannot be inspected: the "
                f"{self.display_name} driver offers no schema inspection."
            )
        )

    # --- helpers for subclasses -----------------------------------------------------------

    def scrub(self, message: str) -> str:
        """Remove every secret option value from MESSAGE."""
        for secret in self.options.secret_values():
            message = message.replace(secret, "********")
        return message

    def error(self, what: str, exc: BaseException | str) -> DriverError:
        """A DriverError naming the connection, with secrets scrubbed."""
        detail = str(exc).strip().splitlines()
        text = "; ".join(line.strip() for line in detail if line.strip()) or type(exc).__name__
        text = text.rstrip(".")
        return DriverError(
            self.scrub(f"{what} for connection {self.context.connection!r}: {text}.")
        )

    @staticmethod
    def timer() -> Callable[[], float]:
        start = time.perf_counter()
        return lambda: time.perf_counter() - start


def missing_extra(driver: str, module: str, extra: str) -> OutpostError:
    return OutpostError(
        f"The {driver} driver needs the Python package {module!r}; "
        f"install it with: pip install 'outpost-agent[{extra}]'"
    )
