"""Series of many studies at once: UID-list matching, checked per study, with its fallbacks."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest

from bridge.dicomweb.client import DicomwebClient
from bridge.dicomweb.limits import DicomwebLimits
from bridge.dicomweb.query import SeriesQuery
from bridge.errors import ConfigurationError, MappingError, UpstreamLimitError
from bridge.upstream.bounds import Pace
from bridge.upstream.retry import RetryPolicy
from tests.builders import study_series_row, uid

pytestmark = pytest.mark.anyio

BASE = "http://archive.test/dicom-web"
NO_RETRY = RetryPolicy(retries=0, base=0.001, max_wait=0.001)


class ListArchive:
    """Series rows of several studies, answering /series?StudyInstanceUID=a,b the way it is told."""

    def __init__(self, rows: list[dict[str, Any]], *, mode: str = "list") -> None:
        self.rows = rows
        self.mode = mode  # list | ignore (answers every series) | literal (matches the text as one UID)
        self.requests: list[httpx.Request] = []

    def __call__(self, request: httpx.Request) -> httpx.Response:
        self.requests.append(request)
        wanted = request.url.params.get("StudyInstanceUID", "")

        def study_of(r: dict[str, Any]) -> str | None:
            return r.get("0020000D", {}).get("Value", [None])[0]

        if self.mode == "list":
            asked = set(wanted.split(","))
            rows = [r for r in self.rows if study_of(r) in asked or study_of(r) is None]
        elif self.mode == "ignore":
            rows = self.rows
        else:
            rows = [r for r in self.rows if study_of(r) == wanted]
        offset = int(request.url.params.get("offset", 0))
        limit = int(request.url.params.get("limit", len(rows)))
        page = rows[offset : offset + limit]
        if not page:
            return httpx.Response(204)
        return httpx.Response(200, json=page)


def client(archive: ListArchive, **kw: Any) -> DicomwebClient:
    http = httpx.AsyncClient(transport=httpx.MockTransport(archive))
    return DicomwebClient(http, BASE, policy=NO_RETRY, **kw)


def archive_of(n_studies: int, per_study: int = 2) -> tuple[list[str], list[dict[str, Any]]]:
    studies = [uid(500 + i) for i in range(n_studies)]
    rows = [study_series_row(s, f"{s}.{k}", number=k) for s in studies for k in range(1, per_study + 1)]
    return studies, rows


async def test_one_list_query_answers_a_page_of_studies_grouped_per_study() -> None:
    studies, rows = archive_of(100, per_study=3)
    archive = ListArchive(rows)
    qido = client(archive)
    answer = await qido.search_series_many(studies)
    assert len(archive.requests) == 1
    request = archive.requests[0]
    assert request.url.path == "/dicom-web/series"
    assert request.url.params["StudyInstanceUID"] == ",".join(studies)
    assert "0020000D" in request.url.params.get_list("includefield")
    assert set(answer) == set(studies)
    for study in studies:
        series = answer[study]
        assert isinstance(series, list)
        assert [s.uid for s in series] == [f"{study}.{k}" for k in (1, 2, 3)]
    assert qido.series_query_used == "list"
    assert qido.queries[0].startswith("/series?")


async def test_the_list_answer_is_paged_and_more_studies_than_a_list_take_several_queries() -> None:
    studies, rows = archive_of(5, per_study=3)
    archive = ListArchive(rows)
    qido = client(archive, series_list_size=3, series_page_size=4)
    answer = await qido.search_series_many(studies)
    assert all(isinstance(answer[s], list) and len(answer[s]) == 3 for s in studies)  # type: ignore[arg-type]
    lists = [r.url.params["StudyInstanceUID"].count(",") + 1 for r in archive.requests]
    assert lists == [3, 3, 3, 2, 2]  # 9 rows by 4 (3 pages), then 6 rows by 4 (2 pages)


async def test_an_archive_that_ignores_the_list_is_found_out_and_never_trusted() -> None:
    studies, rows = archive_of(4)
    archive = ListArchive(rows, mode="ignore")
    qido = client(archive)
    assert await qido.search_series_many(studies[:2]) == {}
    assert qido.series_query_used == "per-study"
    assert await qido.search_series_many(studies[2:]) == {}
    assert len(archive.requests) == 1  # decided once


async def test_an_archive_that_reads_the_list_as_one_uid_falls_back_per_study() -> None:
    studies, rows = archive_of(3)
    qido = client(ListArchive(rows, mode="literal"))
    assert await qido.search_series_many(studies) == {}
    assert qido.series_query_used == "per-study"


async def test_list_by_setting_refuses_an_archive_that_cannot() -> None:
    studies, rows = archive_of(3)
    qido = client(ListArchive(rows, mode="ignore"), series_query=SeriesQuery.LIST)
    with pytest.raises(ConfigurationError, match="BRIDGE_DICOMWEB_SERIES_QUERY"):
        await qido.search_series_many(studies[:2])


async def test_per_study_by_setting_makes_no_list_query() -> None:
    studies, rows = archive_of(3)
    archive = ListArchive(rows)
    qido = client(archive, series_query=SeriesQuery.PER_STUDY)
    assert await qido.search_series_many(studies) == {}
    assert archive.requests == []


async def test_a_study_without_rows_is_left_for_the_caller_to_fetch_alone() -> None:
    studies, rows = archive_of(3)
    rows = [r for r in rows if r["0020000D"]["Value"][0] != studies[1]]
    answer = await client(ListArchive(rows)).search_series_many(studies)
    assert set(answer) == {studies[0], studies[2]}


async def test_a_malformed_row_parks_its_study_only() -> None:
    studies, rows = archive_of(3)
    rows[2] = study_series_row(studies[1], "not a uid")  # studies[1]'s first series
    rows[2].pop("0020000E")
    answer = await client(ListArchive(rows)).search_series_many(studies)
    assert isinstance(answer[studies[1]], MappingError)
    assert isinstance(answer[studies[0]], list) and isinstance(answer[studies[2]], list)


async def test_a_row_without_its_study_sends_every_study_of_the_query_alone() -> None:
    studies, rows = archive_of(3)
    rows[0] = {k: v for k, v in rows[0].items() if k != "0020000D"}
    answer = await client(ListArchive(rows)).search_series_many(studies)
    assert answer == {}


async def test_too_many_series_parks_that_study_only() -> None:
    studies, rows = archive_of(2, per_study=4)
    rows += [study_series_row(uid(900), f"{uid(900)}.1")]
    limits = DicomwebLimits(max_series=3)
    answer = await client(ListArchive(rows), limits=limits).search_series_many([*studies, uid(900)])
    assert isinstance(answer[studies[0]], UpstreamLimitError)
    assert isinstance(answer[uid(900)], list)


async def test_a_single_study_is_not_asked_by_list() -> None:
    studies, rows = archive_of(1)
    archive = ListArchive(rows)
    assert await client(archive).search_series_many(studies) == {}
    assert archive.requests == []


async def test_an_archive_that_refuses_the_list_query_is_asked_per_study() -> None:
    studies, _ = archive_of(3)
    calls: list[httpx.Request] = []

    def refuse(request: httpx.Request) -> httpx.Response:
        calls.append(request)
        return httpx.Response(400, json={"error": "unknown"})

    http = httpx.AsyncClient(transport=httpx.MockTransport(refuse))
    qido = DicomwebClient(http, BASE, policy=NO_RETRY)
    assert await qido.search_series_many(studies) == {}
    assert qido.series_query_used == "per-study"
    assert await qido.search_series_many(studies) == {}
    assert len(calls) == 1


async def test_a_list_query_that_stalls_sends_its_studies_alone_and_the_next_list_is_still_asked() -> None:
    studies, rows = archive_of(4)
    bad = studies[1]
    lists = ListArchive(rows)

    async def never(request: httpx.Request) -> httpx.Response:
        async def drip() -> AsyncIterator[bytes]:
            yield b"["
            await asyncio.sleep(60)

        lists.requests.append(request)
        return httpx.Response(200, content=drip())

    async def answer(request: httpx.Request) -> httpx.Response:
        if bad in request.url.params.get("StudyInstanceUID", "").split(","):
            return await never(request)
        return lists(request)

    http = httpx.AsyncClient(transport=httpx.MockTransport(answer))
    limits = DicomwebLimits(pace=Pace(stall=0.2, min_rate=0))
    qido = DicomwebClient(http, BASE, policy=NO_RETRY, limits=limits, series_list_size=2)
    started = time.monotonic()
    answer_ = await qido.search_series_many(studies)
    assert time.monotonic() - started < 5
    assert set(answer_) == set(studies[2:])  # the stalled list's two studies are left to be asked alone
    assert qido.series_query_used == "list"
    assert len(lists.requests) == 2
