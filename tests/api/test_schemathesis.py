"""Schemathesis over the real app: requests generated from /openapi.json (valid ones, and
invalid ones for the negative phase) get no 5xx, only documented status codes, and bodies
that match the declared schemas. Skipped where schemathesis is not installed (dev extra)."""

from __future__ import annotations

from typing import Any

import pytest

schemathesis = pytest.importorskip("schemathesis")

from hypothesis import HealthCheck, settings  # noqa: E402

from .conftest import chat_lines, make_env, upload  # noqa: E402


@pytest.fixture(scope="module")
def st_env(tmp_path_factory, tiny_model_dir) -> Any:
    e = make_env(tmp_path_factory.mktemp("schemathesis"), tiny_model_dir)
    yield e
    e.store.close()


@pytest.fixture(scope="module")
def api_schema(st_env) -> Any:
    from fastapi.testclient import TestClient

    with TestClient(st_env.app) as c:  # one real file, so links and ids have a target
        assert upload(c, chat_lines(4), headers=st_env.headers()).status_code == 200
    return schemathesis.openapi.from_asgi("/openapi.json", st_env.app)


schema = schemathesis.pytest.from_fixture("api_schema").include(
    path_regex=r"^/v1/(files|fine_tuning/jobs)")


@pytest.mark.slow  # ~45 s on 2 cores: 12 operations x 25 generated requests
@schema.parametrize()
@settings(max_examples=25, deadline=None, derandomize=True,
          suppress_health_check=list(HealthCheck))
def test_generated_requests_get_documented_answers(case, st_env) -> None:
    from schemathesis.checks import not_a_server_error
    from schemathesis.specs.openapi.checks import (
        positive_data_acceptance,
        response_schema_conformance,
        status_code_conformance,
    )

    # positive_data_acceptance is left out on purpose: a schema-valid id that names nothing
    # (a random training_file) is rightly a 400/404.
    del positive_data_acceptance
    case.call_and_validate(headers=st_env.headers(), checks=[
        not_a_server_error, status_code_conformance, response_schema_conformance])
