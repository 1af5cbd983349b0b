"""The DICOMweb routes the gateway serves (PS3.18 QIDO-RS and WADO-RS), parsed from a request path; pure.

Anything else is not forwarded: the archive may offer more (its own REST API, STOW-RS, admin
pages) and none of that is the caller's business.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Literal

from bridge.mapping.uid import is_uid

_RENDERS = frozenset({"metadata", "rendered", "thumbnail"})
_FRAMES = re.compile(r"^[1-9][0-9]{0,8}(,[1-9][0-9]{0,8}){0,999}$")
_BULK = re.compile(r"^[0-9A-Fa-f]{8}(\.[0-9]+)?$")  # Orthanc's bulk data: a tag path per segment


@dataclass(frozen=True, slots=True)
class DicomwebPath:
    """One request path the gateway serves: a search or a retrieve, and the study it touches."""

    kind: Literal["search", "retrieve"]
    level: Literal["studies", "series", "instances"]  # what a search answers with
    study_uid: str | None  # None only for searches across studies
    path: str  # as forwarded, relative to the DICOMweb base: "studies/1.2.3/metadata"
    series_uid: str | None = None  # the series the path names, if it names one
    instance_uid: str | None = None  # the SOP instance the path names, if it names one

    @property
    def metadata(self) -> bool:
        """Whether the path asks for metadata (DICOM JSON, filtered row by row for one patient)."""
        return self.kind == "retrieve" and self.path.endswith("/metadata")


def _instance_tail(rest: list[str]) -> bool:
    """What may follow ``instances/{uid}``: a render, frames (and their renders) or bulk data."""
    if not rest:
        return True
    if len(rest) == 1:
        return rest[0] in _RENDERS
    if rest[0] == "frames":
        return bool(_FRAMES.match(rest[1])) and (
            len(rest) == 2 or (len(rest) == 3 and rest[2] in ("rendered", "thumbnail"))
        )
    if rest[0] == "bulk":
        return 1 < len(rest) <= 9 and all(_BULK.match(part) for part in rest[1:])
    return False


def parse(path: str) -> DicomwebPath | None:
    """The DICOMweb route of ``path`` (relative to /dicom-web), or None if the gateway does not serve it."""
    parts = path.strip("/").split("/") if path.strip("/") else []
    if len(parts) > 16 or any(not part for part in parts):
        return None
    joined = "/".join(parts)
    if len(parts) == 1 and parts[0] in ("studies", "series", "instances"):
        return DicomwebPath("search", parts[0], None, joined)  # type: ignore[arg-type]
    if len(parts) < 2 or parts[0] != "studies" or not is_uid(parts[1]):
        return None
    study = parts[1]
    rest = parts[2:]
    if not rest or (len(rest) == 1 and rest[0] in _RENDERS):
        return DicomwebPath("retrieve", "studies", study, joined)
    if rest == ["series"] or rest == ["instances"]:
        return DicomwebPath("search", rest[0], study, joined)  # type: ignore[arg-type]
    if rest[0] != "series" or not is_uid(rest[1]):
        return None
    tail = rest[2:]
    series = rest[1]
    if not tail or (len(tail) == 1 and tail[0] in _RENDERS):
        return DicomwebPath("retrieve", "series", study, joined, series)
    if tail == ["instances"]:
        return DicomwebPath("search", "instances", study, joined, series)
    if tail[0] == "instances" and len(tail) >= 2 and is_uid(tail[1]) and _instance_tail(tail[2:]):
        return DicomwebPath("retrieve", "instances", study, joined, series, tail[1])
    return None
