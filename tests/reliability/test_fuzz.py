"""Fuzzing every app's OpenAPI with schemathesis on the shared cluster: no 500, 502 or
503 for any generated input, and every response matches what the OpenAPI documents
(a 504 is right for a deadline header too short to run the pipeline in).

Bounded in examples per operation. The model servers get valid and invalid inputs; the
pipelines get invalid ones only (a valid one runs the LLM for seconds, and the pipelines'
valid inputs are exercised by the integration tier).

The pipelines' documented headers also get extreme values with a valid body and a key
(a generated header rarely reaches a run: the body or the key fails first): past the
bounds, or not a number, a 422 naming the header; within them, the run's own answer,
never a 5xx but 503 or 504 (issue 23: `x-servegraph-max-cost-usd: 6.602692196242413e+307`
was a 502 from the LLM node)."""

from __future__ import annotations

import hypothesis
import pytest
import schemathesis
from hypothesis import HealthCheck, Phase
from schemathesis.checks import response_schema_conformance, status_code_conformance
from schemathesis.generation import GenerationMode

from servegraph.deploy.local_ray import LocalCluster
from servegraph.security.client import client_headers

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


# Values each header's schema refuses: a 422 naming the header, before any work.
REFUSED_HEADERS = {
    "x-servegraph-max-cost-usd": [
        "6.602692196242413e+307",
        "1e308",
        "1.8e308",  # past the largest float: infinity
        "1000000.5",  # past MAX_COST_USD
        "inf",
        "-inf",
        "Infinity",
        "nan",
        "NaN",
        "-nan",
        "0",
        "-0",
        "-1",
        "1e-400",  # zero, in floats
        "",
        "0x10",
    ],
    "x-request-timeout": ["1e308", "1.8e308", "600.5", "inf", "nan", "0", "-1", "1e-400", ""],
}
# Values within the schemas, each answered quickly: a budget too small for anything
# (402, once the ingress knows what calls cost), a deadline too short (504).
QUICK_HEADERS = {
    "x-servegraph-max-cost-usd": ["1e-300", "5e-324"],
    "x-request-timeout": ["1e-300", "0.001"],
}
# The largest maximum a caller may send: the whole run, as if it had none (plain routes
# only, so the LLM runs once per pipeline).
FULL_RUN_HEADERS = {"x-servegraph-max-cost-usd": "1e6"}
# A valid body per pipeline that only reads (rag_ingest writes: never run here).
VALID_BODIES = {
    "rag": {"question": "How long do refunds take after a return?"},
    "rag_yaml": {"question": "How long do refunds take after a return?"},
    "triage": {"text": "Where is my order 12345? It has not arrived.", "email": "ana@example.com"},
}


def test_documented_headers_at_extreme_values_never_get_a_server_error(
    pipelines: LocalCluster,
) -> None:
    schema = schemathesis.openapi.from_url(f"{pipelines.base_url}/pipelines/openapi.json")
    base_url = f"{pipelines.base_url}/pipelines"
    operations = [
        operation
        for operation in (result.ok() for result in schema.get_all_operations())
        if operation.method.upper() == "POST"
        and operation.path.strip("/").removesuffix("/stream") in VALID_BODIES
    ]
    assert len(operations) == 2 * len(VALID_BODIES), [op.label for op in operations]
    failures: list[str] = []

    def send(operation: schemathesis.APIOperation, header: str, value: str) -> tuple[int, str]:
        name = operation.path.strip("/").removesuffix("/stream")
        case = operation.Case(
            body=VALID_BODIES[name], headers={header: value}, media_type="application/json"
        )
        response = case.call(base_url=base_url, headers=client_headers(), timeout=180)
        label = f"{operation.label} {header}: {value!r}"
        if response.status_code >= 500 and response.status_code not in (503, 504):
            failures.append(f"{response.status_code} for {label}: {response.text[:500]}")
        else:
            try:
                case.validate_response(response, checks=[status_code_conformance])
            except Exception as exc:
                failures.append(f"{label}: {exc}"[:2000])
        return response.status_code, response.text

    for operation in operations:
        for header, values in REFUSED_HEADERS.items():
            for value in values:
                status, text = send(operation, header, value)
                if status != 422 or f"header.{header}" not in text:
                    failures.append(f"{status}, not a 422 naming {header}, for {value!r}: {text}")
        for header, values in QUICK_HEADERS.items():
            for value in values:
                send(operation, header, value)
        if not operation.path.endswith("/stream"):
            for header, value in FULL_RUN_HEADERS.items():
                status, text = send(operation, header, value)
                if status != 200:
                    failures.append(f"{status} for {operation.label} at {value}: {text[:500]}")
    assert not failures, "\n\n".join(failures)
