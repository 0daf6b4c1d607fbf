"""Schemathesis against the OpenAPI document of a running HQ (`outpost hq serve`, real process).

Every documented operation gets generated requests (valid and invalid) with the admin token;
no answer may be a 5xx, and answers must match the document (status codes, bodies, headers).
Not checked: that every schema-valid body is accepted, because JobCreate's rules depend on its
kind (a query needs sql; only a query takes sql/params), which the document cannot express.
HQ runs on PostgreSQL, the stricter backend (no NUL characters in text, typed columns).
Schemathesis' pytest plugin does not load under pytest 9, so this drives its Python API
(``APIOperation.as_strategy``) with Hypothesis directly.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from schemathesis.checks import positive_data_acceptance
from schemathesis.core.result import Ok

from tests.hq_helpers import HQ, throwaway_pg_database

pytestmark = pytest.mark.integration

EXAMPLES = 60


@pytest.fixture(scope="module")
def hq(tmp_path_factory: pytest.TempPathFactory, pg_dsn: str) -> Iterator[HQ]:
    with throwaway_pg_database(pg_dsn, "outpost_hq_openapi") as url:
        server = HQ(tmp_path_factory.mktemp("hq-openapi"), database=url)
        server.create_admin()
        server.start()
        try:
            yield server
        finally:
            server.stop()


def test_every_operation_conforms_and_never_fails(hq: HQ) -> None:
    schema = schemathesis.openapi.from_url(f"{hq.url}/openapi.json")
    headers = {"Authorization": f"Bearer {hq.admin_token}"}
    operations = []
    for result in schema.get_all_operations():
        assert isinstance(result, Ok), f"invalid operation in HQ's OpenAPI document: {result}"
        operations.append(result.ok())
    assert len(operations) >= 18
    for operation in operations:

        @given(case=operation.as_strategy())
        @settings(
            max_examples=EXAMPLES,
            deadline=None,
            database=None,
            suppress_health_check=list(HealthCheck),
        )
        def check(case: Any) -> None:
            case.call_and_validate(
                headers=headers, timeout=30, excluded_checks=[positive_data_acceptance]
            )

        check()
    # the generated requests really reached HQ: some of them enrolled agents
    with hq.api() as api:
        assert api.get("/api/v1/agents").json()["agents"]
