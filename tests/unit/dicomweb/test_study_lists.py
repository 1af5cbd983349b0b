"""Study rows of named studies by UID-list matching on /studies: checked; the series step's flag."""

from __future__ import annotations

from typing import Any

import httpx
import pytest

from bridge.dicomweb.client import DicomwebClient
from bridge.dicomweb.query import SeriesQuery
from bridge.dicomweb.series import MAX_UID_LIST_CHARS
from bridge.errors import ConfigurationError
from bridge.upstream.retry import RetryPolicy
from tests.builders import study_row, uid

pytestmark = pytest.mark.anyio

BASE = "http://archive.test/dicom-web"
NO_RETRY = RetryPolicy(retries=0, base=0.001, max_wait=0.001)


class StudyArchive:
    """Study rows, answering /studies?StudyInstanceUID=a,b the way it is told."""

    def __init__(self, rows: list[dict[str, Any]], *, mode: str = "list", refuse: int | None = None) -> None:
        self.rows = rows
        self.mode = mode  # list | ignore (answers every study) | literal (the text as one UID)
        self.refuse = refuse  # a status answered to every list query
        self.dropped: set[str] = set()  # left out of list answers
        self.requests: list[httpx.Request] = []

    def __call__(self, request: httpx.Request) -> httpx.Response:
        self.requests.append(request)
        wanted = request.url.params.get("StudyInstanceUID", "")
        is_list = "," in wanted
        if is_list and self.refuse is not None:
            return httpx.Response(self.refuse, text="no")

        def uid_of(r: dict[str, Any]) -> str | None:
            return r.get("0020000D", {}).get("Value", [None])[0]

        if self.mode == "ignore":
            rows = self.rows
        elif self.mode == "literal" or not is_list:
            rows = [r for r in self.rows if uid_of(r) == wanted]
        else:
            asked = set(wanted.split(","))
            rows = [r for r in self.rows if uid_of(r) in asked and uid_of(r) not in self.dropped]
        offset = int(request.url.params.get("offset", 0))
        page = rows[offset : offset + int(request.url.params.get("limit", len(rows)))]
        return httpx.Response(200, json=page) if page else httpx.Response(204)

    def lists_asked(self) -> list[list[str]]:
        return [
            r.url.params["StudyInstanceUID"].split(",")
            for r in self.requests
            if "," in r.url.params.get("StudyInstanceUID", "")
        ]


def client(archive: StudyArchive, **kw: Any) -> DicomwebClient:
    http = httpx.AsyncClient(transport=httpx.MockTransport(archive))
    return DicomwebClient(http, BASE, policy=NO_RETRY, **kw)


def studies(n: int) -> tuple[list[str], list[dict[str, Any]]]:
    uids = [uid(700 + i) for i in range(n)]
    return uids, [study_row(study_uid=u, patient_id=f"P{i}") for i, u in enumerate(uids)]


async def test_one_query_answers_a_page_and_decides_list_matching_for_the_series_too() -> None:
    uids, rows = studies(20)
    archive = StudyArchive(rows)
    qido = client(archive, page_size=20)
    answer = await qido.search_studies_many(uids)
    assert archive.lists_asked() == [uids]
    assert len(archive.requests) == 1  # a page as long as the list still tells the answer ended
    assert archive.requests[0].url.path == "/dicom-web/studies"
    assert set(answer) == set(uids) and all(len(found) == 1 for found in answer.values())
    assert qido.list_matching is True and qido.series_query_used == "list"


async def test_a_study_the_answer_drops_or_lists_twice_is_left_out_for_its_own_query() -> None:
    uids, rows = studies(5)
    rows.append(study_row(study_uid=uids[1], patient_id="OTHER"))  # one UID under two patients
    archive = StudyArchive(rows)
    archive.dropped = {uids[3]}
    answer = await client(archive).search_studies_many(uids)
    assert set(answer) == {uids[0], uids[2], uids[4]}


async def test_an_archive_refusing_lists_is_asked_per_study_from_then_on_series_included() -> None:
    uids, rows = studies(5)
    archive = StudyArchive(rows, refuse=400)
    qido = client(archive)
    assert await qido.search_studies_many(uids) == {}
    assert qido.list_matching is False
    asked = len(archive.requests)
    assert await qido.search_studies_many(uids) == {}
    assert await qido.search_series_many(uids) == {}
    assert len(archive.requests) == asked  # the one flag: no further list query of either kind


@pytest.mark.parametrize("mode", ["ignore", "literal"])
async def test_an_archive_misreading_the_list_answers_nothing_usable(mode: str) -> None:
    uids, rows = studies(5)
    extra = study_row(study_uid=uid(999), patient_id="X")
    archive = StudyArchive([*rows, extra], mode=mode)
    qido = client(archive)
    assert await qido.search_studies_many(uids[:3]) == {}
    # An answer with a study not asked decides; one with none leaves it to the next answer.
    assert qido.list_matching is (False if mode == "ignore" else None)


async def test_a_list_too_long_for_one_url_is_split() -> None:
    long_uids = [f"1.2.826.0.1.3680043.10.543.{i + 100}." + "1" * 30 for i in range(100)]
    rows = [study_row(study_uid=u, patient_id=f"P{i}") for i, u in enumerate(long_uids)]
    archive = StudyArchive(rows)
    answer = await client(archive).search_studies_many(long_uids)
    assert set(answer) == set(long_uids)
    lists = archive.lists_asked()
    assert len(lists) == 2 and [u for chunk in lists for u in chunk] == long_uids
    assert all(len(",".join(chunk)) + 2 * len(chunk) <= MAX_UID_LIST_CHARS for chunk in lists)  # %2C commas
    assert all(len(str(r.url)) < 8192 for r in archive.requests)


async def test_list_set_where_the_archive_ignores_lists_stops_naming_the_setting() -> None:
    uids, rows = studies(3)
    archive = StudyArchive([*rows, study_row(study_uid=uid(998), patient_id="X")], mode="ignore")
    with pytest.raises(ConfigurationError, match="BRIDGE_DICOMWEB_SERIES_QUERY"):
        await client(archive, series_query=SeriesQuery.LIST).search_studies_many(uids)
