"""The SQLite driver against files served by a local HTTP server, and local files."""

from __future__ import annotations

import sqlite3
import stat
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from outpost.drivers import get_driver
from outpost.drivers.base import DriverContext
from outpost.drivers.download import fetch_source
from outpost.drivers.sqlite import SQLiteDriver
from outpost.errors import DriverError, ReadOnlyError, UsageError
from tests.helpers import FileServer, files_in, refused_port, serve_files, silent_listener

pytestmark = pytest.mark.integration

SLOW_SQL = (
    "WITH RECURSIVE c(x) AS (SELECT 1 UNION ALL SELECT x + 1 FROM c WHERE x < 2000000000) "
    "SELECT count(*) FROM c"
)


@pytest.fixture
def server(tmp_path: Path) -> Iterator[FileServer]:
    with serve_files(tmp_path / "www") as served:
        yield served


def make_db(path: Path, rows: int = 10, *, padding: int = 0) -> Path:
    conn = sqlite3.connect(path)
    conn.execute("CREATE TABLE items (id INTEGER PRIMARY KEY, name TEXT, price REAL, data BLOB)")
    conn.executemany(
        "INSERT INTO items VALUES (?, ?, ?, ?)",
        [(i, f"item {i}", i * 1.5, bytes([i % 256, 255])) for i in range(1, rows + 1)],
    )
    conn.execute("INSERT INTO items VALUES (?, NULL, NULL, NULL)", (rows + 1,))
    if padding:
        conn.execute("CREATE TABLE padding (b BLOB)")
        conn.execute("INSERT INTO padding VALUES (zeroblob(?))", (padding,))
    conn.commit()
    conn.close()
    return path


def driver(
    source_url: str,
    cache_dir: Path,
    *,
    context: DriverContext | None = None,
    **options: object,
) -> SQLiteDriver:
    ctx = context or DriverContext(connection="shop-db", cache_dir=cache_dir)
    opts = SQLiteDriver.parse_options({"source_url": source_url, **options})
    return SQLiteDriver(opts, ctx)


# --- options and registry -------------------------------------------------------------------


def test_registered_without_password_option() -> None:
    assert get_driver("sqlite") is SQLiteDriver
    assert SQLiteDriver.password_option is None
    assert SQLiteDriver.display_name == "SQLite"
    for name, field in SQLiteDriver.options_model.model_fields.items():
        assert field.description, name


def test_bad_source_url_is_a_usage_error() -> None:
    with pytest.raises(UsageError, match=r"--source-url: unsupported URL scheme 'ftp'"):
        SQLiteDriver.parse_options({"source_url": "ftp://example.com/x.db"})
    with pytest.raises(UsageError, match=r"--source-url is required"):
        SQLiteDriver.parse_options({})


# --- over HTTP --------------------------------------------------------------------------------


def test_download_test_and_query(server: FileServer, cache_dir: Path) -> None:
    make_db(server.root / "shop.db")
    d = driver(server.url("shop.db"), cache_dir)

    result = d.test(timeout=10)
    assert result.server_version == "SQLite " + sqlite3.sqlite_version

    q = d.query(
        "SELECT id, name, price, data FROM items WHERE id IN (?, ?, 11) ORDER BY id", [1, 2]
    )
    assert q.columns == ["id", "name", "price", "data"]
    assert q.rows == [
        [1, "item 1", 1.5, "\\x01ff"],
        [2, "item 2", 3.0, "\\x02ff"],
        [11, None, None, None],
    ]
    assert q.row_count == 3
    assert q.truncated is False

    assert stat.S_IMODE(cache_dir.stat().st_mode) == 0o700
    assert all(not name.startswith(".part-") for name in files_in(cache_dir))


def test_max_rows_truncates(server: FileServer, cache_dir: Path) -> None:
    make_db(server.root / "shop.db", rows=9)  # ten rows with the NULL one
    d = driver(server.url("shop.db"), cache_dir)
    q = d.query("SELECT id FROM items ORDER BY id", max_rows=4)
    assert q.rows == [[1], [2], [3], [4]]
    assert q.row_count == 4
    assert q.truncated is True
    q = d.query("SELECT id FROM items ORDER BY id", max_rows=10)
    assert q.row_count == 10
    assert q.truncated is False


def test_progress_reports_increasing_bytes_and_total(server: FileServer, cache_dir: Path) -> None:
    path = make_db(server.root / "big.db", padding=400_000)
    size = path.stat().st_size
    calls: list[tuple[int, int | None]] = []
    ctx = DriverContext(
        connection="big", cache_dir=cache_dir, progress=lambda d, t: calls.append((d, t))
    )
    driver(server.url("big.db"), cache_dir, context=ctx).test(timeout=10)
    assert len(calls) >= 2
    done = [d for d, _ in calls]
    assert done == sorted(done)
    assert len(set(done)) == len(done)
    assert all(total == size for _, total in calls)
    assert calls[-1] == (size, size)


def test_queries_reuse_a_fresh_download_and_test_downloads_again(
    server: FileServer, cache_dir: Path
) -> None:
    make_db(server.root / "shop.db", rows=3)
    d = driver(server.url("shop.db"), cache_dir)
    assert d.query("SELECT count(*) FROM items").rows == [[4]]

    (server.root / "shop.db").unlink()
    make_db(server.root / "shop.db", rows=5)
    # within the cache window a query uses the copy already downloaded ...
    assert d.query("SELECT count(*) FROM items").rows == [[4]]
    # ... and a test always fetches the current file, which later queries then see.
    d.test(timeout=10)
    assert d.query("SELECT count(*) FROM items").rows == [[6]]


def test_downloaded_database_refuses_writes_even_when_allowed(
    server: FileServer, cache_dir: Path
) -> None:
    make_db(server.root / "shop.db")
    d = driver(server.url("shop.db"), cache_dir)
    with pytest.raises(ReadOnlyError, match=r"runs read-only"):
        d.query("DELETE FROM items")
    with pytest.raises(ReadOnlyError, match=r"downloaded copy of http://127\.0\.0\.1:\d+/shop\.db"):
        d.query("DELETE FROM items", allow_writes=True)
    assert d.query("SELECT count(*) FROM items", allow_writes=True).rows == [[11]]


def test_http_404_is_one_clear_sentence_without_the_password(
    server: FileServer, cache_dir: Path
) -> None:
    port = server.base.rsplit(":", 1)[1]
    d = driver(f"http://bob:s3cret-pw@127.0.0.1:{port}/missing.db?token=abc123", cache_dir)
    with pytest.raises(DriverError) as info:
        d.test(timeout=10)
    message = str(info.value)
    assert message.startswith(f"Cannot download http://127.0.0.1:{port}/missing.db")
    assert "connection 'shop-db'" in message
    assert "404" in message
    assert "s3cret-pw" not in message
    assert "abc123" not in message
    assert "\n" not in message
    assert files_in(cache_dir) == []


def test_refused_port_is_a_clear_error(cache_dir: Path) -> None:
    port = refused_port()
    d = driver(f"http://127.0.0.1:{port}/shop.db", cache_dir)
    started = time.monotonic()
    with pytest.raises(DriverError, match=r"connection was refused") as info:
        d.test(timeout=2)
    assert time.monotonic() - started < 2 + 5
    assert f"http://127.0.0.1:{port}/shop.db" in str(info.value)


def test_silent_server_times_out(cache_dir: Path) -> None:
    with silent_listener() as port:
        d = driver(f"http://127.0.0.1:{port}/shop.db", cache_dir)
        started = time.monotonic()
        with pytest.raises(DriverError, match=r"did not answer within 2 s"):
            d.test(timeout=2)
        assert time.monotonic() - started < 2 + 5
    assert files_in(cache_dir) == []


def test_size_limit_from_content_length(server: FileServer, cache_dir: Path) -> None:
    make_db(server.root / "big.db", padding=200_000)
    d = driver(server.url("big.db"), cache_dir, max_download_bytes=100_000)
    with pytest.raises(DriverError, match=r"larger than the download limit of 97\.7 KiB"):
        d.test(timeout=10)
    assert files_in(cache_dir) == []


def test_size_limit_while_reading_removes_the_partial_file(
    server: FileServer, cache_dir: Path
) -> None:
    make_db(server.root / "big.db", padding=400_000)
    calls: list[tuple[int, int | None]] = []
    ctx = DriverContext(
        connection="big",
        cache_dir=cache_dir,
        progress=lambda d, t: calls.append((d, t)),
        max_download_bytes=150_000,  # the agent's limit is below the connection's
    )
    d = driver(server.url("stream/big.db"), cache_dir, context=ctx)
    with pytest.raises(DriverError, match=r"larger than the download limit"):
        d.test(timeout=10)
    assert calls, "some bytes arrived before the limit was hit"
    assert all(total is None for _, total in calls)  # no Content-Length was sent
    assert files_in(cache_dir) == []


def test_failed_download_keeps_the_previous_copy(server: FileServer, cache_dir: Path) -> None:
    make_db(server.root / "shop.db")
    ctx = DriverContext(connection="shop-db", cache_dir=cache_dir)
    first = fetch_source(server.url("shop.db"), ctx, timeout=10)
    before = first.read_bytes()
    (server.root / "shop.db").unlink()
    with pytest.raises(DriverError, match="404"):
        fetch_source(server.url("shop.db"), ctx, timeout=10)
    assert first.read_bytes() == before
    assert files_in(cache_dir) == [first.name]


def test_non_sqlite_download(server: FileServer, cache_dir: Path) -> None:
    (server.root / "page.db").write_text("<html>Sign in to continue</html>\n")
    d = driver(server.url("page.db"), cache_dir)
    with pytest.raises(DriverError) as info:
        d.test(timeout=10)
    assert str(info.value) == (
        "Cannot open the SQLite database for connection 'shop-db': "
        f"{server.url('page.db')} is not an SQLite database."
    )


# --- local files ----------------------------------------------------------------------------


def test_local_path_and_file_url_are_used_in_place(tmp_path: Path, cache_dir: Path) -> None:
    path = make_db(tmp_path / "local.db")
    for source in (str(path), path.as_uri()):
        d = driver(source, cache_dir)
        assert d.test().server_version.startswith("SQLite 3.")
        assert d.query("SELECT name FROM items WHERE id = 3").rows == [["item 3"]]
    assert files_in(cache_dir) == []  # nothing copied


def test_local_writes_refused_unless_allowed(tmp_path: Path, cache_dir: Path) -> None:
    path = make_db(tmp_path / "local.db")
    d = driver(str(path), cache_dir)
    for sql in (
        "DELETE FROM items",
        "UPDATE items SET name = 'x'",
        "CREATE TABLE t (a)",
        "PRAGMA query_only = OFF",
    ):
        with pytest.raises(ReadOnlyError, match=r"connection 'shop-db': the query runs read-only"):
            d.query(sql)
    assert d.query("SELECT count(*) FROM items").rows == [[11]]

    w = d.query("DELETE FROM items WHERE id > ?", [5], allow_writes=True)
    assert (w.columns, w.rows, w.row_count) == ([], [], 6)
    conn = sqlite3.connect(path)
    assert conn.execute("SELECT count(*) FROM items").fetchone() == (5,)
    conn.close()


def test_attach_is_refused(tmp_path: Path, cache_dir: Path) -> None:
    path = make_db(tmp_path / "local.db")
    other = make_db(tmp_path / "other.db")
    d = driver(str(path), cache_dir)
    for sql in (f"ATTACH '{other}' AS o", f"VACUUM INTO '{tmp_path / 'copy.db'}'"):
        for allow in (False, True):
            with pytest.raises(
                DriverError, match=r"ATTACH, DETACH and VACUUM INTO are not allowed"
            ):
                d.query(sql, allow_writes=allow)
    assert not (tmp_path / "copy.db").exists()


def test_slow_query_times_out(tmp_path: Path, cache_dir: Path) -> None:
    d = driver(str(make_db(tmp_path / "local.db")), cache_dir)
    started = time.monotonic()
    with pytest.raises(DriverError) as info:
        d.query(SLOW_SQL, timeout=1)
    assert time.monotonic() - started < 1 + 5
    assert str(info.value) == (
        "Query timed out for connection 'shop-db': it ran longer than the statement timeout "
        "of 1 s and was stopped."
    )
    # the connection is usable afterwards
    assert d.query("SELECT 1", timeout=1).rows == [[1]]


def test_non_sqlite_local_file(tmp_path: Path, cache_dir: Path) -> None:
    path = tmp_path / "notes.txt"
    path.write_text("not a database\n" * 10)
    with pytest.raises(DriverError, match=r"notes\.txt is not an SQLite database\.$"):
        driver(str(path), cache_dir).test()
    empty = tmp_path / "empty.db"
    empty.touch()
    with pytest.raises(DriverError, match=r"empty\.db is empty, not an SQLite database\.$"):
        driver(str(empty), cache_dir).query("SELECT 1")


def test_missing_local_file(tmp_path: Path, cache_dir: Path) -> None:
    path = tmp_path / "nope.db"
    with pytest.raises(DriverError) as info:
        driver(str(path), cache_dir).test()
    assert str(info.value) == (
        f"Cannot open {path} for connection 'shop-db': the file does not exist."
    )


def test_sql_errors_are_driver_errors(tmp_path: Path, cache_dir: Path) -> None:
    d = driver(str(make_db(tmp_path / "local.db")), cache_dir)
    with pytest.raises(DriverError, match=r"Query failed for connection 'shop-db': no such table"):
        d.query("SELECT * FROM nope")
    with pytest.raises(DriverError, match=r"one statement at a time"):
        d.query("SELECT 1; SELECT 2")
