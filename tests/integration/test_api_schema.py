"""schemathesis against the app's own OpenAPI schema, served by `bridge serve` over a synced stack: no 5xx."""

from __future__ import annotations

import copy
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import response_schema_conformance

from tests.integration.conftest import Stack
from tests.integration.test_resolver import ACCESSION_SYSTEM, serve
from tests.stack.samples import load_demo

pytestmark = pytest.mark.integration

MAX_EXAMPLES = 30


def _with_real_examples(schema: dict[str, Any], values: dict[str, str]) -> dict[str, Any]:
    """The schema with examples that exist in the stack, so generated cases also reach 200/302."""
    patched = copy.deepcopy(schema)
    for operations in patched["paths"].values():
        for operation in operations.values():
            for parameter in operation.get("parameters", []):
                if parameter["name"] in values:
                    parameter["schema"]["examples"] = [values[parameter["name"]]]
                    parameter.pop("example", None)
                    parameter.pop("examples", None)
    return patched


@pytest.fixture
def api_schema(stack: Stack) -> Iterator[Any]:
    specs = load_demo(stack.orthanc.dicomweb_url)
    stack.sync(accession_identifier_system=ACCESSION_SYSTEM)
    study = stack.fhir_search("ImagingStudy")[0]
    with serve(stack) as url:
        raw = httpx.get(f"{url}/openapi.json", timeout=30).json()
        values = {
            "id": study["id"],
            "study_uid": str(specs[0].uid),
            "accession": str(specs[0].accession),
            "reference": f"ImagingStudy/{study['id']}",
            "issuer": ACCESSION_SYSTEM,
            "viewer": "stone",
        }
        schema = schemathesis.openapi.from_dict(_with_real_examples(raw, values))
        schema.config.update(base_url=url)
        yield schema


def test_no_server_errors_and_answers_match_the_schema(api_schema: Any) -> None:
    # Each operation gets its own bounded hypothesis run (schemathesis's lazy pytest
    # integration does not work with this pytest; driving the strategies directly does).
    operations = [result.ok() for result in api_schema.get_all_operations()]
    assert len(operations) >= 10
    statuses: list[int] = []
    for operation in operations:

        @given(case=operation.as_strategy())
        @settings(
            max_examples=MAX_EXAMPLES,
            deadline=None,
            database=None,
            suppress_health_check=list(HealthCheck),
        )
        def run(case: Any) -> None:
            response = case.call_and_validate(
                checks=[not_a_server_error, response_schema_conformance], allow_redirects=False
            )
            statuses.append(response.status_code)

        run()
    # The run reached real studies, not only the error paths.
    assert len(statuses) > 5 * len(operations)
    assert {200, 302, 404, 422} <= set(statuses), sorted(set(statuses))
