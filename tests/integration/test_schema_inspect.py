"""Schema inspection (outpost.schema.inspect) against the real PostgreSQL and MariaDB servers,
an SQLite file and a CSV file: each test builds a small schema, inspects it through the driver
and checks the document a user (HQ, the dashboard) gets."""

from __future__ import annotations

import json
import sqlite3
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psycopg
import pymysql
import pytest

from outpost.drivers.base import Driver, DriverContext
from outpost.drivers.csv import CSVDriver
from outpost.drivers.mysql import MySQLDriver
from outpost.drivers.postgres import PostgresDriver
from outpost.drivers.redshift import RedshiftDriver
from outpost.drivers.sqlite import SQLiteDriver
from outpost.errors import DriverError
from outpost.schema.inspect import inspect_driver
from tests.conftest import mysql_admin
from tests.helpers import refused_port

pytestmark = pytest.mark.integration

#: A timeout that has always passed by the time the first catalog statement runs.
TINY_TIMEOUT = 1e-6


def col(name: str, type_: str | None, nullable: bool, default: str | None = None) -> dict[str, Any]:
    return {"name": name, "type": type_, "nullable": nullable, "default": default}


def schema_named(doc: dict[str, Any], name: str) -> dict[str, Any]:
    found: dict[str, Any] = next(s for s in doc["schemas"] if s["name"] == name)
    return found


def assert_stable_json(driver: Driver, schemas: list[str]) -> dict[str, Any]:
    """Inspect twice: the documents are equal and survive a JSON round trip unchanged."""
    first = inspect_driver(driver, schemas, timeout=30)
    second = inspect_driver(driver, schemas, timeout=30)
    assert json.loads(json.dumps(first)) == first
    assert json.dumps(first, sort_keys=False) == json.dumps(second, sort_keys=False)
    return first


# --- PostgreSQL -----------------------------------------------------------------------------


@pytest.fixture
def pg_schemas(pg_dsn: str) -> Iterator[tuple[str, str]]:
    """Two throwaway schemas, CRM and SALES (a foreign key from SALES to CRM), dropped after."""
    tag = uuid.uuid4().hex[:10]
    crm, sales = f"outpost_crm_{tag}", f"outpost_sales_{tag}"
    with psycopg.connect(pg_dsn, autocommit=True) as conn:
        conn.execute(
            f"""
            CREATE SCHEMA {crm};
            CREATE SCHEMA {sales};
            CREATE TABLE {crm}.customers (
                id serial PRIMARY KEY,
                email text NOT NULL,
                name varchar(40),
                created_at timestamptz DEFAULT now()
            );
            CREATE UNIQUE INDEX customers_email_key ON {crm}.customers (lower(email));
            COMMENT ON TABLE {crm}.customers IS 'People who order';
            CREATE TABLE {sales}.orders (
                id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
                customer_id integer NOT NULL REFERENCES {crm}.customers (id),
                total numeric(10, 2) NOT NULL DEFAULT 0,
                code varchar(12) CONSTRAINT orders_code_key UNIQUE,
                note text
            );
            CREATE INDEX orders_customer_total ON {sales}.orders (customer_id, total);
            CREATE VIEW {sales}.big_orders AS
                SELECT id, total FROM {sales}.orders WHERE total > 100;
            """
        )
        try:
            yield crm, sales
        finally:
            conn.execute(f"DROP SCHEMA {sales} CASCADE; DROP SCHEMA {crm} CASCADE")


@pytest.fixture
def pg_driver(pg_params: dict[str, object]) -> PostgresDriver:
    return PostgresDriver(PostgresDriver.parse_options(pg_params), DriverContext(connection="pg"))


def test_postgres_document_matches_what_was_created(
    pg_driver: PostgresDriver, pg_schemas: tuple[str, str]
) -> None:
    crm, sales = pg_schemas
    doc = assert_stable_json(pg_driver, [sales, crm])
    assert doc["driver"] == "postgres"
    assert doc["database"] == "test"
    assert [s["name"] for s in doc["schemas"]] == sorted([crm, sales])

    assert schema_named(doc, crm) == {
        "name": crm,
        "tables": [
            {
                "name": "customers",
                "comment": "People who order",
                "columns": [
                    col("id", "INTEGER", False, f"nextval('{crm}.customers_id_seq'::regclass)"),
                    col("email", "TEXT", False),
                    col("name", "VARCHAR(40)", True),
                    col("created_at", "TIMESTAMP WITH TIME ZONE", True, "now()"),
                ],
                "primary_key": {"name": "customers_pkey", "columns": ["id"]},
                "foreign_keys": [],
                "indexes": [
                    {"name": "customers_email_key", "columns": ["lower(email)"], "unique": True}
                ],
            }
        ],
        "views": [],
    }

    got_sales = schema_named(doc, sales)
    (orders,) = got_sales["tables"]
    assert orders == {
        "name": "orders",
        "comment": None,
        "columns": [
            col("id", "BIGINT", False),
            col("customer_id", "INTEGER", False),
            col("total", "NUMERIC(10, 2)", False, "0"),
            col("code", "VARCHAR(12)", True),
            col("note", "TEXT", True),
        ],
        "primary_key": {"name": "orders_pkey", "columns": ["id"]},
        "foreign_keys": [
            {
                "name": "orders_customer_id_fkey",
                "columns": ["customer_id"],
                "referred_schema": crm,
                "referred_table": "customers",
                "referred_columns": ["id"],
            }
        ],
        "indexes": [
            {"name": "orders_code_key", "columns": ["code"], "unique": True},
            {"name": "orders_customer_total", "columns": ["customer_id", "total"], "unique": False},
        ],
    }
    (view,) = got_sales["views"]
    assert view["name"] == "big_orders"
    assert view["columns"] == [col("id", "BIGINT", True), col("total", "NUMERIC(10, 2)", True)]
    assert view["definition"].startswith("SELECT")
    assert f"FROM {sales}.orders" in view["definition"]
    assert "total > " in view["definition"]


def test_postgres_foreign_key_to_a_schema_on_the_search_path_names_it(
    pg_driver: PostgresDriver, pg_schemas: tuple[str, str], pg_dsn: str
) -> None:
    _crm, sales = pg_schemas
    table = f"outpost_ref_{uuid.uuid4().hex[:10]}"
    with psycopg.connect(pg_dsn, autocommit=True) as conn:
        conn.execute(f"CREATE TABLE public.{table} (id int PRIMARY KEY)")
        try:
            conn.execute(f"CREATE TABLE {sales}.refs (id int REFERENCES public.{table} (id))")
            doc = inspect_driver(pg_driver, [sales])
        finally:
            conn.execute(f"DROP TABLE {sales}.refs; DROP TABLE public.{table}")
    refs = next(t for t in doc["schemas"][0]["tables"] if t["name"] == "refs")
    assert refs["foreign_keys"][0]["referred_schema"] == "public"
    assert refs["foreign_keys"][0]["referred_table"] == table


def test_postgres_default_schemas_are_the_non_system_ones(
    pg_driver: PostgresDriver, pg_schemas: tuple[str, str]
) -> None:
    names = [s["name"] for s in inspect_driver(pg_driver)["schemas"]]
    assert set(pg_schemas) <= set(names)
    assert "public" in names
    assert names == sorted(names)
    assert "information_schema" not in names
    assert not [n for n in names if n.startswith("pg_")]


def test_postgres_schemas_filter(pg_driver: PostgresDriver, pg_schemas: tuple[str, str]) -> None:
    crm, _sales = pg_schemas
    doc = inspect_driver(pg_driver, [crm])
    assert [s["name"] for s in doc["schemas"]] == [crm]
    assert [t["name"] for t in doc["schemas"][0]["tables"]] == ["customers"]


def test_postgres_unknown_schema_is_an_error_naming_it(
    pg_driver: PostgresDriver, pg_schemas: tuple[str, str]
) -> None:
    crm, _sales = pg_schemas
    with pytest.raises(DriverError) as info:
        inspect_driver(pg_driver, [crm, "no_such_schema"])
    message = str(info.value)
    assert message.startswith("Cannot inspect the schema for connection 'pg': ")
    assert "no schema 'no_such_schema' in the database" in message
    assert crm in message  # the schemas that exist are listed
    assert "pg_catalog" not in message


def test_postgres_timeout_stops_the_inspection(pg_driver: PostgresDriver) -> None:
    with pytest.raises(DriverError) as info:
        inspect_driver(pg_driver, timeout=TINY_TIMEOUT)
    assert str(info.value) == (
        "Inspecting the schema of connection 'pg' took longer than the timeout of 1e-06 s and "
        "was stopped; give it more time or inspect fewer schemas."
    )


def test_postgres_inspection_connection_reads_only_and_has_a_statement_timeout(
    pg_driver: PostgresDriver,
) -> None:
    conn = pg_driver.dbapi_connect(timeout=0.2)
    try:
        with pytest.raises(psycopg.errors.ReadOnlySqlTransaction):
            conn.execute("CREATE TABLE outpost_never (a int)")
        conn.rollback()
        with pytest.raises(psycopg.errors.QueryCanceled):
            conn.execute("SELECT pg_sleep(30)")
    finally:
        conn.close()


def test_postgres_unreachable_server_is_a_driver_error() -> None:
    options = PostgresDriver.parse_options({"host": "127.0.0.1", "port": refused_port()})
    driver = PostgresDriver(options, DriverContext(connection="pg"))
    with pytest.raises(DriverError) as info:
        inspect_driver(driver, timeout=5)
    assert "Cannot connect to PostgreSQL at 127.0.0.1:" in str(info.value)
    assert "connection refused" in str(info.value)


def test_redshift_driver_inspects_over_the_postgres_protocol(
    pg_params: dict[str, object], pg_schemas: tuple[str, str]
) -> None:
    """There is no Redshift here: the redshift driver against PostgreSQL (no TLS)."""
    crm, _sales = pg_schemas
    options = RedshiftDriver.parse_options({**pg_params, "ssl": "disable"})
    driver = RedshiftDriver(options, DriverContext(connection="rs"))
    doc = inspect_driver(driver, [crm], timeout=30)
    assert doc["driver"] == "redshift"
    assert [t["name"] for t in doc["schemas"][0]["tables"]] == ["customers"]


# --- MariaDB --------------------------------------------------------------------------------


@pytest.fixture
def maria_dbs(mysql_params: dict[str, object]) -> Iterator[tuple[str, str]]:
    """Two throwaway databases, CRM and SALES (a foreign key from SALES to CRM)."""
    tag = uuid.uuid4().hex[:10]
    crm, sales = f"outpost_crm_{tag}", f"outpost_sales_{tag}"
    admin = mysql_admin(mysql_params)
    try:
        with admin.cursor() as cur:
            cur.execute(f"CREATE DATABASE {crm}")
            cur.execute(f"CREATE DATABASE {sales}")
            cur.execute(
                f"CREATE TABLE {crm}.customers ("
                " id INT AUTO_INCREMENT PRIMARY KEY,"
                " email VARCHAR(100) NOT NULL,"
                " name VARCHAR(40) DEFAULT 'anon',"
                " UNIQUE KEY customers_email (email)"
                ") COMMENT 'People who order'"
            )
            cur.execute(
                f"CREATE TABLE {sales}.orders ("
                " id BIGINT PRIMARY KEY,"
                " customer_id INT NOT NULL,"
                " total DECIMAL(10, 2) NOT NULL DEFAULT 0,"
                " note TEXT,"
                " KEY orders_customer_total (customer_id, total),"
                " CONSTRAINT orders_customer_fk FOREIGN KEY (customer_id)"
                f"  REFERENCES {crm}.customers (id)"
                ")"
            )
            cur.execute(
                f"CREATE VIEW {sales}.big_orders AS "
                f"SELECT id, total FROM {sales}.orders WHERE total > 100"
            )
        yield crm, sales
    finally:
        with admin.cursor() as cur:
            cur.execute(f"DROP DATABASE IF EXISTS {sales}")
            cur.execute(f"DROP DATABASE IF EXISTS {crm}")
        admin.close()


def maria_driver(params: dict[str, object], **overrides: object) -> MySQLDriver:
    options = MySQLDriver.parse_options({**params, **overrides})
    return MySQLDriver(options, DriverContext(connection="maria"))


def test_mariadb_document_matches_what_was_created(
    mysql_params: dict[str, object], maria_dbs: tuple[str, str]
) -> None:
    crm, sales = maria_dbs
    driver = maria_driver(mysql_params, database=sales)
    doc = assert_stable_json(driver, [sales, crm])
    assert doc["driver"] == "mysql"
    assert doc["database"] == sales
    assert [s["name"] for s in doc["schemas"]] == sorted([crm, sales])

    (customers,) = schema_named(doc, crm)["tables"]
    assert customers["comment"] == "People who order"
    assert [(c["name"], c["nullable"], c["default"]) for c in customers["columns"]] == [
        ("id", False, None),
        ("email", False, None),
        ("name", True, "'anon'"),
    ]
    assert customers["columns"][0]["type"].startswith("INTEGER")
    assert customers["columns"][1]["type"] == "VARCHAR(100)"
    assert customers["primary_key"] == {"name": "PRIMARY", "columns": ["id"]}
    assert customers["indexes"] == [
        {"name": "customers_email", "columns": ["email"], "unique": True}
    ]

    got_sales = schema_named(doc, sales)
    (orders,) = got_sales["tables"]
    assert [c["name"] for c in orders["columns"]] == ["id", "customer_id", "total", "note"]
    assert orders["columns"][2] == col("total", "DECIMAL(10, 2)", False, "0.00")
    assert orders["columns"][3] == col("note", "TEXT", True)
    assert orders["comment"] is None
    assert orders["primary_key"] == {"name": "PRIMARY", "columns": ["id"]}
    assert orders["foreign_keys"] == [
        {
            "name": "orders_customer_fk",
            "columns": ["customer_id"],
            "referred_schema": crm,
            "referred_table": "customers",
            "referred_columns": ["id"],
        }
    ]
    # InnoDB's index for the foreign key is the composite one created with the table.
    assert orders["indexes"] == [
        {"name": "orders_customer_total", "columns": ["customer_id", "total"], "unique": False}
    ]
    (view,) = got_sales["views"]
    assert view["name"] == "big_orders"
    assert [c["name"] for c in view["columns"]] == ["id", "total"]
    assert "`total` > 100" in view["definition"]


def test_mariadb_default_is_the_connections_database(
    mysql_params: dict[str, object], maria_dbs: tuple[str, str]
) -> None:
    crm, sales = maria_dbs
    doc = inspect_driver(maria_driver(mysql_params, database=crm))
    assert [s["name"] for s in doc["schemas"]] == [crm]
    # without a database: every non-system database
    everything = inspect_driver(maria_driver(mysql_params, database=None))
    names = [s["name"] for s in everything["schemas"]]
    assert {crm, sales} <= set(names)
    assert not {"mysql", "information_schema", "performance_schema", "sys"} & set(names)
    assert everything["database"] is None


def test_mariadb_schemas_filter_and_unknown_schema(
    mysql_params: dict[str, object], maria_dbs: tuple[str, str]
) -> None:
    crm, sales = maria_dbs
    driver = maria_driver(mysql_params, database=sales)
    doc = inspect_driver(driver, [crm])
    assert [s["name"] for s in doc["schemas"]] == [crm]
    with pytest.raises(DriverError) as info:
        inspect_driver(driver, ["nope_a", "nope_b"])
    message = str(info.value)
    assert "Cannot inspect the schema for connection 'maria': no schemas 'nope_a', 'nope_b'" in (
        message
    )
    assert crm in message
    assert "performance_schema" not in message


def test_mariadb_timeout_stops_the_inspection(
    mysql_params: dict[str, object], maria_dbs: tuple[str, str]
) -> None:
    with pytest.raises(DriverError) as info:
        inspect_driver(maria_driver(mysql_params), timeout=TINY_TIMEOUT)
    assert "took longer than the timeout of 1e-06 s and was stopped" in str(info.value)


def test_mariadb_inspection_connection_reads_only_and_has_a_statement_timeout(
    mysql_params: dict[str, object],
) -> None:
    conn = maria_driver(mysql_params).dbapi_connect(timeout=0.2)
    try:
        with conn.cursor() as cur:
            with pytest.raises(pymysql.MySQLError) as info:
                cur.execute("CREATE TABLE outpost_never (a INT)")
            assert info.value.args[0] == 1792  # read-only transaction
            with pytest.raises(pymysql.MySQLError) as info:
                cur.execute("SELECT SLEEP(30)")
            assert info.value.args[0] == 1969  # max_statement_time exceeded
    finally:
        conn.close()


# --- SQLite and CSV -------------------------------------------------------------------------


@pytest.fixture
def sqlite_file(tmp_path: Path) -> Path:
    path = tmp_path / "shop.db"
    conn = sqlite3.connect(path)
    conn.executescript(
        """
        CREATE TABLE customers (
            id INTEGER PRIMARY KEY,
            email TEXT NOT NULL UNIQUE,
            name VARCHAR(40) DEFAULT 'anon'
        );
        CREATE TABLE orders (
            code TEXT PRIMARY KEY,
            customer_id INTEGER NOT NULL REFERENCES customers (id),
            total NUMERIC(10, 2) NOT NULL DEFAULT 0,
            placed_at TIMESTAMP
        );
        CREATE INDEX orders_customer_total ON orders (customer_id, total);
        CREATE VIEW big_orders AS SELECT code, total, total * 2 AS doubled FROM orders;
        """
    )
    conn.close()
    return path


def test_sqlite_document_matches_what_was_created(sqlite_file: Path, cache_dir: Path) -> None:
    options = SQLiteDriver.parse_options({"source_url": str(sqlite_file)})
    driver = SQLiteDriver(options, DriverContext(connection="lite", cache_dir=cache_dir))
    doc = assert_stable_json(driver, ["main"])
    assert inspect_driver(driver) == doc  # "main" is the default
    assert inspect_driver(driver, []) == doc  # and so is an empty list
    assert doc["driver"] == "sqlite"
    assert doc["database"] == "shop.db"
    (main,) = doc["schemas"]
    assert main["name"] == "main"
    customers, orders = main["tables"]
    assert customers == {
        "name": "customers",
        "comment": None,
        "columns": [
            col("id", "INTEGER", True),  # SQLite reports a rowid alias as nullable
            col("email", "TEXT", False),
            col("name", "VARCHAR(40)", True, "'anon'"),
        ],
        "primary_key": {"name": None, "columns": ["id"]},
        "foreign_keys": [],
        "indexes": [
            # the index SQLite made for the UNIQUE constraint
            {"name": "sqlite_autoindex_customers_1", "columns": ["email"], "unique": True}
        ],
    }
    assert orders == {
        "name": "orders",
        "comment": None,
        "columns": [
            col("code", "TEXT", True),
            col("customer_id", "INTEGER", False),
            col("total", "NUMERIC(10, 2)", False, "0"),
            col("placed_at", "TIMESTAMP", True),
        ],
        "primary_key": {"name": None, "columns": ["code"]},
        "foreign_keys": [
            {
                "name": None,
                "columns": ["customer_id"],
                "referred_schema": "main",
                "referred_table": "customers",
                "referred_columns": ["id"],
            }
        ],
        # the primary key's own index (sqlite_autoindex_orders_1) is left out
        "indexes": [
            {"name": "orders_customer_total", "columns": ["customer_id", "total"], "unique": False}
        ],
    }
    assert main["views"] == [
        {
            "name": "big_orders",
            "definition": "CREATE VIEW big_orders AS SELECT code, total, total * 2 AS doubled "
            "FROM orders",
            "columns": [
                col("code", "TEXT", True),
                col("total", "NUMERIC(10, 2)", True),
                col("doubled", None, True),  # an expression has no declared type
            ],
        }
    ]


def test_sqlite_unknown_schema_and_timeout(sqlite_file: Path, cache_dir: Path) -> None:
    options = SQLiteDriver.parse_options({"source_url": str(sqlite_file)})
    driver = SQLiteDriver(options, DriverContext(connection="lite", cache_dir=cache_dir))
    with pytest.raises(DriverError) as info:
        inspect_driver(driver, ["public"])
    assert str(info.value) == (
        "Cannot inspect the schema for connection 'lite': no schema 'public' in the database "
        "(its schemas: main)."
    )
    with pytest.raises(DriverError) as info:
        inspect_driver(driver, timeout=TINY_TIMEOUT)
    assert "took longer than the timeout of 1e-06 s" in str(info.value)


def test_sqlite_missing_file_is_a_driver_error(tmp_path: Path, cache_dir: Path) -> None:
    options = SQLiteDriver.parse_options({"source_url": str(tmp_path / "gone.db")})
    driver = SQLiteDriver(options, DriverContext(connection="lite", cache_dir=cache_dir))
    with pytest.raises(DriverError) as info:
        inspect_driver(driver)
    assert "'lite'" in str(info.value)
    assert "gone.db" in str(info.value)


def test_csv_document_is_the_loaded_table_and_its_view(tmp_path: Path, cache_dir: Path) -> None:
    path = tmp_path / "Sales 2024.csv"
    path.write_text("id,region,amount,sold_on\n1,north,1.5,2024-01-02\n2,south,2,2024-01-03\n")
    options = CSVDriver.parse_options({"source_url": str(path), "time_format": "%Y-%m-%d"})
    driver = CSVDriver(options, DriverContext(connection="sales", cache_dir=cache_dir))
    try:
        doc = assert_stable_json(driver, ["main"])
        columns = [
            col("id", "INTEGER", True),
            col("region", "TEXT", True),
            col("amount", "REAL", True),
            col("sold_on", "TIMESTAMP", True),
        ]
        assert doc == {
            "driver": "csv",
            "database": "Sales 2024.csv",
            "schemas": [
                {
                    "name": "main",
                    "tables": [
                        {
                            "name": "sales_2024",
                            "comment": None,
                            "columns": columns,
                            "primary_key": None,
                            "foreign_keys": [],
                            "indexes": [],
                        }
                    ],
                    "views": [
                        {
                            "name": "csv",
                            "definition": 'CREATE VIEW "csv" AS SELECT * FROM "sales_2024"',
                            "columns": columns,
                        }
                    ],
                }
            ],
        }
        # the driver's loaded file still answers queries
        assert driver.query("SELECT count(*) FROM csv").rows == [[2]]
    finally:
        driver.close()
