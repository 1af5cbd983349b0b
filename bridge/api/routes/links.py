"""Links: from an ImagingStudy (by id, Study Instance UID, accession or reference) to its URLs."""

from __future__ import annotations

from dataclasses import replace
from functools import partial
from typing import Annotated, Literal

import anyio.to_thread
from fastapi import APIRouter, Depends, Query, Request
from starlette.responses import Response
from starlette.routing import BaseRoute
from starlette.types import ASGIApp, Receive, Scope, Send

from bridge.api.audit import note
from bridge.api.auth.access import decide
from bridge.api.auth.caller import AuthenticatedRoute, authenticate, caller
from bridge.api.deps import StudyByAccession, StudyById, StudyByReference, StudyByUid
from bridge.api.errors import ERROR_RESPONSES
from bridge.api.models import StudyLinks
from bridge.api.services import Services, services_of
from bridge.errors import BridgeError
from bridge.mapping.uid import is_uid
from bridge.resolve.links import StudyLocation, build_links
from bridge.resolve.published import FHIR_ID

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
    most = services.settings.api.links_max_series
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
            answers.put(study, (offset, count), body)
        else:  # in a worker thread, once for everyone asking at the same time
            made = partial(anyio.to_thread.run_sync, _make_answer, s, study, offset, count)
            body = await answers.get_or_make(study, (offset, count), made)
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


# ---------------------------------------------------------------- the cached lane

# The two lookups the lane answers, by path prefix: the resolver's cache kind, the route's template.
_LANES: tuple[tuple[str, Literal["id", "uid"], str], ...] = (
    ("/studies/", "uid", "/studies/{study_uid}/links"),
    ("/imaging-studies/", "id", "/imaging-studies/{id}/links"),
)


def _lane_of(path: str) -> tuple[Literal["id", "uid"], str, str] | None:
    """(cache kind, id or UID, route template) of a plain links path whose key is valid; else None."""
    if not path.endswith("/links"):
        return None
    for prefix, kind, template in _LANES:
        if path.startswith(prefix):
            value = path[len(prefix) : -len("/links")]
            valid = is_uid(value) if kind == "uid" else FHIR_ID.fullmatch(value) is not None
            return (kind, value, template) if valid else None
    return None


class CachedLinksLane:
    """ASGI: answers a cached links lookup (by Study UID or id, first page) before FastAPI routes it.

    A viewer or an EHR asks for the same few studies again and again; for those, FastAPI's
    routing, dependency solving and parameter validation were most of the request's cost. This lane
    takes only a request that needs none of it: GET, no query string, no CORS configured, no
    mount prefix, a valid UID or id, a study in the resolver's cache, a caller who authenticates
    and may see it. It then does what the route does (authenticate, count the cache hit, audit
    the access, send the page's kept bytes) with the route's template set for the metrics and the
    access log. Anything else, including every refusal, goes on to the route unchanged, which
    answers, audits and counts it as before; the lane has no side effect on what it passes on.
    """

    def __init__(self, app: ASGIApp) -> None:
        self.app = app
        self._routes: dict[str, BaseRoute] | None = None

    def _route(self, scope: Scope, template: str) -> BaseRoute | None:
        """The app's route of this template (None when the links router is not in the app)."""
        if self._routes is None:
            templates = {t for _, _, t in _LANES}
            self._routes = {}
            for route in scope["app"].router.routes:
                # FastAPI keeps an included router whole (the request's route is then the router's
                # own); older releases copied its routes into the app's
                whole = getattr(route, "original_router", None) is router
                for each in router.routes if whole else [route]:
                    path = getattr(each, "path", None)
                    if path in templates:
                        self._routes[path] = each
        return self._routes.get(template)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        """Answer from the cache when the request allows it, else pass it on."""
        if (
            scope["type"] != "http"
            or scope["method"] != "GET"
            or scope["query_string"]
            or scope.get("root_path")
            or not await self._answered(scope, receive, send)
        ):
            await self.app(scope, receive, send)

    async def _answered(self, scope: Scope, receive: Receive, send: Send) -> bool:
        lane = _lane_of(scope["path"])
        if lane is None:
            return False
        kind, value, template = lane
        route = self._route(scope, template)
        request = Request(scope, receive)
        s = services_of(request)
        resolver = s.resolver
        if route is None or resolver is None or s.settings.cors_origins:
            return False  # with CORS on, its middleware has headers to add (Vary: Origin, at least)
        study = resolver.cached(kind, value)
        if study is None:
            return False
        try:
            who = await authenticate(request, audit_refusal=False)  # the route audits a refusal
        except BridgeError:  # a refusal, or the session store failing: the route answers it
            return False
        offset, count = _page(s, 0, None)
        body = resolver.answers.get(study, (offset, count))
        if body is None or not decide(who, study.patient).allowed:
            return False  # the route makes the answer (or refuses, audited)
        resolver.count_hit(kind)
        note(request, who, "links", study=study)
        scope["route"] = route  # what the route's request would carry: its template labels the metrics
        await send(
            {
                "type": "http.response.start",
                "status": 200,
                "headers": [(b"content-length", str(len(body)).encode()), (b"content-type", JSON.encode())],
            }
        )
        await send({"type": "http.response.body", "body": body})
        return True
