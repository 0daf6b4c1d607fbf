"""The agent's operations, used by the CLI directly or through the local HTTP API.

``AgentService`` owns the store (and so the data dir lock), the key, and the last known
status of every connection. Every change goes through a command object applied by the store,
so that a Raft cluster can later replicate the same commands.

``test_connection``, ``query`` and ``inspect`` build a driver for the call; their ``on_driver``
keyword is handed each driver before it runs anything, so that another thread can stop the
operation with ``driver.cancel()`` (the job executor does, for HQ's cancel).
"""

from __future__ import annotations

import os
import re
import threading
import time
import unicodedata
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from pydantic import SecretStr

from outpost import __version__
from outpost.api.models import (
    AgentStatus,
    ConnectionDetail,
    ConnectionInfo,
    QueryReport,
    TestReport,
)
from outpost.config import LoadedConfig
from outpost.credentials import parse_reference
from outpost.credentials.base import CredentialContext, CredentialError, CredentialSource
from outpost.credentials.cache import CredentialCache, Provenance
from outpost.crypto import Key, load_key_file
from outpost.drivers import get_driver
from outpost.drivers.base import Driver, DriverContext, DriverOptions, Progress
from outpost.errors import (
    ConflictError,
    DriverError,
    KeyError_,
    OutpostError,
    ReadOnlyError,
    UsageError,
)
from outpost.link.association import load_association, load_token, save_token
from outpost.pooler.route_admin import check_routes_open, rekey_route_items
from outpost.protocol import ConnectionMeta
from outpost.state import backup as backup_format
from outpost.state.codec import decode_options, encode_options
from outpost.state.commands import (
    AddConnection,
    DeleteConnection,
    MarkStarted,
    RekeyConnections,
    RekeyItem,
    RenameConnection,
    RestoreConnections,
    StoredConnection,
    UpdateConnectionOptions,
    b64,
)
from outpost.state.store import Owner, Store


def slugify(name: str) -> str:
    """The slug of a connection name: lower-case ASCII words joined by hyphens."""
    text = unicodedata.normalize("NFKD", name).encode("ascii", "ignore").decode()
    slug = re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")
    return slug or "connection"


def _check_name(name: str) -> str:
    name = name.strip()
    if not name:
        raise UsageError("A connection name cannot be empty; give --name NAME.")
    if len(name) > 200:
        raise UsageError("A connection name is at most 200 characters long.")
    return name


def _reveal(value: Any) -> Any:
    if isinstance(value, SecretStr):
        return value.get_secret_value()
    if isinstance(value, Path):
        return str(value)
    return value


#: Called with each driver an operation builds, before the driver runs anything.
OnDriver = Callable[[Driver], None]


def storable_options(options: DriverOptions) -> dict[str, Any]:
    """Only the options the user set (defaults stay defaults), secrets revealed for sealing."""
    return {name: _reveal(getattr(options, name)) for name in sorted(options.model_fields_set)}


class AgentService:
    """Everything the CLI and the API can ask of the agent."""

    def __init__(
        self, loaded: LoadedConfig, store: Store, key: Key | None, *, check_key: bool = True
    ) -> None:
        self.loaded = loaded
        self.config = loaded.config
        self.store = store
        self.key = key
        self.progress: Progress | None = None
        self.started_at: float | None = None
        self.api_url: str | None = None
        self._status_lock = threading.Lock()
        self.credentials = CredentialCache(loaded.config.credentials)
        #: warnings every CLI command repeats (the unencrypted-without-key one only serve says)
        self.cli_warnings: list[str] = []
        self.warnings = self._check_key() if check_key else []

    @classmethod
    def open(cls, loaded: LoadedConfig, *, owner: Owner = "cli") -> AgentService:
        """Load the key (if configured), open and lock the store, check the key fits."""
        key = load_key_file(loaded.config.key_path) if loaded.config.key_path else None
        store = Store(loaded.config.data_dir, owner=owner)
        try:
            return cls(loaded, store, key)
        except BaseException:
            store.close()
            raise

    def close(self) -> None:
        self.credentials.close()
        self.store.close()

    # --- key checks -------------------------------------------------------------------

    def _check_key(self) -> list[str]:
        stored = self.store.connections()
        encrypted = [c for c in stored if c.encrypted]
        plain = [c for c in stored if not c.encrypted]
        data_dir = self.store.data_dir
        if self.key is None:
            if encrypted:
                raise KeyError_(
                    f"{len(encrypted)} connection(s) in data dir {data_dir} are encrypted but "
                    "no key_path is set; set key_path to the key file that encrypted them."
                )
            return [
                f"Connection options in {data_dir} are stored unencrypted; to encrypt them, "
                "create a key with `outpost key generate PATH`, set key_path, and run "
                "`outpost key rotate`."
            ]
        store_key_id = self.store.key_id
        if encrypted and store_key_id and store_key_id != self.key.id:
            raise KeyError_(
                f"Key file {self.key.path} is not the key that encrypted the connections in "
                f"{data_dir} (key id {self.key.id}, stored data needs {store_key_id}); set "
                "key_path to the right key, or move to a new key with "
                "`outpost key rotate --old-key OLD_KEY_FILE`."
            )
        if plain:
            self.cli_warnings = [
                f"{len(plain)} connection(s) in {data_dir} were stored before a key was set "
                "and are unencrypted; run `outpost key rotate` to encrypt them."
            ]
            return self.cli_warnings
        return []

    # --- helpers --------------------------------------------------------------------------

    def _context(self, name: str, slug: str) -> DriverContext:
        return DriverContext(
            connection=name,
            cache_dir=self.store.data_dir / "cache" / slug,
            progress=self.progress,
        )

    def _parse(
        self, cls: type[Driver], raw: dict[str, Any], name: str
    ) -> tuple[DriverOptions, CredentialSource | None]:
        """Validate options; ``password_from`` (a credential source reference) is kept apart."""
        raw = dict(raw)
        reference = raw.pop("password_from", None)
        source = None
        if reference is not None:
            if cls.password_option is None:
                raise UsageError(f"The {cls.name} driver takes no password (--password-from).")
            if raw.get(cls.password_option) is not None:
                raise UsageError(
                    f"Give connection {name!r} a password or --password-from, not both."
                )
            source = parse_reference(str(reference), self.config.credentials)
        return cls.parse_options(raw, connection=name), source

    def _storable(self, parsed: DriverOptions, source: CredentialSource | None) -> dict[str, Any]:
        data = storable_options(parsed)
        if source is not None:
            data["password_from"] = source.reference
        return data

    def _driver(
        self,
        cls: type[Driver],
        parsed: DriverOptions,
        source: CredentialSource | None,
        name: str,
        slug: str,
    ) -> tuple[Driver, Provenance | None, CredentialContext | None]:
        """A driver ready to connect: the password fetched from its source when it has one."""
        if source is None:
            return cls(parsed, self._context(name, slug)), None, None
        values = storable_options(parsed)
        ctx = CredentialContext(
            connection=name,
            driver=cls.name,
            host=getattr(parsed, "host", None),
            port=getattr(parsed, "port", None),
            user=getattr(parsed, "user", None),
            options=values,
        )
        credential, provenance = self.credentials.get(source, ctx)
        assert cls.password_option is not None
        values[cls.password_option] = credential.password
        if credential.username is not None:
            values["user"] = credential.username
        driver = cls(cls.parse_options(values, connection=name), self._context(name, slug))
        return driver, provenance, ctx

    def _build(
        self, stored: StoredConnection
    ) -> tuple[Driver, Provenance | None, CredentialSource | None, CredentialContext | None]:
        cls = get_driver(stored.driver)
        parsed, source = self._parse(cls, decode_options(stored, self.key), stored.name)
        driver, provenance, ctx = self._driver(cls, parsed, source, stored.name, stored.slug)
        return driver, provenance, source, ctx

    def _info(self, stored: StoredConnection) -> ConnectionInfo:
        status = self.store.status(stored.slug)
        try:
            display = get_driver(stored.driver).display_name
        except OutpostError:
            display = stored.driver
        return ConnectionInfo(
            name=stored.name,
            slug=stored.slug,
            driver=stored.driver,
            driver_name=display,
            on_agent=True,
            up=status.up if status else None,
            checked_at=status.checked_at if status else None,
            error=status.error if status else None,
            server_version=status.server_version if status else None,
            check_seconds=status.duration_seconds if status else None,
        )

    def _verify(self, driver: Driver, what: str, provenance: Provenance | None) -> TestReport:
        report = self._run_test(driver, driver.context.connection, "", None, provenance)
        if not report.up:
            raise DriverError(
                f"{report.error} Nothing was {what}; fix the options, or use --no-verify "
                "to save them without checking."
            )
        return report

    def _run_test(
        self,
        driver: Driver,
        name: str,
        slug: str,
        timeout: float | None = None,
        provenance: Provenance | None = None,
    ) -> TestReport:
        start = time.perf_counter()
        source = provenance.describe() if provenance else None
        try:
            result = driver.test(timeout)
        except OutpostError as exc:
            return TestReport(
                slug=slug,
                name=name,
                up=False,
                duration_seconds=time.perf_counter() - start,
                error=driver.scrub(str(exc)),
                password_source=source,
            )
        finally:
            driver.close()
        return TestReport(
            slug=slug,
            name=name,
            up=True,
            server_version=result.server_version,
            duration_seconds=result.duration_seconds,
            password_source=source,
        )

    def _record(self, report: TestReport) -> None:
        with self._status_lock:
            self.store.record_status(
                report.slug,
                up=report.up,
                checked_at=time.time(),
                error=report.error,
                server_version=report.server_version,
                duration_seconds=report.duration_seconds,
            )

    def _unique_slug(self, name: str) -> str:
        base = slugify(name)
        taken = self.store.slugs()
        slug, n = base, 2
        while slug in taken:
            slug, n = f"{base}-{n}", n + 1
        return slug

    # --- connections ------------------------------------------------------------------

    def list_connections(self) -> list[ConnectionInfo]:
        return [self._info(c) for c in self.store.connections()]

    def get_connection(self, slug: str) -> ConnectionDetail:
        stored = self.store.connection(slug)
        cls = get_driver(stored.driver)
        parsed, source = self._parse(cls, decode_options(stored, self.key), stored.name)
        info = self._info(stored)
        options = parsed.to_public()
        if source is not None:
            options["password_from"] = source.reference
        return ConnectionDetail(
            **info.model_dump(),
            options=options,
            encrypted=stored.encrypted,
            password_source=source.reference if source else None,
        )

    def add_connection(
        self, driver_name: str, name: str, options: dict[str, Any], *, verify: bool = True
    ) -> ConnectionInfo:
        name = _check_name(name)
        cls = get_driver(driver_name)
        parsed, source = self._parse(cls, options, name)
        existing = next(
            (c for c in self.store.connections() if c.name.lower() == name.lower()), None
        )
        if existing is not None:
            raise ConflictError(
                f"A connection named {name!r} already exists (slug {existing.slug!r}); "
                "choose another name."
            )
        slug = self._unique_slug(name)
        report: TestReport | None = None
        if verify:
            driver, provenance, _ = self._driver(cls, parsed, source, name, slug)
            report = self._verify(driver, "saved", provenance)
        blob, encrypted = encode_options(self._storable(parsed, source), self.key)
        self.store.apply(
            AddConnection(
                slug=slug,
                name=name,
                driver=cls.name,
                options_b64=b64(blob),
                encrypted=encrypted,
                key_id=self.key.id if self.key else None,
                at=time.time(),
            )
        )
        if report is not None:
            self._record(report.model_copy(update={"slug": slug}))
        return self._info(self.store.connection(slug))

    def rename_connection(self, slug: str, new_name: str) -> ConnectionInfo:
        new_name = _check_name(new_name)
        self.store.connection(slug)
        self.store.apply(RenameConnection(slug=slug, name=new_name, at=time.time()))
        return self._info(self.store.connection(slug))

    def edit_connection_options(
        self, slug: str, changes: dict[str, Any], *, verify: bool = True
    ) -> ConnectionInfo:
        stored = self.store.connection(slug)
        if not changes:
            raise UsageError(
                f"No options given to change for connection {slug!r}; "
                "give at least one --OPTION VALUE."
            )
        cls = get_driver(stored.driver)
        current = decode_options(stored, self.key)
        if changes.get("password_from") is not None and cls.password_option:
            changes.setdefault(cls.password_option, None)  # a source replaces a stored password
        if cls.password_option and changes.get(cls.password_option) is not None:
            changes.setdefault("password_from", None)  # and a password replaces a source
        merged = {**current, **changes}
        for k, v in changes.items():
            if v is None:
                merged.pop(k, None)
        parsed, source = self._parse(cls, merged, stored.name)
        report: TestReport | None = None
        if verify:
            driver, provenance, _ = self._driver(cls, parsed, source, stored.name, slug)
            report = self._verify(driver, "changed", provenance)
        blob, encrypted = encode_options(self._storable(parsed, source), self.key)
        self.store.apply(
            UpdateConnectionOptions(
                slug=slug,
                options_b64=b64(blob),
                encrypted=encrypted,
                key_id=self.key.id if self.key else None,
                at=time.time(),
            )
        )
        if report is not None:
            self._record(report.model_copy(update={"slug": slug}))
        return self._info(self.store.connection(slug))

    def delete_connection(self, slug: str) -> ConnectionInfo:
        info = self._info(self.store.connection(slug))
        self.store.apply(DeleteConnection(slug=slug))
        return info

    def test_connection(
        self,
        slug: str,
        *,
        record: bool = True,
        timeout: float | None = None,
        on_driver: OnDriver | None = None,
    ) -> TestReport:
        """Connect with the stored options; TIMEOUT (seconds) overrides the driver's own."""
        stored = self.store.connection(slug)
        cancelled = False
        try:
            driver, provenance, source, ctx = self._build(stored)
        except CredentialError as exc:
            report = TestReport(
                slug=slug, name=stored.name, up=False, duration_seconds=0.0, error=str(exc)
            )
        else:
            if on_driver is not None:
                on_driver(driver)
            report = self._run_test(driver, stored.name, slug, timeout, provenance)
            if (
                not report.up
                and provenance is not None
                and provenance.cached
                and not driver.cancel_requested
            ):
                # the database may have refused a value rotated at the source: fetch afresh
                assert source is not None and ctx is not None
                self.credentials.invalidate(source, ctx)
                driver, provenance, _, _ = self._build(stored)
                if on_driver is not None:
                    on_driver(driver)
                report = self._run_test(driver, stored.name, slug, timeout, provenance)
            cancelled = driver.cancel_requested
        if record and not cancelled:  # a cancelled test says nothing about the connection
            self._record(report)
        return report

    def query(
        self,
        slug: str,
        sql: str,
        params: Sequence[Any] | None = None,
        *,
        max_rows: int | None = None,
        timeout: float | None = None,
        allow_writes: bool = False,
        on_driver: OnDriver | None = None,
    ) -> QueryReport:
        if not sql.strip():
            raise UsageError("The SQL text is empty; give a statement to run.")
        if allow_writes and self.config.read_only:
            where = self.loaded.source or "the configuration"
            raise ReadOnlyError(
                f"The agent is read-only (read_only: true in {where}); writes are refused."
            )
        max_rows = max_rows or self.config.query.max_rows
        if max_rows < 1:
            raise UsageError("--max-rows must be at least 1.")
        timeout = timeout or self.config.query.timeout
        stored = self.store.connection(slug)
        driver, _, _, _ = self._build(stored)
        try:
            if on_driver is not None:
                on_driver(driver)
            result = driver.query(
                sql, params, max_rows=max_rows, timeout=timeout, allow_writes=allow_writes
            )
        finally:
            driver.close()
        return QueryReport(
            slug=slug,
            columns=result.columns,
            rows=result.rows,
            row_count=result.row_count,
            truncated=result.truncated,
            duration_seconds=result.duration_seconds,
            notices=result.notices,
        )

    def inspect(
        self,
        slug: str,
        schemas: list[str] | None = None,
        timeout: float | None = None,
        *,
        on_driver: OnDriver | None = None,
    ) -> dict[str, Any]:
        """The connection's schema as one JSON document (the same shape for every driver)."""
        from outpost.schema.inspect import inspect_driver

        stored = self.store.connection(slug)
        driver, _, _, _ = self._build(stored)
        try:
            if on_driver is not None:
                on_driver(driver)
            return inspect_driver(
                driver, schemas=schemas, timeout=timeout or self.config.query.timeout
            )
        finally:
            driver.close()

    def connection_meta(self) -> list[ConnectionMeta]:
        """What HQ may know of each connection: slug, name, driver, UP and when it was checked."""
        metas = []
        for stored in self.store.connections():
            status = self.store.status(stored.slug)
            metas.append(
                ConnectionMeta(
                    slug=stored.slug,
                    name=stored.name,
                    driver=stored.driver,
                    up=status.up if status else None,
                    checked_at=status.checked_at if status else None,
                )
            )
        return metas

    def check_all(self) -> list[TestReport]:
        """Test every connection once (the periodic check keeping UP current)."""
        reports = []
        for stored in self.store.connections():
            try:
                reports.append(
                    self.test_connection(stored.slug, timeout=self.config.checks.timeout)
                )
            except OutpostError as exc:
                report = TestReport(
                    slug=stored.slug,
                    name=stored.name,
                    up=False,
                    duration_seconds=0.0,
                    error=str(exc),
                )
                self._record(report)
                reports.append(report)
        return reports

    # --- key, backup, status ------------------------------------------------------------

    def rotate_key(self, old_key: Key | None, new_key: Key | None) -> int:
        """Re-encrypt every connection from OLD_KEY (or plaintext) to NEW_KEY, atomically."""
        items = []
        for stored in self.store.connections():
            options = decode_options(stored, old_key if stored.encrypted else None)
            blob, encrypted = encode_options(options, new_key)
            items.append(RekeyItem(slug=stored.slug, options_b64=b64(blob), encrypted=encrypted))
        data_dir = self.store.data_dir
        hq_token = load_token(data_dir, old_key) if load_association(data_dir) else None
        self.store.apply(
            RekeyConnections(
                items=items,
                key_id=new_key.id if new_key else None,
                at=time.time(),
                routes=rekey_route_items(self.store, old_key, new_key),
            )
        )
        if hq_token is not None:  # the HQ token from `outpost login` is sealed with the key too
            save_token(data_dir, new_key, hq_token)
        self.key = new_key
        self.warnings = self._check_key()
        return len(items)

    def backup_bytes(self) -> bytes:
        return backup_format.dump(
            self.store.connections(), self.key, self.store.key_id, self.store.routes()
        )

    def restore(self, data: bytes, source: str) -> int:
        """Restore a backup into this never-started, empty data dir (checked first)."""
        payload = backup_format.load(data, self.key, source=source)
        for stored in payload.connections:
            decode_options(stored, self.key)  # every record must open before we write
        check_routes_open(payload.routes, self.key)
        self.store.apply(
            RestoreConnections(
                connections=payload.connections,
                key_id=payload.key_id,
                at=time.time(),
                routes=payload.routes,
            )
        )
        self.warnings = self._check_key()
        return len(payload.connections)

    def mark_started(self) -> None:
        now = time.time()
        self.started_at = now
        self.store.apply(MarkStarted(at=now))

    def status(self) -> AgentStatus:
        infos = self.list_connections()
        return AgentStatus(
            version=__version__,
            data_dir=str(self.store.data_dir),
            config_file=str(self.loaded.source) if self.loaded.source else None,
            encrypted=self.key is not None,
            key_path=self.key.path if self.key else None,
            read_only=self.config.read_only,
            connections=len(infos),
            connections_up=sum(1 for i in infos if i.up),
            started_at=self.started_at,
            pid=os.getpid() if self.api_url else None,
            api_url=self.api_url,
            warnings=self.warnings,
        )
