"""A small, deterministic SQLite database for the demo: a shop.

Tables ``customers``, ``products``, ``orders`` and ``order_items`` (with foreign keys), an
index on ``orders(customer_id)`` and the view ``order_totals``. The same call always writes
the same rows (a seeded generator and fixed dates), so the demo and its screenshots are
repeatable. :data:`SAMPLE_QUERY` is a ready-to-run SELECT over it.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import os
import random
import sqlite3
import tempfile
from pathlib import Path

from outpost.errors import ConflictError, OutpostError

#: Top customers by revenue (cancelled orders left out).
SAMPLE_QUERY = """\
SELECT c.name AS customer,
       c.country,
       count(DISTINCT o.id) AS orders,
       sum(oi.quantity) AS items,
       round(sum(oi.quantity * oi.unit_price_cents) / 100.0, 2) AS revenue
FROM customers AS c
JOIN orders AS o ON o.customer_id = c.id
JOIN order_items AS oi ON oi.order_id = o.id
WHERE o.status <> 'cancelled'
GROUP BY c.id
ORDER BY revenue DESC, c.name
LIMIT 10"""

SCHEMA = """\
CREATE TABLE customers (
    id          INTEGER PRIMARY KEY,
    name        TEXT NOT NULL,
    email       TEXT NOT NULL UNIQUE,
    country     TEXT NOT NULL,
    created_at  TEXT NOT NULL
);
CREATE TABLE products (
    id           INTEGER PRIMARY KEY,
    sku          TEXT NOT NULL UNIQUE,
    name         TEXT NOT NULL,
    category     TEXT NOT NULL,
    price_cents  INTEGER NOT NULL CHECK (price_cents > 0)
);
CREATE TABLE orders (
    id           INTEGER PRIMARY KEY,
    customer_id  INTEGER NOT NULL REFERENCES customers (id),
    ordered_at   TEXT NOT NULL,
    status       TEXT NOT NULL CHECK (status IN ('pending', 'shipped', 'delivered', 'cancelled'))
);
CREATE TABLE order_items (
    order_id          INTEGER NOT NULL REFERENCES orders (id) ON DELETE CASCADE,
    product_id        INTEGER NOT NULL REFERENCES products (id),
    quantity          INTEGER NOT NULL CHECK (quantity > 0),
    unit_price_cents  INTEGER NOT NULL,
    PRIMARY KEY (order_id, product_id)
);
CREATE INDEX orders_customer_id ON orders (customer_id);
CREATE VIEW order_totals AS
    SELECT o.id AS order_id,
           o.customer_id,
           o.ordered_at,
           o.status,
           sum(oi.quantity * oi.unit_price_cents) AS total_cents
    FROM orders AS o
    JOIN order_items AS oi ON oi.order_id = o.id
    GROUP BY o.id;
"""

_CUSTOMERS = [
    ("Ada Lovelace", "GB"),
    ("Alan Turing", "GB"),
    ("Grace Hopper", "US"),
    ("Katherine Johnson", "US"),
    ("Edsger Dijkstra", "NL"),
    ("Barbara Liskov", "US"),
    ("Donald Knuth", "US"),
    ("Margaret Hamilton", "US"),
    ("Tim Berners-Lee", "GB"),
    ("Linus Torvalds", "FI"),
    ("Guido van Rossum", "NL"),
    ("Frances Allen", "US"),
    ("John McCarthy", "US"),
    ("Radia Perlman", "US"),
    ("Niklaus Wirth", "CH"),
    ("Hedy Lamarr", "AT"),
    ("Sophie Wilson", "GB"),
    ("Bjarne Stroustrup", "DK"),
    ("Anita Borg", "US"),
    ("Ken Thompson", "US"),
    ("Karen Spärck Jones", "GB"),
    ("Leslie Lamport", "US"),
    ("Shafi Goldwasser", "US"),
    ("Yukihiro Matsumoto", "JP"),
]

_PRODUCTS = [
    ("Mechanical keyboard", "hardware", 8900),
    ("Ergonomic mouse", "hardware", 4500),
    ("27-inch monitor", "hardware", 27900),
    ("USB-C dock", "hardware", 12900),
    ("Noise-cancelling headphones", "hardware", 19900),
    ("Laptop stand", "accessories", 3900),
    ("Desk mat", "accessories", 1900),
    ("Cable organiser", "accessories", 1200),
    ("Webcam cover (3 pack)", "accessories", 500),
    ("SQL in a Nutshell", "books", 3400),
    ("Designing Data-Intensive Applications", "books", 4200),
    ("The Art of PostgreSQL", "books", 3900),
    ("Coffee beans, 1 kg", "pantry", 2400),
    ("Green tea, 100 bags", "pantry", 900),
    ("Rubber duck", "accessories", 700),
]

_STATUSES = ["delivered"] * 6 + ["shipped"] * 2 + ["pending", "cancelled"]
_ORDERS = 60
_SEED = 20240301
_START = dt.datetime(2024, 1, 2, 9, 0, 0)


def create_sample_database(path: Path, *, overwrite: bool = False) -> None:
    """Write the demo shop database to PATH.

    Refuses (ConflictError) when PATH exists unless OVERWRITE. The file is built under a
    temporary name beside PATH and renamed into place, so a failure leaves nothing behind.
    """
    path = Path(path)
    if path.exists() and not overwrite:
        raise ConflictError(
            f"{path} already exists; remove it or choose another path for the sample database."
        )
    if path.is_dir():
        raise ConflictError(f"{path} is a directory; give a file path for the sample database.")
    parent = path.parent if str(path.parent) else Path(".")
    try:
        parent.mkdir(parents=True, exist_ok=True)
        fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=parent)
    except OSError as exc:
        raise OutpostError(
            f"Cannot write the sample database to {path}: {exc.strerror or exc}."
        ) from None
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        conn = sqlite3.connect(tmp, isolation_level=None)
        try:
            _fill(conn)
        finally:
            conn.close()
        os.replace(tmp, path)
    except (OSError, sqlite3.Error) as exc:
        raise OutpostError(f"Cannot write the sample database to {path}: {exc}.") from None
    finally:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()


def _fill(conn: sqlite3.Connection) -> None:
    rng = random.Random(_SEED)
    conn.execute("PRAGMA foreign_keys=ON")
    conn.executescript(SCHEMA)
    conn.execute("BEGIN")
    for i, (name, country) in enumerate(_CUSTOMERS, start=1):
        email = name.lower().replace(" ", ".").replace("ä", "a").replace("-", "") + "@example.com"
        created = _START - dt.timedelta(days=400 - 11 * i, hours=rng.randrange(24))
        conn.execute(
            "INSERT INTO customers (id, name, email, country, created_at) VALUES (?, ?, ?, ?, ?)",
            (i, name, email, country, created.isoformat(sep=" ")),
        )
    for i, (name, category, price) in enumerate(_PRODUCTS, start=1):
        sku = f"{category[:3].upper()}-{1000 + i}"
        conn.execute(
            "INSERT INTO products (id, sku, name, category, price_cents) VALUES (?, ?, ?, ?, ?)",
            (i, sku, name, category, price),
        )
    when = _START
    for order_id in range(1, _ORDERS + 1):
        when += dt.timedelta(hours=rng.randrange(6, 60), minutes=rng.randrange(60))
        customer = rng.randrange(1, len(_CUSTOMERS) + 1)
        status = rng.choice(_STATUSES)
        if order_id > _ORDERS - 4:
            status = "pending"  # the newest orders have not left yet
        conn.execute(
            "INSERT INTO orders (id, customer_id, ordered_at, status) VALUES (?, ?, ?, ?)",
            (order_id, customer, when.isoformat(sep=" "), status),
        )
        for product in sorted(rng.sample(range(1, len(_PRODUCTS) + 1), rng.randrange(1, 5))):
            price = _PRODUCTS[product - 1][2]
            conn.execute(
                "INSERT INTO order_items (order_id, product_id, quantity, unit_price_cents) "
                "VALUES (?, ?, ?, ?)",
                (order_id, product, rng.choice([1, 1, 1, 2, 2, 3]), price),
            )
    conn.execute("COMMIT")
