"""The demo's sample SQLite database."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest

from outpost.drivers.base import DriverContext
from outpost.drivers.sqlite import SQLiteDriver
from outpost.errors import ConflictError
from outpost.sample_data import SAMPLE_QUERY, create_sample_database


def dump(path: Path) -> list[str]:
    conn = sqlite3.connect(path)
    try:
        return list(conn.iterdump())
    finally:
        conn.close()


def test_database_has_the_shop(tmp_path: Path) -> None:
    path = tmp_path / "shop.db"
    create_sample_database(path)
    conn = sqlite3.connect(path)
    try:
        objects = dict(
            conn.execute("SELECT name, type FROM sqlite_master WHERE name NOT LIKE 'sqlite_%'")
        )
        assert objects == {
            "customers": "table",
            "products": "table",
            "orders": "table",
            "order_items": "table",
            "orders_customer_id": "index",
            "order_totals": "view",
        }
        counts = {
            table: conn.execute(f"SELECT count(*) FROM {table}").fetchone()[0]
            for table in ("customers", "products", "orders", "order_items")
        }
        assert all(20 <= n <= 200 for t, n in counts.items() if t != "products"), counts
        assert 10 <= counts["products"] <= 200
        assert conn.execute("PRAGMA foreign_key_check").fetchall() == []
        fks = conn.execute("SELECT \"table\" FROM pragma_foreign_key_list('order_items')")
        assert sorted(r[0] for r in fks) == ["orders", "products"]
        rows = conn.execute(SAMPLE_QUERY).fetchall()
        assert 1 <= len(rows) <= 10
        revenues = [r[-1] for r in rows]
        assert revenues == sorted(revenues, reverse=True)
        assert all(isinstance(r, float) and r > 0 for r in revenues)
    finally:
        conn.close()


def test_sample_query_through_the_driver(tmp_path: Path) -> None:
    path = tmp_path / "shop.db"
    create_sample_database(path)
    d = SQLiteDriver(
        SQLiteDriver.parse_options({"source_url": str(path)}),
        DriverContext(connection="demo", cache_dir=tmp_path / "cache"),
    )
    result = d.query(SAMPLE_QUERY)
    assert result.columns == ["customer", "country", "orders", "items", "revenue"]
    assert result.rows
    assert d.query("SELECT count(*) FROM order_totals").rows[0][0] > 0


def test_deterministic(tmp_path: Path) -> None:
    create_sample_database(tmp_path / "a.db")
    create_sample_database(tmp_path / "b.db")
    assert dump(tmp_path / "a.db") == dump(tmp_path / "b.db")


def test_refuses_to_overwrite_unless_asked(tmp_path: Path) -> None:
    path = tmp_path / "shop.db"
    path.write_text("precious")
    with pytest.raises(ConflictError, match=r"shop\.db already exists"):
        create_sample_database(path)
    assert path.read_text() == "precious"
    create_sample_database(path, overwrite=True)
    assert dump(path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["shop.db"]  # no temporary left


def test_creates_missing_parent_directories(tmp_path: Path) -> None:
    path = tmp_path / "demo" / "data" / "shop.db"
    create_sample_database(path)
    assert path.is_file()
