"""A short fuzz pass (see tests/fast/test_fuzz.py) against the real model: whatever the body, no
5xx, no hang, errors in their route's shape, with llama.cpp behind the engine."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, settings

from tests.fast.test_fuzz import SCHEMA, check_response
from tests.server import Server, run_server

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def fuzzed_real(default_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    tmp = tmp_path_factory.mktemp("fuzz-real")
    with run_server(tmp, "--model", str(default_model), "--threads", "2", "--ctx-size", "512",
                    env={"AXS_DEFAULT_MAX_TOKENS": "16"}, ready_timeout=180) as s:
        yield s


@SCHEMA.include(path_regex="^/(v1/(chat/completions|completions|responses|messages|embeddings)|tokenize)$").parametrize()
@settings(max_examples=4, deadline=None, suppress_health_check=list(HealthCheck))
def test_no_server_errors_on_the_real_model(case: Any, fuzzed_real: Server) -> None:
    if isinstance(case.body, dict) and isinstance(case.body.get("max_tokens"), int):
        case.body["max_tokens"] = min(case.body["max_tokens"], 16)  # bounded work per example
    response = case.call(base_url=fuzzed_real.url, headers={"Authorization": f"Bearer {fuzzed_real.api_key}"},
                         timeout=120)
    check_response(fuzzed_real, case, response)
