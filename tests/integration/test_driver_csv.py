"""The CSV driver against files served by a local HTTP server, and local files."""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from outpost.drivers import get_driver
from outpost.drivers.base import DriverContext
from outpost.drivers.csv import CSVDriver, table_name
from outpost.errors import DriverError, ReadOnlyError, UsageError
from tests.helpers import FileServer, files_in, refused_port, serve_files

pytestmark = pytest.mark.integration

ORDERS_CSV = (
    "id,customer,amount,ordered at,zip,note\n"
    '1,Ada,12.50,2024-03-01 14:05:00,007,"first, with a comma"\n'
    "2,Grace,3,2024-03-02 09:00:00,12345,\n"
    "\n"
    '3,Alan,,2024-03-03 23:59:59,00042,"two\nlines"\n'
)


@pytest.fixture
def server(tmp_path: Path) -> Iterator[FileServer]:
    with serve_files(tmp_path / "www") as served:
        yield served


def driver(
    source_url: str,
    cache_dir: Path,
    *,
    context: DriverContext | None = None,
    **options: object,
) -> CSVDriver:
    ctx = context or DriverContext(connection="orders-csv", cache_dir=cache_dir)
    opts = CSVDriver.parse_options({"source_url": source_url, **options})
    return CSVDriver(opts, ctx)


def column_types(d: CSVDriver, table: str) -> dict[str, str]:
    rows = d.query("SELECT name, type FROM pragma_table_info(?)", [table]).rows
    return {str(name): str(kind) for name, kind in rows}


# --- options and registry -------------------------------------------------------------------


def test_registered_without_password_option() -> None:
    assert get_driver("csv") is CSVDriver
    assert CSVDriver.password_option is None
    assert CSVDriver.display_name == "CSV"
    for name, field in CSVDriver.options_model.model_fields.items():
        assert field.description, name


def test_bad_options_are_reported_together() -> None:
    with pytest.raises(UsageError) as info:
        CSVDriver.parse_options(
            {"source_url": "gopher://x/y.csv", "delimiter": ";;", "time_format": "%Q"}
        )
    message = str(info.value)
    assert "--source-url: unsupported URL scheme 'gopher'" in message
    assert "--delimiter: ';;' is not one character" in message
    assert "--time-format: '%Q' is not a valid time format" in message
    opts = CSVDriver.parse_options({"source_url": "x.csv", "delimiter": "tab"})
    assert opts.to_storable()["delimiter"] == "\t"


@pytest.mark.parametrize(
    ("source", "expected"),
    [
        ("https://example.com/exports/Orders.csv", "orders"),
        ("https://example.com/Sales%20Report%202024.csv?sig=1", "sales_report_2024"),
        ("/data/2024-q1.csv", "t_2024_q1"),
        ("/data/sqlite_stuff.csv", "t_sqlite_stuff"),
        ("https://example.com/", "data"),
    ],
)
def test_table_name_from_the_file_stem(source: str, expected: str) -> None:
    assert table_name(source) == expected


# --- over HTTP --------------------------------------------------------------------------------


def test_download_test_and_query_with_inferred_types(server: FileServer, cache_dir: Path) -> None:
    (server.root / "Orders 2024.csv").write_text(ORDERS_CSV)
    d = driver(server.url("Orders%202024.csv"), cache_dir, time_format="%Y-%m-%d %H:%M:%S")
    result = d.test(timeout=10)
    assert result.server_version == "CSV (3 rows, 6 columns)"

    q = d.query("SELECT * FROM orders_2024 ORDER BY id")
    assert q.columns == ["id", "customer", "amount", "ordered at", "zip", "note"]
    assert q.rows == [
        [1, "Ada", 12.5, "2024-03-01T14:05:00", "007", "first, with a comma"],
        [2, "Grace", 3.0, "2024-03-02T09:00:00", "12345", None],
        [3, "Alan", None, "2024-03-03T23:59:59", "00042", "two\nlines"],
    ]
    assert column_types(d, "orders_2024") == {
        "id": "INTEGER",
        "customer": "TEXT",
        "amount": "REAL",
        "ordered at": "TIMESTAMP",
        "zip": "TEXT",  # leading zeros are kept
        "note": "TEXT",
    }
    # the view `csv` shows the same table, and SQL works on typed values
    q = d.query(
        "SELECT customer FROM csv WHERE amount > ? AND \"ordered at\" >= '2024-03-01T12:00'",
        [5],
    )
    assert q.rows == [["Ada"]]
    q = d.query("SELECT sum(amount), max(id), typeof(id) FROM csv")
    assert q.rows == [[15.5, 3, "integer"]]


def test_without_time_format_timestamps_stay_text(server: FileServer, cache_dir: Path) -> None:
    (server.root / "orders.csv").write_text(ORDERS_CSV)
    d = driver(server.url("orders.csv"), cache_dir)
    assert column_types(d, "orders")["ordered at"] == "TEXT"
    assert d.query('SELECT "ordered at" FROM csv WHERE id = 1').rows == [["2024-03-01 14:05:00"]]


def test_time_format_only_applies_where_every_value_matches(
    tmp_path: Path, cache_dir: Path
) -> None:
    path = tmp_path / "events.csv"
    path.write_text("day,label\n01/02/2024,a\n15/02/2024,2024-01-01\n28/02/2024,c\n")
    d = driver(str(path), cache_dir, time_format="%d/%m/%Y")
    assert column_types(d, "events") == {"day": "TIMESTAMP", "label": "TEXT"}
    assert d.query("SELECT day, label FROM csv").rows == [
        ["2024-02-01", "a"],  # a format without a time of day gives dates
        ["2024-02-15", "2024-01-01"],
        ["2024-02-28", "c"],
    ]


def test_truncated(server: FileServer, cache_dir: Path) -> None:
    lines = ["n,square"] + [f"{i},{i * i}" for i in range(1, 51)]
    (server.root / "squares.csv").write_text("\n".join(lines) + "\n")
    d = driver(server.url("squares.csv"), cache_dir)
    q = d.query("SELECT n FROM csv ORDER BY n", max_rows=3)
    assert (q.rows, q.row_count, q.truncated) == ([[1], [2], [3]], 3, True)
    q = d.query("SELECT n FROM csv", max_rows=50)
    assert (q.row_count, q.truncated) == (50, False)


def test_always_read_only(server: FileServer, cache_dir: Path) -> None:
    (server.root / "orders.csv").write_text(ORDERS_CSV)
    d = driver(server.url("orders.csv"), cache_dir)
    for sql in (
        "DELETE FROM orders",
        "INSERT INTO csv (id) VALUES (9)",
        "CREATE TABLE t (a)",
        "CREATE TEMP TABLE t (a)",
        "DROP VIEW csv",
        "PRAGMA query_only = OFF",
    ):
        for allow in (False, True):
            with pytest.raises(ReadOnlyError) as info:
                d.query(sql, allow_writes=allow)
            assert str(info.value).startswith(
                "Write refused for connection 'orders-csv': CSV connections are read-only, "
                "because the data comes from a file the agent only reads"
            )
    assert d.query("SELECT count(*) FROM orders").rows == [[3]]


def test_http_404(server: FileServer, cache_dir: Path) -> None:
    d = driver(server.url("missing.csv"), cache_dir)
    with pytest.raises(DriverError) as info:
        d.test(timeout=10)
    assert str(info.value) == (
        f"Cannot download {server.url('missing.csv')} for connection 'orders-csv': "
        "the server answered 404 File not found."
    )
    assert files_in(cache_dir) == []


def test_refused_port(cache_dir: Path) -> None:
    port = refused_port()
    started = time.monotonic()
    with pytest.raises(DriverError, match=r"connection was refused"):
        driver(f"http://127.0.0.1:{port}/orders.csv", cache_dir).query("SELECT 1", timeout=2)
    assert time.monotonic() - started < 2 + 5


def test_size_limit(server: FileServer, cache_dir: Path) -> None:
    (server.root / "big.csv").write_text("a,b\n" + "1,2\n" * 50_000)
    for name in ("big.csv", "stream/big.csv"):
        d = driver(server.url(name), cache_dir, max_download_bytes=64 * 1024)
        with pytest.raises(DriverError, match=r"larger than the download limit of 64 KiB"):
            d.test(timeout=10)
        assert files_in(cache_dir) == []


def test_progress(server: FileServer, cache_dir: Path) -> None:
    body = "a,b\n" + "1,2\n" * 100_000
    (server.root / "big.csv").write_text(body)
    calls: list[tuple[int, int | None]] = []
    ctx = DriverContext(
        connection="big", cache_dir=cache_dir, progress=lambda d, t: calls.append((d, t))
    )
    assert driver(server.url("big.csv"), cache_dir, context=ctx).test(
        timeout=10
    ).server_version == ("CSV (100000 rows, 2 columns)")
    done = [d for d, _ in calls]
    assert len(done) >= 2
    assert done == sorted(set(done))
    assert calls[-1] == (len(body), len(body))


# --- local files and bad content ------------------------------------------------------------


def test_local_file_delimiters_and_header_names(tmp_path: Path, cache_dir: Path) -> None:
    path = tmp_path / "people.csv"
    path.write_bytes("\ufeffname;;Name;age\nZoë;x;y;41\n".encode())
    d = driver(str(path), cache_dir, delimiter=";")
    q = d.query("SELECT * FROM people")
    assert q.columns == ["name", "column_2", "Name_2", "age"]
    assert q.rows == [["Zoë", "x", "y", 41]]

    tsv = tmp_path / "people.tsv"
    tsv.write_text("name\tage\nAda\t36\n")
    d = driver(tsv.as_uri(), cache_dir, delimiter="tab")
    assert d.test().server_version == "CSV (1 row, 2 columns)"
    assert d.query("SELECT * FROM csv").rows == [["Ada", 36]]
    assert files_in(cache_dir) == []  # local files are read in place


def test_local_file_changes_are_seen(tmp_path: Path, cache_dir: Path) -> None:
    path = tmp_path / "counts.csv"
    path.write_text("n\n1\n2\n")
    d = driver(str(path), cache_dir)
    assert d.query("SELECT count(*) FROM csv").rows == [[2]]
    path.write_text("n\n1\n2\n3\n")
    os.utime(path, ns=(time.time_ns(), time.time_ns() + 1_000_000_000))
    assert d.query("SELECT count(*) FROM csv").rows == [[3]]


def test_ragged_row_names_the_line(tmp_path: Path, cache_dir: Path) -> None:
    path = tmp_path / "ragged.csv"
    path.write_text('a,b,c\n1,2,3\n"multi\nline",5,6\n7,8\n')
    with pytest.raises(DriverError) as info:
        driver(str(path), cache_dir).test()
    assert str(info.value) == (
        f"Cannot load the CSV file {path} for connection 'orders-csv': "
        "line 5 has 2 fields but the header has 3."
    )


def test_undecodable_bytes_name_the_line(tmp_path: Path, cache_dir: Path) -> None:
    path = tmp_path / "latin.csv"
    path.write_bytes("city,n\nBerlin,1\nMünchen,2\n".encode("latin-1"))
    with pytest.raises(DriverError, match=r": line 3 is not valid utf-8 text \(bytes fc\)"):
        driver(str(path), cache_dir).test()
    d = driver(str(path), cache_dir, encoding="latin-1")
    assert d.query("SELECT city FROM csv WHERE n = 2").rows == [["München"]]


def test_no_header(tmp_path: Path, cache_dir: Path) -> None:
    for content in ("", "\n\n", ",,\n"):
        path = tmp_path / "empty.csv"
        path.write_text(content)
        with pytest.raises(DriverError) as info:
            driver(str(path), cache_dir).test()
        assert str(info.value) == (
            f"Cannot load the CSV file {path} for connection 'orders-csv': the file has no "
            "header row (the first line must name the columns)."
        )


def test_header_only_is_an_empty_table(tmp_path: Path, cache_dir: Path) -> None:
    path = tmp_path / "nothing.csv"
    path.write_text("a,b\n")
    d = driver(str(path), cache_dir)
    assert d.test().server_version == "CSV (0 rows, 2 columns)"
    q = d.query("SELECT * FROM csv")
    assert (q.columns, q.rows) == (["a", "b"], [])


def test_missing_local_file(tmp_path: Path, cache_dir: Path) -> None:
    path = tmp_path / "gone.csv"
    with pytest.raises(DriverError) as info:
        driver(path.as_uri(), cache_dir).test()
    assert str(info.value) == (
        f"Cannot open {path} for connection 'orders-csv': the file does not exist."
    )


def test_slow_query_times_out(tmp_path: Path, cache_dir: Path) -> None:
    path = tmp_path / "tiny.csv"
    path.write_text("a\n1\n")
    d = driver(str(path), cache_dir)
    started = time.monotonic()
    with pytest.raises(DriverError, match=r"Query timed out for connection 'orders-csv'"):
        d.query(
            "WITH RECURSIVE c(x) AS (SELECT 1 UNION ALL SELECT x + 1 FROM c "
            "WHERE x < 2000000000) SELECT count(*) FROM c",
            timeout=1,
        )
    assert time.monotonic() - started < 1 + 5
    assert d.query("SELECT a FROM csv").rows == [[1]]
