"""QIDO-RS client: parameters sent, paging, odd servers, encodings, and the audit of queries."""

from __future__ import annotations

import gzip
import json
import math
from collections.abc import Callable
from typing import Any

import httpx
import pytest

from bridge.dicomweb.client import DicomwebClient
from bridge.errors import FatalUpstreamError, MappingError, UpstreamError
from bridge.mapping.records import SERIES_FIELDS, STUDY_FIELDS
from bridge.upstream.retry import RetryPolicy
from tests.builders import load_json, series_row, study_row, uid

pytestmark = pytest.mark.anyio

BASE = "http://archive.test/dicom-web"
NO_RETRY = RetryPolicy(retries=0, base=0.001, max_wait=0.001)


class FakeArchive:
    """A QIDO-RS server over a list of study rows, with switches for the quirks of real ones."""

    def __init__(
        self,
        rows: list[dict[str, Any]],
        *,
        ignore_limit: bool = False,
        ignore_offset: bool = False,
        cap: int | None = None,
    ) -> None:
        self.rows = rows
        self.ignore_limit = ignore_limit
        self.ignore_offset = ignore_offset
        self.cap = cap  # most rows per answer; says so in a Warning header when it cuts
        self.requests: list[httpx.Request] = []
        self.series: dict[str, list[dict[str, Any]]] = {}

    def __call__(self, request: httpx.Request) -> httpx.Response:
        self.requests.append(request)
        rows = self.rows
        if request.url.path.endswith("/series"):
            rows = self.series.get(request.url.path.split("/")[-2], [])
        limit = int(request.url.params.get("limit", len(rows)))
        offset = int(request.url.params.get("offset", 0))
        start = 0 if self.ignore_offset else offset
        answer = rows[start:] if self.ignore_limit else rows[start : start + limit]
        headers = {}
        if self.cap is not None and len(answer) > self.cap:
            answer = answer[: self.cap]
            headers["Warning"] = '299 archive.test "The number of results exceeded the maximum"'
        if not answer:
            return httpx.Response(204, headers=headers)
        return httpx.Response(200, json=answer, headers={"Content-Type": "application/dicom+json", **headers})


def studies(n: int) -> list[dict[str, Any]]:
    return [study_row(study_uid=uid(100 + i)) for i in range(n)]


def client_for(handler: Callable[[httpx.Request], httpx.Response], page_size: int = 5) -> DicomwebClient:
    http = httpx.AsyncClient(transport=httpx.MockTransport(handler))
    return DicomwebClient(http, BASE, policy=NO_RETRY, page_size=page_size)


async def all_uids(client: DicomwebClient) -> list[str]:
    return [row["0020000D"]["Value"][0] async for page in client.iter_studies() for row in page]


async def test_study_query_asks_only_for_the_needed_attributes_with_limit_and_offset() -> None:
    archive = FakeArchive(studies(2))
    await all_uids(client_for(archive, page_size=50))
    request = archive.requests[0]
    assert request.url.path == "/dicom-web/studies"
    assert request.url.params.get_list("includefield") == list(STUDY_FIELDS)
    assert request.url.params["limit"] == "50"
    assert request.url.params["offset"] == "0"
    assert "application/dicom+json" in request.headers["Accept"]
    assert "gzip" in request.headers["Accept-Encoding"]


async def test_filters_are_sent_as_query_parameters() -> None:
    archive = FakeArchive(studies(1))
    client = client_for(archive)
    [page] = [p async for p in client.iter_studies({"StudyDate": "20240101-20240131"})]
    assert archive.requests[0].url.params["StudyDate"] == "20240101-20240131"


async def test_paging_walks_every_page_until_a_short_one() -> None:
    archive = FakeArchive(studies(12))
    uids = await all_uids(client_for(archive, page_size=5))
    assert uids == [uid(100 + i) for i in range(12)]
    assert [r.url.params["offset"] for r in archive.requests] == ["0", "5", "10"]


@pytest.mark.parametrize("n", [0, 1, 4, 5, 6, 10, 11, 23])
async def test_number_of_requests_is_pages_plus_one_when_the_last_page_is_full(n: int) -> None:
    archive = FakeArchive(studies(n))
    uids = await all_uids(client_for(archive, page_size=5))
    assert len(uids) == n
    assert len(archive.requests) == math.ceil(n / 5) + (1 if n % 5 == 0 else 0)


async def test_a_server_that_ignores_limit_gives_each_study_once_and_the_walk_stops() -> None:
    archive = FakeArchive(studies(12), ignore_limit=True)
    uids = await all_uids(client_for(archive, page_size=5))
    assert sorted(uids) == [uid(100 + i) for i in range(12)]
    assert len(archive.requests) == 1


async def test_a_server_that_ignores_limit_with_exactly_a_page_stops() -> None:
    archive = FakeArchive(studies(5), ignore_limit=True, ignore_offset=True)
    uids = await all_uids(client_for(archive, page_size=5))
    assert sorted(uids) == [uid(100 + i) for i in range(5)]
    assert len(archive.requests) == 2


async def test_a_server_that_ignores_offset_stops_instead_of_looping() -> None:
    archive = FakeArchive(studies(12), ignore_offset=True)
    uids = await all_uids(client_for(archive, page_size=5))
    assert uids == [uid(100 + i) for i in range(5)]  # no duplicates
    assert len(archive.requests) == 2


async def test_one_study_uid_listed_under_two_patients_reaches_the_sync_twice_and_a_repeat_once() -> None:
    rows = [
        study_row(study_uid=uid(1), patient_id="MRN-A"),
        study_row(study_uid=uid(2)),
        study_row(study_uid=uid(1), patient_id="MRN-B"),  # Orthanc: the same Study UID, another patient
        study_row(study_uid=uid(1), patient_id="MRN-A"),  # the first row again (offset paging shifted)
    ]
    client = client_for(FakeArchive(rows), page_size=2)
    found = [
        (row["0020000D"]["Value"][0], row["00100020"]["Value"][0])
        async for page in client.iter_studies()
        for row in page
    ]
    assert found == [(uid(1), "MRN-A"), (uid(2), "PID0001"), (uid(1), "MRN-B")]


async def test_a_server_that_ignores_offset_is_reported(caplog: pytest.LogCaptureFixture) -> None:
    archive = FakeArchive(studies(12), ignore_offset=True)
    await all_uids(client_for(archive, page_size=5))
    assert any(r.levelname == "WARNING" for r in caplog.records)


async def test_a_truncated_short_page_with_a_warning_header_keeps_paging() -> None:
    archive = FakeArchive(studies(12), cap=3)  # asks for 5, gets 3 and a Warning
    uids = await all_uids(client_for(archive, page_size=5))
    assert uids == [uid(100 + i) for i in range(12)]
    assert [r.url.params["offset"] for r in archive.requests] == ["0", "3", "6", "9"]


async def test_204_no_content_means_no_rows() -> None:
    client = client_for(lambda request: httpx.Response(204))
    assert await all_uids(client) == []


async def test_an_empty_200_body_means_no_rows() -> None:
    client = client_for(lambda request: httpx.Response(200, content=b""))
    assert await all_uids(client) == []


async def test_a_gzip_encoded_body_is_decoded() -> None:
    body = gzip.compress(json.dumps(studies(2)).encode())

    def handler(request: httpx.Request) -> httpx.Response:
        # A stream, so the body is decoded by the client rather than when the Response is built.
        return httpx.Response(
            200,
            stream=httpx.ByteStream(body),
            headers={"Content-Encoding": "gzip", "Content-Type": "application/dicom+json"},
        )

    assert await all_uids(client_for(handler)) == [uid(100), uid(101)]


async def test_a_body_that_is_not_json_is_an_error_naming_the_request() -> None:
    client = client_for(lambda request: httpx.Response(200, content=b"<html>login</html>"))
    with pytest.raises(FatalUpstreamError, match="GET http://archive.test/dicom-web/studies"):
        await all_uids(client)


async def test_a_json_body_that_is_not_an_array_is_an_error() -> None:
    client = client_for(lambda request: httpx.Response(200, json={"error": "nope"}))
    with pytest.raises(FatalUpstreamError, match="DICOM JSON array"):
        await all_uids(client)


async def test_queries_records_every_request_made() -> None:
    archive = FakeArchive(studies(7))
    client = client_for(archive, page_size=5)
    await all_uids(client)
    assert len(client.queries) == len(archive.requests) == 2
    for query, request in zip(client.queries, archive.requests, strict=True):
        assert query == f"/studies?{request.url.query.decode()}"


async def test_series_query_for_one_study() -> None:
    archive = FakeArchive([])
    archive.series[uid(1)] = [series_row(series_uid=uid(1, n), number=n) for n in (1, 2)]
    client = client_for(archive)
    records = await client.search_series(uid(1))
    assert [r.uid for r in records] == [uid(1, 1), uid(1, 2)]
    request = archive.requests[0]
    assert request.url.path == f"/dicom-web/studies/{uid(1)}/series"
    assert request.url.params.get_list("includefield") == list(SERIES_FIELDS)
    assert client.queries[0].startswith(f"/studies/{uid(1)}/series?")


async def test_series_from_a_recorded_answer() -> None:
    rows = load_json("qido-series.json")
    client = client_for(lambda request: httpx.Response(200, json=rows))
    records = await client.search_series("1.2.826.0.1.3680043.8.498.10")
    assert {r.modality for r in records} == {"CT", "SR"}


async def test_an_unparsable_series_row_is_a_mapping_error() -> None:
    client = client_for(lambda request: httpx.Response(200, json=[series_row(series_uid=None)]))
    with pytest.raises(MappingError):
        await client.search_series(uid(1))


async def test_http_errors_become_upstream_errors() -> None:
    client = client_for(lambda request: httpx.Response(404))
    with pytest.raises(UpstreamError) as caught:
        await all_uids(client)
    assert (caught.value.service, caught.value.status) == ("dicomweb", 404)


def bounded_client(handler: Callable[[httpx.Request], httpx.Response], **limits: Any) -> DicomwebClient:
    from bridge.dicomweb.limits import DicomwebLimits

    http = httpx.AsyncClient(transport=httpx.MockTransport(handler))
    return DicomwebClient(http, BASE, policy=NO_RETRY, page_size=5, limits=DicomwebLimits(**limits))


async def test_a_warning_header_on_every_page_of_new_rows_ends_at_the_page_cap() -> None:
    from bridge.errors import UpstreamLimitError

    served: list[int] = []

    def endless(request: httpx.Request) -> httpx.Response:
        offset = int(request.url.params["offset"])
        served.append(offset)
        rows = [study_row(study_uid=uid(10_000 + offset + i)) for i in range(5)]
        return httpx.Response(200, json=rows, headers={"Warning": '299 x "truncated"'})

    client = bounded_client(endless, max_pages=20)
    with pytest.raises(UpstreamLimitError) as caught:
        await all_uids(client)
    assert caught.value.setting == "BRIDGE_DICOMWEB_MAX_PAGES"
    assert len(served) == 20


async def test_a_study_with_more_series_than_the_cap_fails_naming_the_setting_without_reading_on() -> None:
    from bridge.errors import UpstreamLimitError

    archive = FakeArchive([])
    archive.series[uid(1)] = [series_row(series_uid=uid(5000 + i)) for i in range(100)]
    client = bounded_client(archive, max_series=12)
    with pytest.raises(UpstreamLimitError) as caught:
        await client.search_series(uid(1))
    assert caught.value.setting == "BRIDGE_DICOMWEB_MAX_SERIES"
    assert len(archive.requests) == 3  # pages of 5: the third crosses 12
    assert len(await bounded_client(archive, max_series=100).search_series(uid(1))) == 100


async def test_a_series_answer_over_its_size_cap_fails_naming_the_setting() -> None:
    from bridge.errors import UpstreamLimitError

    archive = FakeArchive([])
    archive.series[uid(1)] = [series_row(series_uid=uid(5000 + i)) for i in range(5)]
    with pytest.raises(UpstreamLimitError) as caught:
        await bounded_client(archive, series_bytes=1024).search_series(uid(1))
    assert caught.value.setting == "BRIDGE_DICOMWEB_MAX_SERIES_BYTES"
# The other archive calls: readiness ping and study pictures ------------------------------------


async def test_ping_asks_for_one_study_once_and_raises_when_the_archive_fails() -> None:
    seen: list[httpx.Request] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        return httpx.Response(503 if len(seen) > 1 else 200, json=[])

    async with httpx.AsyncClient(transport=httpx.MockTransport(handler)) as http:
        archive = DicomwebClient(http, BASE, policy=RetryPolicy(retries=3, base=0.001))
        await archive.ping()
        with pytest.raises(UpstreamError):
            await archive.ping()
    assert len(seen) == 2  # never retried: readiness reports, it does not wait
    assert seen[0].url.path == "/dicom-web/studies" and seen[0].url.params["limit"] == "1"


async def test_picture_takes_the_first_resource_that_renders_an_image() -> None:
    asked: list[str] = []

    def handler(request: httpx.Request) -> httpx.Response:
        asked.append(f"{request.url.path}?{request.url.query.decode()} {request.headers['accept']}")
        if request.url.path.endswith("/thumbnail"):
            return httpx.Response(404)
        return httpx.Response(200, content=b"\xff\xd8jpeg", headers={"Content-Type": "image/jpeg"})

    study = f"{BASE}/studies/{uid(1)}"
    async with httpx.AsyncClient(transport=httpx.MockTransport(handler)) as http:
        archive = DicomwebClient(http, BASE, policy=NO_RETRY)
        picture = await archive.picture([f"{study}/thumbnail", f"{study}/rendered"], viewport="96,96")
    assert picture == (b"\xff\xd8jpeg", "image/jpeg")
    assert asked == [
        f"/dicom-web/studies/{uid(1)}/thumbnail?viewport=96,96 image/jpeg",
        f"/dicom-web/studies/{uid(1)}/rendered?viewport=96,96 image/jpeg",
    ]


async def test_no_picture_when_no_resource_answers_an_image() -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        return httpx.Response(200, content=b"<html>", headers={"Content-Type": "text/html"})

    async with httpx.AsyncClient(transport=httpx.MockTransport(handler)) as http:
        archive = DicomwebClient(http, BASE, policy=NO_RETRY)
        assert await archive.picture([f"{BASE}/studies/{uid(1)}/rendered"], viewport="96,96") is None


async def test_series_metadata_reads_the_wado_rs_metadata_of_one_series() -> None:
    seen: list[str] = []
    note = {"00080016": {"vr": "UI", "Value": ["1.2.840.10008.5.1.4.1.1.88.59"]}}

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request.url.path)
        return httpx.Response(200, json=[note])

    answer = await client_for(handler).series_metadata("1.2.3", "1.2.3.4")
    assert answer == [note]
    assert seen == ["/dicom-web/studies/1.2.3/series/1.2.3.4/metadata"]
