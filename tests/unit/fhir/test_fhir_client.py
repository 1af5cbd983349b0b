"""FHIR REST client: reads, versioned and conditional writes, errors, transaction answers."""

from __future__ import annotations

import json
from collections.abc import Callable

import httpx
import pytest

from bridge.errors import (
    ConfigurationError,
    FatalUpstreamError,
    RejectedResourceError,
    UpstreamUnavailableError,
    VersionConflictError,
)
from bridge.fhir.client import FhirClient, entry_result, etag_version, outcome_text, parse_location
from bridge.upstream.retry import RetryPolicy

pytestmark = pytest.mark.anyio

BASE = "http://ehr.test/fhir"
STUDY = {
    "resourceType": "ImagingStudy",
    "id": "s1",
    "status": "available",
    "subject": {"reference": "Patient/p"},
}
OUTCOME = {
    "resourceType": "OperationOutcome",
    "issue": [
        {
            "severity": "error",
            "code": "required",
            "diagnostics": "ImagingStudy.subject: minimum required = 1",
            "expression": ["ImagingStudy.subject"],
        },
        {"severity": "error", "code": "value", "details": {"text": "bad status"}},
    ],
}


class Recorder:
    def __init__(self, response: httpx.Response | Callable[[httpx.Request], httpx.Response]) -> None:
        self.response = response
        self.requests: list[httpx.Request] = []

    def __call__(self, request: httpx.Request) -> httpx.Response:
        self.requests.append(request)
        return self.response(request) if callable(self.response) else self.response

    @property
    def last(self) -> httpx.Request:
        return self.requests[-1]


def fhir(handler: Callable[[httpx.Request], httpx.Response], retries: int = 0) -> FhirClient:
    http = httpx.AsyncClient(transport=httpx.MockTransport(handler))
    return FhirClient(http, BASE, policy=RetryPolicy(retries=retries, base=0.001, max_wait=0.001))


async def test_read_returns_the_resource() -> None:
    rec = Recorder(httpx.Response(200, json={"resourceType": "Patient", "id": "p1"}))
    assert await fhir(rec).read("Patient", "p1") == {"resourceType": "Patient", "id": "p1"}
    assert str(rec.last.url) == f"{BASE}/Patient/p1"
    assert rec.last.headers["Accept"] == "application/fhir+json"


@pytest.mark.parametrize("status", [404, 410])
async def test_read_of_a_missing_or_deleted_resource_is_none(status: int) -> None:
    assert await fhir(Recorder(httpx.Response(status))).read("Patient", "gone") is None


async def test_update_sends_if_match_and_parses_etag_and_location() -> None:
    rec = Recorder(
        httpx.Response(
            200, json=STUDY, headers={"ETag": 'W/"4"', "Location": f"{BASE}/ImagingStudy/s1/_history/4"}
        )
    )
    result = await fhir(rec).update(STUDY, if_match="3")
    assert rec.last.method == "PUT"
    assert str(rec.last.url) == f"{BASE}/ImagingStudy/s1"
    assert rec.last.headers["If-Match"] == 'W/"3"'
    assert rec.last.headers["Content-Type"] == "application/fhir+json"
    assert json.loads(rec.last.content) == STUDY
    assert (result.resource_type, result.id, result.version, result.created) == (
        "ImagingStudy",
        "s1",
        "4",
        False,
    )


async def test_update_without_a_known_version_sends_no_if_match() -> None:
    rec = Recorder(httpx.Response(201, headers={"Location": f"{BASE}/ImagingStudy/s1/_history/1"}))
    result = await fhir(rec).update(STUDY)
    assert "If-Match" not in rec.last.headers
    assert (result.version, result.created) == ("1", True)


async def test_write_result_falls_back_to_the_body_meta() -> None:
    body = {**STUDY, "meta": {"versionId": "9"}}
    result = await fhir(Recorder(httpx.Response(200, json=body))).update(STUDY)
    assert (result.id, result.version) == ("s1", "9")


async def test_conditional_create_sends_if_none_exist() -> None:
    rec = Recorder(
        httpx.Response(201, headers={"Location": f"{BASE}/Patient/new1/_history/1", "ETag": 'W/"1"'})
    )
    patient = {"resourceType": "Patient", "identifier": [{"system": "urn:x", "value": "1"}]}
    result = await fhir(rec).conditional_create(patient, "identifier=urn%3Ax%7C1")
    assert rec.last.method == "POST"
    assert str(rec.last.url) == f"{BASE}/Patient"
    assert rec.last.headers["If-None-Exist"] == "identifier=urn%3Ax%7C1"
    assert (result.id, result.version, result.created) == ("new1", "1", True)


async def test_conditional_create_of_an_existing_resource_is_not_created() -> None:
    rec = Recorder(
        httpx.Response(200, json={"resourceType": "Patient", "id": "old", "meta": {"versionId": "2"}})
    )
    result = await fhir(rec).conditional_create({"resourceType": "Patient"}, "identifier=a%7Cb")
    assert (result.id, result.created) == ("old", False)


async def test_conditional_update_puts_to_the_type_with_the_search_and_no_id() -> None:
    rec = Recorder(httpx.Response(201, headers={"Location": f"{BASE}/ImagingStudy/srv9/_history/1"}))
    result = await fhir(rec).conditional_update(STUDY, {"identifier": "urn:dicom:uid|urn:oid:1.2.3"})
    assert rec.last.method == "PUT"
    assert rec.last.url.path == "/fhir/ImagingStudy"
    assert rec.last.url.params["identifier"] == "urn:dicom:uid|urn:oid:1.2.3"
    assert "id" not in json.loads(rec.last.content)
    assert result.id == "srv9"


@pytest.mark.parametrize("status", [400, 422])
async def test_a_rejected_resource_carries_the_operation_outcome_text(status: int) -> None:
    rec = Recorder(httpx.Response(status, json=OUTCOME))
    with pytest.raises(RejectedResourceError) as caught:
        await fhir(rec).update(STUDY)
    assert caught.value.outcome == (
        "ImagingStudy.subject: minimum required = 1 (ImagingStudy.subject); bad status"
    )
    assert caught.value.outcome in str(caught.value)
    assert caught.value.status == status


async def test_412_is_a_version_conflict_and_not_retried() -> None:
    rec = Recorder(httpx.Response(412, json=OUTCOME))
    with pytest.raises(VersionConflictError) as caught:
        await fhir(rec, retries=3).update(STUDY, if_match="1")
    assert caught.value.status == 412
    assert len(rec.requests) == 1


async def test_409_is_a_version_conflict() -> None:
    with pytest.raises(VersionConflictError):
        await fhir(Recorder(httpx.Response(409))).update(STUDY)


async def test_a_rejection_without_a_body_is_still_rejected() -> None:
    with pytest.raises(RejectedResourceError) as caught:
        await fhir(Recorder(httpx.Response(400, content=b"Bad Request"))).update(STUDY)
    assert caught.value.outcome == ""


async def test_other_4xx_are_fatal() -> None:
    with pytest.raises(FatalUpstreamError) as caught:
        await fhir(Recorder(httpx.Response(405))).update(STUDY)
    assert not isinstance(caught.value, RejectedResourceError | VersionConflictError)


async def test_5xx_is_retried_then_unavailable() -> None:
    rec = Recorder(httpx.Response(503))
    with pytest.raises(UpstreamUnavailableError):
        await fhir(rec, retries=2).read("Patient", "p")
    assert len(rec.requests) == 3


async def test_search_returns_only_matches_of_the_type() -> None:
    bundle = {
        "resourceType": "Bundle",
        "type": "searchset",
        "entry": [
            {"resource": {"resourceType": "Patient", "id": "a"}, "search": {"mode": "match"}},
            {"resource": {"resourceType": "Patient", "id": "b"}},
            {"resource": {"resourceType": "Organization", "id": "o"}, "search": {"mode": "include"}},
            {"resource": {"resourceType": "OperationOutcome"}, "search": {"mode": "outcome"}},
        ],
    }
    rec = Recorder(httpx.Response(200, json=bundle))
    found = await fhir(rec).search("Patient", {"identifier": "urn:x|1"})
    assert [r["id"] for r in found] == ["a", "b"]
    assert rec.last.url.params["identifier"] == "urn:x|1"


async def test_searches_ask_for_fresh_results_not_a_cached_answer() -> None:
    # HAPI reuses a search's results for 60 s unless told not to: a Patient created in between
    # would stay invisible to a match-only re-run.
    rec = Recorder(lambda request: httpx.Response(200, json=_page(["a"], f"{BASE}?_getpages=x")))
    await fhir(rec).search("ImagingStudy", {"subject": "Patient/p"}, limit=2)
    assert [r.headers.get("Cache-Control") for r in rec.requests] == ["no-cache", "no-cache"]


async def test_a_400_on_search_does_not_echo_the_query_string() -> None:
    rec = Recorder(httpx.Response(400))
    with pytest.raises(FatalUpstreamError) as caught:
        await fhir(rec).search("Patient", {"identifier": "urn:x|SECRET-PID"})
    assert "SECRET" not in str(caught.value)
    assert "GET http://ehr.test/fhir/Patient" in str(caught.value)


async def test_transaction_posts_a_bundle_and_returns_the_entries_in_order() -> None:
    answer = {
        "resourceType": "Bundle",
        "type": "transaction-response",
        "entry": [
            {
                "response": {
                    "status": "201 Created",
                    "location": "ImagingStudy/s1/_history/1",
                    "etag": 'W/"1"',
                }
            },
            {"response": {"status": "200 OK", "location": "Endpoint/e1/_history/3"}},
        ],
    }
    rec = Recorder(httpx.Response(200, json=answer))
    entries = [{"resource": STUDY, "request": {"method": "PUT", "url": "ImagingStudy/s1"}}] * 2
    answers = await fhir(rec).transaction(entries)
    assert rec.last.method == "POST"
    assert str(rec.last.url) == BASE
    assert json.loads(rec.last.content)["type"] == "transaction"
    first, second = entry_result(answers[0], "ImagingStudy"), entry_result(answers[1], "Endpoint")
    assert (first.id, first.version, first.created) == ("s1", "1", True)
    assert (second.id, second.version, second.created) == ("e1", "3", False)


async def test_a_transaction_answer_with_the_wrong_number_of_entries_is_an_error() -> None:
    rec = Recorder(httpx.Response(200, json={"resourceType": "Bundle", "entry": []}))
    with pytest.raises(FatalUpstreamError, match="0 entries for 1"):
        await fhir(rec).transaction([{"request": {"method": "GET", "url": "Patient/p"}}])


def test_entry_result_from_the_returned_resource_when_there_is_no_location() -> None:
    answer = {"response": {"status": "200"}, "resource": {"id": "x", "meta": {"versionId": "5"}}}
    result = entry_result(answer, "Patient")
    assert (result.id, result.version, result.created) == ("x", "5", False)


def test_entry_result_without_any_id_is_an_error() -> None:
    with pytest.raises(FatalUpstreamError):
        entry_result({"response": {"status": "200 OK"}}, "Patient")


@pytest.mark.parametrize(
    ("location", "expected"),
    [
        ("http://ehr/fhir/Patient/p1/_history/7", ("Patient", "p1", "7")),
        ("Patient/p1", ("Patient", "p1", None)),
        ("Patient/p1/", ("Patient", "p1", None)),
    ],
)
def test_parse_location(location: str, expected: tuple[str, str, str | None]) -> None:
    assert parse_location(location) == expected


def test_etag_version() -> None:
    assert etag_version('W/"12"') == "12"
    assert etag_version('"12"') == "12"
    assert etag_version(None) is None


def test_outcome_text_ignores_other_resources() -> None:
    assert outcome_text({"resourceType": "Patient"}) is None
    assert outcome_text(OUTCOME) is not None


def test_outcome_text_blanks_quoted_values_a_server_echoes() -> None:
    from bridge.fhir.client import outcome_text

    body = {
        "resourceType": "OperationOutcome",
        "issue": [
            {"diagnostics": 'The value "Doe^Jane" is not valid', "expression": ["Patient.name[0]"]},
            {"diagnostics": "birth date 'x' can't be parsed"},
        ],
    }
    text = outcome_text(body)
    assert text is not None
    assert "Doe" not in text and "'x'" not in text
    assert "Patient.name[0]" in text and "can't be parsed" in text


def _page(ids: list[str], next_url: str | None) -> dict[str, object]:
    return {
        "resourceType": "Bundle",
        "type": "searchset",
        "link": [{"relation": "self", "url": BASE}]
        + ([{"relation": "next", "url": next_url}] if next_url else []),
        "entry": [
            {"resource": {"resourceType": "ImagingStudy", "id": i}, "search": {"mode": "match"}} for i in ids
        ],
    }


async def test_search_with_a_limit_follows_next_links_when_the_server_caps_count() -> None:
    # HAPI answers _count=100 with at most 50 a page (its default maximum) and a next link.
    pages = {
        "/fhir/ImagingStudy": _page(["a", "b"], f"{BASE}?_getpages=x&_getpagesoffset=2&_count=2"),
        "/fhir?_getpages=x&_getpagesoffset=2&_count=2": _page(
            ["c", "d"], f"{BASE}?_getpages=x&_getpagesoffset=4"
        ),
    }

    def handler(request: httpx.Request) -> httpx.Response:
        key = request.url.path + (f"?{request.url.query.decode()}" if request.url.path == "/fhir" else "")
        return httpx.Response(200, json=pages[key])

    rec = Recorder(handler)
    found = await fhir(rec).search("ImagingStudy", {"subject": "Patient/p", "_count": "3"}, limit=3)
    assert [r["id"] for r in found] == ["a", "b", "c"]
    assert len(rec.requests) == 2
    # Without a limit, the first page only: callers searching by identifier need no more.
    rec = Recorder(handler)
    assert [r["id"] for r in await fhir(rec).search("ImagingStudy", {}, limit=0)] == ["a", "b"]
    assert len(rec.requests) == 1


async def test_search_never_follows_a_next_link_to_another_host() -> None:
    rec = Recorder(httpx.Response(200, json=_page(["a"], "http://elsewhere.test/fhir?_getpages=x")))
    found = await fhir(rec).search("ImagingStudy", {}, limit=10)
    assert [r["id"] for r in found] == ["a"]
    assert [str(r.url.host) for r in rec.requests] == ["ehr.test"]


async def test_search_follows_at_most_a_bounded_number_of_pages() -> None:
    rec = Recorder(lambda request: httpx.Response(200, json=_page(["a"], f"{BASE}?_getpages=loop")))
    found = await fhir(rec).search("ImagingStudy", {}, limit=1000)
    assert len(rec.requests) == 50
    assert len(found) == 50


# Not a FHIR server
@pytest.mark.parametrize(
    ("answer", "said"),
    [
        (httpx.Response(404, text="Unknown resource"), "GET metadata answered 404"),  # an archive
        (
            httpx.Response(200, text="<html>Welcome</html>", headers={"Content-Type": "text/html"}),
            "GET metadata did not answer JSON",  # a web page on every path
        ),
        (httpx.Response(200, json={"studies": []}), "GET metadata answered no CapabilityStatement"),
    ],
)
async def test_a_base_url_that_is_no_fhir_server_is_named_as_bridge_fhir_url(
    answer: httpx.Response, said: str
) -> None:
    with pytest.raises(ConfigurationError) as caught:
        await fhir(Recorder(answer)).capability_statement()
    message = str(caught.value)
    assert message.startswith(f"BRIDGE_FHIR_URL: {BASE} is not a FHIR server")
    assert said in message
