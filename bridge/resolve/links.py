"""Pure link building: FHIR ImagingStudy/Endpoint JSON in, WADO-RS and viewer URLs out; no I/O."""

from __future__ import annotations

import re
import string
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any
from urllib.parse import quote, urlsplit

from bridge.errors import InvalidLookupError, NoUsableEndpointError, StudyNotFoundError, StudyWithdrawnError
from bridge.mapping.context import (
    CONNECTION_TYPE_SYSTEM,
)
from bridge.mapping.uid import is_uid
from bridge.resolve.published import (
    FHIR_ID,
    WITHDRAWN,
    accession_of,
    reference_of,
    source_tags,
    study_uid_of,
    subject_patient,
    withdrawal_of,
    withdrawn_instances,
)

WADO_RS = "dicom-wado-rs"

# Placeholders a viewer template may use; every value but base_url is percent-encoded.
PLACEHOLDERS: Mapping[str, str] = {
    "base_url": "the viewer's base URL (from the table or BRIDGE_VIEWER_URLS), inserted as is",
    "study_uid": "Study Instance UID",
    "accession": "accession number (a viewer that uses it is skipped for studies without one)",
    "dicomweb_base": "WADO-RS base URL of the study (its Endpoint address)",
    "imaging_study_id": "FHIR id of the ImagingStudy",
    "imaging_study_url": "absolute URL of the ImagingStudy on the FHIR server",
}


def check_fhir_id(value: str) -> str:
    """``value`` if it is a valid FHIR id, else InvalidLookupError."""
    if not FHIR_ID.fullmatch(value):
        raise InvalidLookupError("a FHIR id is 1-64 characters of A-Z, a-z, 0-9, '-' and '.'")
    return value


# ---------------------------------------------------------------- bases


# RFC 3986 unreserved characters and "/": all a WADO-RS base path needs. No ";" (path parameters
# some servers strip before routing, so "..;/" climbs), no backslash, no "%" but the escapes below.
_PATH = re.compile(r"^[A-Za-z0-9._~/-]*$")
_ESCAPE = re.compile(r"%([0-9A-Fa-f]{2})")
_UNRESERVED = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-._~")


def clean_path(path: str) -> str | None:
    """``path`` with escapes of unreserved characters decoded, or None if it holds anything else.

    Decoding first means an escaped dot segment (``%2e%2e``) is seen as the ``..`` it is; any other
    escape (``%2f``, ``%5c``, ``%00``, ``%25``), a ``;`` or a non-ASCII character refuses the path.
    """

    def decode(match: re.Match[str]) -> str:
        char = chr(int(match.group(1), 16))
        return char if char in _UNRESERVED else "\x00"

    decoded = _ESCAPE.sub(decode, path)
    return decoded if _PATH.fullmatch(decoded) else None


# Pure, and asked for the same few addresses on every links answer (each WADO-RS URL is checked
# against the bases before it leaves): kept for the next time.
@lru_cache(maxsize=4096)
def normalize_base(url: str) -> str | None:
    """``url`` as a comparable base (lower-case scheme and host, no trailing slash), or None.

    None for anything a safe base cannot be: not http(s), user info, query, fragment, dot
    segments or encoded slashes that could step outside a base after the prefix check.
    """
    try:
        parts = urlsplit(url.strip())
        port = parts.port
    except ValueError:
        return None
    if parts.scheme.lower() not in ("http", "https") or not parts.hostname:
        return None
    if parts.username is not None or parts.password is not None or parts.query or parts.fragment:
        return None
    if "?" in url or "#" in url:
        return None
    path = clean_path(parts.path.rstrip("/"))
    if path is None or not url.isascii():
        return None
    segments = path.split("/")
    if any(s in (".", "..") for s in segments) or "%2f" in path.lower() or "%2e" in path.lower():
        return None
    if "//" in path or "\\" in path:
        return None
    host = parts.hostname.lower()
    if ":" in host:
        host = f"[{host}]"
    netloc = f"{host}:{port}" if port is not None else host
    return f"{parts.scheme.lower()}://{netloc}{path}"


def under_base(address: str, bases: Iterable[str]) -> str | None:
    """The normalised ``address`` if it is one of ``bases`` or beneath one, else None."""
    candidate = normalize_base(address)
    if candidate is None:
        return None
    for base in bases:
        if candidate == base or candidate.startswith(base + "/"):
            return candidate
    return None


# ------------------------------------------------------------- resources


@dataclass(frozen=True, slots=True)
class SeriesLocation:
    """One series and the WADO-RS base it is served from (None: its own endpoint is unusable)."""

    uid: str
    base: str | None
    number: int | None = None
    modality: str | None = None
    instances: int | None = None
    reason: str | None = None


@dataclass(frozen=True, slots=True)
class StudyLocation:
    """What the links of one study are built from: ids, its WADO-RS base and its series."""

    fhir_id: str
    study_uid: str
    base: str
    accession: str | None = None
    series: tuple[SeriesLocation, ...] = field(default_factory=tuple)
    # Whose images these are: the Patient id of a relative ``Patient/{id}`` subject; None for any
    # other subject, which then matches no patient in context.
    patient: str | None = None
    sources: tuple[str, ...] = ()  # the bridge sources that wrote it (meta.tag)
    # SOP Instance UIDs rejection notes withdrew (IHE IOCM): never served, though the archive holds them
    withdrawn: frozenset[str] = frozenset()


def lists_series(study: StudyLocation, series_uid: str) -> bool:
    """Whether the published study shows this series (a study that lists no series shows any).

    A series the bridge left out (rejected images, IHE IOCM; a rejection note's own series) is not
    served: the published ImagingStudy is what clinicians are shown.
    """
    return not study.series or any(s.uid == series_uid for s in study.series)


def endpoint_base(endpoint: Mapping[str, Any] | None, bases: Sequence[str]) -> tuple[str | None, str]:
    """The WADO-RS base of a usable Endpoint, or None and why it is not usable.

    Usable: an active Endpoint of connectionType dicom-wado-rs whose address is one of the
    configured DICOMweb ``bases`` or beneath one.
    """
    if endpoint is None:
        return None, "not found or not readable on the configured FHIR server"
    if endpoint.get("resourceType") != "Endpoint":
        return None, "is not an Endpoint"
    if endpoint.get("status") != "active":
        return None, f"status is {endpoint.get('status')!r}, not 'active'"
    connection = endpoint.get("connectionType") or {}
    if connection.get("code") != WADO_RS or connection.get("system") not in (CONNECTION_TYPE_SYSTEM, None):
        return None, "connectionType is not dicom-wado-rs"
    address = endpoint.get("address")
    base = under_base(address, bases) if isinstance(address, str) else None
    if base is None:
        return None, "address is not under a configured DICOMweb base"
    return base, "usable"


def locate(
    resource: Mapping[str, Any],
    endpoints: Mapping[str, Mapping[str, Any] | None],
    bases: Sequence[str],
) -> StudyLocation:
    """Where a study's images are, from its ImagingStudy and its Endpoints (by reference).

    A series-level endpoint overrides the study's. Raises StudyNotFoundError for a study whose
    status withdraws it, StudyWithdrawnError for one the bridge withdrew from clinicians (a
    conflicting patient identity in the archive), and NoUsableEndpointError when no usable
    endpoint serves it.
    """
    if resource.get("resourceType") != "ImagingStudy":
        raise StudyNotFoundError("the resource is not an ImagingStudy")
    fhir_id = str(resource.get("id") or "")
    label = f"ImagingStudy/{fhir_id}"
    status = resource.get("status")
    if status in WITHDRAWN:
        raise StudyNotFoundError(f"{label} is {status}")
    withdrawn = withdrawal_of(resource)
    if withdrawn is not None:
        raise StudyWithdrawnError(
            f"{label} is withdrawn from clinicians: {withdrawn} (the archive holds its Study Instance UID "
            "under more than one patient; the integrator corrects the archive, then it is published again)"
        )
    study_uid = study_uid_of(resource)
    if study_uid is None:
        raise NoUsableEndpointError(f"{label} has no valid Study Instance UID identifier (urn:dicom:uid)")

    def pick(refs: Iterable[str | None]) -> tuple[str | None, list[str]]:
        reasons = []
        for ref in refs:
            if ref is None:
                continue
            base, why = endpoint_base(endpoints.get(ref), bases)
            if base is not None:
                return base, []
            reasons.append(f"{_label(ref)}: {why}")
        return None, reasons

    study_refs = [reference_of(r) for r in resource.get("endpoint") or []]
    study_base, study_reasons = pick(study_refs)

    located: list[SeriesLocation] = []
    for item in resource.get("series") or []:
        if not isinstance(item, dict) or not is_uid(str(item.get("uid") or "")):
            continue  # a series without a valid UID cannot be addressed
        refs = [reference_of(r) for r in item.get("endpoint") or []]
        base, reasons = pick(refs) if any(refs) else (study_base, [])
        modality = item.get("modality") or {}
        located.append(
            SeriesLocation(
                uid=str(item["uid"]),
                base=base,
                number=item.get("number") if isinstance(item.get("number"), int) else None,
                modality=modality.get("code") if isinstance(modality, dict) else None,
                instances=item.get("numberOfInstances")
                if isinstance(item.get("numberOfInstances"), int)
                else None,
                reason=None if base else "; ".join(reasons) or "no usable endpoint for the study",
            )
        )

    if study_base is None:
        series_bases = {s.base for s in located}
        if located and len(series_bases) == 1 and None not in series_bases:
            study_base = located[0].base  # every series is served from one usable base
    if study_base is None:
        why = "; ".join(study_reasons) if study_reasons else "it references no Endpoint"
        raise NoUsableEndpointError(f"{label} has no usable WADO-RS endpoint: {why}")
    return StudyLocation(
        fhir_id=fhir_id,
        study_uid=study_uid,
        base=study_base,
        accession=accession_of(resource),
        series=tuple(located),
        patient=subject_patient(resource),
        sources=source_tags(resource),
        withdrawn=withdrawn_instances(resource),
    )


def _label(reference: str) -> str:
    """A reference as shown in a message: relative form only, never a foreign absolute URL."""
    if reference.startswith("#"):
        return f"contained {reference}"
    parts = reference.rstrip("/").split("/")
    if len(parts) >= 2 and FHIR_ID.fullmatch(parts[-1]):
        return f"{parts[-2]}/{parts[-1]}"
    return "an endpoint reference"


# ------------------------------------------------------------------ links


def wado_urls(base: str, study_uid: str, series_uid: str | None = None) -> dict[str, str]:
    """WADO-RS URLs (PS3.18 10.4) of a study, or of one of its series: resource, metadata, renders."""
    url = f"{base}/studies/{quote(study_uid, safe='')}"
    if series_uid is not None:
        url = f"{url}/series/{quote(series_uid, safe='')}"
    return {
        "url": url,
        "metadata": f"{url}/metadata",
        "rendered": f"{url}/rendered",
        "thumbnail": f"{url}/thumbnail",
    }


@dataclass(frozen=True, slots=True)
class ViewerTemplate:
    """A viewer's URL template, with the base URL its ``{base_url}`` stands for."""

    name: str
    template: str
    base_url: str
    title: str = ""


def template_fields(template: str) -> list[str]:
    """The placeholder names of a template; ValueError for anything but plain ``{name}`` fields."""
    names = []
    try:
        parsed = list(string.Formatter().parse(template))
    except ValueError as exc:
        raise ValueError(f"unbalanced braces ({exc})") from exc
    for _literal, name, spec, conversion in parsed:
        if name is None:
            continue
        if spec or conversion or name not in PLACEHOLDERS:
            raise ValueError(f"unknown placeholder {{{name}}}; known: {', '.join(PLACEHOLDERS)}")
        names.append(name)
    return names


def render_viewer(viewer: ViewerTemplate, values: Mapping[str, str | None]) -> str | None:
    """The viewer URL, every value percent-encoded; None if the template needs a missing value."""
    wanted = template_fields(viewer.template)
    filled: dict[str, str] = {"base_url": viewer.base_url.rstrip("/")}
    for name in wanted:
        if name == "base_url":
            continue
        value = values.get(name)
        if value is None:
            return None
        filled[name] = quote(value, safe="")
    return viewer.template.format_map(filled)


def placeholder_values(location: StudyLocation, fhir_base: str) -> dict[str, str | None]:
    """The values of a study's template placeholders (besides base_url), not yet encoded."""
    return {
        "study_uid": location.study_uid,
        "accession": location.accession,
        "dicomweb_base": location.base,
        "imaging_study_id": location.fhir_id,
        "imaging_study_url": f"{fhir_base}/ImagingStudy/{location.fhir_id}",
    }


def build_links(
    location: StudyLocation,
    *,
    fhir_base: str,
    viewers: Mapping[str, ViewerTemplate],
    default_viewer: str,
    bases: Sequence[str],
) -> dict[str, Any]:
    """The links of a located study as plain JSON data.

    Every WADO-RS URL is checked once more against the configured ``bases`` before it leaves:
    each distinct base once, and a URL made of a checked base and valid UIDs (digits and dots, so
    no segment can step out of the base) is under it by construction; any other URL is parsed
    and checked whole. Parsing all of them cost a 1,000-series page most of its time.
    """
    checked: dict[str, bool] = {}

    def inside(url: str, base: str, *uids: str) -> bool:
        known = checked.get(base)
        if known is None:
            known = checked[base] = under_base(base, bases) is not None
        if known and all(is_uid(u) for u in uids):
            return True
        return under_base(url, bases) is not None

    study_urls = wado_urls(location.base, location.study_uid)
    urls_ok = inside(location.base, location.base) and all(
        inside(url, location.base, location.study_uid) for url in study_urls.values()
    )
    series = []
    for s in location.series:
        entry: dict[str, Any] = {
            "uid": s.uid,
            "number": s.number,
            "modality": s.modality,
            "number_of_instances": s.instances,
            "dicomweb_base": s.base,
        }
        if s.base is not None:
            urls = wado_urls(s.base, location.study_uid, s.uid)
            urls_ok = urls_ok and inside(urls["url"], s.base, location.study_uid, s.uid)
            entry.update(urls)
        else:
            entry["unavailable"] = s.reason
        series.append(entry)
    if not urls_ok:
        raise NoUsableEndpointError(f"ImagingStudy/{location.fhir_id}: a link left the configured bases")
    values = placeholder_values(location, fhir_base)
    imaging_study_url = values["imaging_study_url"]
    viewer_urls = {}
    for name, viewer in viewers.items():
        url = render_viewer(viewer, values)
        if url is not None:
            viewer_urls[name] = url
    return {
        "imaging_study": f"ImagingStudy/{location.fhir_id}",
        "imaging_study_url": imaging_study_url,
        "study_uid": location.study_uid,
        "accession": location.accession,
        "dicomweb_base": location.base,
        "study": study_urls,
        "series": series,
        "viewers": viewer_urls,
        "default_viewer": default_viewer if default_viewer in viewer_urls else None,
    }


def viewer_url(location: StudyLocation, viewer: ViewerTemplate, *, fhir_base: str) -> str:
    """The URL of one viewer for a located study; NoUsableEndpointError if it lacks a value."""
    values = placeholder_values(location, fhir_base)
    url = render_viewer(viewer, values)
    if url is None:
        missing = [n for n in template_fields(viewer.template) if n != "base_url" and values.get(n) is None]
        raise NoUsableEndpointError(
            f"viewer {viewer.name!r} needs {', '.join(missing)}, which ImagingStudy/{location.fhir_id} lacks"
        )
    return url
