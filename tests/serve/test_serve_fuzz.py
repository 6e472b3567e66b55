"""Schema-driven fuzzing: schemathesis generates requests from the served OpenAPI spec against the real Serve app;
no response may be a 5xx, and every status code and content type must be one the spec documents.

Bounded: EXAMPLES requests per operation, derandomised so every run sends the same cases. (schemathesis's lazy
``from_fixture`` loader does not work with pytest 9, so the operations are parametrised here and each one's
hypothesis strategy is drawn from inside the test.)
"""

from __future__ import annotations

import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import content_type_conformance, status_code_conformance
from serve_helpers import TOKEN

pytestmark = pytest.mark.integration
EXAMPLES = 50
OPERATIONS = [
    ("POST", "/v1/embed"),
    ("POST", "/v1/difference"),
    ("POST", "/v1/rank"),
    ("POST", "/v1/classify"),
    ("GET", "/v1/model"),
    ("GET", "/healthz"),
]


@pytest.fixture(scope="module")
def api_schema(server):
    return schemathesis.openapi.from_url(f"{server.url}/openapi.json")


def test_every_operation_is_fuzzed(api_schema):
    served = {(r.ok().method.upper(), r.ok().path) for r in api_schema.get_all_operations()}
    assert served == set(OPERATIONS)


@pytest.mark.parametrize("method, path", OPERATIONS)
def test_no_server_errors(api_schema, server, method, path):
    operation = api_schema[path][method]
    headers = {"authorization": f"Bearer {TOKEN}"}
    statuses = []

    @given(case=operation.as_strategy())
    @settings(
        max_examples=EXAMPLES, deadline=None, derandomize=True, database=None, suppress_health_check=list(HealthCheck)
    )
    def fuzz(case):
        response = case.call(base_url=server.url, headers=headers, timeout=30)
        statuses.append(response.status_code)
        assert response.status_code < 500, f"{method} {path}: {response.status_code} {response.text[:500]}"
        case.validate_response(
            response, headers=headers, checks=[not_a_server_error, status_code_conformance, content_type_conformance]
        )

    fuzz()
    assert statuses and max(statuses) < 500
