"""Rejected images (IHE IOCM) the gateway never serves, though the archive still holds them.

An archive that does not apply rejection notes itself (Orthanc does not) keeps serving the
instances they withdraw. The sync leaves them out of the published ImagingStudy and names each in
an extension (bridge/mapping/context.py, WITHDRAWN_INSTANCE_EXTENSION), which the resolver reads
into ``StudyLocation.withdrawn``: the same published study that decides which series are shown
decides which instances are. So, for a study with withdrawn instances:

- a retrieve naming a withdrawn instance (the instance, its metadata, frames, rendering, bulk data)
  is refused as not found;
- metadata and instance searches are read whole and the withdrawn instances' rows left out;
- a whole series (or its rendering, thumbnail) holding a withdrawn instance, and the whole study,
  are refused, not trimmed: a multipart answer cannot be filtered part by part as it streams;
  the instances shown can be retrieved one by one;
- the nginx front sends no request of the study straight to the archive (its grants are kept per
  series, not per instance): `bridge serve` answers them all.

A study without withdrawn instances costs nothing more.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Iterable, Sequence
from typing import Any

from bridge.errors import BridgeError
from bridge.gateway.paths import DicomwebPath
from bridge.gateway.qido import SOP_UID, STUDY_UID, value_of
from bridge.resolve.links import StudyLocation

# The archive's rows at a path (relative to the study's base) for the given QIDO parameters.
Rows = Callable[[str, Sequence[tuple[str, str]]], Awaitable[list[Any]]]
WITHDRAWN = "withdrawn from clinicians: a rejection note (IHE IOCM) rejected it"


def named_refusal(route: DicomwebPath, study: StudyLocation) -> str | None:
    """Why a request naming a withdrawn instance is refused, or None (no archive asked)."""
    if route.instance_uid is not None and route.instance_uid in study.withdrawn:
        return f"instance {route.instance_uid}: {WITHDRAWN}"
    return None


def read_whole(route: DicomwebPath, study: StudyLocation) -> bool:
    """Whether the answer is read whole to leave withdrawn rows out: metadata or an instance search."""
    return bool(study.withdrawn) and (
        route.metadata or (route.kind == "search" and route.level == "instances")
    )


async def refusal(route: DicomwebPath, study: StudyLocation, rows: Rows) -> str | None:
    """Why a request within a study with withdrawn instances is refused, or None to serve it.

    ``rows`` asks the archive; it is called only for a whole series of such a study, to learn
    whether the series holds a withdrawn instance.
    """
    named = named_refusal(route, study)
    if named is not None or not study.withdrawn or route.kind != "retrieve" or route.metadata:
        return named
    if route.level == "studies":
        return (
            f"study {study.study_uid}: it holds images a rejection note withdrew, so it is not served "
            "whole; retrieve its series or instances one by one"
        )
    if route.level == "series" and route.series_uid is not None:
        held = await rows(
            f"studies/{study.study_uid}/series/{route.series_uid}/instances", [("includefield", SOP_UID)]
        )
        if any(isinstance(row, dict) and value_of(row, SOP_UID) in study.withdrawn for row in held):
            return (
                f"series {route.series_uid}: it holds images a rejection note withdrew, so it is not "
                "served whole; retrieve its instances one by one"
            )
    return None


def shown(rows: Iterable[Any], withdrawn: frozenset[str]) -> list[Any]:
    """``rows`` (DICOM JSON: metadata or QIDO) without those of withdrawn instances."""
    return [row for row in rows if not (isinstance(row, dict) and value_of(row, SOP_UID) in withdrawn)]


async def shown_across(rows: Sequence[Any], locate: Callable[[str], Awaitable[StudyLocation]]) -> list[Any]:
    """Instance rows of a search across studies, without the withdrawn ones of each published study.

    Each study named is located once (the resolver's cached look-up); a study the resolver cannot
    locate (not published, retired) has no withdrawn instances it knows of, and its rows stay
    (a caller limited to one patient has had them checked against its published studies already).
    """
    studies = {uid for row in rows if isinstance(row, dict) and (uid := value_of(row, STUDY_UID)) is not None}
    withdrawn: set[str] = set()
    for uid in sorted(studies):
        try:
            withdrawn |= (await locate(uid)).withdrawn
        except BridgeError:
            continue
    return shown(rows, frozenset(withdrawn)) if withdrawn else list(rows)
