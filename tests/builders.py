"""Builders for QIDO-RS DICOM JSON rows (tag -> {"vr", "Value"}) and the records and context made from them.

Every keyword has a plausible default; pass ``None`` to leave an attribute out of the row, as an
archive does when it has no value for it.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from bridge.mapping.context import MappingContext
from bridge.mapping.records import DicomJson, SeriesRecord, StudyRecord, parse_series, parse_study
from bridge.mapping.tables import load_tables

DATA = Path(__file__).parent / "data"

# A UID root reserved for examples (pydicom's), so built UIDs are valid and never real.
UID_ROOT = "1.2.826.0.1.3680043.8.498"

PUBLIC_BASE = "https://pacs.example.org/dicom-web"
PATIENT_SYSTEM = "urn:oid:2.16.840.1.113883.3.9999.1"

# Tags, named as in PS3.6.
STUDY_INSTANCE_UID = "0020000D"
SERIES_INSTANCE_UID = "0020000E"


def uid(*parts: int) -> str:
    """A valid, made-up DICOM UID under the example root."""
    return ".".join([UID_ROOT, *(str(p) for p in parts)])


def element(vr: str, *values: Any) -> dict[str, Any]:
    """One DICOM JSON attribute; without values it is present but empty, as QIDO sends it."""
    return {"vr": vr, "Value": list(values)} if values else {"vr": vr}


def person_name(name: str | Mapping[str, str]) -> dict[str, Any]:
    """A PN attribute: a string is the Alphabetic group; a mapping gives the groups by name."""
    groups = {"Alphabetic": name} if isinstance(name, str) else dict(name)
    return {"vr": "PN", "Value": [groups]}


def issuer_sequence(
    local: str | None = None, universal: str | None = None, universal_type: str | None = None
) -> dict[str, Any]:
    """An Issuer of Accession Number Sequence (0008,0051) with one item."""
    item: DicomJson = {}
    if local is not None:
        item["00400031"] = element("UT", local)  # LocalNamespaceEntityID
    if universal is not None:
        item["00400032"] = element("UT", universal)  # UniversalEntityID
    if universal_type is not None:
        item["00400033"] = element("CS", universal_type)  # UniversalEntityIDType
    return {"vr": "SQ", "Value": [item]}


def _put(row: DicomJson, tag: str, vr: str, value: Any) -> None:
    if value is None:
        return
    if isinstance(value, tuple | list):
        row[tag] = element(vr, *value)
    else:
        row[tag] = element(vr, value)


def study_row(
    *,
    study_uid: str | None = uid(1),
    date: str | None = "20240115",
    time: str | None = "101530",
    tz_offset: str | None = None,
    accession: str | None = "ACC0001",
    accession_issuer: Mapping[str, str] | None = None,
    description: str | None = "CT Chest with contrast",
    modalities: Sequence[str] | None = ("CT",),
    series_count: int | None = 1,
    instance_count: int | None = 120,
    patient_id: str | None = "PID0001",
    patient_issuer: str | None = None,
    patient_name: str | Mapping[str, str] | None = "Doe^Jane",
    birth_date: str | None = "19700101",
    sex: str | None = "F",
    extra: Mapping[str, Any] | None = None,
) -> DicomJson:
    """A study-level QIDO-RS row. ``accession_issuer`` takes local/universal/universal_type."""
    row: DicomJson = {}
    _put(row, "00080020", "DA", date)
    _put(row, "00080030", "TM", time)
    _put(row, "00080050", "SH", accession)
    if accession_issuer is not None:
        row["00080051"] = issuer_sequence(**accession_issuer)
    _put(row, "00080061", "CS", None if modalities is None else list(modalities))
    _put(row, "00080201", "SH", tz_offset)
    _put(row, "00081030", "LO", description)
    if patient_name is not None:
        row["00100010"] = person_name(patient_name)
    _put(row, "00100020", "LO", patient_id)
    _put(row, "00100021", "LO", patient_issuer)
    _put(row, "00100030", "DA", birth_date)
    _put(row, "00100040", "CS", sex)
    _put(row, STUDY_INSTANCE_UID, "UI", study_uid)
    _put(row, "00201206", "IS", series_count)
    _put(row, "00201208", "IS", instance_count)
    row.update(extra or {})
    return row


def series_row(
    *,
    series_uid: str | None = uid(1, 1),
    number: int | None = 1,
    modality: str | None = "CT",
    description: str | None = "Axial 5 mm",
    instance_count: int | None = 120,
    body_part: str | None = "CHEST",
    laterality: str | None = None,
    date: str | None = "20240115",
    time: str | None = "101602",
    extra: Mapping[str, Any] | None = None,
) -> DicomJson:
    """A series-level QIDO-RS row."""
    row: DicomJson = {}
    _put(row, "00080021", "DA", date)
    _put(row, "00080031", "TM", time)
    _put(row, "00080060", "CS", modality)
    _put(row, "0008103E", "LO", description)
    _put(row, "00180015", "CS", body_part)
    _put(row, SERIES_INSTANCE_UID, "UI", series_uid)
    _put(row, "00200011", "IS", number)
    _put(row, "00200060", "CS", laterality)
    _put(row, "00201209", "IS", instance_count)
    row.update(extra or {})
    return row


def study_series_row(study_uid: str, series_uid: str, **kwargs: Any) -> DicomJson:
    """A series row of a search across studies (``/series?StudyInstanceUID=a,b``): it names its study."""
    return {**series_row(series_uid=series_uid, **kwargs), STUDY_INSTANCE_UID: element("UI", study_uid)}


def study(**kwargs: Any) -> StudyRecord:
    """The StudyRecord parsed from ``study_row(**kwargs)``."""
    return parse_study(study_row(**kwargs))


def series(**kwargs: Any) -> SeriesRecord:
    """The SeriesRecord parsed from ``series_row(**kwargs)``."""
    return parse_series(series_row(**kwargs))


def context(**overrides: Any) -> MappingContext:
    """A MappingContext with the bundled tables and test systems; keywords override fields."""
    values: dict[str, Any] = {
        "source_name": "test-pacs",
        "public_base": PUBLIC_BASE,
        "tables": load_tables(),
        "patient_system": PATIENT_SYSTEM,
        "timezone": "UTC",
    }
    values.update(overrides)
    return MappingContext(**values)


def load_json(name: str) -> Any:
    """A recorded sample from tests/data/."""
    return json.loads((DATA / name).read_text(encoding="utf-8"))


def rejection_note_json(
    study_uid: str,
    series_uid: str,
    note_uid: str,
    withdrawn: Mapping[str, Sequence[str]],
    *,
    reason: str = "113001",
    scheme: str = "DCM",
    sop_class: str = "1.2.840.10008.5.1.4.1.1.88.59",
) -> DicomJson:
    """The WADO-RS metadata of a Key Object Selection rejection note withdrawing ``withdrawn``.

    ``withdrawn`` maps a Series Instance UID to the SOP Instance UIDs listed for it in the
    Current Requested Procedure Evidence Sequence (IHE IOCM).
    """
    referenced_series = [
        {
            "0020000E": element("UI", series),
            "00081199": {
                "vr": "SQ",
                "Value": [
                    {"00081150": element("UI", "1.2.840.10008.5.1.4.1.1.2"), "00081155": element("UI", sop)}
                    for sop in sops
                ],
            },
        }
        for series, sops in withdrawn.items()
    ]
    return {
        "00080016": element("UI", sop_class),
        "00080018": element("UI", note_uid),
        "00080060": element("CS", "KO"),
        "0020000D": element("UI", study_uid),
        "0020000E": element("UI", series_uid),
        "0040A043": {
            "vr": "SQ",
            "Value": [
                {
                    "00080100": element("SH", reason),
                    "00080102": element("SH", scheme),
                    "00080104": element("LO", "Rejected for Quality Reasons"),
                }
            ],
        },
        "0040A375": {
            "vr": "SQ",
            "Value": [
                {"0020000D": element("UI", study_uid), "00081115": {"vr": "SQ", "Value": referenced_series}}
            ],
        },
    }
