"""The API against its own OpenAPI spec (schemathesis): generated requests to every operation, with an admin key,
must never get a 5xx, and every answer must match the documented status codes, content types and schemas.

Driven from a plain test (schemathesis' own pytest loader trips over pytest 9's nodes): one hypothesis run per
operation over `operation.as_strategy()`, each failure reported with the operation's name."""

from __future__ import annotations

import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from schemathesis.specs.openapi.checks import positive_data_acceptance
from service_world import served_world

pytestmark = pytest.mark.integration

EXAMPLES = 12


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    with served_world(tmp_path_factory.mktemp("schema"), trace=False) as w:
        yield w


def test_every_operation_conforms_to_the_spec(world):
    schema = schemathesis.openapi.from_asgi("/openapi.json", world.app)
    operations = [result.ok() for result in schema.get_all_operations()]
    assert len(operations) >= 14, [op.label for op in operations]
    headers = world.auth("admin")
    failures = {}
    for operation in operations:
        # batch-test and compare refuse schema-valid bodies whose JSONL lines are not cases or whose case ids repeat:
        # neither rule can be said in JSON Schema
        excluded = [positive_data_acceptance] if operation.path.endswith(("/batch-test", "/compare")) else []

        @given(case=operation.as_strategy())
        @settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True,
                  database=None)
        def check(case):
            case.call_and_validate(headers=headers, excluded_checks=excluded)

        try:
            check()
        except BaseException as e:  # noqa: BLE001 - hypothesis raises an exception group; collect every operation's failure
            failures[operation.label] = str(e)[:2000]
    assert not failures, "\n\n".join(f"{op}:\n{text}" for op, text in failures.items())
