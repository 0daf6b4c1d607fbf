"""The redshift driver: Redshift's defaults, over the PostgreSQL protocol against the real
PostgreSQL servers (there is no Redshift here)."""

from __future__ import annotations

from typing import Any

import pytest

from outpost.drivers import get_driver
from outpost.drivers.base import DriverContext
from outpost.drivers.postgres import PostgresDriver
from outpost.drivers.redshift import RedshiftDriver, RedshiftOptions
from outpost.errors import DriverError, ReadOnlyError, UsageError
from tests.integration.conftest import PgCluster

pytestmark = pytest.mark.integration

CONNECTION = "rs-test"


def make_driver(options: dict[str, Any]) -> RedshiftDriver:
    return RedshiftDriver(
        RedshiftDriver.parse_options(options), DriverContext(connection=CONNECTION)
    )


def test_registry_and_names() -> None:
    assert get_driver("redshift") is RedshiftDriver
    assert issubclass(RedshiftDriver, PostgresDriver)
    assert RedshiftDriver.name == "redshift"
    assert RedshiftDriver.display_name == "Amazon Redshift"


def test_defaults_are_redshifts() -> None:
    options = RedshiftDriver.parse_options({"host": "examplecluster.abc.redshift.amazonaws.com"})
    assert isinstance(options, RedshiftOptions)
    assert options.port == 5439
    assert options.ssl == "require"
    assert options.connect_timeout == 30
    driver = RedshiftDriver(options)
    assert driver.ssl_kwargs() == {"sslmode": "require"}
    assert driver.connect_kwargs(30)["port"] == 5439


def test_host_is_required() -> None:
    with pytest.raises(UsageError) as info:
        RedshiftDriver.parse_options({"port": 5439}, connection="warehouse")
    message = str(info.value)
    assert "--host" in message
    assert "required" in message


def test_every_option_has_a_description() -> None:
    for name, info in RedshiftOptions.model_fields.items():
        assert info.description, name


@pytest.mark.parametrize(
    ("raw", "flag"),
    [
        ({"host": "h", "port": 0}, "--port"),
        ({"host": "h", "ssl": "maybe"}, "--ssl"),
        ({"host": "h", "nope": 1}, "--nope"),
    ],
)
def test_bad_options_name_the_flag(raw: dict[str, Any], flag: str) -> None:
    with pytest.raises(UsageError) as info:
        RedshiftDriver.parse_options(raw)
    assert flag in str(info.value)


def test_against_the_scram_tls_cluster_with_default_ssl(pg_tls_cluster: PgCluster) -> None:
    # ssl left at its default (require); only the port differs from Redshift's.
    driver = make_driver(pg_tls_cluster.options())
    version = driver.test().server_version
    assert version.startswith("PostgreSQL ")
    result = driver.query("SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()")
    assert result.rows == [[True]]


def test_against_the_scram_tls_cluster_verify_full(pg_tls_cluster: PgCluster) -> None:
    driver = make_driver(
        pg_tls_cluster.options(ssl="verify-full", ssl_root_cert=str(pg_tls_cluster.ca_path))
    )
    result = driver.query("SELECT %s::int * 2 AS n", [21])
    assert result.columns == ["n"]
    assert result.rows == [[42]]


def test_wrong_password_names_redshift(pg_tls_cluster: PgCluster) -> None:
    wrong = "not-the-password-123"
    driver = make_driver(pg_tls_cluster.options(password=wrong))
    with pytest.raises(DriverError) as info:
        driver.test()
    message = str(info.value)
    assert "Amazon Redshift" in message
    assert "authentication failed" in message
    assert wrong not in message


def test_against_the_plain_server(pg_params: dict[str, object]) -> None:
    driver = make_driver({**pg_params, "ssl": "disable"})
    assert "PostgreSQL" in driver.test().server_version
    result = driver.query("SELECT g FROM generate_series(1, 100) g", max_rows=10)
    assert result.row_count == 10
    assert result.truncated is True
    with pytest.raises(ReadOnlyError):
        driver.query("CREATE TABLE outpost_rs_never (id int)")
    with pytest.raises(DriverError) as info:
        driver.query("SELECT pg_sleep(5)", timeout=1)
    assert "statement timeout" in str(info.value)


def test_default_ssl_against_a_server_without_ssl(pg_params: dict[str, object]) -> None:
    driver = make_driver(dict(pg_params))
    if driver.ssl_kwargs()["sslmode"] != "require":
        pytest.fail("redshift should require TLS by default")
    plain = make_driver({**pg_params, "ssl": "disable"})
    if plain.query("SHOW ssl").rows != [["off"]]:
        pytest.skip("the shared PostgreSQL server has ssl on")
    with pytest.raises(DriverError) as info:
        driver.test()
    assert "does not accept SSL connections" in str(info.value)
