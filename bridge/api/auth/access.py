"""Who may see which study: a caller's SMART context and scopes against a study's patient; pure.

The rules, in order:

- an anonymous caller (authentication off) and an API-key caller (a machine client) see every study;
- a caller with a patient in context (a SMART token's ``patient``, an EHR-launched session) sees
  only that patient's studies, and, when it carries SMART resource scopes, only with one that
  grants reading ImagingStudy;
- a caller without a patient in context but with SMART resource scopes sees every study only with
  a ``user/`` or ``system/`` scope that grants reading ImagingStudy (a ``patient/`` scope alone needs
  the patient in context);
- a caller with neither (a plain JWT, a login session) sees what the rest of the API shows it: all.

Scopes are SMART v1 (``patient/ImagingStudy.read``, ``user/*.*``) or v2 (``system/ImagingStudy.rs``).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from bridge.api.auth.security import Caller

RESOURCE = "ImagingStudy"
_SCOPE = re.compile(r"^(patient|user|system)/([A-Za-z*]+)\.([a-z*]+)(\?.*)?$")


@dataclass(frozen=True, slots=True)
class Decision:
    """Whether a caller may see a study, and why not (for the refusal and the audit trail)."""

    allowed: bool
    reason: str = ""


def _reads(resource: str, permission: str) -> bool:
    if resource not in (RESOURCE, "*"):
        return False
    if permission in ("read", "*"):  # SMART v1
        return True
    return permission != "write" and "r" in permission  # SMART v2: c r u d s


def granted_levels(scopes: frozenset[str]) -> frozenset[str]:
    """The levels (patient, user, system) at which the scopes let ImagingStudy be read."""
    levels = set()
    for scope in scopes:
        match = _SCOPE.match(scope)
        if match and _reads(match[2], match[3]):
            levels.add(match[1])
    return frozenset(levels)


def has_resource_scopes(scopes: frozenset[str]) -> bool:
    """Whether any scope is a SMART resource scope (so the scopes, not their absence, decide)."""
    return any(_SCOPE.match(scope) for scope in scopes)


def patient_limit(caller: Caller) -> str | None:
    """The one Patient id the caller is limited to, or None when it is not limited to one."""
    return caller.patient if caller.method not in ("anonymous", "api-key") else None


def may_see_all(caller: Caller) -> bool:
    """Whether the caller may see every patient's studies."""
    if caller.method in ("anonymous", "api-key"):
        return True
    if caller.patient is not None:
        return False
    if not has_resource_scopes(caller.scopes):
        return True
    return bool(granted_levels(caller.scopes) & {"user", "system"})


def decide(caller: Caller, study_patient: str | None) -> Decision:
    """Whether ``caller`` may see a study whose subject is Patient/``study_patient`` (None: no Patient)."""
    if caller.method in ("anonymous", "api-key"):
        return Decision(True)
    levels = granted_levels(caller.scopes)
    if caller.patient is None:
        if may_see_all(caller):
            return Decision(True)
        return Decision(False, "the token's scopes do not grant reading ImagingStudy")
    if has_resource_scopes(caller.scopes) and not levels:
        return Decision(False, "the token's scopes do not grant reading ImagingStudy")
    if study_patient is None or study_patient != caller.patient:
        return Decision(False, "the study belongs to another patient than the one in context")
    return Decision(True)
