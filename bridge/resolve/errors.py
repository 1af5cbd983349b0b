"""Errors of the resolver; the API maps each to an HTTP status, nothing else here knows HTTP.

::

    BridgeError
    └── ResolveError                  a lookup cannot give links
        ├── InvalidLookupError        the caller's id, UID, reference or option is malformed (422)
        ├── StudyNotFoundError        no (live) ImagingStudy matches (404)
        └── NoUsableEndpointError     the ImagingStudy has no usable WADO-RS endpoint,
                                      or the lookup is ambiguous (409)

Messages name ids, UIDs and reasons, never patient data or an address outside the configured bases.
"""

from __future__ import annotations

from bridge.errors import BridgeError


class ResolveError(BridgeError):
    """Base of the resolver's errors."""


class InvalidLookupError(ResolveError):
    """The lookup itself is malformed; the message says why."""


class StudyNotFoundError(ResolveError):
    """No ImagingStudy matches, or the one that did was withdrawn."""


class NoUsableEndpointError(ResolveError):
    """The ImagingStudy exists but cannot be turned into links (no usable endpoint, ambiguity)."""
