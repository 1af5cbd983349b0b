"""Series paging for a whole-archive run: /series at the root, kept on disk by study, one page in memory."""

from __future__ import annotations

import random
from typing import Any

import httpx
import pytest

from bridge.dicomweb.client import DicomwebClient
from bridge.dicomweb.query import SeriesQuery
from bridge.errors import ConfigurationError, MappingError
from bridge.upstream.retry import RetryPolicy
from tests.builders import element, series_row, study_series_row, uid

pytestmark = pytest.mark.anyio

BASE = "http://archive.test/dicom-web"
NO_RETRY = RetryPolicy(retries=0, base=0.001, max_wait=0.001)


class RootSeries:
    """An archive answering /series at its root, paged, in an order that mixes the studies."""

    def __init__(self, rows: list[dict[str, Any]], *, status: int = 200, ignore_offset: bool = False) -> None:
        self.rows = rows
        self.status = status
        self.ignore_offset = ignore_offset
        self.requests: list[httpx.Request] = []

    def __call__(self, request: httpx.Request) -> httpx.Response:
        self.requests.append(request)
        if self.status != 200:
            return httpx.Response(self.status)
        offset = 0 if self.ignore_offset else int(request.url.params.get("offset", 0))
        limit = int(request.url.params.get("limit", len(self.rows)))
        page = self.rows[offset : offset + limit]
        return httpx.Response(200, json=page) if page else httpx.Response(204)


def client(archive: RootSeries, **kw: Any) -> DicomwebClient:
    http = httpx.AsyncClient(transport=httpx.MockTransport(archive))
    kw.setdefault("series_query", SeriesQuery.PAGED)
    return DicomwebClient(http, BASE, policy=NO_RETRY, **kw)


def archive_of(n_studies: int, per_study: int) -> tuple[list[str], list[dict[str, Any]]]:
    studies = [uid(700 + i) for i in range(n_studies)]
    rows = [study_series_row(s, f"{s}.{k}", number=k) for s in studies for k in range(1, per_study + 1)]
    random.Random(3).shuffle(rows)  # the standard gives no order: a study's series on any page
    return studies, rows


async def test_a_sweep_pages_through_the_root_and_answers_each_study_its_own_series() -> None:
    studies, rows = archive_of(40, per_study=3)
    archive = RootSeries(rows)
    qido = client(archive, series_page_size=25)

    assert await qido.sweep_series({"StudyDate": "20240101-"}) is True
    # 120 rows in pages of 25: 5 pages, the last one short, and nothing else.
    assert len(archive.requests) == 5
    assert {r.url.path for r in archive.requests} == {"/dicom-web/series"}
    first = archive.requests[0].url.params
    assert "0020000D" in first.get_list("includefield")
    assert first["StudyDate"] == "20240101-"  # the run's own study-level criteria
    assert qido.series_query_used == "paged"

    answer = await qido.search_series_many(studies[:10])
    assert len(archive.requests) == 5  # answered from the sweep, no query
    assert set(answer) == set(studies[:10])
    for study in studies[:10]:
        series = answer[study]
        assert not isinstance(series, Exception)
        assert sorted(s.uid for s in series) == [f"{study}.{k}" for k in (1, 2, 3)]
    qido.end_sweep()
    assert await qido.search_series_many(studies[:10]) == {}  # no sweep, no list matching: ask alone


async def test_a_study_the_sweep_did_not_see_is_left_to_be_asked_alone() -> None:
    studies, rows = archive_of(5, per_study=2)
    qido = client(RootSeries(rows))
    await qido.sweep_series()
    late = uid(799)
    answer = await qido.search_series_many([*studies, late])
    qido.end_sweep()
    assert late not in answer and set(answer) == set(studies)


async def test_a_repeated_page_ends_the_sweep_and_each_series_is_kept_once() -> None:
    studies, rows = archive_of(10, per_study=3)
    archive = RootSeries(rows, ignore_offset=True)
    qido = client(archive, series_page_size=10)
    await qido.sweep_series()
    assert len(archive.requests) == 2  # the second page repeats the first: the walk ends there
    answer = await qido.search_series_many(studies)
    qido.end_sweep()
    assert sum(len(s) for s in answer.values() if isinstance(s, list)) == 10  # no duplicate series


async def test_a_bad_series_row_is_that_studys_error() -> None:
    studies, rows = archive_of(3, per_study=1)
    bad = study_series_row(studies[0], f"{studies[0]}.1")
    bad["00200011"] = element("IS", "x1")  # SeriesNumber not an integer
    qido = client(RootSeries([bad, *[r for r in rows if r["0020000D"]["Value"][0] != studies[0]]]))
    await qido.sweep_series()
    answer = await qido.search_series_many(studies)
    qido.end_sweep()
    assert isinstance(answer[studies[0]], MappingError)
    assert all(isinstance(answer[s], list) for s in studies[1:])


async def test_an_archive_that_refuses_a_root_series_search_names_the_setting() -> None:
    qido = client(RootSeries([], status=400))
    with pytest.raises(ConfigurationError, match="BRIDGE_DICOMWEB_SERIES_QUERY=paged"):
        await qido.sweep_series()
    assert not qido.sweeping


async def test_rows_without_their_study_cannot_be_swept() -> None:
    rows = [series_row(series_uid=uid(800, k)) for k in range(3)]
    qido = client(RootSeries(rows))
    with pytest.raises(ConfigurationError, match="without their StudyInstanceUID"):
        await qido.sweep_series()


@pytest.mark.parametrize("mode", [SeriesQuery.AUTO, SeriesQuery.LIST, SeriesQuery.PER_STUDY])
async def test_only_the_paged_setting_sweeps(mode: SeriesQuery) -> None:
    archive = RootSeries(archive_of(3, per_study=1)[1])
    qido = client(archive, series_query=mode)
    assert await qido.sweep_series() is False
    assert archive.requests == []
