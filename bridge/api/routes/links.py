"""Links: from an ImagingStudy (by id, Study Instance UID, accession or reference) to its URLs."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Depends

from bridge.api.deps import (
    ServicesDep,
    StudyByAccession,
    StudyById,
    StudyByReference,
    StudyByUid,
    caller,
)
from bridge.api.errors import ERROR_RESPONSES
from bridge.api.models import StudyLinks
from bridge.resolve.links import StudyLocation, build_links

router = APIRouter(tags=["links"], dependencies=[Depends(caller)], responses=ERROR_RESPONSES)


def _links(study: StudyLocation, s: ServicesDep) -> dict[str, Any]:
    assert s.resolver is not None
    config = s.resolver.config
    return build_links(
        study,
        fhir_base=config.fhir_base.rstrip("/"),
        viewers=s.viewers,
        default_viewer=s.settings.default_viewer,
        bases=config.dicomweb_bases,
    )


@router.get("/imaging-studies/{id}/links", response_model=StudyLinks, summary="Links by FHIR ImagingStudy id")
async def links_by_id(study: StudyById, s: ServicesDep) -> dict[str, Any]:
    """WADO-RS URLs (study, metadata, series, rendered, thumbnail) and viewer URLs of ImagingStudy/{id}."""
    return _links(study, s)


@router.get("/studies/{study_uid}/links", response_model=StudyLinks, summary="Links by Study Instance UID")
async def links_by_study_uid(study: StudyByUid, s: ServicesDep) -> dict[str, Any]:
    """The links of the study whose ImagingStudy carries this Study Instance UID."""
    return _links(study, s)


@router.get("/accessions/{accession}/links", response_model=StudyLinks, summary="Links by accession number")
async def links_by_accession(study: StudyByAccession, s: ServicesDep) -> dict[str, Any]:
    """The links of the one study with this accession number; 409 if it matches several studies."""
    return _links(study, s)


@router.get(
    "/links", response_model=StudyLinks, summary="Links by FHIR reference or absolute ImagingStudy URL"
)
async def links_by_reference(study: StudyByReference, s: ServicesDep) -> dict[str, Any]:
    """The links of ``?reference=ImagingStudy/{id}`` or of the ImagingStudy's absolute URL."""
    return _links(study, s)
