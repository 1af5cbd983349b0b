"""Patient identity rules: the unmapped-issuer policy and the exact-match check of search answers.

Pure and light (standard library only); the policy enum is defined with the settings that choose it.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any, TypeVar
from urllib.parse import quote

from bridge.config.choices import UnmappedIssuer as UnmappedIssuer

# Systems derived from an issuer that has no configured system (BRIDGE_UNMAPPED_ISSUER=derive).
DERIVED_ISSUER_PREFIX = "urn:fhir-dicomweb-bridge:issuer:"


def derived_system(issuer: str) -> str:
    """A URI of the issuer's own: the prefix and the issuer, percent-encoded (case kept)."""
    return DERIVED_ISSUER_PREFIX + quote(issuer, safe="")


def has_identifier(resource: Mapping[str, Any], system: str | None, value: str) -> bool:
    r"""Whether ``resource`` carries the identifier (system, value) exactly, case-sensitive.

    With ``system`` None any system matches, but the value must still be equal character for
    character: FHIR servers differ in how their token search folds case, escapes ``|``, ``,``
    and ``\``, and trims, so their answer is a candidate list, never a verdict.
    """
    for identifier in resource.get("identifier") or ():
        if not isinstance(identifier, Mapping) or identifier.get("value") != value:
            continue
        if system is None or identifier.get("system") == system:
            return True
    return False


R = TypeVar("R", bound=Mapping[str, Any])


def exact_matches(resources: Iterable[R], system: str | None, value: str) -> list[R]:
    """The resources of a search answer that carry (system, value) exactly; the rest are ignored."""
    return [r for r in resources if has_identifier(r, system, value)]


def replaced_by(patient: Mapping[str, Any]) -> str | None:
    """The id of the Patient that replaced this one (``link`` of type ``replaced-by``), if any.

    EHRs publish an ADT merge this way (the old record ``active: false``); such a Patient "must no
    longer be used" (FHIR R4 Patient.link), whatever its ``active`` says. Only references of the
    form ``[base/]Patient/id[/_history/v]`` are read; anything else counts as no survivor.
    """
    for link in patient.get("link") or ():
        if not isinstance(link, Mapping) or link.get("type") != "replaced-by":
            continue
        reference = (
            (link.get("other") or {}).get("reference") if isinstance(link.get("other"), Mapping) else None
        )
        if not isinstance(reference, str):
            return ""  # replaced, but by nothing the bridge can follow
        parts = reference.split("/_history/", 1)[0].rstrip("/").split("/")
        if len(parts) >= 2 and parts[-2] == "Patient" and parts[-1]:
            return parts[-1]
        return ""
    return None


def subject_patient_id(resource: Mapping[str, Any]) -> str | None:
    """The id of the Patient an ImagingStudy's subject references (None for a logical reference)."""
    reference = (resource.get("subject") or {}).get("reference")
    if isinstance(reference, str) and reference.startswith("Patient/"):
        return reference.removeprefix("Patient/")
    return None
