"""FHIR batch Bundles: what is sent, and each entry's outcome read on its own."""

from __future__ import annotations

import json
from typing import Any

import httpx
import pytest

from bridge.errors import (
    FatalUpstreamError,
    RejectedResourceError,
    RetriableUpstreamError,
    VersionConflictError,
)
from bridge.fhir.client import FhirClient, entry_outcome, entry_status
from bridge.fhir.results import WriteResult
from bridge.upstream.retry import RetryPolicy

pytestmark = pytest.mark.anyio

BASE = "http://ehr.test/fhir"
NO_RETRY = RetryPolicy(retries=0, base=0.001, max_wait=0.001)


def put(i: int) -> dict[str, Any]:
    return {
        "resource": {"resourceType": "ImagingStudy", "id": f"s{i}"},
        "request": {"method": "PUT", "url": f"ImagingStudy/s{i}"},
    }


def answer(status: str, **response: Any) -> dict[str, Any]:
    return {"response": {"status": status, **response}}


async def test_batch_posts_one_bundle_and_returns_the_answers_in_order() -> None:
    seen: list[httpx.Request] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        body = json.loads(request.content)
        entries = [answer("201 Created", location=f"{e['request']['url']}/_history/1") for e in body["entry"]]
        return httpx.Response(
            200, json={"resourceType": "Bundle", "type": "batch-response", "entry": entries}
        )

    fhir = FhirClient(httpx.AsyncClient(transport=httpx.MockTransport(handler)), BASE, policy=NO_RETRY)
    answers = await fhir.batch([put(1), put(2)])
    assert len(seen) == 1
    request = seen[0]
    assert request.method == "POST" and str(request.url) == BASE
    assert request.headers["Prefer"] == "return=minimal"
    bundle = json.loads(request.content)
    assert bundle["type"] == "batch" and [e["request"]["url"] for e in bundle["entry"]] == [
        "ImagingStudy/s1",
        "ImagingStudy/s2",
    ]
    assert [a.result for a in answers] == [
        WriteResult("ImagingStudy", "s1", "1", True),
        WriteResult("ImagingStudy", "s2", "1", True),
    ]
    assert [a.status for a in answers] == [201, 201]


async def test_each_entry_is_read_as_its_own_request_reads_writes_and_failures() -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        entries = [
            answer("200 OK", location="ImagingStudy/s1/_history/3"),
            {"resource": {"resourceType": "Patient", "id": "p1"}, "response": {"status": "200 OK"}},
            answer("412 Precondition Failed"),
            answer("201 Created", location="Patient/p2/_history/1"),
        ]
        bundle = {"resourceType": "Bundle", "type": "batch-response", "entry": entries}
        return httpx.Response(200, json=bundle)

    fhir = FhirClient(httpx.AsyncClient(transport=httpx.MockTransport(handler)), BASE, policy=NO_RETRY)
    create = {
        "resource": {"resourceType": "Patient"},
        "request": {"method": "POST", "url": "Patient", "ifNoneExist": "identifier=s|PID"},
    }
    read = {"request": {"method": "GET", "url": "Patient/p1"}}
    s1, p1, s2, p2 = await fhir.batch([put(1), read, put(2), create])
    assert s1.result == WriteResult("ImagingStudy", "s1", "3", False)
    assert p1.resource == {"resourceType": "Patient", "id": "p1"} and p1.result is None
    assert isinstance(s2.error, VersionConflictError) and s2.status == 412
    assert p2.result == WriteResult("Patient", "p2", "1", True)


async def test_an_answer_with_the_wrong_number_of_entries_is_a_broken_batch() -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        return httpx.Response(200, json={"resourceType": "Bundle", "type": "batch-response", "entry": []})

    fhir = FhirClient(httpx.AsyncClient(transport=httpx.MockTransport(handler)), BASE, policy=NO_RETRY)
    with pytest.raises(FatalUpstreamError, match="batch answered 0 entries for 2"):
        await fhir.batch([put(1), put(2)])


OUTCOME = {
    "resourceType": "OperationOutcome",
    "issue": [{"severity": "error", "code": "required", "diagnostics": "subject is 'Doe^Jane'"}],
}


@pytest.mark.parametrize(
    ("status", "error"),
    [
        ("412 Precondition Failed", VersionConflictError),
        ("409 Conflict", VersionConflictError),
        ("400 Bad Request", RejectedResourceError),
        ("422 Unprocessable Entity", RejectedResourceError),
        ("403 Forbidden", FatalUpstreamError),
        ("500 Internal Server Error", RetriableUpstreamError),
        ("429 Too Many Requests", RetriableUpstreamError),
        ("", RetriableUpstreamError),
    ],
)
async def test_each_entry_failure_is_the_error_a_single_write_would_raise(
    status: str, error: type[Exception]
) -> None:
    outcome = entry_outcome(answer(status, outcome=OUTCOME), "ImagingStudy", "PUT ImagingStudy/s1")
    assert type(outcome) is error
    assert "Doe" not in str(outcome)  # quoted values are blanked: they may be patient data
    if status.startswith("4") and not status.startswith("429"):
        assert "subject is" in str(outcome)


async def test_a_2xx_entry_reads_id_and_version_from_the_etag_or_location() -> None:
    assert entry_outcome(answer("200 OK", location="ImagingStudy/s1/_history/4"), "ImagingStudy", "PUT") == (
        WriteResult("ImagingStudy", "s1", "4", False)
    )
    assert entry_outcome(
        answer("200", etag='W/"7"', location="http://ehr.test/fhir/Patient/p9"), "Patient", "POST"
    ) == WriteResult("Patient", "p9", "7", False)
    assert entry_status(answer("201 Created")) == 201
    assert isinstance(entry_outcome(answer("200 OK"), "ImagingStudy", "PUT"), FatalUpstreamError)
