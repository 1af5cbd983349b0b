"""What the FHIR client answers, as plain values.

Where a write landed, a batch entry's answer, and the error for a base URL that is no FHIR server.

They are the FHIR client's values; the sync's FhirSink protocol (bridge/sync/protocols.py) passes them.
No HTTP here, so importing them loads no httpx.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from bridge.errors import ConfigurationError, FatalUpstreamError, UpstreamError


@dataclass(frozen=True, slots=True)
class WriteResult:
    """Where a write landed: type, id, version, and whether it created the resource.

    ``created`` is what the answer's status says (201); ``status`` is that status, for callers
    that must tell a create from an update on servers that answer 200 to both (Medplum's batch).
    """

    resource_type: str
    id: str
    version: str | None
    created: bool
    status: int = field(default=0, compare=False)  # how it was answered, not where it landed


@dataclass(frozen=True, slots=True)
class BatchAnswer:
    """One entry's answer in a FHIR batch: its status, and what it wrote or read, or why it failed."""

    status: int
    result: WriteResult | None = None  # a write that succeeded
    resource: dict[str, Any] | None = None  # the resource a read (or a full answer) carried
    error: UpstreamError | None = None  # the error the same single request would have raised


def not_a_fhir_server(base_url: str | None, why: str) -> ConfigurationError:
    """The error for a base URL that does not answer as a FHIR server, naming the setting to fix."""
    what = f"{base_url} is" if base_url else "it is"
    return ConfigurationError(
        f"BRIDGE_FHIR_URL: {what} not a FHIR server ({why}); set it to the FHIR R4 base URL, "
        "the one that ends where [base]/metadata answers a CapabilityStatement and [base]/ImagingStudy "
        "searches ImagingStudies"
    )


def metadata_failure(status: int | None) -> str:
    """Why ``GET [base]/metadata`` showed no FHIR server, for :func:`not_a_fhir_server`.

    A failure with a success status is a body that was not JSON (a web page answering every path).
    """
    if status is not None and status >= 300:
        return f"GET metadata answered {status}"
    return "GET metadata did not answer JSON"


def no_fhir_answer(exc: FatalUpstreamError) -> bool:
    """Whether a write's failure is what a URL serving no FHIR at all answers.

    404 or 405 (no such path, no PUT there), or a success that is no FHIR answer (a page, not
    JSON; JSON that says nothing of where it wrote).
    """
    return exc.status is None or exc.status < 300 or exc.status in (404, 405)
