"""Reading a published ImagingStudy: its UID, accession numbers, source tags, subject, endpoints, withdrawal.

Pure functions over the FHIR JSON the resolver, the gateway and the sync read back; no I/O.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

from bridge.mapping.context import (
    BRIDGE_TAG_SYSTEM,
    DICOM_UID_SYSTEM,
    V2_0203,
    WITHDRAWN_CODES,
    WITHDRAWN_EXTENSION,
    WITHDRAWN_INSTANCE_EXTENSION,
)
from bridge.mapping.uid import is_uid

FHIR_ID = re.compile(r"^[A-Za-z0-9\-.]{1,64}$")
# Statuses under which the images are not (or no longer) to be shown.
WITHDRAWN = frozenset({"entered-in-error", "cancelled"})


def study_uid_of(resource: Mapping[str, Any]) -> str | None:
    """The Study Instance UID in an ImagingStudy's ``urn:dicom:uid`` identifier, if valid."""
    for identifier in resource.get("identifier") or []:
        if not isinstance(identifier, dict) or identifier.get("system") != DICOM_UID_SYSTEM:
            continue
        value = str(identifier.get("value") or "").removeprefix("urn:oid:")
        if is_uid(value):
            return value
    return None


def is_accession(identifier: Any) -> bool:
    """Whether an Identifier is typed as an accession number (v2-0203#ACSN)."""
    if not isinstance(identifier, dict):
        return False
    codings = (identifier.get("type") or {}).get("coding") or []
    return any(
        isinstance(c, dict) and c.get("code") == "ACSN" and c.get("system") in (V2_0203, None)
        for c in codings
    )


def accession_of(resource: Mapping[str, Any]) -> str | None:
    """The first accession number of an ImagingStudy, if it has one."""
    for identifier in resource.get("identifier") or []:
        if is_accession(identifier) and identifier.get("value"):
            return str(identifier["value"])
    return None


def has_accession(resource: Mapping[str, Any], value: str, system: str | None) -> bool:
    """Whether the ImagingStudy carries accession ``value`` (in ``system``, when one is given)."""
    return any(
        is_accession(i) and i.get("value") == value and (system is None or i.get("system") == system)
        for i in resource.get("identifier") or []
    )


def is_tagged(resource: Mapping[str, Any], source: str) -> bool:
    """Whether this bridge's source ``source`` wrote the resource (its meta.tag)."""
    tags = (resource.get("meta") or {}).get("tag") or []
    return any(
        isinstance(t, dict) and t.get("system") == BRIDGE_TAG_SYSTEM and t.get("code") == source for t in tags
    )


def withdrawal_of(resource: Mapping[str, Any]) -> str | None:
    """Why the bridge withdrew an ImagingStudy from clinicians (its withdrawal extension), or None."""
    for extension in resource.get("extension") or []:
        if isinstance(extension, dict) and extension.get("url") == WITHDRAWN_EXTENSION:
            code = extension.get("valueCode")
            # A code this version does not know still withdraws: refusing is the safe reading.
            return (
                WITHDRAWN_CODES.get(code, "withdrawn by the bridge") if isinstance(code, str) else "withdrawn"
            )
    return None


def withdrawn_instances(resource: Mapping[str, Any]) -> frozenset[str]:
    """The SOP Instance UIDs an ImagingStudy names as withdrawn by rejection notes (its extensions)."""
    return frozenset(
        uid
        for extension in resource.get("extension") or []
        if isinstance(extension, dict)
        and extension.get("url") == WITHDRAWN_INSTANCE_EXTENSION
        and isinstance(uid := extension.get("valueId"), str)
    )


def subject_patient(resource: Mapping[str, Any]) -> str | None:
    """The Patient id of an ImagingStudy's subject when it is ``Patient/{id}``, else None.

    Only the relative form the bridge writes: an absolute URL may name another server's Patient with
    the same id, so it matches no patient in context.
    """
    reference = reference_of(resource.get("subject"))
    if reference is None:
        return None
    kind, _, rid = reference.partition("/")
    return rid if kind == "Patient" and FHIR_ID.fullmatch(rid) else None


def source_tags(resource: Mapping[str, Any]) -> tuple[str, ...]:
    """The bridge sources named in the resource's meta.tag."""
    tags = (resource.get("meta") or {}).get("tag") or []
    return tuple(
        str(t["code"])
        for t in tags
        if isinstance(t, dict) and t.get("system") == BRIDGE_TAG_SYSTEM and isinstance(t.get("code"), str)
    )


def endpoint_references(resource: Mapping[str, Any]) -> list[str]:
    """Every endpoint reference of the ImagingStudy and of its series, study-level first."""
    refs = [reference_of(r) for r in resource.get("endpoint") or []]
    for series in resource.get("series") or []:
        if isinstance(series, dict):
            refs.extend(reference_of(r) for r in series.get("endpoint") or [])
    return list(dict.fromkeys(r for r in refs if r))


def reference_of(value: Any) -> str | None:
    """The reference string of a FHIR Reference, or None."""
    if isinstance(value, dict) and isinstance(value.get("reference"), str):
        return str(value["reference"])
    return None
