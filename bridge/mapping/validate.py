"""Validation of outgoing resources with fhir.resources (R4B models share R4's shapes here)."""

from __future__ import annotations

from typing import Any

from pydantic import ValidationError

from bridge.errors import MappingError


def validate(resource: dict[str, Any]) -> None:
    """Raise MappingError if ``resource`` is not a valid FHIR resource.

    The message names the elements at fault and never the values (which may be patient data).
    """
    from fhir.resources.R4B import get_fhir_model_class  # on first use: not before a sync's first request

    kind = str(resource.get("resourceType", ""))
    try:
        model = get_fhir_model_class(kind)
    except (KeyError, ValueError) as exc:
        raise MappingError(f"unknown resource type {kind!r}") from exc
    try:
        model.model_validate(resource)
    except ValidationError as exc:
        problems = "; ".join(
            f"{kind}.{'.'.join(str(p) for p in e['loc'])}: {e['msg']}"
            for e in exc.errors(include_input=False, include_url=False)
        )
        raise MappingError(f"invalid {kind}: {problems}") from None


# The resources the bridge validates before it writes them.
WRITTEN_TYPES = ("ImagingStudy", "Endpoint", "Patient", "Observation")


def load_models() -> None:
    """Import the models of the written resources now.

    fhir.resources imports each on first use: tens of milliseconds that would otherwise stall the
    API's event loop during its first on-demand sync. A command-line sync leaves them to its first
    validation, after its first archive request.
    """
    from fhir.resources.R4B import get_fhir_model_class

    for kind in WRITTEN_TYPES:
        get_fhir_model_class(kind)
