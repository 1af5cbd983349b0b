"""Links: from an ImagingStudy (by id, Study Instance UID, accession or reference) to its URLs."""

from __future__ import annotations

from dataclasses import replace
from typing import Annotated, Any

import anyio.to_thread
from fastapi import APIRouter, Depends, Query, Request

from bridge.api.audit import note
from bridge.api.deps import (
    AuthenticatedRoute,
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

SeriesOffset = Annotated[int, Query(ge=0, le=10_000_000, description="Index of the first series to list")]
SeriesCount = Annotated[
    int | None, Query(ge=1, description="Series to list, at most BRIDGE_API_LINKS_MAX_SERIES (the default)")
]


async def _links(
    study: StudyLocation, request: Request, offset: int = 0, count: int | None = None
) -> dict[str, Any]:
    """One page of the study's links, built in a worker thread when it is large.

    A study with very many series must not hold up the event loop (and with it /healthz); a
    small one is built at once, without the thread hop that would cost more than the work.
    """
    s = services_of(request)
    note(request, await authenticate(request), "links", study=study)  # the caller is known by now
    assert s.resolver is not None
    config = s.resolver.config
    count = min(count or s.settings.api.links_max_series, s.settings.api.links_max_series)
    page = replace(study, series=study.series[offset : offset + count])

    def build() -> dict[str, Any]:
        links = build_links(
            page,
            fhir_base=config.fhir_base.rstrip("/"),
            viewers=s.viewers,
            default_viewer=s.settings.default_viewer,
            bases=config.dicomweb_bases,
        )
        return {**links, "series_total": len(study.series), "series_offset": offset}

    if len(page.series) <= _ON_LOOP_SERIES:
        return build()
    return await anyio.to_thread.run_sync(build)


@router.get("/imaging-studies/{id}/links", response_model=StudyLinks, summary="Links by FHIR ImagingStudy id")
async def links_by_id(
    study: StudyById,
    request: Request,
    series_offset: SeriesOffset = 0,
    series_count: SeriesCount = None,
) -> dict[str, Any]:
    """WADO-RS URLs (study, metadata, series, rendered, thumbnail) and viewer URLs of ImagingStudy/{id}."""
    return await _links(study, request, series_offset, series_count)


@router.get("/studies/{study_uid}/links", response_model=StudyLinks, summary="Links by Study Instance UID")
async def links_by_study_uid(
    study: StudyByUid,
    request: Request,
    series_offset: SeriesOffset = 0,
    series_count: SeriesCount = None,
) -> dict[str, Any]:
    """The links of the study whose ImagingStudy carries this Study Instance UID."""
    return await _links(study, request, series_offset, series_count)


@router.get("/accessions/{accession}/links", response_model=StudyLinks, summary="Links by accession number")
async def links_by_accession(study: StudyByAccession, request: Request) -> dict[str, Any]:
    """The links of the one study with this accession number; 409 if it matches several studies."""
    return await _links(study, request)


@router.get(
    "/links", response_model=StudyLinks, summary="Links by FHIR reference or absolute ImagingStudy URL"
)
async def links_by_reference(study: StudyByReference, request: Request) -> dict[str, Any]:
    """The links of ``?reference=ImagingStudy/{id}`` or of the ImagingStudy's absolute URL."""
    return await _links(study, request)
