"""Rejected images (IHE IOCM): rejection notes and the instances they withdraw, as plain data.

A rejection note is a Key Object Selection Document (SOP Class 1.2.840.10008.5.1.4.1.1.88.59)
whose Concept Name is one of the rejection reasons of DICOM CID 7011 (IHE RAD TF-3 IOCM): the
instances it lists in its Current Requested Procedure Evidence Sequence are withdrawn. An archive
that does not apply the notes itself (Orthanc does not) keeps listing those instances; the bridge
leaves them, the series they empty and the notes themselves out of the ImagingStudy.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, replace
from typing import Any

from bridge.mapping.records import DicomJson, InstanceRecord, SeriesRecord, StudyRecord

KEY_OBJECT_SELECTION = "1.2.840.10008.5.1.4.1.1.88.59"
# DICOM CID 7011 "Rejected for Quality Reasons" and the IOCM reasons (PS3.16, DCM codes).
REJECTION_REASONS = {
    "113001": "Rejected for Quality Reasons",
    "113037": "Rejected for Patient Safety Reasons",
    "113038": "Incorrect Modality Worklist Entry",
    "113039": "Data Retention Policy Expired",
}
# The modality of a Key Object Selection Document's series: only such series are read for notes.
KEY_OBJECT_MODALITY = "KO"

_SOP_CLASS = "00080016"
_SOP_INSTANCE = "00080018"
_SERIES_UID = "0020000E"
_STUDY_UID = "0020000D"
_CONCEPT_NAME = "0040A043"
_CODE_VALUE = "00080100"
_SCHEME = "00080102"
_EVIDENCE = "0040A375"  # Current Requested Procedure Evidence Sequence
_REFERENCED_SERIES = "00081115"
_REFERENCED_SOP = "00081199"
_REFERENCED_SOP_INSTANCE = "00081155"


@dataclass(frozen=True, slots=True)
class RejectionNote:
    """One rejection note: its own instance, its reason and the (series, SOP instance) UIDs it withdraws."""

    uid: str
    series_uid: str
    reason: str  # the DCM code
    withdrawn: frozenset[tuple[str, str]]


def _first(item: DicomJson, tag: str) -> Any:
    values = (item.get(tag) or {}).get("Value") or []
    return values[0] if values else None


def _items(item: DicomJson, tag: str) -> list[DicomJson]:
    return [v for v in (item.get(tag) or {}).get("Value") or [] if isinstance(v, dict)]


def rejection_note(dataset: DicomJson, study_uid: str) -> RejectionNote | None:
    """The rejection note in one instance's metadata (DICOM JSON), or None if it is not one.

    Only references to ``study_uid`` are kept: a note's references to another study withdraw
    nothing from this one.
    """
    if _first(dataset, _SOP_CLASS) != KEY_OBJECT_SELECTION:
        return None
    reasons = [
        code
        for item in _items(dataset, _CONCEPT_NAME)
        if (code := _first(item, _CODE_VALUE)) in REJECTION_REASONS and _first(item, _SCHEME) == "DCM"
    ]
    uid, series_uid = _first(dataset, _SOP_INSTANCE), _first(dataset, _SERIES_UID)
    if not reasons or not isinstance(uid, str) or not isinstance(series_uid, str):
        return None
    withdrawn = frozenset(
        (series, sop)
        for evidence in _items(dataset, _EVIDENCE)
        if _first(evidence, _STUDY_UID) == study_uid
        for referenced_series in _items(evidence, _REFERENCED_SERIES)
        if isinstance(series := _first(referenced_series, _SERIES_UID), str)
        for referenced in _items(referenced_series, _REFERENCED_SOP)
        if isinstance(sop := _first(referenced, _REFERENCED_SOP_INSTANCE), str)
    )
    return RejectionNote(uid, series_uid, reasons[0], withdrawn)


def rejection_notes(datasets: Iterable[DicomJson], study_uid: str) -> list[RejectionNote]:
    """The rejection notes among a series' instance metadata."""
    return [note for ds in datasets if (note := rejection_note(ds, study_uid)) is not None]


@dataclass(frozen=True, slots=True)
class Remaining:
    """What is left of a study once its rejection notes are applied."""

    study: StudyRecord
    series: list[SeriesRecord]
    instances: list[InstanceRecord]
    withdrawn: frozenset[str]  # SOP Instance UIDs of the listed instances withdrawn, the notes included


def apply_rejections(
    study: StudyRecord,
    series: Sequence[SeriesRecord],
    instances: Sequence[InstanceRecord],
    notes: Sequence[RejectionNote],
) -> Remaining:
    """The study without the withdrawn instances, the notes, and the series left empty.

    ``instances`` are every instance the archive lists for the study (instance-level QIDO), so the
    counts are those of what is really left, whether or not a note names instances that are gone
    already: every count, the study's and each series', is counted from that list.
    """
    gone = {pair for note in notes for pair in note.withdrawn} | {(n.series_uid, n.uid) for n in notes}
    left = [i for i in instances if (i.series_uid, i.uid) not in gone]
    per_series: dict[str, int] = {}
    for instance in left:
        per_series[instance.series_uid] = per_series.get(instance.series_uid, 0) + 1
    kept = [replace(s, instance_count=per_series[s.uid]) for s in series if per_series.get(s.uid)]
    remaining_study = replace(study, series_count=len(kept), instance_count=len(left))
    withdrawn = frozenset(i.uid for i in instances if (i.series_uid, i.uid) in gone)
    return Remaining(remaining_study, kept, left, withdrawn)
