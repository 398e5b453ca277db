"""Fuzzing every app's OpenAPI with schemathesis on the shared cluster: no 500, 502 or
503 for any generated input, and every response matches what the OpenAPI documents
(a 504 is right for a deadline header too short to run the pipeline in).

Bounded in examples per operation. The model servers get valid and invalid inputs; the
pipelines get invalid ones only (a valid one runs the LLM for seconds, and the pipelines'
valid inputs are exercised by the integration tier)."""

from __future__ import annotations

import hypothesis
import pytest
import schemathesis
from hypothesis import HealthCheck, Phase
from schemathesis.checks import response_schema_conformance, status_code_conformance
from schemathesis.generation import GenerationMode

from servegraph.local_ray import LocalCluster

pytestmark = pytest.mark.reliability

APPS = {
    "/embedder": (30, None),
    "/classifier": (30, None),
    "/index": (30, None),
    "/pipelines": (20, GenerationMode.NEGATIVE),
}


@pytest.mark.parametrize("prefix", list(APPS))
def test_no_generated_input_gets_a_server_error_or_an_undocumented_body(
    pipelines: LocalCluster, prefix: str
) -> None:
    examples, mode = APPS[prefix]
    config = schemathesis.Config()
    if mode is not None:
        config.projects.default.generation.update(modes=[mode])
    schema = schemathesis.openapi.from_url(
        f"{pipelines.base_url}{prefix}/openapi.json", config=config
    )
    failures: list[str] = []
    operations = [result.ok() for result in schema.get_all_operations()]
    assert operations, f"{prefix} documents no operation"
    for operation in operations:

        @hypothesis.given(case=operation.as_strategy())
        @hypothesis.settings(
            max_examples=examples,
            deadline=None,
            database=None,
            derandomize=True,  # the same inputs on every run: a failure reproduces
            phases=[Phase.explicit, Phase.generate],
            suppress_health_check=list(HealthCheck),
        )
        def fuzz(case: schemathesis.Case) -> None:
            response = case.call(base_url=f"{pipelines.base_url}{prefix}", timeout=120)
            assert response.status_code not in (500, 502, 503), (
                f"{response.status_code} for {case.method} {case.formatted_path} "
                f"body={case.body!r} headers={case.headers!r}: {response.text[:500]}"
            )
            case.validate_response(
                response, checks=[status_code_conformance, response_schema_conformance]
            )

        try:
            fuzz()
        except Exception as exc:  # every operation is fuzzed; all failures reported
            failures.append(f"{operation.label}: {exc}"[:2000])
    assert not failures, "\n\n".join(failures)
