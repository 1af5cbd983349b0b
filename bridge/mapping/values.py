"""DICOM values cleaned and checked against their VR before the mapping reads them.

Pure functions, no I/O. Problems are described by attribute and VR, never by the value itself:
a malformed UID or PatientID can carry a name.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Literal

from bridge.errors import MappingError
from bridge.mapping.uid import archive_uid

# pydicom is imported where bytes are decoded or the dictionary is asked (rare rows): importing it
# (and numpy, which it loads) is about a third of `bridge sync`'s start-up.

# C0 controls, DEL and C1 controls: not text in any DICOM VR the mapping reads, and FHIR's
# string type refuses most of them. ESC is among them: pydicom has already applied the ISO 2022
# escape sequences when it decoded the value.
_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f]")

# Maximum length in characters per VR (PS3.5 Table 6.2-1); PN's limit is per component group.
MAX_LENGTH: dict[str, int] = {
    "AE": 16,
    "AS": 4,
    "CS": 16,
    "DA": 10,  # 8, or 10 for the ACR-NEMA form YYYY.MM.DD that older files still carry
    "DS": 16,
    "DT": 26,
    "IS": 12,
    "LO": 64,
    "LT": 10240,
    "PN": 64,
    "SH": 16,
    "ST": 1024,
    "TM": 16,
    "UI": 64,
}
# VRs whose single value may not hold a backslash (it separates values in DICOM).
_NO_BACKSLASH = frozenset({"AE", "AS", "CS", "DA", "DS", "DT", "IS", "LO", "PN", "SH", "TM", "UI"})
TEXT_VRS = frozenset({*MAX_LENGTH, "UC", "UR", "UT"})

_PATTERN: dict[str, re.Pattern[str]] = {
    "CS": re.compile(r"^[A-Z0-9_ ]+$"),
    "DA": re.compile(r"^\d{8}$|^\d{4}\.\d{2}\.\d{2}$"),
    "TM": re.compile(r"^\d{2}(?::?\d{2}(?::?\d{2}(?:\.\d{1,6})?)?)?$"),
    "DT": re.compile(r"^\d{4}(?:\d{2}){0,5}(?:\.\d{1,6})?(?:[+-]\d{4})?$"),
    "IS": re.compile(r"^[+-]?\d+$"),
    "DS": re.compile(r"^[+-]?(?:\d+\.?\d*|\.\d+)(?:[eE][+-]?\d+)?$"),
}

# An attribute whose value is invalid for its VR parks the study (records.py raises MappingError
# naming it), with one exception: demographics the EHR owns. Their invalid value is left out of the
# Patient the bridge may create, rather than parking a study a radiologist can open.
LEFT_OUT_WHEN_INVALID = frozenset({"PatientBirthDate", "PatientSex"})


def clean_text(value: str) -> str | None:
    """The value without control characters and surrounding spaces; None when nothing is left.

    DICOM pads values with spaces and allows empty (Type 2) values: absent and empty are the same.
    """
    text = _CONTROL.sub("", value).strip(" ")
    return text or None


def vr_problem(value: str, vr: str) -> str | None:
    """What is wrong with a (cleaned, single) value for its VR, or None; never quotes the value."""
    limit = MAX_LENGTH.get(vr)
    if vr == "PN":
        groups = value.split("=")
        if len(groups) > 3:
            return "has more than three component groups"
        if any(len(group) > MAX_LENGTH["PN"] for group in groups):
            return f"has a component group longer than {MAX_LENGTH['PN']} characters"
    elif limit is not None and len(value) > limit:
        return f"is longer than {limit} characters"
    if vr in _NO_BACKSLASH and "\\" in value:
        return "holds a backslash (several values where one is expected)"
    if vr == "UI":
        if archive_uid(value) is None:
            return "is not a valid DICOM UID (digits and dots, no leading zeros)"
        return None
    pattern = _PATTERN.get(vr)
    if pattern is not None and not pattern.match(value):
        return f"is not a valid {vr} value"
    return None


def check_value(value: str, vr: str, attribute: str) -> str:
    """``value`` if valid for ``vr``; else a MappingError naming the attribute (not the value)."""
    problem = vr_problem(value, vr)
    if problem is not None:
        raise MappingError(f"{attribute} {problem} (VR {vr})", attribute=attribute)
    return value


def decode_text(raw: bytes, vr: str, encodings: Sequence[str]) -> str | None:
    """Text sent as bytes (InlineBinary) decoded per the character set, or None.

    ``encodings`` are Python codec names, as ``pydicom.charset.convert_encodings`` gives for the
    Specific Character Set. None when the bytes are not text in that character set (the value is
    then left out): a Python bytes repr must never reach a resource.
    """
    from pydicom.charset import decode_bytes
    from pydicom.valuerep import PersonName

    charsets = list(encodings) or ["ISO_IR 6"]
    raw = raw.rstrip(b"\x00 ")
    if not raw:
        return None
    try:
        with pydicom_reading("raise"):
            if vr == "PN":
                return str(PersonName(raw, encodings=charsets).decode())
            if vr in ("SH", "LO", "ST", "LT", "UC", "UT"):
                return decode_bytes(raw, charsets, {0x5C} if vr != "UT" else set())
            return raw.decode("ascii")  # the other text VRs use the default repertoire only
    except (UnicodeError, LookupError, ValueError):
        return None


@contextmanager
def pydicom_reading(mode: Literal["raise", "ignore"]) -> Iterator[None]:
    """Set pydicom's reading validation for the block.

    ``raise``: undecodable bytes raise (pydicom else replaces them, with a warning). ``ignore``: no
    value checks (pydicom would warn and log raw values, patient data).
    """
    from pydicom import config

    saved = config.settings.reading_validation_mode
    config.settings.reading_validation_mode = config.RAISE if mode == "raise" else config.IGNORE
    try:
        yield
    finally:
        config.settings.reading_validation_mode = saved


def safe_key(value: str) -> str:
    """A stand-in for an invalid UID in logs and the store: a digest, never the value itself."""
    return "invalid-uid:" + hashlib.sha256(value.encode("utf-8", "surrogatepass")).hexdigest()[:16]


# What an archive leaves of a name it could not decode: ISO 2022 escape sequences that lost their
# ESC byte (JIS X 0208 "$B", "$@", "(B", "(J"; KS X 1001 "$)C"), the ESC byte itself, the
# replacement character, and the "?" a transcoder writes for a character its target lacks.
_ISO2022_REMNANT = re.compile(r"\x1b|\$[B@]|\$\)C|\$\(D|(?<![A-Za-z])\([BJ](?![a-z])")
_PLACEHOLDERS = frozenset("^=? ")


def name_problem(text: str, charset: Sequence[str] = ()) -> str | None:
    """Why a person name the archive answered is garbled, or None when it reads as a name.

    ``charset`` holds the Specific Character Set's defined terms as the answer declared them; a
    character no declared set can hold was not decoded from it. A name of separators only (``^``,
    ``=``) with a placeholder among them is what Orthanc at a Latin-1 DefaultEncoding answers for
    a name it cannot represent. The reason names the fault, never the name.
    """
    if "\ufffd" in text:
        return "replacement characters (U+FFFD)"
    if _ISO2022_REMNANT.search(text):
        return "ISO 2022 escape remnants"
    if "?" in text:
        return "'?' placeholders"
    if text.strip() and set(text) <= _PLACEHOLDERS and "^" in text:
        return "component separators only"
    codecs = _codecs(charset)
    if codecs and any(not _encodable(char, codecs) for char in set(text)):
        return "characters the declared Specific Character Set cannot hold"
    return None


def _codecs(charset: Sequence[str]) -> list[str]:
    if not charset:
        return []
    from pydicom.charset import convert_encodings

    with pydicom_reading("ignore"):
        try:
            return list(convert_encodings(list(charset)))
        except (LookupError, ValueError):
            return []  # an unknown set: nothing to hold the name against


def _encodable(char: str, codecs: Sequence[str]) -> bool:
    for codec in codecs:
        try:
            char.encode(codec)
        except (UnicodeError, LookupError):
            continue
        return True
    return False
