"""The one DICOM UID rule, for every place a UID comes in: archive values, FHIR identifiers, URL paths.

PS3.5 9.1: a UID is components of digits separated by dots, no component with a leading zero
(``0`` alone is allowed), 64 characters at most, and nothing else: no space, no sign, no letter.
PS3.5 6.2 pads a UI value of odd length with one trailing NUL, and the DICOM JSON model (PS3.18
F.2) carries the value without it, but archives leave padding (NUL or spaces) in their answers.

So there are two entry points, and they differ only in what surrounds the UID:

- ``is_uid`` is exact. A UID named by a caller (a URL path, a query parameter) or read from a FHIR
  identifier the bridge wrote must be the UID itself: whitespace around it is a bad request (4xx),
  never silently trimmed, so two spellings never name one study.
- ``archive_uid`` reads a value an archive sent: whitespace around it is padding and removed, as
  pydicom's ``UID`` removes it (its validity is pydicom's, checked by a test), then the same exact
  rule applies. Whitespace inside is never removed. The NUL pad is control data, removed with the
  other controls before a value is read (``values.clean_text``, ``records.raw_uid``).
"""

from __future__ import annotations

import re

# For OpenAPI and pydantic path/query validation (a Rust regex there, where ``$`` is the end of text).
UID_PATTERN = r"^(0|[1-9][0-9]*)(\.(0|[1-9][0-9]*))*$"
MAX_UID_LENGTH = 64

_UID = re.compile(UID_PATTERN)


def is_uid(value: str) -> bool:
    """Whether ``value`` is exactly a valid DICOM UID (nothing around it)."""
    return len(value) <= MAX_UID_LENGTH and _UID.fullmatch(value) is not None


def archive_uid(value: str) -> str | None:
    """The UID an archive's value holds, trimmed of its padding; None when it is not a valid UID."""
    text = value.strip()
    return text if is_uid(text) else None
