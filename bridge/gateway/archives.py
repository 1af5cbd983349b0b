"""The gateway's model: the archives it reaches, which one serves a study, and what it asks them.

``Gateway.archive_for`` is the one rule for "which archive serves this study" (the longest
configured base the study's Endpoint address falls under); the gateway and the record pages both
ask it, so with nested base URLs they never choose different archives.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import httpx

from bridge.config import Settings
from bridge.dicomweb.limits import DicomwebLimits
from bridge.errors import FatalUpstreamError, NoUsableEndpointError, StudyNotFoundError, UpstreamLimitError
from bridge.fhir.client import FhirClient
from bridge.gateway import front, qido, withdrawn
from bridge.gateway.proxy import SERVICE, search_json
from bridge.resolve.links import StudyLocation, normalize_base
from bridge.resolve.published import WITHDRAWN, study_uid_of, subject_patient, withdrawal_of
from bridge.resolve.resolver import TtlCache
from bridge.upstream.bounds import CallLimit, Pace
from bridge.upstream.client import authorization_for
from bridge.upstream.errors import error_for_exception

PATIENT_STUDIES = "1000"  # most ImagingStudies of one patient a search across studies considers
NOT_IN_ARCHIVE = "not found in the study's archive"

# A patient's identifiers (system, value) and the Study Instance UIDs of its live ImagingStudies.
PatientStudies = tuple[tuple[tuple[str, str], ...], frozenset[str]]


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
    patients: TtlCache[PatientStudies]
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


def gateway_of(settings: Settings, clients: Sequence[httpx.AsyncClient]) -> Gateway:
    """The gateway over each source's archive, reached through that source's client (in source order)."""
    archives = []
    for index, (source, client) in enumerate(zip(settings.each_source(), clients, strict=True)):
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
    return Gateway(
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


async def archive_rows(
    archive: Archive, base: str, path: str, params: Sequence[tuple[str, str]], limit: CallLimit
) -> list[Any]:
    """The archive's DICOM JSON answer at ``path``, read whole; its 404 is the bridge's own."""
    try:
        return await search_json(archive.client, base, path, params, limit)
    except FatalUpstreamError as exc:
        if exc.status == 404 and not isinstance(exc, UpstreamLimitError):
            raise StudyNotFoundError(NOT_IN_ARCHIVE) from None
        raise


async def holds_unlisted(archive: Archive, base: str, study_uid: str, listed: frozenset[str]) -> bool:
    """Whether the archive holds series of the study that its published ImagingStudy does not list."""
    path = f"studies/{study_uid}/series"
    rows = await archive_rows(archive, base, path, [("includefield", qido.SERIES_UID)], archive.limits.page())
    held = {qido.value_of(row, qido.SERIES_UID) for row in rows if isinstance(row, dict)}
    return bool(held - listed)


async def search_every_archive(gateway: Gateway, path: str, params: Sequence[tuple[str, str]]) -> list[Any]:
    """A search across studies in every archive, rows one after the other (for a caller who may see all)."""
    rows = []
    for archive in gateway.archives:
        rows.extend(
            await search_json(archive.client, archive.base, path, list(params), archive.limits.page())
        )
    return rows


async def search_patients_rows(
    gateway: Gateway,
    fhir: FhirClient,
    patient: str,
    path: str,
    given: Sequence[tuple[str, str]],
    *,
    locate: Callable[[str], Awaitable[StudyLocation]] | None = None,
) -> list[Any]:
    """A search across studies for one patient: each archive asked by the patient's identifiers, rows checked.

    Only rows of the patient's live published studies are kept, once each, at most the caller's limit;
    given ``locate`` (instance rows), without the instances each study's publication withdrew.
    """
    identifiers, studies = await gateway.patients.get_or_load(patient, lambda: patient_studies(fhir, patient))
    kept: dict[tuple[str | None, ...], Any] = {}
    for archive in gateway.archives:
        keys = qido.patient_keys(
            identifiers, default_system=archive.default_system, issuer_systems=archive.issuer_systems
        )
        for key in keys:
            for row in await search_json(
                archive.client, archive.base, path, qido.query_params(given, key), archive.limits.page()
            ):
                if qido.keep(row, key, studies):
                    kept.setdefault(qido.row_key(row), row)
    rows = list(kept.values())
    if locate is not None:
        rows = await withdrawn.shown_across(rows, locate)
    limit = qido.limit_of(given)
    return rows[:limit] if limit is not None else rows


async def patient_studies(fhir: FhirClient, patient: str) -> PatientStudies:
    """A Patient's identifiers, and the Study Instance UIDs of its live ImagingStudies."""
    resource = await fhir.read("Patient", patient)
    if resource is None:
        return (), frozenset()
    identifiers = tuple(
        (str(i["system"]), str(i["value"]))
        for i in resource.get("identifier") or []
        if isinstance(i, dict) and isinstance(i.get("system"), str) and isinstance(i.get("value"), str)
    )
    found = await fhir.search("ImagingStudy", {"subject": f"Patient/{patient}", "_count": PATIENT_STUDIES})
    uids = frozenset(
        uid
        for study in found
        if subject_patient(study) == patient
        and study.get("status") not in WITHDRAWN
        and withdrawal_of(study) is None
        and (uid := study_uid_of(study)) is not None
    )
    return identifiers, uids


async def front_headers(archive: Archive, base: str) -> dict[str, str]:
    """Where the nginx front sends a granted retrieve, and the bridge's credentials for the archive.

    A token-based credential is fetched or reused as for any request; a failure to get it is an
    UpstreamError, as any other failed call to the archive.
    """
    try:
        authorization = await authorization_for(archive.client, base)
    except httpx.HTTPError as exc:
        raise error_for_exception(exc, archive.client.build_request("GET", base), SERVICE) from exc
    target = httpx.URL(base)
    headers = {
        front.FORWARD_HEADER: f"{target.scheme}://{archive.upstream}{target.path.rstrip('/')}",
        front.HOST_HEADER: target.netloc.decode("ascii"),
        front.NAME_HEADER: target.host,
    }
    if authorization is not None:
        headers[front.AUTHORIZATION_HEADER] = authorization
    return headers
