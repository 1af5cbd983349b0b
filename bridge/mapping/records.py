"""Small typed records made from QIDO-RS DICOM JSON rows (values read by bridge.mapping.dicomjson)."""

from __future__ import annotations

import hashlib
import io
import json
import warnings
from dataclasses import asdict, dataclass, replace
from typing import Any

from bridge.errors import MappingError
from bridge.mapping.dicomjson import (
    CHARSET,
    Attrs,
    charset_terms,
    read_int,
    read_items,
    read_joined,
    read_multi,
    read_person_name,
    read_person_names,
    read_required,
    read_row,
    read_text,
)
from bridge.mapping.dicomjson import DicomJson as DicomJson  # the name the record users know
from bridge.mapping.uid import archive_uid
from bridge.mapping.values import clean_text, name_problem, pydicom_reading, safe_key, vr_problem

# Attributes asked for with includefield, as tags (every QIDO-RS server accepts tags).
STUDY_FIELDS = (
    "0020000D",  # StudyInstanceUID
    "00080020",  # StudyDate
    "00080030",  # StudyTime
    "00080201",  # TimezoneOffsetFromUTC
    "00080050",  # AccessionNumber
    "00080051",  # IssuerOfAccessionNumberSequence
    "00081030",  # StudyDescription
    "00080061",  # ModalitiesInStudy
    "00201206",  # NumberOfStudyRelatedSeries
    "00201208",  # NumberOfStudyRelatedInstances
    "00100010",  # PatientName
    "00100020",  # PatientID
    "00100021",  # IssuerOfPatientID
    "00100030",  # PatientBirthDate
    "00100040",  # PatientSex
    "00080090",  # ReferringPhysicianName
    # Sequences: many archives return them when asked; Orthanc does not (see instance headers).
    "00100024",  # IssuerOfPatientIDQualifiersSequence
    "00101002",  # OtherPatientIDsSequence
    "00081032",  # ProcedureCodeSequence
    "0040100A",  # ReasonForRequestedProcedureCodeSequence
)
SERIES_FIELDS = (
    "0020000E",  # SeriesInstanceUID
    "00200011",  # SeriesNumber
    "00080060",  # Modality
    "0008103E",  # SeriesDescription
    "00201209",  # NumberOfSeriesRelatedInstances
    "00180015",  # BodyPartExamined
    "00200060",  # Laterality
    "00080021",  # SeriesDate
    "00080031",  # SeriesTime
    "00081050",  # PerformingPhysicianName
    "00081070",  # OperatorsName
    # Whose series it is: one Study Instance UID may hold several patients' series (bridge/sync/identity.py).
    "00100020",  # PatientID
    "00100021",  # IssuerOfPatientID
)
HEADER_FIELDS = (
    "00080090",  # ReferringPhysicianName
    "00080051",  # IssuerOfAccessionNumberSequence
    "00100024",  # IssuerOfPatientIDQualifiersSequence
    "00101002",  # OtherPatientIDsSequence
    "00081032",  # ProcedureCodeSequence
    "0040100A",  # ReasonForRequestedProcedureCodeSequence
)
INSTANCE_FIELDS = (
    "00080018",  # SOPInstanceUID
    "00080016",  # SOPClassUID
    "00200013",  # InstanceNumber
    "0020000E",  # SeriesInstanceUID
)


@dataclass(frozen=True, slots=True)
class Issuer:
    """An issuer of an identifier: a local namespace and/or a universal entity id with its type."""

    local: str | None = None
    universal: str | None = None
    universal_type: str | None = None


@dataclass(frozen=True, slots=True)
class Code:
    """A coded entry of a DICOM code sequence item."""

    value: str
    scheme: str | None
    meaning: str | None


@dataclass(frozen=True, slots=True)
class OtherPatientId:
    """An item of Other Patient IDs Sequence (0010,1002)."""

    value: str
    issuer: str | None
    qualifier: Issuer | None


@dataclass(frozen=True, slots=True)
class PatientIdentity:
    """Whose data a row is: PatientID ("" when empty) and Issuer of Patient ID (None when not given)."""

    patient_id: str
    issuer: str | None = None


@dataclass(frozen=True, slots=True)
class StudyRecord:
    """One study as QIDO-RS describes it; strings are as the archive sent them."""

    uid: str
    date: str | None
    time: str | None
    tz_offset: str | None
    accession: str | None
    accession_issuer: Issuer | None
    description: str | None
    modalities: tuple[str, ...]
    series_count: int | None
    instance_count: int | None
    patient_id: str | None
    patient_issuer: str | None
    patient_name: str | None
    birth_date: str | None
    sex: str | None
    referring_physician: str | None = None
    patient_issuer_qualifier: Issuer | None = None
    other_patient_ids: tuple[OtherPatientId, ...] = ()
    procedure_codes: tuple[Code, ...] = ()
    reason_codes: tuple[Code, ...] = ()
    # Why the archive's PatientName is not used (garbled in its answer); the name is then None.
    patient_name_problem: str | None = None

    @property
    def accessions(self) -> tuple[str, ...]:
        """Each value of AccessionNumber: some archives send several (VM > 1)."""
        return tuple(self.accession.split("\\")) if self.accession else ()

    def fingerprint(self) -> str:
        """A digest of everything the mapping reads from the study row."""
        fields = asdict(self)
        if fields["patient_name_problem"] is None:
            del fields["patient_name_problem"]  # studies published before it keep their digest
        return digest(fields)

    @property
    def patient(self) -> PatientIdentity:
        """The patient identity the study row names."""
        return PatientIdentity(self.patient_id or "", self.patient_issuer)


@dataclass(frozen=True, slots=True)
class SeriesRecord:
    """One series of a study, from a series-level QIDO-RS query."""

    uid: str
    number: int | None
    modality: str | None
    description: str | None
    instance_count: int | None
    body_part: str | None
    laterality: str | None
    date: str | None
    time: str | None
    performers: tuple[str, ...] = ()
    patient: PatientIdentity | None = None  # None: the archive's row did not say whose series it is


@dataclass(frozen=True, slots=True)
class InstanceRecord:
    """One instance of a series, from an instance-level QIDO-RS query."""

    uid: str
    series_uid: str
    sop_class: str | None
    number: int | None


def digest(value: Any) -> str:
    """A stable SHA-256 of JSON-able data (keys sorted)."""
    text = json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False, default=str)
    return hashlib.sha256(text.encode()).hexdigest()


def raw_uid(row: DicomJson, tag: str = "0020000D") -> str | None:
    """The UID in a DICOM JSON row without parsing the rest, for parking a row that fails to parse."""
    try:
        value = row[tag]["Value"][0]
    except (KeyError, IndexError, TypeError):
        return None
    if not isinstance(value, str):
        return None
    value = value.strip(" \x00")  # the NUL pad of PS3.5 6.2 too, which archive_uid leaves to us
    # An invalid UID is never logged or stored as such: it can be anything, a name included.
    uid = archive_uid(value)
    return uid if uid is not None else safe_key(value)


def _issuer(ds: Attrs, keyword: str) -> Issuer | None:
    items = read_items(ds, keyword)
    if not items:
        return None
    item = items[0]
    within = f"{keyword}."
    issuer = Issuer(
        local=read_text(item, "LocalNamespaceEntityID", within),
        universal=read_text(item, "UniversalEntityID", within),
        universal_type=read_text(item, "UniversalEntityIDType", within),
    )
    return issuer if issuer.local or issuer.universal else None


def _codes(ds: Attrs, keyword: str) -> tuple[Code, ...]:
    codes = []
    within = f"{keyword}."
    for item in read_items(ds, keyword):
        value = (
            read_text(item, "CodeValue", within)
            or read_text(item, "LongCodeValue", within)
            or read_text(item, "URNCodeValue", within)
        )
        if value:
            scheme = read_text(item, "CodingSchemeDesignator", within)
            codes.append(Code(value, scheme, read_text(item, "CodeMeaning", within)))
    return tuple(codes)


def _other_ids(ds: Attrs) -> tuple[OtherPatientId, ...]:
    found = []
    within = "OtherPatientIDsSequence."
    for item in read_items(ds, "OtherPatientIDsSequence"):
        value = read_text(item, "PatientID", within)
        if value:
            qualifier = _issuer(item, "IssuerOfPatientIDQualifiersSequence")
            found.append(OtherPatientId(value, read_text(item, "IssuerOfPatientID", within), qualifier))
    return tuple(found)


def parse_study(row: DicomJson) -> StudyRecord:
    """Parse a study-level QIDO-RS row; raises MappingError naming the attribute at fault."""
    ds = read_row(row, "study", STUDY_FIELDS)
    uid = read_required(ds, "StudyInstanceUID")
    return StudyRecord(
        uid=uid,
        date=read_text(ds, "StudyDate"),
        time=read_text(ds, "StudyTime"),
        tz_offset=read_text(ds, "TimezoneOffsetFromUTC"),
        accession=read_joined(ds, "AccessionNumber"),
        description=read_text(ds, "StudyDescription"),
        modalities=read_multi(ds, "ModalitiesInStudy"),
        series_count=read_int(ds, "NumberOfStudyRelatedSeries"),
        instance_count=read_int(ds, "NumberOfStudyRelatedInstances"),
        patient_id=read_text(ds, "PatientID"),
        patient_issuer=read_text(ds, "IssuerOfPatientID"),
        **_patient_name(ds),
        birth_date=read_text(ds, "PatientBirthDate"),
        sex=read_text(ds, "PatientSex"),
        **_header_fields(ds),
    )


def _patient_name(ds: Attrs) -> dict[str, Any]:
    """PatientName, or None with the reason when the archive's answer garbled it (see name_problem)."""
    element = ds.get("PatientName")
    values = element.value if element is not None else None
    for value in values if isinstance(values, list) else [values]:
        problem = name_problem(value, charset_terms(ds)) if isinstance(value, str) else None
        if problem is not None:
            return {"patient_name": None, "patient_name_problem": problem}
    return {"patient_name": read_person_name(ds, "PatientName")}


def _header_fields(ds: Attrs) -> dict[str, Any]:
    """The study fields that archives often return only in instance headers (WADO-RS metadata)."""
    return {
        "referring_physician": read_person_name(ds, "ReferringPhysicianName"),
        "patient_issuer_qualifier": _issuer(ds, "IssuerOfPatientIDQualifiersSequence"),
        "other_patient_ids": _other_ids(ds),
        "procedure_codes": _codes(ds, "ProcedureCodeSequence"),
        "reason_codes": _codes(ds, "ReasonForRequestedProcedureCodeSequence"),
        "accession_issuer": _issuer(ds, "IssuerOfAccessionNumberSequence"),
    }


def with_header(study: StudyRecord, header: DicomJson) -> StudyRecord:
    """The study completed from an instance header: what QIDO left out is taken from the header."""
    # Only the attributes read here: a full header also holds bulk data (pixels) by reference.
    ds = read_row({tag: header[tag] for tag in (*HEADER_FIELDS, CHARSET) if tag in header}, "instance header")
    found = _header_fields(ds)
    updates = {k: v for k, v in found.items() if v and not getattr(study, k)}
    return replace(study, **updates) if updates else study


def parse_series(row: DicomJson) -> SeriesRecord:
    """Parse a series-level QIDO-RS row; raises MappingError naming the attribute at fault."""
    ds = read_row(row, "series", SERIES_FIELDS)
    uid = read_required(ds, "SeriesInstanceUID")
    return SeriesRecord(
        uid=uid,
        number=read_int(ds, "SeriesNumber"),
        modality=read_text(ds, "Modality"),
        description=read_text(ds, "SeriesDescription"),
        instance_count=read_int(ds, "NumberOfSeriesRelatedInstances"),
        body_part=read_text(ds, "BodyPartExamined"),
        laterality=read_text(ds, "Laterality"),
        date=read_text(ds, "SeriesDate"),
        time=read_text(ds, "SeriesTime"),
        performers=read_person_names(ds, "PerformingPhysicianName") or read_person_names(ds, "OperatorsName"),
        patient=_patient(ds),
    )


def _patient(ds: Attrs) -> PatientIdentity | None:
    """The patient identity a row names; None when it carries no PatientID attribute at all.

    Present but empty is an identity (the empty PatientID), unlike absent: an archive that leaves
    the attribute out of a row says nothing about whose row it is.
    """
    if ds.get("PatientID") is None:
        return None
    return PatientIdentity(read_text(ds, "PatientID") or "", read_text(ds, "IssuerOfPatientID"))


def header_patient(header: DicomJson) -> PatientIdentity | None:
    """The patient identity an instance header (WADO-RS metadata) names, if it carries PatientID."""
    fields = ("00100020", "00100021")
    return _patient(
        read_row({tag: header[tag] for tag in (*fields, CHARSET) if tag in header}, "instance header")
    )


def parse_instance(row: DicomJson) -> InstanceRecord:
    """Parse an instance-level QIDO-RS row; raises MappingError naming the attribute at fault."""
    ds = read_row(row, "instance", INSTANCE_FIELDS)
    uid = read_required(ds, "SOPInstanceUID")
    series_uid = read_text(ds, "SeriesInstanceUID")
    if series_uid is None:
        raise MappingError("an instance has no SeriesInstanceUID", attribute="SeriesInstanceUID")
    return InstanceRecord(uid, series_uid, read_text(ds, "SOPClassUID"), read_int(ds, "InstanceNumber"))


# Tag of PatientName: a Part 10 file's elements come in tag order, so once one past it is read,
# the name (if the file has one) is complete.
_PATIENT_NAME_TAG = 0x00100010


def part10_patient_name(data: bytes, *, complete: bool) -> tuple[str | None, str | None] | None:
    """PatientName as pydicom decodes it from (the start of) a Part 10 file: (name, problem).

    ``complete``: ``data`` is the whole file; else it may be cut anywhere, and None says the bytes
    do not yet reach past the name. The name is decoded with the file's own Specific Character
    Set, then held to the same test as the archive's answer (``problem`` says why it is not used);
    a name of separators only is no name.
    """
    from pydicom import dcmread

    if len(data) >= 132 and data[128:132] != b"DICM":  # WADO-RS sends Part 10 files, preamble and all
        return None, "the Part 10 header cannot be read"
    try:
        with pydicom_reading("ignore"), warnings.catch_warnings():
            warnings.simplefilter("ignore")  # a cut file or odd values: judged below, not warned
            ds = dcmread(io.BytesIO(data), force=True, stop_before_pixels=True)
            tags = [int(tag) for tag in ds.keys()]
            if not complete and (not tags or max(tags) <= _PATIENT_NAME_TAG):
                return None
            element = ds.get("PatientName")
            text = clean_text(str(element)) if element is not None and element != "" else None
            charset = ds.get("SpecificCharacterSet")
    except Exception:  # noqa: BLE001 - pydicom's errors for cut or broken files are of many types
        return None if not complete else (None, "the Part 10 header cannot be read")
    if text is None or not text.replace("=", "").replace("^", "").strip():
        return None, None
    terms = [] if charset is None else [str(c) for c in ([charset] if isinstance(charset, str) else charset)]
    problem = name_problem(text, terms) or vr_problem(text, "PN")
    return (None, problem) if problem else (text, None)
