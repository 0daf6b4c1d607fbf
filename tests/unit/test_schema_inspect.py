"""Schema inspection without a database server: the SQL Server wiring (there is no SQL Server
here: the real pymssql against a refused port on 127.0.0.1), type names as each dialect writes
them, the system schemas left out by default, and drivers that cannot be inspected."""

from __future__ import annotations

from typing import Any, ClassVar

import pytest
from sqlalchemy.dialects import mssql, mysql, postgresql, sqlite
from sqlalchemy.engine import Dialect, make_url
from sqlalchemy.types import NullType

from outpost.drivers.base import Driver, DriverContext, DriverOptions, QueryResult
from outpost.drivers.base import TestResult as DriverTestResult
from outpost.drivers.mssql import MSSQLDriver
from outpost.errors import DriverError
from outpost.schema.inspect import inspect_driver, type_text, user_schemas
from tests.helpers import refused_port


def test_mssql_inspection_connects_through_the_driver() -> None:
    """The mssql+pymssql engine gets its connection from the driver (its login, its errors)."""
    options = MSSQLDriver.parse_options(
        {"host": "127.0.0.1", "port": refused_port(), "password": "Sekr3t-Pw-9081", "timeout": 2}
    )
    driver = MSSQLDriver(options, DriverContext(connection="erp"))
    assert driver.sqlalchemy_dialect == "mssql+pymssql"
    with pytest.raises(DriverError) as info:
        inspect_driver(driver, timeout=5)
    message = str(info.value)
    assert message.startswith("Cannot connect to SQL Server at 127.0.0.1:")
    assert "for connection 'erp'" in message
    assert "Sekr3t" not in message


def test_mssql_default_schemas_leave_out_the_system_and_role_schemas() -> None:
    names = ["dbo", "sales", "sys", "INFORMATION_SCHEMA", "guest", "db_owner", "db_datareader"]
    assert user_schemas("mssql", names) == ["dbo", "sales"]


def test_postgres_and_mysql_system_schemas() -> None:
    assert user_schemas("postgresql", ["pg_catalog", "pg_toast", "information_schema", "a"]) == [
        "a"
    ]
    assert user_schemas("mysql", ["mysql", "sys", "performance_schema", "shop"]) == ["shop"]


def dialect(name: str) -> Dialect:
    return make_url(f"{name}://").get_dialect()()


@pytest.mark.parametrize(
    ("type_", "dialect_name", "text"),
    [
        (mssql.NVARCHAR(50), "mssql+pymssql", "NVARCHAR(50)"),
        (mssql.BIT(), "mssql+pymssql", "BIT"),
        (mssql.UNIQUEIDENTIFIER(), "mssql+pymssql", "UNIQUEIDENTIFIER"),
        (postgresql.JSONB(), "postgresql+psycopg", "JSONB"),
        (postgresql.ARRAY(postgresql.TEXT()), "postgresql+psycopg", "TEXT[]"),
        (mysql.INTEGER(display_width=11), "mysql+pymysql", "INTEGER(11)"),
        (sqlite.NUMERIC(10, 2), "sqlite", "NUMERIC(10, 2)"),
        (NullType(), "sqlite", None),
    ],
)
def test_type_text_is_the_dialects_spelling(
    type_: Any, dialect_name: str, text: str | None
) -> None:
    assert type_text(type_, dialect(dialect_name)) == text


class _Options(DriverOptions):
    pass


class _NoDialect(Driver):
    name: ClassVar[str] = "acme"
    display_name: ClassVar[str] = "Acme DB"
    options_model: ClassVar[type[DriverOptions]] = _Options

    def test(self, timeout: float | None = None) -> DriverTestResult:
        return DriverTestResult(server_version="1", duration_seconds=0.0)

    def query(self, sql: str, params: Any = None, **kwargs: Any) -> QueryResult:
        return QueryResult(columns=[], rows=[], row_count=0)


class _UnknownDialect(_NoDialect):
    sqlalchemy_dialect: ClassVar[str | None] = "acmedb+acme"


def test_a_driver_without_inspection_says_so() -> None:
    driver = _NoDialect(_Options(), DriverContext(connection="legacy"))
    with pytest.raises(DriverError) as info:
        inspect_driver(driver)
    assert str(info.value) == (
        "Connection 'legacy' cannot be inspected: the Acme DB driver offers no schema inspection."
    )


def test_a_driver_naming_an_unknown_dialect_says_which() -> None:
    driver = _UnknownDialect(_Options(), DriverContext(connection="legacy"))
    with pytest.raises(DriverError) as info:
        inspect_driver(driver)
    message = str(info.value)
    assert message.startswith(
        "Cannot inspect the schema (SQLAlchemy dialect acmedb+acme) for connection 'legacy': "
    )
    assert "acmedb" in message.split(": ", 1)[1]
