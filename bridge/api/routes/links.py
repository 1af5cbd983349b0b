"""Links: from an ImagingStudy (by id, Study Instance UID, accession or reference) to its URLs."""

from __future__ import annotations

from dataclasses import replace
from typing import Annotated

import anyio.to_thread
from fastapi import APIRouter, Depends, Query, Request
from starlette.responses import Response

from bridge.api.audit import note
from bridge.api.deps import (
    AuthenticatedRoute,
    Services,
    StudyByAccession,
    StudyById,
    StudyByReference,
    StudyByUid,
    authenticate,
    caller,
    services_of,
)
from bridge.api.errors import ERROR_RESPONSES
from bridge.api.models import StudyLinks
from bridge.resolve.links import StudyLocation, build_links

router = APIRouter(
    tags=["links"], dependencies=[Depends(caller)], responses=ERROR_RESPONSES, route_class=AuthenticatedRoute
)


# A page of this many series is built on the event loop (tens of microseconds); a thread hop
# would cost more than the work. Larger pages go to a worker thread.
_ON_LOOP_SERIES = 64
JSON = "application/json"

SeriesOffset = Annotated[int, Query(ge=0, le=10_000_000, description="Index of the first series to list")]
SeriesCount = Annotated[
    int | None, Query(ge=1, description="Series to list, at most BRIDGE_API_LINKS_MAX_SERIES (the default)")
]


def _page(services: Services, offset: int, count: int | None) -> tuple[int, int]:
    """The page asked for: its offset, and its size capped at BRIDGE_API_LINKS_MAX_SERIES."""
    most = services.settings.api_links_max_series
    return offset, min(count or most, most)


def _make_answer(services: Services, study: StudyLocation, offset: int, count: int) -> bytes:
    """One page of the study's links as the JSON the route answers (StudyLinks, validated once)."""
    assert services.resolver is not None
    config = services.resolver.config
    page = replace(study, series=study.series[offset : offset + count])
    links = build_links(
        page,
        fhir_base=config.fhir_base.rstrip("/"),
        viewers=services.viewers,
        default_viewer=services.settings.default_viewer,
        bases=config.dicomweb_bases,
    )
    answer = StudyLinks.model_validate({**links, "series_total": len(study.series), "series_offset": offset})
    return answer.model_dump_json().encode()


async def _links(
    study: StudyLocation, request: Request, offset: int = 0, count: int | None = None
) -> Response:
    """One page of the study's links, made in a worker thread when it is large, kept while the study is.

    A study with very many series must not hold up the event loop (and with it /healthz); a
    small one is made at once, without the thread hop that would cost more than the work. The
    answer is kept beside the cached study (``Resolver.answers``), so the next lookup of the same
    page sends the same bytes without making them again.
    """
    s = services_of(request)
    note(request, await authenticate(request), "links", study=study)  # the caller is known by now
    assert s.resolver is not None
    offset, count = _page(s, offset, count)
    answers = s.resolver.answers
    body = answers.get(study, (offset, count))
    if body is None:
        if len(study.series[offset : offset + count]) <= _ON_LOOP_SERIES:
            body = _make_answer(s, study, offset, count)
        else:
            body = await anyio.to_thread.run_sync(_make_answer, s, study, offset, count)
        answers.put(study, (offset, count), body)
    return Response(body, media_type=JSON)


@router.get("/imaging-studies/{id}/links", response_model=StudyLinks, summary="Links by FHIR ImagingStudy id")
async def links_by_id(
    study: StudyById,
    request: Request,
    series_offset: SeriesOffset = 0,
    series_count: SeriesCount = None,
) -> Response:
    """WADO-RS URLs (study, metadata, series, rendered, thumbnail) and viewer URLs of ImagingStudy/{id}."""
    return await _links(study, request, series_offset, series_count)


@router.get("/studies/{study_uid}/links", response_model=StudyLinks, summary="Links by Study Instance UID")
async def links_by_study_uid(
    study: StudyByUid,
    request: Request,
    series_offset: SeriesOffset = 0,
    series_count: SeriesCount = None,
) -> Response:
    """The links of the study whose ImagingStudy carries this Study Instance UID."""
    return await _links(study, request, series_offset, series_count)


@router.get("/accessions/{accession}/links", response_model=StudyLinks, summary="Links by accession number")
async def links_by_accession(study: StudyByAccession, request: Request) -> Response:
    """The links of the one study with this accession number; 409 if it matches several studies."""
    return await _links(study, request)


@router.get(
    "/links", response_model=StudyLinks, summary="Links by FHIR reference or absolute ImagingStudy URL"
)
async def links_by_reference(study: StudyByReference, request: Request) -> Response:
    """The links of ``?reference=ImagingStudy/{id}`` or of the ImagingStudy's absolute URL."""
    return await _links(study, request)
