"""Schema fuzzing: schemathesis generates requests from /openapi.json against a live server; none may
get a 5xx (a 500 is a bug; refusals must be 4xx OpenAI errors)."""

from __future__ import annotations

import schemathesis
from hypothesis import HealthCheck, given, settings
from schemathesis.checks import not_a_server_error

from server.app import create_app
from tests.api.conftest import live_server
from tests.api.conftest import settings as app_settings

EXAMPLES = 40  # per operation: bounded so the suite stays quick


def test_no_server_errors(tiny):
    app = create_app(app_settings(image_fetch_timeout=0.5, max_waiting=64), loaded=tiny)
    with live_server(app) as base:
        schema = schemathesis.openapi.from_url(f"{base}/openapi.json")
        operations = [result.ok() for result in schema.get_all_operations()]
        assert {op.path for op in operations} >= {"/v1/chat/completions", "/v1/completions", "/v1/models"}
        for operation in operations:

            @given(case=operation.as_strategy())
            @settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=list(HealthCheck),
                      database=None)
            def check(case):
                if isinstance(case.body, dict) and "model" in case.body:
                    case.body["model"] = "tiny"  # past the 404, into the parameter and generation paths
                response = case.call(timeout=30)
                case.validate_response(response, checks=[not_a_server_error])
                if response.status_code >= 400:
                    assert set(response.json()["error"]) == {"message", "type", "param", "code"}

            check()
