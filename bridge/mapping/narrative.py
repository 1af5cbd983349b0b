"""The short human-readable ``text`` every resource the bridge writes carries (FHIR R4 Narrative).

An EHR that cannot render a resource shows its narrative instead (R4 dom-6 asks for one). Each
narrative is made from the finished resource itself, so it changes only when what it shows
changes and an unchanged study still has an unchanged fingerprint.

The XHTML keeps to what R4's narrative rules allow (txt-1: a ``div`` in the XHTML namespace holding
only basic formatting elements, no attributes, scripts or comments; txt-2: some text): plain ``p``,
``b`` and ``ul``/``li`` elements, every value escaped, and characters XML 1.0 cannot carry
(control characters a DICOM string may hold) dropped.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Sequence
from typing import Any

Resource = dict[str, Any]

XHTML_NAMESPACE = "http://www.w3.org/1999/xhtml"

# Characters XML 1.0 cannot hold (C0 controls except tab, newline and carriage return; U+FFFE/FFFF).
_NOT_XML = re.compile("[\x00-\x08\x0b\x0c\x0e-\x1f\ufffe\uffff]")
_ESCAPES = {"&": "&amp;", "<": "&lt;", ">": "&gt;"}


def escape(text: str) -> str:
    """``text`` as XHTML character data: markup characters escaped, non-XML characters dropped."""
    return "".join(_ESCAPES.get(c, c) for c in _NOT_XML.sub("", text))


def narrative(title: str, lines: Iterable[str], items: Sequence[str] = ()) -> Resource:
    """A generated Narrative: a bold title, one paragraph per line, then an optional list.

    Every argument is plain text, escaped here; empty lines are left out.
    """
    parts = [f"<p><b>{escape(title)}</b></p>"]
    parts += [f"<p>{escape(line)}</p>" for line in lines if line.strip()]
    if items:
        parts.append("<ul>" + "".join(f"<li>{escape(item)}</li>" for item in items) + "</ul>")
    return {"status": "generated", "div": f'<div xmlns="{XHTML_NAMESPACE}">{"".join(parts)}</div>'}


def with_narrative(resource: Resource, make: Callable[[Resource], Resource]) -> Resource:
    """``resource`` with its narrative, placed after ``meta`` as R4's JSON examples order it."""
    text = make(resource)
    out: Resource = {}
    for key, value in resource.items():
        if key == "text":
            continue
        out[key] = value
        if key == "meta":
            out["text"] = text
    out.setdefault("text", text)
    return out


def _count(count: int, one: str, many: str) -> str:
    return f"{count} {one if count == 1 else many}"


def _when(started: str) -> str:
    """A FHIR dateTime as people read it: the date, and the time to the minute with its offset."""
    date, _, time = started.partition("T")
    if not time:
        return date
    clock = time[:5]
    offset = time[8:].lstrip("0123456789.")  # what follows the seconds and their fraction
    return f"{date} {clock}{' ' + offset if offset else ''}"


def imaging_study_narrative(resource: Resource) -> Resource:
    """The ImagingStudy's date, description, acquisition modalities and counts.

    No patient data: the subject and the referrer stay out (the Patient has its own narrative).
    """
    heading = "Imaging study"
    if resource.get("started"):
        heading += f" of {_when(resource['started'])}"
    modalities = [c["code"] for c in resource.get("modality", ())]
    counts = []
    if "numberOfSeries" in resource:
        counts.append(_count(resource["numberOfSeries"], "series", "series"))
    if "numberOfInstances" in resource:
        counts.append(_count(resource["numberOfInstances"], "instance", "instances"))
    status = resource.get("status")
    lines = [
        f"Status: {status}" if status and status != "available" else "",
        resource.get("description", ""),
        f"Modalities: {', '.join(modalities)}" if modalities else "",
        ", ".join(counts),
    ]
    return narrative(heading, lines)


def endpoint_narrative(resource: Resource) -> Resource:
    """The Endpoint's name and the WADO-RS address clients append ``/studies/{uid}`` to."""
    return narrative(resource.get("name") or "DICOMweb endpoint", [f"WADO-RS: {resource['address']}"])


def _person_name(name: Resource) -> str:
    """A HumanName as people write it: prefixes, given names, family name, suffixes."""
    parts = [*name.get("prefix", ()), *name.get("given", ()), name.get("family", ""), *name.get("suffix", ())]
    return " ".join(p for p in parts if p)


def patient_narrative(resource: Resource) -> Resource:
    """The Patient's names, gender, birth date and identifier: FHIR data, shown in its own resource."""
    names = [n for n in (_person_name(name) for name in resource.get("name", ())) if n]
    facts = [resource.get("gender", ""), f"born {resource['birthDate']}" if "birthDate" in resource else ""]
    identifiers = [
        f"{i['value']} ({i['system']})" if "system" in i else i["value"]
        for i in resource.get("identifier", ())
        if i.get("value")
    ]
    return narrative(
        " = ".join(names) or "Patient",
        [", ".join(f for f in facts if f)],
        [f"Identifier: {identifier}" for identifier in identifiers],
    )
