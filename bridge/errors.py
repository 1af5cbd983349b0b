"""The bridge's exception tree; third-party errors are converted to these at the client boundary.

::

    BridgeError
    ├── ConfigurationError            bad or missing setting: stop before any work (exit 2)
    ├── MappingError                  bad DICOM data in one study: park it, go on
    │   ├── PatientLinkError          no (or no unique) Patient for the study's PatientID
    │   └── PatientConflictError      one Study Instance UID, rows naming several patients: park, withdraw
    ├── StoreError                    the state database failed
    ├── ResolveError                  a resolver lookup cannot give links (the API maps each)
    │   ├── InvalidLookupError        the caller's id, UID, reference or option is malformed (422)
    │   ├── StudyNotFoundError        no (live) ImagingStudy matches (404)
    │   ├── NoUsableEndpointError     no usable WADO-RS endpoint, or an ambiguous lookup (409)
    │   └── StudyWithdrawnError       the study is withdrawn from clinicians, with the reason (409)
    └── UpstreamError                 an archive or FHIR server answered badly or not at all
        ├── UpstreamAuthError         credentials or TLS refused (401/403, token endpoint, certificate):
        │                             no study can pass, so the run stops (exit 3)
        ├── RetriableUpstreamError    timeouts, connection errors, 429, 5xx: retry, then give up
        │   └── UpstreamUnavailableError  still failing after the retries (exit 3)
        └── FatalUpstreamError        other 4xx: retrying will not help; the study is parked
            ├── UpstreamLimitError    an answer broke a bound (deadline, size, pages, series per study)
            ├── RejectedResourceError the FHIR server rejected a resource (OperationOutcome text)
            └── VersionConflictError  If-Match failed (412) or the write conflicted (409)

Messages say what failed and where (method, path, attribute, UID) and never carry patient data.
"""

from __future__ import annotations


class BridgeError(Exception):
    """Base of every error the bridge raises on purpose."""


class ConfigurationError(BridgeError):
    """A setting is missing or malformed; the message names it."""


class MappingError(BridgeError):
    """A study's DICOM data cannot be mapped; ``attribute`` names the DICOM attribute at fault."""

    def __init__(self, message: str, attribute: str | None = None) -> None:
        super().__init__(message)
        self.attribute = attribute


class PatientLinkError(MappingError):
    """The study's Patient cannot be linked (missing under ``match-only``, or ambiguous)."""


class PatientConflictError(MappingError):
    """The archive's rows of one Study Instance UID name more than one patient (bridge/sync/identity.py)."""


class StoreError(BridgeError):
    """The state store could not be opened, read or written."""


class UpstreamError(BridgeError):
    """An upstream server (DICOMweb archive or FHIR server) failed a request.

    ``service`` is ``"dicomweb"`` or ``"fhir"``; ``status`` the HTTP status, if any answer came.
    """

    def __init__(self, message: str, *, service: str, status: int | None = None) -> None:
        super().__init__(message)
        self.service = service
        self.status = status


class UpstreamAuthError(UpstreamError):
    """The upstream (or its token endpoint) refused the bridge's credentials or TLS identity.

    Not a study's fault and not worth retrying: the run stops and the message names the setting
    to check (never the secret itself).
    """


class RetriableUpstreamError(UpstreamError):
    """A failure that may pass: timeout, connection error, 429 or 5xx.

    ``retry_after`` carries the server's Retry-After, in seconds, when it sent one.
    """

    def __init__(
        self,
        message: str,
        *,
        service: str,
        status: int | None = None,
        retry_after: float | None = None,
    ) -> None:
        super().__init__(message, service=service, status=status)
        self.retry_after = retry_after


class UpstreamUnavailableError(RetriableUpstreamError):
    """An upstream kept failing after every retry: the run stops and exits 3."""


class FatalUpstreamError(UpstreamError):
    """A 4xx other than 429: the request itself is wrong, so retrying cannot help."""


class UpstreamLimitError(FatalUpstreamError):
    """An answer broke one of the bridge's bounds; ``setting`` names the setting that sets it.

    Not retried (the same request would break it again): the study is parked, or, for a study
    page, the run ends (exit 3).
    """

    def __init__(self, message: str, *, service: str, status: int | None = None, setting: str) -> None:
        super().__init__(message, service=service, status=status)
        self.setting = setting


class RejectedResourceError(FatalUpstreamError):
    """The FHIR server refused a resource; ``outcome`` is the OperationOutcome's text."""

    def __init__(self, message: str, *, service: str, status: int | None, outcome: str) -> None:
        super().__init__(message, service=service, status=status)
        self.outcome = outcome


class VersionConflictError(FatalUpstreamError):
    """An ``If-Match`` precondition failed or the server reported a write conflict."""


class ResolveError(BridgeError):
    """Base of the resolver's errors; messages never name an address outside the configured bases."""


class InvalidLookupError(ResolveError):
    """The lookup itself is malformed; the message says why."""


class StudyNotFoundError(ResolveError):
    """No ImagingStudy matches, or the one that did was withdrawn."""


class NoUsableEndpointError(ResolveError):
    """The ImagingStudy exists but cannot be turned into links (no usable endpoint, ambiguity)."""


class StudyWithdrawnError(ResolveError):
    """The study's ImagingStudy carries the bridge's withdrawal extension: refused to clinicians, with why."""
