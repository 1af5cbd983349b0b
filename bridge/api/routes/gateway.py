"""The image gateway: DICOMweb at /dicom-web for the studies each caller may see, forwarded to the archive.

Every request naming a study is authorized by that study: its ImagingStudy is found on the FHIR
server by Study Instance UID (the resolver's exact identifier match), and its subject must be the
caller's patient in context, or the caller's scopes must allow any patient (bridge/api/auth/access.py).
The request then goes to the archive the study's Endpoint names, with the bridge's credentials
for that archive, and the answer streams back as the archive sends it. Searches across studies
are answered, for a caller limited to one patient, from the archive asked by that patient's
identifiers with each row checked (bridge/gateway/qido.py).

Within a study, a caller limited to one patient is served only what the published ImagingStudy
lists, row by row: an archive may hold one Study Instance UID under several patients (Orthanc
keeps a second study when an instance arrives under a known Study UID and another PatientID),
and answers every patient's series of it. So a path naming a series the ImagingStudy does not
list is refused before the archive is asked; searches and metadata within the study are read
whole and keep only rows of listed series and of the study's patient; a retrieve of the whole
study is refused when the archive holds series the ImagingStudy does not list. The archive's own
error bodies never reach a caller: the bridge answers with its own reason.
"""

from __future__ import annotations

import hmac
import json
import time
from collections.abc import Sequence
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import Response, StreamingResponse

from bridge.api.audit import note
from bridge.api.auth.access import decide, may_see_all, patient_limit
from bridge.api.auth.caller import CallerDep, authenticate
from bridge.api.auth.security import Caller
from bridge.api.deps import resolver_of
from bridge.api.errors import AccessDeniedError, outcome
from bridge.api.services import services_of
from bridge.audit.events import Action
from bridge.errors import BridgeError, StudyNotFoundError
from bridge.gateway import front, qido, withdrawn
from bridge.gateway.archives import (
    NOT_IN_ARCHIVE,
    Archive,
    Gateway,
    archive_rows,
    front_headers,
    holds_unlisted,
    patient_studies,
    search_every_archive,
    search_patients_rows,
)
from bridge.gateway.paths import DicomwebPath, parse
from bridge.gateway.proxy import forward, request_headers
from bridge.resolve.links import StudyLocation, lists_series
from bridge.resolve.resolver import Resolver
from bridge.upstream.bounds import CallLimit

DICOM_JSON = "application/dicom+json"

router = APIRouter(prefix="/dicom-web", tags=["dicomweb"], include_in_schema=False)


def _gateway(request: Request) -> Gateway:
    found = services_of(request).gateway
    if found is None:  # only outside the lifespan, i.e. a wiring mistake
        raise RuntimeError("the app's lifespan has not run")
    return found


@router.api_route("/{path:path}", methods=["GET", "HEAD"])
async def dicomweb(path: str, request: Request, who: CallerDep) -> Response:
    """QIDO-RS and WADO-RS, authorized per study and forwarded to the study's archive."""
    route = parse(path)
    if route is None:
        raise StudyNotFoundError("not a DICOMweb route the gateway serves (QIDO-RS, WADO-RS)")
    r, g = resolver_of(request), _gateway(request)  # plain reads: one dependency layer a request
    if route.study_uid is None:
        return await _search_across(route, request, who, r, g)
    action: Action = "image-read" if route.kind == "retrieve" else "image-query"
    study = await r.by_study_uid(route.study_uid)
    decision = decide(who, study.patient)
    if not decision.allowed:
        note(request, who, action, "refused", study=study, reason=decision.reason)
        raise AccessDeniedError(f"study {route.study_uid}: {decision.reason}")
    patient = patient_limit(who)
    listed = frozenset(s.uid for s in study.series)
    if route.series_uid is not None and (
        # A caller limited to one patient sees only the series listed; others, any series of a
        # study that lists none. Rejected images (IHE IOCM) are left out of the listing.
        route.series_uid not in listed if patient is not None else not lists_series(study, route.series_uid)
    ):
        # The same answer for another patient's series, rejected images, and no series at all.
        note(request, who, action, "refused", study=study, reason=_UNLISTED)
        raise StudyNotFoundError(
            f"series {route.series_uid}: {_UNLISTED} (its images were rejected, or it is not synced yet)"
        )
    refused = await withdrawn.refusal(
        route, study, lambda p, q: archive_rows(*g.archive_for(study), p, q, g.limit)
    )
    if refused is not None:  # rejected images (IHE IOCM), though the archive still holds them
        note(request, who, action, "refused", study=study, reason=refused)
        raise StudyNotFoundError(refused)
    note(request, who, action, study=study)
    archive, base = g.archive_for(study)
    if patient is not None:
        return await _one_patients(route, request, study, patient, listed, archive, base, r, g)
    if withdrawn.read_whole(route, study):
        rows = await archive_rows(
            archive, base, route.path, list(request.query_params.multi_items()), g.limit
        )
        return _json(withdrawn.shown(rows, study.withdrawn))
    return await _stream(archive, f"{base}/{route.path}", request, g.limit)


_UNLISTED = "not a series of the study's published ImagingStudy"


async def _one_patients(
    route: DicomwebPath,
    request: Request,
    study: StudyLocation,
    patient: str,
    listed: frozenset[str],
    archive: Archive,
    base: str,
    r: Resolver,
    g: Gateway,
) -> Response:
    """A request within a study the caller may see, for a caller limited to that study's patient."""
    if route.kind == "search" or route.metadata:
        accept = request.headers.get("accept", "")
        if accept and not any(t in accept for t in ("json", "*/*")):
            return Response(status_code=406, headers={"Cache-Control": "no-store"})
        identifiers, _ = await g.patients.get_or_load(patient, lambda: patient_studies(r.fhir, patient))
        keys = qido.patient_keys(
            identifiers, default_system=archive.default_system, issuer_systems=archive.issuer_systems
        )
        given = list(request.query_params.multi_items())
        params = qido.within_study_params(given) if route.kind == "search" else []
        rows = await archive_rows(archive, base, route.path, params, g.limit)
        kept = withdrawn.shown([row for row in rows if qido.within_study(row, keys, listed)], study.withdrawn)
        limit = qido.limit_of(given) if route.kind == "search" else None
        return _json(kept[:limit] if limit is not None else kept)
    if route.level == "studies" and await holds_unlisted(archive, base, study.study_uid, listed):
        # The whole study, its rendering or thumbnail: refused, not trimmed (a multipart answer
        # cannot be filtered part by part as it streams); the listed series can be retrieved.
        raise AccessDeniedError(
            f"study {study.study_uid}: the archive holds series its published ImagingStudy does not list; "
            "retrieve the listed series one by one"
        )
    return await _stream(archive, f"{base}/{route.path}", request, g.limit)


async def _stream(archive: Archive, url: str, request: Request, limit: CallLimit) -> Response:
    answer = await forward(
        archive.client,
        url,
        method=request.method,
        params=list(request.query_params.multi_items()),
        headers=request_headers(request.headers),
        limit=limit,
    )
    if answer.status >= 400:
        # The archive's error body stayed behind (bridge/gateway/proxy.py): the bridge's own reason.
        if answer.status == 404:
            return outcome(404, "not-found", NOT_IN_ARCHIVE, {"Cache-Control": "no-store"})
        return outcome(
            answer.status,
            "invalid",
            f"the archive refused the request ({answer.status})",
            {"Cache-Control": "no-store"},
        )
    if isinstance(answer.body, bytes):
        return Response(answer.body, status_code=answer.status, headers=answer.headers)
    return StreamingResponse(answer.body, status_code=answer.status, headers=answer.headers)


async def _search_across(
    route: DicomwebPath, request: Request, who: Caller, r: Resolver, g: Gateway
) -> Response:
    """A search across studies: everything for a caller who may see all, else the patient's rows."""
    if may_see_all(who):
        note(request, who, "image-query")
        if len(g.archives) == 1 and route.level != "instances":
            archive = g.archives[0]
            return await _stream(archive, f"{archive.base.rstrip('/')}/{route.path}", request, g.limit)
        rows = await search_every_archive(g, route.path, list(request.query_params.multi_items()))
        return _json(
            await withdrawn.shown_across(rows, r.by_study_uid) if route.level == "instances" else rows
        )
    patient = patient_limit(who)
    decision = decide(who, patient)
    if patient is None or not decision.allowed:
        note(request, who, "image-query", "refused", reason=decision.reason or "no patient in context")
        raise AccessDeniedError(f"searching across studies: {decision.reason or 'no patient in context'}")
    accept = request.headers.get("accept", "")
    if accept and not any(t in accept for t in ("json", "*/*")):
        return Response(status_code=406, headers={"Cache-Control": "no-store"})
    note(request, who, "image-query", patient=patient)
    given = list(request.query_params.multi_items())
    locate = r.by_study_uid if route.level == "instances" else None  # withdrawn instances left out
    return _json(await search_patients_rows(g, r.fhir, patient, route.path, given, locate=locate))


def _json(rows: Sequence[Any]) -> Response:
    return Response(
        json.dumps(rows, separators=(",", ":")),
        media_type=DICOM_JSON,
        headers={"Cache-Control": "no-store"},
    )


# The nginx front's question (bridge/gateway/front.py), included only with BRIDGE_GATEWAY_FRONT_SECRET.
front_router = APIRouter(include_in_schema=False)
_NOT_FROM_THE_FRONT = 403  # "answer it yourself": the front hands the request to the gateway above


@front_router.get(front.GRANT_PATH)
async def front_grant(request: Request) -> Response:
    """May the caller see the study of this retrieve? 200 with where to send it and for how long; else 403.

    A 403 says only "not from the front": nginx then hands the request to the gateway above, which
    answers it as it would without a front (a refusal with its reason and its audit, a 401, a 404).
    So nothing here is audited but the access granted, and nothing explains itself.
    """
    settings = services_of(request).settings
    secret = settings.gateway.secret
    given = request.headers.get(front.SECRET_HEADER, "")
    if secret is None or not hmac.compare_digest(given.encode(), secret.get_secret_value().encode()):
        return Response(status_code=404)  # not the front: as if there were no such route
    path = request.headers.get(front.PATH_HEADER, "")
    route = parse(path)
    if route is None or route.kind != "retrieve" or route.study_uid is None or not front.is_fast_path(path):
        return Response(status_code=_NOT_FROM_THE_FRONT)
    try:
        who = await authenticate(request, audit_refusal=False)
        study = await resolver_of(request).by_study_uid(route.study_uid)
        if not decide(who, study.patient).allowed:
            return Response(status_code=_NOT_FROM_THE_FRONT)
        if study.withdrawn or (route.series_uid is not None and not lists_series(study, route.series_uid)):
            return Response(status_code=_NOT_FROM_THE_FRONT)  # the gateway refuses it or filters, saying why
        archive, base = _gateway(request).archive_for(study)
        if patient_limit(who) is not None and not await _front_may_serve(route, study, archive, base):
            return Response(status_code=_NOT_FROM_THE_FRONT)
        headers = await front_headers(archive, base)
    except BridgeError:
        return Response(status_code=_NOT_FROM_THE_FRONT)
    note(request, who, "image-read", study=study)
    # How long nginx may keep this grant: the session cache's time, never past the credential's end.
    headers["X-Accel-Expires"] = str(grant_seconds(settings.session.cache_ttl, who.expires, time.time()))
    return Response(status_code=200, headers=headers)


async def _front_may_serve(route: DicomwebPath, study: StudyLocation, archive: Archive, base: str) -> bool:
    """Whether the front may send a patient-limited caller's retrieve straight to the archive.

    A retrieve within a series the published ImagingStudy lists; a study-level one (its metadata,
    the whole study) only while the archive holds no other series of the study. The front keeps
    a grant per study and series (bridge/gateway/front.py), for BRIDGE_SESSION_CACHE_TTL at most.
    """
    listed = frozenset(s.uid for s in study.series)
    if route.series_uid is not None:
        return route.series_uid in listed
    return not await holds_unlisted(archive, base, study.study_uid, listed)


def grant_seconds(cache_ttl: float, expires: float | None, now: float) -> int:
    """Whole seconds a grant may be kept: at most ``cache_ttl``, and 0 once the credential ends within it."""
    seconds = cache_ttl if expires is None else min(cache_ttl, expires - now)
    return max(0, int(seconds))
