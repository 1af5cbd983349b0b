"""A write batch of studies, and what a CapabilityStatement says of batches.

Each study's entries are the study, then its dose Observations; the answers split back by study.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from typing import Any, NamedTuple

from bridge.fhir.results import BatchAnswer


class StudyWrite(NamedTuple):
    """One ImagingStudy to write, the version it is known at, and its dose Observations."""

    resource: dict[str, Any]
    version: str | None
    observations: Sequence[dict[str, Any]] = ()


def supports_batch(statement: Mapping[str, Any]) -> bool:
    """Whether a CapabilityStatement lists the ``batch`` system interaction."""
    return lists_interaction(statement, "batch")


def lists_interaction(statement: Mapping[str, Any], code: str) -> bool:
    """Whether a CapabilityStatement lists the system interaction ``code``."""
    return any(
        isinstance(interaction, dict) and interaction.get("code") == code
        for rest in statement.get("rest", []) or []
        if isinstance(rest, dict)
        for interaction in rest.get("interaction", []) or []
    )


def put_entry(resource: dict[str, Any], version: str | None) -> dict[str, Any]:
    """The batch entry of one write: PUT to the resource's derived id, ifMatch when known."""
    request: dict[str, Any] = {"method": "PUT", "url": f"{resource['resourceType']}/{resource['id']}"}
    if version:
        request["ifMatch"] = f'W/"{version}"'
    return {"resource": resource, "request": request}


def study_entries(item: StudyWrite) -> list[dict[str, Any]]:
    """A study's batch entries: the study, then its Observations, partOf it (their ids derived, as its)."""
    study = f"ImagingStudy/{item.resource['id']}"
    for observation in item.observations:
        observation["partOf"] = [{"reference": study}]
    return [put_entry(item.resource, item.version), *(put_entry(o, None) for o in item.observations)]


def per_study(
    chunk: Sequence[StudyWrite], answers: Sequence[BatchAnswer]
) -> Iterator[tuple[int, BatchAnswer, Sequence[BatchAnswer]]]:
    """Each study's offset in ``chunk``, its answer, and its Observations' answers."""
    at = 0
    for offset, item in enumerate(chunk):
        yield offset, answers[at], answers[at + 1 : at + 1 + len(item.observations)]
        at += 1 + len(item.observations)
