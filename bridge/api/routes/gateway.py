"""The image gateway: DICOMweb at /dicom-web for the studies each caller may see, forwarded to the archive.

Every request naming a study is authorized by that study: its ImagingStudy is found on the FHIR
server by Study Instance UID (the resolver's exact identifier match), and its subject must be the
caller's patient in context, or the caller's scopes must allow any patient (bridge/api/access.py).
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
from collections.abc import AsyncIterator, Sequence
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

import httpx
from fastapi import APIRouter, FastAPI, Request
from fastapi.responses import Response, StreamingResponse

from bridge.api.access import decide, may_see_all, patient_limit
from bridge.api.audit import note
from bridge.api.deps import CallerDep, authenticate, resolver_of, services_of
from bridge.api.errors import AccessDeniedError, outcome
from bridge.api.security import Caller
from bridge.audit.events import Action
from bridge.config import Settings
from bridge.errors import (
    BridgeError,
    FatalUpstreamError,
    NoUsableEndpointError,
    StudyNotFoundError,
    UpstreamLimitError,
)
from bridge.gateway import front, qido
from bridge.gateway.paths import DicomwebPath, parse
from bridge.gateway.proxy import forward, request_headers, search_json
from bridge.limits import CallLimit, DicomwebLimits, Pace
from bridge.resolve.links import (
    WITHDRAWN,
    StudyLocation,
    lists_series,
    normalize_base,
    study_uid_of,
    subject_patient,
    withdrawal_of,
)
from bridge.resolve.resolver import Resolver, TtlCache
from bridge.upstream import authorization_for, http_client

DICOM_JSON = "application/dicom+json"
_MAX_CONNECTIONS = 64
_PATIENT_STUDIES = "1000"  # most ImagingStudies of one patient a search across studies considers


@dataclass
class Archive:
    """One source's archive as the gateway reaches it."""

    name: str
    client: httpx.AsyncClient
    base: str  # the URL the bridge polls
    upstream: str  # its name in the nginx front's configuration (bridge/gateway/front.py)
    keys: tuple[str, ...]  # its bases as Endpoints name them (public and polled), normalised
    limits: DicomwebLimits
    default_system: str
    issuer_systems: dict[str, str]


@dataclass
class Gateway:
    """The archives, the bound of a forwarded answer, and each patient's identifiers and studies."""

    archives: list[Archive]
    limit: CallLimit
    patients: TtlCache[tuple[tuple[tuple[str, str], ...], frozenset[str]]]
    by_key: dict[str, list[Archive]] = field(default_factory=dict)
    _longest_first: list[tuple[str, list[Archive]]] = field(default_factory=list)

    def __post_init__(self) -> None:
        for archive in self.archives:
            for key in archive.keys:
                self.by_key.setdefault(key, []).append(archive)
        self._longest_first = sorted(self.by_key.items(), key=lambda kv: -len(kv[0]))

    def archive_for(self, study: StudyLocation) -> tuple[Archive, str]:
        """The archive serving ``study`` and the study's base as the bridge reaches it."""
        for key, archives in self._longest_first:
            if study.base != key and not study.base.startswith(key + "/"):
                continue
            # Several sources may share one public address (the gateway's own): the study's tag decides.
            chosen = next((a for a in archives if a.name in study.sources), archives[0])
            return chosen, chosen.base.rstrip("/") + study.base[len(key) :]
        raise NoUsableEndpointError(f"ImagingStudy/{study.fhir_id}: its archive is not a configured source")


@asynccontextmanager
async def _archives(app: FastAPI) -> AsyncIterator[None]:
    """One client per source's archive, with that archive's credentials and TLS, for the app's lifetime."""
    settings: Settings = app.state.services.settings
    limits = httpx.Limits(max_connections=_MAX_CONNECTIONS, max_keepalive_connections=_MAX_CONNECTIONS)
    archives = []
    async with AsyncExitStack() as stack:
        for index, source in enumerate(settings.each_source()):
            client = await stack.enter_async_context(
                http_client(
                    settings,
                    source.dicomweb,
                    "dicomweb",
                    limits=limits,
                    transport=getattr(app.state, "transport", None),  # tests: the app's transport
                )
            )
            keys = (normalize_base(source.dicomweb.public_base), normalize_base(source.dicomweb.base))
            archives.append(
                Archive(
                    name=source.name,
                    client=client,
                    base=source.dicomweb.base,
                    upstream=front.upstream_name(index),
                    keys=tuple(dict.fromkeys(k for k in keys if k)),
                    limits=DicomwebLimits.from_settings(source.dicomweb, settings),
                    default_system=source.patient_identifier_system,
                    issuer_systems=dict(source.patient_issuer_systems),
                )
            )
        app.state.gateway = Gateway(
            archives,
            CallLimit(
                "gateway",
                settings.gateway.max_response_bytes,
                "BRIDGE_GATEWAY_MAX_RESPONSE_BYTES",
                settings.http.deadline,
                pace=Pace.from_settings(settings),
            ),
            TtlCache(settings.resolver.cache_ttl, 1000),
        )
        try:
            yield
        finally:
            app.state.gateway = None


router = APIRouter(prefix="/dicom-web", tags=["dicomweb"], include_in_schema=False, lifespan=_archives)


def _gateway(request: Request) -> Gateway:
    found: Gateway | None = getattr(request.app.state, "gateway", None)
    if found is None:  # only outside the lifespan, i.e. a wiring mistake
        raise RuntimeError("the gateway's lifespan has not run")
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
    note(request, who, action, study=study)
    archive, base = g.archive_for(study)
    if patient is not None:
        return await _one_patients(route, request, study.study_uid, patient, listed, archive, base, r, g)
    return await _stream(archive, f"{base}/{route.path}", request, g.limit)


_UNLISTED = "not a series of the study's published ImagingStudy"
_NOT_IN_ARCHIVE = "not found in the study's archive"


async def _one_patients(
    route: DicomwebPath,
    request: Request,
    study_uid: str,
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
        identifiers, _ = await g.patients.get_or_load(patient, lambda: _patient(r, patient))
        keys = qido.patient_keys(
            identifiers, default_system=archive.default_system, issuer_systems=archive.issuer_systems
        )
        given = list(request.query_params.multi_items())
        params = qido.within_study_params(given) if route.kind == "search" else []
        rows = await _archive_rows(archive, base, route.path, params, g.limit)
        kept = [row for row in rows if qido.within_study(row, keys, listed)]
        limit = qido.limit_of(given) if route.kind == "search" else None
        return _json(kept[:limit] if limit is not None else kept)
    if route.level == "studies" and await _holds_unlisted(archive, base, study_uid, listed):
        # The whole study, its rendering or thumbnail: refused, not trimmed (a multipart answer
        # cannot be filtered part by part as it streams); the listed series can be retrieved.
        raise AccessDeniedError(
            f"study {study_uid}: the archive holds series its published ImagingStudy does not list; "
            "retrieve the listed series one by one"
        )
    return await _stream(archive, f"{base}/{route.path}", request, g.limit)


async def _holds_unlisted(archive: Archive, base: str, study_uid: str, listed: frozenset[str]) -> bool:
    """Whether the archive holds series of the study that its published ImagingStudy does not list."""
    path = f"studies/{study_uid}/series"
    rows = await _archive_rows(
        archive, base, path, [("includefield", qido.SERIES_UID)], archive.limits.page()
    )
    held = {qido.value_of(row, qido.SERIES_UID) for row in rows if isinstance(row, dict)}
    return bool(held - listed)


async def _archive_rows(
    archive: Archive, base: str, path: str, params: Sequence[tuple[str, str]], limit: CallLimit
) -> list[Any]:
    """The archive's DICOM JSON answer at ``path``, read whole; its 404 is the bridge's own."""
    try:
        return await search_json(archive.client, base, path, params, limit)
    except FatalUpstreamError as exc:
        if exc.status == 404 and not isinstance(exc, UpstreamLimitError):
            raise StudyNotFoundError(_NOT_IN_ARCHIVE) from None
        raise


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
            return outcome(404, "not-found", _NOT_IN_ARCHIVE, {"Cache-Control": "no-store"})
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
        if len(g.archives) == 1:
            archive = g.archives[0]
            return await _stream(archive, f"{archive.base.rstrip('/')}/{route.path}", request, g.limit)
        rows = []
        for archive in g.archives:
            rows.extend(
                await search_json(
                    archive.client,
                    archive.base,
                    route.path,
                    list(request.query_params.multi_items()),
                    archive.limits.page(),
                )
            )
        return _json(rows)
    patient = patient_limit(who)
    decision = decide(who, patient)
    if patient is None or not decision.allowed:
        note(request, who, "image-query", "refused", reason=decision.reason or "no patient in context")
        raise AccessDeniedError(f"searching across studies: {decision.reason or 'no patient in context'}")
    accept = request.headers.get("accept", "")
    if accept and not any(t in accept for t in ("json", "*/*")):
        return Response(status_code=406, headers={"Cache-Control": "no-store"})
    note(request, who, "image-query", patient=patient)
    identifiers, studies = await g.patients.get_or_load(patient, lambda: _patient(r, patient))
    given = list(request.query_params.multi_items())
    kept: dict[tuple[str | None, ...], Any] = {}
    for archive in g.archives:
        keys = qido.patient_keys(
            identifiers, default_system=archive.default_system, issuer_systems=archive.issuer_systems
        )
        for key in keys:
            for row in await search_json(
                archive.client, archive.base, route.path, qido.query_params(given, key), archive.limits.page()
            ):
                if qido.keep(row, key, studies):
                    kept.setdefault(qido.row_key(row), row)
    rows = list(kept.values())
    limit = qido.limit_of(given)
    return _json(rows[:limit] if limit is not None else rows)


def _json(rows: Sequence[Any]) -> Response:
    return Response(
        json.dumps(rows, separators=(",", ":")),
        media_type=DICOM_JSON,
        headers={"Cache-Control": "no-store"},
    )


async def _patient(r: Resolver, patient: str) -> tuple[tuple[tuple[str, str], ...], frozenset[str]]:
    """A Patient's identifiers, and the Study Instance UIDs of its live ImagingStudies."""
    resource = await r.fhir.read("Patient", patient)
    if resource is None:
        return (), frozenset()
    identifiers = tuple(
        (str(i["system"]), str(i["value"]))
        for i in resource.get("identifier") or []
        if isinstance(i, dict) and isinstance(i.get("system"), str) and isinstance(i.get("value"), str)
    )
    found = await r.fhir.search("ImagingStudy", {"subject": f"Patient/{patient}", "_count": _PATIENT_STUDIES})
    studies = frozenset(
        uid
        for study in found
        if subject_patient(study) == patient
        and study.get("status") not in WITHDRAWN
        and withdrawal_of(study) is None
        and (uid := study_uid_of(study)) is not None
    )
    return identifiers, studies


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
        if route.series_uid is not None and not lists_series(study, route.series_uid):
            return Response(status_code=_NOT_FROM_THE_FRONT)  # the gateway refuses it, saying why
        archive, base = _gateway(request).archive_for(study)
        if patient_limit(who) is not None and not await _front_may_serve(route, study, archive, base):
            return Response(status_code=_NOT_FROM_THE_FRONT)
        authorization = await authorization_for(archive.client, base)
    except (BridgeError, httpx.HTTPError):
        return Response(status_code=_NOT_FROM_THE_FRONT)
    note(request, who, "image-read", study=study)
    target = httpx.URL(base)
    headers = {
        front.FORWARD_HEADER: f"{target.scheme}://{archive.upstream}{target.path.rstrip('/')}",
        front.HOST_HEADER: target.netloc.decode("ascii"),
        front.NAME_HEADER: target.host,
        # How long nginx may keep this grant: the session cache's time, never past the credential's end.
        "X-Accel-Expires": str(grant_seconds(settings.session.cache_ttl, who.expires, time.time())),
    }
    if authorization is not None:
        headers[front.AUTHORIZATION_HEADER] = authorization
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
    return not await _holds_unlisted(archive, base, study.study_uid, listed)


def grant_seconds(cache_ttl: float, expires: float | None, now: float) -> int:
    """Whole seconds a grant may be kept: at most ``cache_ttl``, and 0 once the credential ends within it."""
    seconds = cache_ttl if expires is None else min(cache_ttl, expires - now)
    return max(0, int(seconds))
