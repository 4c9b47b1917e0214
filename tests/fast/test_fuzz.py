"""Fuzzing the API from its own OpenAPI document (schemathesis) against a real `axserving run` on
the fake backend: whatever the body, no 5xx, no hang, and every error in its route's shape.

The document is generated in-process (the same types the routes parse with); the requests go to
a real Granian server over HTTP. Examples are bounded so the run stays short; the slow tier runs
a shorter pass against the real model (tests/slow/test_fuzz_real.py).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
import schemathesis
from hypothesis import HealthCheck, settings
from schemathesis.specs.openapi.checks import response_schema_conformance

from axserving.openapi import document
from tests.server import Server, run_server

SCHEMA = schemathesis.openapi.from_dict(document())
EXAMPLES = 12


@pytest.fixture(scope="module")
def fuzzed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    # The model-management routes are fuzzed too: the allowed dirs keep loads to a scratch dir.
    tmp = tmp_path_factory.mktemp("fuzz")
    with run_server(tmp, "--backend", "fake", "--backend-option", "delay_ms=0", "--ctx-size", "256",
                    env={"AXS_MODEL_ALLOWED_DIRS": str(tmp)}) as s:
        yield s


def check_response(server: Server, case: Any, response: Any) -> None:
    assert response.status_code < 500 or response.status_code in (503, 507), (
        f"{case.method} {case.path} -> {response.status_code}: {response.text[:500]}")
    content_type = response.headers.get("content-type") or [""]
    if isinstance(content_type, list):  # schemathesis' Response keeps every value of a header
        content_type = content_type[0]
    if response.status_code >= 400 and content_type.startswith("application/json"):
        body = response.json()
        if case.path.startswith("/v1/messages"):
            assert body["type"] == "error" and set(body["error"]) == {"type", "message"}, body
        else:
            assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "param", "code"}, body


@SCHEMA.parametrize()
@settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=list(HealthCheck))
def test_no_server_errors_and_errors_in_shape(case: Any, fuzzed: Server) -> None:
    if case.path.startswith("/v1/models") and case.method.upper() in ("DELETE", "POST") and "reload" not in case.path:
        case.path_parameters = {"model_id": "fuzz-" + str(abs(hash(str(case.body))) % 1000)} if case.path_parameters else None
    headers = {"Authorization": f"Bearer {fuzzed.api_key}"}
    response = case.call(base_url=fuzzed.url, headers=headers, timeout=30)
    check_response(fuzzed, case, response)
    if response.status_code < 300:  # a success body matches the document's type for it
        case.validate_response(response, checks=[response_schema_conformance])


def test_the_document_covers_every_route() -> None:
    from axserving.routes import routes

    described = {(p, m) for p, ops in document()["paths"].items() for m in ops}
    for route in routes():
        path = route.path.replace(":str", "")
        for method in (route.methods or set()) - {"HEAD"}:
            # The unprefixed copies of /v1 routes are the same operations.
            spellings = {path, "/v1" + path, path.removeprefix("/v1")}
            assert any((p, method.lower()) in described for p in spellings), (path, method)
