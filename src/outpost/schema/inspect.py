"""Schema inspection: one JSON document of the same shape for every driver.

SQLAlchemy's inspector reads the catalog through an engine whose only connection comes from
the driver's own :meth:`~outpost.drivers.base.Driver.dbapi_connect`, so host, credentials,
credential sources and TLS stay the driver's, and the session is read-only where the database
allows it. The document (see the HQ contract)::

    {"driver": "postgres", "database": "shop",
     "schemas": [{"name": "public",
       "tables": [{"name": "orders", "comment": None,
         "columns": [{"name": "id", "type": "INTEGER", "nullable": False,
                      "default": "nextval('orders_id_seq'::regclass)"}],
         "primary_key": {"name": "orders_pkey", "columns": ["id"]},
         "foreign_keys": [{"name": "orders_customer_id_fkey", "columns": ["customer_id"],
                           "referred_schema": "public", "referred_table": "customers",
                           "referred_columns": ["id"]}],
         "indexes": [{"name": "orders_placed", "columns": ["placed_at"], "unique": False}]}],
       "views": [{"name": "big_orders", "definition": "SELECT ...", "columns": [...]}]}]}

Schemas, tables, views, indexes and foreign keys are sorted by name; columns keep the table's
order. ``type`` is the type as SQLAlchemy compiles it for the dialect (null when the database
declares none, e.g. an SQLite view column over an expression); ``default`` is the default's SQL
text. Indexes leave out the primary key's own index; an index on an expression lists the
expression's text among its columns. A name the database does not keep (an SQLite primary key
or foreign key) is null; a MySQL primary key is always named ``PRIMARY``. Materialized views
(PostgreSQL) are listed among the views. PostgreSQL names come schema-qualified in defaults,
types and view definitions (the inspection's search_path is ``pg_catalog`` only), so the
document does not depend on the role's search_path.

Schemas inspected by default: every schema but the system ones (PostgreSQL, Redshift, SQL
Server); MySQL/MariaDB: the connection's database (every non-system database when the
connection names none); SQLite and CSV: ``main``. A schema asked for that does not exist is
an error that lists the ones that do.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Mapping
from typing import Any

from sqlalchemy import create_engine, event
from sqlalchemy import inspect as sa_inspect
from sqlalchemy.engine import Connection, Dialect, Inspector
from sqlalchemy.engine.reflection import ObjectKind
from sqlalchemy.exc import DBAPIError, NoSuchModuleError, SQLAlchemyError
from sqlalchemy.pool import NullPool
from sqlalchemy.types import NullType, TypeEngine

from outpost.drivers.base import Driver
from outpost.drivers.download import source_name
from outpost.errors import DriverError

Document = dict[str, Any]

#: Schemas left out by default, by SQLAlchemy dialect name (besides PostgreSQL's ``pg_*``).
SYSTEM_SCHEMAS: dict[str, frozenset[str]] = {
    "postgresql": frozenset({"information_schema"}),
    "mysql": frozenset({"information_schema", "mysql", "performance_schema", "sys"}),
    "mssql": frozenset(
        {
            "sys",
            "INFORMATION_SCHEMA",
            "guest",
            "db_owner",
            "db_accessadmin",
            "db_securityadmin",
            "db_ddladmin",
            "db_backupoperator",
            "db_datareader",
            "db_datawriter",
            "db_denydatareader",
            "db_denydatawriter",
        }
    ),
}

#: The statement that names the connection's database, by dialect name.
DATABASE_SQL: dict[str, str] = {
    "postgresql": "SELECT current_database()",
    "mysql": "SELECT DATABASE()",
    "mssql": "SELECT DB_NAME()",
}

#: Server error numbers that mean "stopped by the statement timeout" (MariaDB
#: max_statement_time, MySQL max_execution_time, interrupted; db-lib timeout).
_TIMEOUT_ERRNOS = frozenset({1969, 3024, 1317, 20003})


class _Deadline:
    """The end of the inspection's time budget; no statement starts after it."""

    def __init__(self, timeout: float | None) -> None:
        self.timeout = timeout if timeout is not None and timeout > 0 else None
        self.end = None if self.timeout is None else time.monotonic() + self.timeout

    def passed(self) -> bool:
        return self.end is not None and time.monotonic() >= self.end

    def check(self, *_: Any, **__: Any) -> None:
        if self.passed():
            raise _TimedOut


class _TimedOut(Exception):
    """The time budget ran out between two statements."""


def inspect_driver(
    driver: Driver, schemas: list[str] | None = None, timeout: float | None = None
) -> Document:
    """The schema document of DRIVER's database: SCHEMAS (None or empty: the default ones, see
    the module docstring), within TIMEOUT seconds (None or <= 0: no limit).

    Raises DriverError (naming the connection, without secrets) when the database cannot be
    reached or read, a schema does not exist, or the timeout passes.
    """
    if driver.sqlalchemy_dialect is None:
        raise DriverError(
            driver.scrub(
                f"Connection {driver.context.connection!r} cannot be inspected: the "
                f"{driver.display_name} driver offers no schema inspection."
            )
        )
    deadline = _Deadline(timeout)
    try:
        engine = create_engine(
            f"{driver.sqlalchemy_dialect}://",
            creator=lambda: driver.dbapi_connect(deadline.timeout),
            poolclass=NullPool,
        )
    except (ImportError, NoSuchModuleError) as exc:
        raise driver.error(
            f"Cannot inspect the schema (SQLAlchemy dialect {driver.sqlalchemy_dialect})", exc
        ) from None
    event.listen(engine, "before_cursor_execute", deadline.check)
    try:
        with engine.connect() as conn:
            return _document(driver, conn, schemas)
    except _TimedOut:
        raise _timeout_error(driver, deadline) from None
    except DBAPIError as exc:
        if deadline.timeout is not None and (deadline.passed() or _is_timeout(exc.orig)):
            raise _timeout_error(driver, deadline) from None
        raise driver.error("Cannot inspect the schema", exc.orig or exc) from None
    except (SQLAlchemyError, NotImplementedError) as exc:
        raise driver.error("Cannot inspect the schema", exc) from None
    finally:
        engine.dispose()


def _document(driver: Driver, conn: Connection, wanted: list[str] | None) -> Document:
    insp = sa_inspect(conn)
    dialect = conn.dialect
    names = _schema_names(driver, insp, wanted or None)
    return {
        "driver": driver.name,
        "database": _database(driver, conn),
        "schemas": [_schema(insp, dialect, name) for name in names],
    }


def _database(driver: Driver, conn: Connection) -> str | None:
    sql = DATABASE_SQL.get(conn.dialect.name)
    if sql is None:  # sqlite (the sqlite and csv drivers): the source's file name
        name = source_name(str(getattr(driver.options, "source_url", "")))
        return name or None
    value = conn.exec_driver_sql(sql).scalar()
    return None if value is None else str(value)


def _schema_names(driver: Driver, insp: Inspector, wanted: list[str] | None) -> list[str]:
    dialect = insp.dialect.name
    existing = insp.get_schema_names()
    if wanted is not None:
        missing = [name for name in wanted if name not in existing]
        if missing:
            known = ", ".join(sorted(user_schemas(dialect, existing))) or "none"
            what = "schema" if len(missing) == 1 else "schemas"
            raise driver.error(
                "Cannot inspect the schema",
                f"no {what} {', '.join(repr(m) for m in missing)} in the database "
                f"(its schemas: {known})",
            )
        return sorted(set(wanted))
    if dialect == "sqlite":
        return ["main"]
    if dialect == "mysql" and insp.default_schema_name:
        return [insp.default_schema_name]
    return sorted(user_schemas(dialect, existing))


def user_schemas(dialect: str, names: Iterable[str]) -> list[str]:
    """NAMES without the system schemas of DIALECT (a SQLAlchemy dialect name)."""
    system = SYSTEM_SCHEMAS.get(dialect, frozenset())
    return [
        name
        for name in names
        if name not in system and not (dialect == "postgresql" and name.startswith("pg_"))
    ]


def _schema(insp: Inspector, dialect: Dialect, schema: str) -> Document:
    table_names = sorted(insp.get_table_names(schema=schema))
    view_names = list(insp.get_view_names(schema=schema))
    if dialect.name == "postgresql":
        view_names += insp.get_materialized_view_names(schema=schema)
    view_names = sorted(set(view_names))

    columns = _by_name(insp.get_multi_columns(schema=schema, kind=ObjectKind.ANY))
    # SQLite: list the indexes behind UNIQUE constraints, as the other databases do.
    idx_options: dict[str, Any] = {"include_auto_indexes": True} if dialect.name == "sqlite" else {}
    pks = _by_name(insp.get_multi_pk_constraint(schema=schema)) if table_names else {}
    fks = _by_name(insp.get_multi_foreign_keys(schema=schema)) if table_names else {}
    indexes = _by_name(insp.get_multi_indexes(schema=schema, **idx_options)) if table_names else {}
    comments: dict[str, Any] = {}
    if table_names and dialect.supports_comments:
        comments = _by_name(insp.get_multi_table_comment(schema=schema))

    tables = []
    for name in table_names:
        pk = pks.get(name) or {}
        pk_columns = list(pk.get("constrained_columns") or [])
        pk_name = pk.get("name") or ("PRIMARY" if dialect.name == "mysql" else None)
        primary_key = {"name": pk_name, "columns": pk_columns} if pk_columns else None
        tables.append(
            {
                "name": name,
                "comment": (comments.get(name) or {}).get("text"),
                "columns": _columns(columns.get(name, []), dialect),
                "primary_key": primary_key,
                "foreign_keys": _foreign_keys(fks.get(name, []), schema),
                "indexes": _indexes(indexes.get(name, []), primary_key),
            }
        )
    views = [
        {
            "name": name,
            "definition": _view_definition(insp, name, schema),
            "columns": _columns(columns.get(name, []), dialect),
        }
        for name in view_names
    ]
    return {"name": schema, "tables": tables, "views": views}


def _by_name(multi: Mapping[tuple[str | None, str], Any]) -> dict[str, Any]:
    """A get_multi_* result keyed by object name (the schema is the same for all)."""
    return {name: value for (_schema_name, name), value in multi.items()}


def _columns(reflected: Iterable[Mapping[str, Any]], dialect: Dialect) -> list[Document]:
    return [
        {
            "name": str(col["name"]),
            "type": type_text(col["type"], dialect),
            "nullable": bool(col.get("nullable", True)),
            "default": None if col.get("default") is None else str(col["default"]),
        }
        for col in reflected
    ]


def type_text(type_: TypeEngine[Any], dialect: Dialect) -> str | None:
    """TYPE_ as DIALECT writes it (``VARCHAR(40)``), or None for no declared type."""
    if isinstance(type_, NullType):
        return None
    try:
        return str(type_.compile(dialect=dialect))
    except SQLAlchemyError:
        return str(type_.__class__.__name__).upper()


def _foreign_keys(reflected: Iterable[Mapping[str, Any]], schema: str) -> list[Document]:
    keys = [
        {
            "name": fk.get("name"),
            "columns": list(fk["constrained_columns"]),
            "referred_schema": fk.get("referred_schema") or schema,
            "referred_table": fk["referred_table"],
            "referred_columns": list(fk["referred_columns"]),
        }
        for fk in reflected
    ]
    return sorted(keys, key=_name_then_columns)


def _indexes(
    reflected: Iterable[Mapping[str, Any]], primary_key: Mapping[str, Any] | None
) -> list[Document]:
    pk_name = primary_key["name"] if primary_key else None
    pk_columns = primary_key["columns"] if primary_key else None
    result = []
    for idx in reflected:
        expressions = idx.get("expressions") or []
        columns = [
            str(col if col is not None else (expressions[i] if i < len(expressions) else "?"))
            for i, col in enumerate(idx.get("column_names") or [])
        ]
        name = idx.get("name")
        if pk_name is not None and name == pk_name:
            continue
        if str(name).startswith("sqlite_autoindex_") and columns == pk_columns:
            continue  # SQLite's index behind a non-INTEGER primary key
        result.append({"name": name, "columns": columns, "unique": bool(idx.get("unique"))})
    return sorted(result, key=_name_then_columns)


def _name_then_columns(item: Mapping[str, Any]) -> tuple[str, list[str]]:
    return (item["name"] or "", item["columns"])


def _view_definition(insp: Inspector, name: str, schema: str) -> str | None:
    try:
        definition = insp.get_view_definition(name, schema=schema)
    except NotImplementedError:
        return None
    return None if definition is None else str(definition).strip()


def _is_timeout(orig: BaseException | None) -> bool:
    """Whether ORIG is a database error saying that the statement timeout stopped it."""
    if orig is None:
        return False
    if getattr(orig, "sqlstate", None) == "57014":  # PostgreSQL query_canceled
        return True
    args = orig.args
    if args and isinstance(args[0], int) and args[0] in _TIMEOUT_ERRNOS:
        return True
    text = str(orig).lower()
    return "interrupted" in text or "timed out" in text


def _timeout_error(driver: Driver, deadline: _Deadline) -> DriverError:
    return DriverError(
        driver.scrub(
            f"Inspecting the schema of connection {driver.context.connection!r} took longer "
            f"than the timeout of {deadline.timeout or 0:g} s and was stopped; give it more "
            "time or inspect fewer schemas."
        )
    )
