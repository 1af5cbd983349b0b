"""The viewer redirect a clinician clicks in the EHR, and the list of viewers offered."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Depends, Query, Request
from fastapi.responses import RedirectResponse

from bridge.api.audit import note
from bridge.api.auth.caller import AuthenticatedRoute, authenticate, caller
from bridge.api.deps import ServicesDep, StudyById, StudyByUid
from bridge.api.errors import ERROR_RESPONSES
from bridge.api.models import ViewerInfo
from bridge.api.services import services_of
from bridge.errors import InvalidLookupError, NoUsableEndpointError
from bridge.resolve.links import StudyLocation, viewer_url

router = APIRouter(
    tags=["viewer"], dependencies=[Depends(caller)], responses=ERROR_RESPONSES, route_class=AuthenticatedRoute
)

ViewerName = Annotated[
    str | None,
    Query(
        description="A viewer from GET /viewers; default: BRIDGE_DEFAULT_VIEWER",
        pattern=r"^[a-z][a-z0-9_-]{0,31}$",
    ),
]
REDIRECT: dict[int | str, dict[str, Any]] = {
    302: {"description": "Redirect to the viewer URL opening the study"}
}


async def _redirect(study: StudyLocation, name: str | None, request: Request) -> RedirectResponse:
    s = services_of(request)
    if not s.viewers:
        raise NoUsableEndpointError(
            "no viewer is configured: set BRIDGE_VIEWER_URLS to each viewer's base URL, e.g. "
            '{"ohif": "https://viewer.example.org"} (or BRIDGE_VIEWER_TEMPLATES for a viewer of your own)'
        )
    chosen = name or s.settings.default_viewer
    viewer = s.viewers.get(chosen)
    if viewer is None:
        raise InvalidLookupError(f"unknown viewer {chosen!r}; offered: {', '.join(s.viewers)}")
    assert s.resolver is not None
    url = viewer_url(study, viewer, fhir_base=s.resolver.config.fhir_base.rstrip("/"))
    note(request, await authenticate(request), "viewer", study=study)  # the caller is known by now
    return RedirectResponse(url, status_code=302, headers={"Cache-Control": "no-store"})


@router.get(
    "/imaging-studies/{id}/viewer",
    status_code=302,
    response_class=RedirectResponse,
    responses=REDIRECT,
    summary="Open ImagingStudy/{id} in a viewer",
)
async def viewer_by_id(study: StudyById, request: Request, viewer: ViewerName = None) -> RedirectResponse:
    """302 to the default viewer (or ``?viewer=NAME``) showing the study."""
    return await _redirect(study, viewer, request)


@router.get(
    "/studies/{study_uid}/viewer",
    status_code=302,
    response_class=RedirectResponse,
    responses=REDIRECT,
    summary="Open a study, by Study Instance UID, in a viewer",
)
async def viewer_by_study_uid(
    study: StudyByUid, request: Request, viewer: ViewerName = None
) -> RedirectResponse:
    """302 to the default viewer (or ``?viewer=NAME``) showing the study."""
    return await _redirect(study, viewer, request)


@router.get("/viewers", response_model=list[ViewerInfo], summary="The viewers offered")
async def viewers(s: ServicesDep) -> list[ViewerInfo]:
    """Names usable as ``?viewer=``, and which one is the default."""
    return [
        ViewerInfo(name=n, title=v.title, default=n == s.settings.default_viewer)
        for n, v in s.viewers.items()
    ]
