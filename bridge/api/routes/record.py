"""The "record": plain HTML pages listing a patient's ImagingStudies, each with an "Open images" link.

It stands in for the EHR screen a clinician clicks from: the studies come from the FHIR server
(the bridge's published ImagingStudies), and every link goes through the resolver's viewer
redirect, so the page shows exactly the path an EHR integration takes. Server-rendered, every
value escaped, no script; the pages carry patient data, so nothing from them is logged and they
sit behind the same authentication as the rest of the API. Not part of the JSON API's schema.
"""

from __future__ import annotations

import html
from collections.abc import Iterable, Mapping, Sequence
from typing import Annotated, Any
from urllib.parse import quote

from fastapi import APIRouter, Depends, Path, Query, Request
from fastapi.responses import HTMLResponse, RedirectResponse, Response

from bridge.api.audit import note
from bridge.api.auth.caller import CallerDep, allow_patient, caller
from bridge.api.auth.security import Caller
from bridge.api.deps import FHIR_ID_PATTERN, ResolverDep, StudyById
from bridge.api.routes.login import form_action
from bridge.api.services import mount_path, services_of
from bridge.config import Settings
from bridge.errors import StudyNotFoundError
from bridge.mapping.identifiers import escape_token
from bridge.resolve.links import wado_urls
from bridge.resolve.published import WITHDRAWN, withdrawal_of

router = APIRouter(
    prefix="/record",
    tags=["record"],
    dependencies=[Depends(caller)],
    include_in_schema=False,
)

PAGE_SIZE = 100
THUMBNAIL_SIZE = 96
PatientId = Annotated[str, Path(description="FHIR id of the Patient", pattern=FHIR_ID_PATTERN, max_length=64)]

_STYLE = """
body { font-family: system-ui, sans-serif; margin: 2rem; color: #1b1f23; }
h1 { font-size: 1.4rem; margin-bottom: 0.2rem; }
p.sub { color: #57606a; margin-top: 0; }
table { border-collapse: collapse; width: 100%; max-width: 70rem; }
th, td { text-align: left; padding: 0.5rem 0.75rem; border-bottom: 1px solid #d0d7de; }
td { vertical-align: middle; }
th { background: #f6f8fa; }
img.thumb { width: 96px; height: 96px; background: #000; display: block; }
a.open-images { font-weight: 600; }
.muted { color: #57606a; }
header.who { display: flex; gap: 1rem; align-items: center; justify-content: flex-end; color: #57606a; }
header.who form { margin: 0; }
form.search { margin: 1rem 0; display: flex; gap: 0.5rem; flex-wrap: wrap; align-items: end; }
form.search label { display: flex; flex-direction: column; font-size: 0.85rem; color: #57606a; }
ul.identifiers { list-style: none; padding: 0; margin: 0.2rem 0; }
.system { color: #57606a; font-size: 0.85rem; }
"""


def html_page(
    title: str,
    body: str,
    status_code: int = 200,
    *,
    request: Request | None = None,
    who: Caller | None = None,
) -> HTMLResponse:
    """A record page; with ``request`` and ``who``, headed by who is signed in and a logout button."""
    settings: Settings | None = services_of(request).settings if request is not None else None
    header = _signed_in(request, who, settings) if request is not None and who is not None else ""
    document = (
        '<!doctype html>\n<html lang="en"><head><meta charset="utf-8">'
        f"<title>{html.escape(title)}</title>"
        '<meta name="viewport" content="width=device-width,initial-scale=1">'
        '<meta name="referrer" content="no-referrer">'
        f"<style>{_STYLE}</style></head>\n<body>\n{header}{body}\n</body></html>\n"
    )
    # Logout goes on to the identity provider (RP-initiated logout): the browser must be let follow
    # the form's redirect there, which form-action governs too.
    forms = form_action(settings) if settings is not None else "'self'"
    # Patient data: never cached by the browser or a proxy, never framed by another site.
    headers = {
        "Cache-Control": "no-store",
        "X-Frame-Options": "DENY",
        "Content-Security-Policy": "default-src 'none'; style-src 'unsafe-inline'; "
        f"img-src 'self'; frame-ancestors 'none'; base-uri 'none'; form-action {forms}",
    }
    return HTMLResponse(document, status_code=status_code, headers=headers)


def _signed_in(request: Request, who: Caller, settings: Settings | None) -> str:
    """Who the page is shown to, and the way out of a browser session."""
    base = html.escape(mount_path(request))
    if who.method == "session":
        shown = f'Signed in as <strong class="user">{html.escape(who.subject or "an unnamed user")}</strong>'
    elif who.method == "api-key":
        shown = "Signed in with an API key"
    elif who.method == "jwt":
        shown = f'Signed in with a token for <strong class="user">{html.escape(who.subject or "?")}</strong>'
    else:
        shown = "Not signed in: authentication is off"
    logout = (
        f'<form method="post" action="{base}/logout">'
        '<button type="submit" class="logout">Log out</button></form>'
        if who.method == "session" and settings is not None and settings.login_enabled
        else ""
    )
    return f'<header class="who"><span>{shown}</span>{logout}</header>\n'


def _texts(values: Iterable[Any]) -> list[str]:
    return [str(v) for v in values if isinstance(v, str | int) and str(v).strip()]


def patient_name(patient: Mapping[str, Any]) -> str:
    """The Patient's first name entry as people write it, or "(no name)"."""
    for name in patient.get("name") or []:
        if not isinstance(name, dict):
            continue
        if isinstance(name.get("text"), str) and name["text"].strip():
            return str(name["text"]).strip()
        parts = [*_texts(name.get("prefix") or []), *_texts(name.get("given") or [])]
        if isinstance(name.get("family"), str):
            parts.append(name["family"])
        parts.extend(_texts(name.get("suffix") or []))
        if parts:
            return " ".join(parts)
    return "(no name)"


def study_date(started: Any) -> str:
    """A FHIR dateTime as date, time of day and its zone, as recorded (no conversion to the server's zone).

    A FHIR dateTime with a time always has a zone; it is shown, since a study's 08:30 in another
    hospital's zone is not this hospital's 08:30.
    """
    if not isinstance(started, str) or not started:
        return "unknown date"
    date, _, time = started.partition("T")
    if not time:
        return date
    zone = "UTC" if time.endswith("Z") else ""
    for sign in ("+", "-"):
        if sign in time:
            time, _, offset = time.partition(sign)
            zone = "UTC" if offset in ("00:00", "00") else f"UTC{sign}{offset}"
    return f"{date} {time[:5]} {zone}".rstrip()


def _type_codes(identifier: Mapping[str, Any]) -> list[Any]:
    """The codes of an Identifier's type (MR, ACSN, ...)."""
    kind = identifier.get("type")
    codings = kind.get("coding") if isinstance(kind, dict) else None
    return [c.get("code") for c in codings or [] if isinstance(c, dict)]


def issuer_names(settings: Settings) -> dict[str, str]:
    """Identifier system -> the Issuer of Patient ID configured for it, across every source."""
    names: dict[str, str] = {}
    for source in settings.each_source():
        for issuer, system in source.patient_issuer_systems.items():
            names.setdefault(system, issuer)
    return names


def identifiers(patient: Mapping[str, Any], issuers: Mapping[str, str]) -> list[tuple[str, str, str]]:
    """The Patient's identifiers as (value, system, issuer name or ""), medical record numbers first."""
    found: list[tuple[bool, str, str, str]] = []
    for identifier in patient.get("identifier") or []:
        if not isinstance(identifier, dict) or not isinstance(identifier.get("value"), str):
            continue
        system = identifier.get("system") if isinstance(identifier.get("system"), str) else ""
        codes = _type_codes(identifier)
        found.append(("MR" not in codes, identifier["value"], str(system), issuers.get(str(system), "")))
    return [(value, system, issuer) for _, value, system, issuer in sorted(found, key=lambda f: f[0])]


def identifier_list(patient: Mapping[str, Any], issuers: Mapping[str, str]) -> str:
    """The identifiers as HTML: each value with its issuer and system, so two namesakes differ."""
    items = []
    for value, system, issuer in identifiers(patient, issuers):
        where = " ".join(
            part for part in (f"issuer {issuer}" if issuer else "", system or "no system") if part
        )
        items.append(
            f'<li><span class="mrn">{html.escape(value)}</span> '
            f'<span class="system">({html.escape(where)})</span></li>'
        )
    return '<ul class="identifiers">' + "".join(items) + "</ul>" if items else ""


def accession(study: Mapping[str, Any]) -> str:
    """The study's accession number (the ACSN identifier), with its system when it has one."""
    for identifier in study.get("identifier") or []:
        if not isinstance(identifier, dict) or not isinstance(identifier.get("value"), str):
            continue
        codes = _type_codes(identifier)
        if "ACSN" in codes:
            system = identifier.get("system")
            return str(identifier["value"]) + (f" ({system})" if isinstance(system, str) and system else "")
    return ""


def referrer(study: Mapping[str, Any]) -> str:
    """The referring physician as recorded (ImagingStudy.referrer.display)."""
    found = study.get("referrer")
    if isinstance(found, dict) and isinstance(found.get("display"), str):
        return str(found["display"]).strip()
    return ""


def modalities(study: Mapping[str, Any]) -> list[str]:
    """The study's modality codes, from ImagingStudy.modality, else from its series."""
    codes = [c.get("code") for c in study.get("modality") or [] if isinstance(c, dict)]
    if not codes:
        codes = [
            (s.get("modality") or {}).get("code") for s in study.get("series") or [] if isinstance(s, dict)
        ]
    return list(dict.fromkeys(str(c) for c in codes if c))


def _newest_first(study: Mapping[str, Any]) -> tuple[bool, str]:
    started = study.get("started")
    return (isinstance(started, str), str(started or ""))  # reversed: undated studies last


def study_rows(studies: Sequence[Mapping[str, Any]], base: str) -> str:
    """The table rows of the studies, newest first."""
    rows = []
    for study in sorted(studies, key=_newest_first, reverse=True):
        fhir_id = str(study.get("id") or "")
        description = str(study.get("description") or "").strip() or "(no description)"
        series = study.get("numberOfSeries")
        instances = study.get("numberOfInstances")
        counts = ", ".join(
            f"{n} {label}" for n, label in ((series, "series"), (instances, "images")) if isinstance(n, int)
        )
        status = study.get("status")
        quoted = quote(fhir_id, safe="")
        if status in WITHDRAWN or withdrawal_of(study) is not None:
            image_cell = '<span class="muted">withdrawn</span>'
            thumb = ""
        else:
            label = html.escape(f"Open images: {description}", quote=True)
            image_cell = (
                f'<a class="open-images" href="{html.escape(base)}/imaging-studies/{quoted}/viewer" '
                f'aria-label="{label}">Open images</a>'
            )
            thumb = (
                f'<img class="thumb" alt="" width="{THUMBNAIL_SIZE}" height="{THUMBNAIL_SIZE}" '
                f'src="{html.escape(base)}/record/imaging-studies/{quoted}/thumbnail">'
            )
        rows.append(
            f'<tr class="study" data-imaging-study="{html.escape(fhir_id, quote=True)}">'
            f"<td>{thumb}</td>"
            f'<td class="date">{html.escape(study_date(study.get("started")))}</td>'
            f'<td class="description">{html.escape(description)}</td>'
            f'<td class="accession">{html.escape(accession(study) or "-")}</td>'
            f'<td class="referrer">{html.escape(referrer(study) or "-")}</td>'
            f'<td class="modalities">{html.escape(", ".join(modalities(study)) or "-")}</td>'
            f'<td class="counts">{html.escape(counts)}</td>'
            f"<td>{image_cell}</td></tr>"
        )
    return "\n".join(rows)


SearchText = Annotated[str | None, Query(max_length=256)]


def patient_query(identifier: str | None, system: str | None, name: str | None) -> dict[str, str]:
    """The FHIR search for what was typed: by identifier (in one system, or any), by name, or both.

    Typed text is escaped as the FHIR search syntax requires (``,`` would otherwise mean "or", ``|``
    split system from value), so what is searched is exactly what was typed.
    """
    params = {"_count": str(PAGE_SIZE)}
    if identifier:
        value = escape_token(identifier)
        params["identifier"] = f"{escape_token(system)}|{value}" if system else value
    if name:
        params["name"] = escape_token(name)
    return params


def _search_form(base: str, settings: Settings, identifier: str, system: str, name: str) -> str:
    systems = {settings.patient_identifier_system: "", **issuer_names(settings)}
    options = ['<option value="">any system</option>'] + [
        f'<option value="{html.escape(value, quote=True)}"{" selected" if value == system else ""}>'
        f"{html.escape(f'{issuer} ({value})' if issuer else value)}</option>"
        for value, issuer in systems.items()
    ]
    return (
        f'<form class="search" method="get" action="{html.escape(base)}/record" role="search">'
        '<label>Identifier (MRN)<input name="identifier" maxlength="256" '
        f'value="{html.escape(identifier, quote=True)}"></label>'
        f'<label>Issuer<select name="system">{"".join(options)}</select></label>'
        f'<label>Name<input name="name" maxlength="256" value="{html.escape(name, quote=True)}"></label>'
        '<button type="submit">Search</button></form>'
    )


@router.get("", response_class=HTMLResponse, summary="Patients, each linking to their imaging")
async def record_index(
    request: Request,
    r: ResolverDep,
    who: CallerDep,
    identifier: SearchText = None,
    system: SearchText = None,
    name: SearchText = None,
) -> Response:
    """Patients found by identifier and/or name (else the first 100), each linking to their record page.

    Each is listed with its identifiers and their issuers, so two patients of the same name and
    birth date can be told apart. A session or token limited to one patient (EHR launch) is sent
    to that patient's page instead.
    """
    if who.patient is not None:
        target = f"{mount_path(request)}/record/patients/{quote(who.patient, safe='')}"
        return RedirectResponse(target, status_code=302, headers={"Cache-Control": "no-store"})
    identifier, system, name = (identifier or "").strip(), (system or "").strip(), (name or "").strip()
    searched = bool(identifier or name)
    settings: Settings = services_of(request).settings
    patients = await r.fhir.search("Patient", patient_query(identifier, system, name), limit=PAGE_SIZE)
    base = mount_path(request)
    issuers = issuer_names(settings)
    items = []
    for patient in sorted(patients, key=patient_name):
        fhir_id = str(patient.get("id") or "")
        details = ", ".join(_texts([patient.get("birthDate"), patient.get("gender")]))
        items.append(
            f'<li class="patient-item"><a class="patient" '
            f'href="{html.escape(base)}/record/patients/{quote(fhir_id, safe="")}">'
            f"{html.escape(patient_name(patient))}</a>"
            + (f' <span class="muted">({html.escape(details)})</span>' if details else "")
            + identifier_list(patient, issuers)
            + "</li>"
        )
    more = (
        f'<p class="muted">Showing the first {PAGE_SIZE} patients.</p>' if len(patients) >= PAGE_SIZE else ""
    )
    none = "No patient matches this search." if searched else "No patients."
    listing = "<ul>\n" + "\n".join(items) + "\n</ul>" if items else f'<p class="muted">{none}</p>'
    intro = '<p class="sub">From the FHIR server; search, then choose a patient to see their imaging.</p>'
    form = _search_form(base, settings, identifier, system, name)
    body = f"<h1>Patients</h1>{intro}\n{form}\n{listing}{more}"
    return html_page("Patients", body, request=request, who=who)


@router.get("/patients/{patient_id}", response_class=HTMLResponse, summary="A patient's imaging studies")
async def record_patient(
    patient_id: PatientId, request: Request, r: ResolverDep, who: CallerDep
) -> HTMLResponse:
    """The patient's ImagingStudies (date, description, modalities), each with an "Open images" link."""
    allow_patient(request, who, "record-view", patient=patient_id)
    base = mount_path(request)
    patient = await r.fhir.read("Patient", patient_id)
    if patient is None:
        back = f'<p><a href="{html.escape(base)}/record">All patients</a></p>'
        return html_page("Not found", f"<h1>No such patient</h1>{back}", 404, request=request, who=who)
    studies = await r.fhir.search(
        "ImagingStudy", {"subject": f"Patient/{patient_id}", "_count": str(PAGE_SIZE)}, limit=PAGE_SIZE
    )
    note(request, who, "record-view", patient=patient_id)
    name = patient_name(patient)
    details = ", ".join(_texts([patient.get("birthDate"), patient.get("gender")]))
    header = (
        f'<p><a href="{html.escape(base)}/record">All patients</a></p>'
        f'<h1 class="patient-name">{html.escape(name)}</h1>'
        f'<p class="sub">{html.escape(details)}</p>'
        + identifier_list(patient, issuer_names(services_of(request).settings))
    )
    if not studies:
        return html_page(
            f"{name}: imaging", header + '<p class="muted">No imaging studies.</p>', request=request, who=who
        )
    table = (
        '<table class="studies"><thead><tr><th></th><th>Date</th><th>Description</th><th>Accession</th>'
        "<th>Referrer</th><th>Modalities</th><th>Size</th><th></th></tr></thead>\n<tbody>\n"
        + study_rows(studies, base)
        + "\n</tbody></table>"
    )
    more = f'<p class="muted">Showing the first {PAGE_SIZE} studies.</p>' if len(studies) >= PAGE_SIZE else ""
    return html_page(f"{name}: imaging", f"{header}<h2>Imaging</h2>\n{table}{more}", request=request, who=who)


@router.get("/imaging-studies/{id}/thumbnail", response_class=Response)
async def record_thumbnail(study: StudyById, request: Request) -> Response:
    """A small picture of the study, fetched by the bridge from its archive over WADO-RS.

    The bridge asks, not the browser: it holds the archive's credentials, and it sends the one
    plain ``Accept: image/jpeg`` that archives understand (Orthanc's DICOMweb plugin refuses a
    browser's ``image/*`` and any list of types with a 400). The
    study-level ``thumbnail`` resource comes first; where the archive has none, ``rendered``.
    """
    services = services_of(request)
    if services.gateway is None:  # only outside the lifespan, i.e. a wiring mistake
        raise RuntimeError("the app's lifespan has not run")
    archive, base = services.gateway.archive_for(study)  # the gateway's rule: the same archive
    pictures = services.pictures[archive.name]
    urls = wado_urls(base, study.study_uid)
    # a picture is awaited by a person: the read timeout bounds it all
    picture = await pictures.picture(
        [urls["thumbnail"], urls["rendered"]],
        viewport=f"{THUMBNAIL_SIZE},{THUMBNAIL_SIZE}",
        deadline=services_of(request).settings.http.timeout,
    )
    if picture is None:
        raise StudyNotFoundError(f"ImagingStudy/{study.fhir_id}: the archive renders no picture of the study")
    content, media_type = picture
    return Response(content, media_type=media_type, headers={"Cache-Control": "private, max-age=300"})
