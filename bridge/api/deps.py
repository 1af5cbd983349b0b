"""FastAPI dependencies: the app's services, and "load the study or fail" per lookup kind."""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, Path, Query, Request

from bridge.api.auth.caller import allow_patient, authenticate
from bridge.api.auth.security import Caller
from bridge.api.services import Services, services_of
from bridge.audit.events import Action
from bridge.mapping.uid import UID_PATTERN
from bridge.resolve.links import StudyLocation
from bridge.resolve.resolver import Resolver

FHIR_ID_PATTERN = r"^[A-Za-z0-9\-.]{1,64}$"
# Accession Number is VR SH: up to 16 characters, no backslash, no control characters.
ACCESSION_PATTERN = r"^[^\\\x00-\x1f\x7f]{1,16}$"


def resolver_of(request: Request) -> Resolver:
    """The resolver, open for the app's lifetime."""
    found = services_of(request).resolver
    if found is None:  # only outside the lifespan, i.e. a wiring mistake
        raise RuntimeError("the app's lifespan has not run")
    return found


async def services(request: Request) -> Services:
    """The app's services, as a dependency."""
    return services_of(request)


ServicesDep = Annotated[Services, Depends(services)]


async def resolver(request: Request) -> Resolver:
    """The resolver, as a dependency."""
    return resolver_of(request)


ResolverDep = Annotated[Resolver, Depends(resolver)]

FhirId = Annotated[
    str,
    Path(
        description="FHIR id of the ImagingStudy",
        pattern=FHIR_ID_PATTERN,
        max_length=64,
        examples=["abc-123"],
    ),
]
StudyUid = Annotated[
    str,
    Path(
        description="Study Instance UID", pattern=UID_PATTERN, max_length=64, examples=["1.2.840.113619.2.1"]
    ),
]


async def study_by_id(id: FhirId, request: Request) -> StudyLocation:  # noqa: A002
    """The study of ImagingStudy/{id}, or 403/404/409/503."""
    who = await authenticate(request)
    return _allowed(await resolver_of(request).by_id(id), who, request)


async def study_by_uid(study_uid: StudyUid, request: Request) -> StudyLocation:
    """The study with this Study Instance UID, or 403/404/409/503."""
    who = await authenticate(request)
    return _allowed(await resolver_of(request).by_study_uid(study_uid), who, request)


def _allowed(study: StudyLocation, who: Caller, request: Request) -> StudyLocation:
    """The study, if the caller may see it (the rule of bridge/api/auth/access.py); else 403, audited."""
    path = request.url.path
    action: Action = (
        "viewer" if path.endswith("/viewer") else "record-view" if path.startswith("/record") else "links"
    )
    allow_patient(request, who, action, study=study)
    return study


async def study_by_accession(
    accession: Annotated[str, Path(description="Accession Number (0008,0050)", pattern=ACCESSION_PATTERN)],
    request: Request,
    issuer: Annotated[
        str | None,
        Query(
            description="Issuer: a BRIDGE_ACCESSION_ISSUER_SYSTEMS name, an OID or the identifier system",
            min_length=1,
            max_length=256,
            pattern=r"^\S+$",
        ),
    ] = None,
) -> StudyLocation:
    """The one study with this accession number, or 403/404/409/503."""
    who = await authenticate(request)
    return _allowed(await resolver_of(request).by_accession(accession, issuer), who, request)


async def study_by_reference(
    reference: Annotated[
        str,
        Query(
            description="ImagingStudy/{id}, or the ImagingStudy's absolute URL on the FHIR server",
            min_length=1,
            max_length=2048,
            examples=["ImagingStudy/abc-123"],
        ),
    ],
    request: Request,
) -> StudyLocation:
    """The study a FHIR reference or absolute URL names, or 403/404/409/422/503."""
    who = await authenticate(request)
    return _allowed(await resolver_of(request).by_reference(reference), who, request)


StudyById = Annotated[StudyLocation, Depends(study_by_id)]
StudyByUid = Annotated[StudyLocation, Depends(study_by_uid)]
StudyByAccession = Annotated[StudyLocation, Depends(study_by_accession)]
StudyByReference = Annotated[StudyLocation, Depends(study_by_reference)]
