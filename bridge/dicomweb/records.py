"""Small typed records parsed from QIDO-RS DICOM JSON: read directly, or with pydicom when unusual."""

from __future__ import annotations

import hashlib
import io
import json
import re
import warnings
from collections.abc import Sequence
from dataclasses import asdict, dataclass, replace
from typing import TYPE_CHECKING, Any

from bridge.errors import MappingError
from bridge.mapping.uid import archive_uid
from bridge.mapping.values import (
    LEFT_OUT_WHEN_INVALID,
    check_value,
    clean_text,
    decode_inline_text,
    decode_text,
    name_problem,
    pydicom_reading,
    safe_key,
    vr_problem,
)

if TYPE_CHECKING:
    # pydicom itself is imported only for a row the direct reading leaves to it (see _attrs)
    from pydicom import Dataset

DicomJson = dict[str, Any]

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
CHARSET = "00080005"  # SpecificCharacterSet: needed to read the others right
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


@dataclass(frozen=True, slots=True)
class _Element:
    """One attribute of a row, as the parsers read it.

    ``value`` is what pydicom's ``DataElement.value`` would be with its single values made
    ``str`` (every reader below takes ``str()`` of them): None when empty, a str, bytes (a value
    pydicom kept as bytes), a list of those when the attribute holds several values, or a list of
    items (``_Attrs``) for a sequence.
    """

    tag: int
    vr: str
    value: Any
    vm: int


@dataclass(frozen=True, slots=True)
class _Attrs:
    """A row or a sequence item: its attributes by keyword, and its character set as codecs."""

    elements: dict[str, _Element]
    encodings: tuple[str, ...] = ()

    def get(self, keyword: str) -> _Element | None:
        return self.elements.get(keyword)


# VRs read straight from the DICOM JSON (strings as they are; UI stripped as pydicom's UID does).
# Anything else, and any value of an unusual shape, is read through pydicom: the rare row pays
# pydicom's cost, the common one does not (pydicom builds a full DataElement, and inspects the
# bulk data handler's signature, per attribute: the largest CPU cost of a sync beyond HTTP).
_PLAIN_VRS = frozenset({"AE", "AS", "CS", "DA", "DT", "LO", "LT", "SH", "ST", "TM", "UC", "UI", "UR", "UT"})
_MULTI_VALUED_TEXT = _PLAIN_VRS - {"LT", "ST", "UT"}  # pydicom splits their values at a backslash
_FAST_VRS = _PLAIN_VRS | {"IS", "PN", "SQ"}
_PN_GROUPS = frozenset({"Alphabetic", "Ideographic", "Phonetic"})
_HEX_TAG = re.compile(r"^[0-9A-Fa-f]{8}$")


def _attrs(row: DicomJson, level: str, fields: Sequence[str] | None = None) -> _Attrs:
    """The row's attributes (``fields`` only, when given), read as pydicom would read them.

    Archives answer with more attributes than asked for; reading only the wanted ones halves
    the cost. Raises MappingError naming the attribute pydicom cannot read.
    """
    if not isinstance(row, dict):
        raise MappingError(f"{level} row is not a DICOM JSON object")
    if fields is not None:
        row = {tag: row[tag] for tag in (*fields, CHARSET) if tag in row}
    row = decode_inline_text(row)
    fast = _plain_item(row)
    if fast is not None:
        return fast
    return _from_dataset(_dataset(row, level))


def _plain_item(row: DicomJson) -> _Attrs | None:
    """The row read directly, or None when any attribute needs pydicom's reading."""
    elements: dict[str, _Element] = {}
    for tag, element in row.items():
        if not isinstance(element, dict) or not _HEX_TAG.match(tag):
            return None
        vr = element.get("vr")
        keys = element.keys() - {"vr"}
        if vr not in _FAST_VRS or not keys <= {"Value"}:
            return None
        raw = element.get("Value", [])
        if not isinstance(raw, list):
            return None
        values: list[Any] = []
        for value in raw:
            read = _plain_value(value, vr)
            if read is None:
                return None
            values.append(read)
        number = int(tag, 16)
        keyword = _keyword(number)
        if vr == "SQ":
            elements[keyword] = _Element(number, vr, values or None, len(values))
            continue
        if len(values) > 1:
            elements[keyword] = _Element(number, vr, values, len(values))
        elif values and values[0] != "":
            elements[keyword] = _Element(number, vr, values[0], 1)
        else:
            elements[keyword] = _Element(number, vr, None, 0)
    elements.pop("", None)  # private and unknown attributes: no reader asks for them
    return _Attrs(elements)


def _plain_value(value: Any, vr: str) -> Any:
    """One value as pydicom would hold it, made str; None when pydicom must read it."""
    if vr in _PLAIN_VRS:
        # pydicom splits a value holding a backslash into several values
        if not isinstance(value, str) or ("\\" in value and vr in _MULTI_VALUED_TEXT):
            return None
        return value.strip() if vr == "UI" else value
    if vr == "IS":
        # pydicom normalises IS strings ("007 " reads as 7); only JSON integers are read here
        return str(value) if type(value) is int else None
    if vr == "PN":
        if not isinstance(value, dict) or not value.keys() <= _PN_GROUPS:
            return None
        if not all(isinstance(v, str) for v in value.values()):
            return None
        if "Phonetic" in value:
            groups = [value.get("Alphabetic", ""), value.get("Ideographic", ""), value["Phonetic"]]
        elif "Ideographic" in value:
            groups = [value.get("Alphabetic", ""), value["Ideographic"]]
        else:
            groups = [value.get("Alphabetic", "")]
        name = "=".join(groups)
        return None if "\\" in name else name
    if vr == "SQ":
        return _plain_item(value) if isinstance(value, dict) else None
    return None


# The keywords of the attributes the parsers read (pydicom's dictionary, checked by a test). The
# direct reading names only these: no reader asks for another, and looking names up in pydicom's
# dictionary would import pydicom at start-up.
KEYWORDS: dict[int, str] = {
    0x00080016: "SOPClassUID",
    0x00080018: "SOPInstanceUID",
    0x00080020: "StudyDate",
    0x00080021: "SeriesDate",
    0x00080030: "StudyTime",
    0x00080031: "SeriesTime",
    0x00080050: "AccessionNumber",
    0x00080051: "IssuerOfAccessionNumberSequence",
    0x00080060: "Modality",
    0x00080061: "ModalitiesInStudy",
    0x00080090: "ReferringPhysicianName",
    0x00080100: "CodeValue",
    0x00080102: "CodingSchemeDesignator",
    0x00080104: "CodeMeaning",
    0x00080119: "LongCodeValue",
    0x00080120: "URNCodeValue",
    0x00080201: "TimezoneOffsetFromUTC",
    0x00081030: "StudyDescription",
    0x00081032: "ProcedureCodeSequence",
    0x0008103E: "SeriesDescription",
    0x00081050: "PerformingPhysicianName",
    0x00081070: "OperatorsName",
    0x00100010: "PatientName",
    0x00100020: "PatientID",
    0x00100021: "IssuerOfPatientID",
    0x00100024: "IssuerOfPatientIDQualifiersSequence",
    0x00100030: "PatientBirthDate",
    0x00100040: "PatientSex",
    0x00101002: "OtherPatientIDsSequence",
    0x00180015: "BodyPartExamined",
    0x0020000D: "StudyInstanceUID",
    0x0020000E: "SeriesInstanceUID",
    0x00200011: "SeriesNumber",
    0x00200013: "InstanceNumber",
    0x00200060: "Laterality",
    0x00201206: "NumberOfStudyRelatedSeries",
    0x00201208: "NumberOfStudyRelatedInstances",
    0x00201209: "NumberOfSeriesRelatedInstances",
    0x00400031: "LocalNamespaceEntityID",
    0x00400032: "UniversalEntityID",
    0x00400033: "UniversalEntityIDType",
    0x0040100A: "ReasonForRequestedProcedureCodeSequence",
}


def _keyword(tag: int) -> str:
    return KEYWORDS.get(tag, "")


def _dataset(row: DicomJson, level: str) -> Dataset:
    """The row as a pydicom Dataset (a row the direct reading leaves to pydicom)."""
    from pydicom import Dataset

    try:
        with pydicom_reading("ignore"):
            ds = Dataset.from_json(row, bulk_data_uri_handler=_no_bulk_data)
    except Exception as exc:  # pydicom raises many types for malformed JSON
        attribute = _failing_attribute(row)
        raise MappingError(
            f"{level} row is not valid DICOM JSON"
            + (f": {attribute} is malformed" if attribute else f" ({type(exc).__name__})"),
            attribute=attribute,
        ) from exc
    _share_encoding(ds)
    return ds


def _from_dataset(ds: Dataset) -> _Attrs:
    """The attributes of a pydicom Dataset, in the form the parsers read."""
    from pydicom.multival import MultiValue

    elements: dict[str, _Element] = {}
    for element in ds:
        keyword = element.keyword
        if not keyword:
            continue
        value = element.value
        if element.VR == "SQ":
            items = [_from_dataset(item) for item in value or ()]
            elements[keyword] = _Element(element.tag, "SQ", items or None, len(items))
            continue
        if isinstance(value, MultiValue | list | tuple):
            value = [v if isinstance(v, bytes) else str(v) for v in value]
        elif value is not None and not isinstance(value, bytes):
            value = str(value)
        if value == "" or value == []:
            value = None  # empty and absent read the same
        elements[keyword] = _Element(element.tag, str(element.VR), value, element.VM)
    return _Attrs(elements, tuple(_encodings(ds)))


def _no_bulk_data(_tag: str, _vr: str, _uri: str) -> bytes:
    """Leave out values sent by BulkDataURI: fetching them would make parsing do I/O."""
    return b""


def _share_encoding(ds: Dataset) -> None:
    """Let sequence items decode text with the character set of the dataset holding them."""
    for element in ds:
        if element.VR == "SQ":
            for item in element.value or ():
                item._parent_encoding = ds._character_set
                _share_encoding(item)


def _failing_attribute(row: DicomJson) -> str | None:
    """The keyword (or tag) of the first element pydicom cannot read on its own."""
    from pydicom import Dataset
    from pydicom.datadict import keyword_for_tag

    for tag, element in row.items():
        try:
            with pydicom_reading("ignore"):
                Dataset.from_json({tag: element}, bulk_data_uri_handler=_no_bulk_data)
        except Exception:  # noqa: BLE001 - any failure names this element
            try:
                return keyword_for_tag(int(tag, 16)) or tag
            except ValueError:
                return tag
    return None


def _encodings(ds: Dataset) -> list[str]:
    charset = ds._character_set  # the item's own, else its parent's (set in _dataset)
    return [charset] if isinstance(charset, str) else list(charset)


def _value_vr(element: _Element) -> str:
    if element.vr not in ("UN", "OB", "OW"):
        return element.vr
    from pydicom.datadict import dictionary_VR

    return str(dictionary_VR(element.tag))


def _value_text(ds: _Attrs, element: _Element) -> str | None:
    """The element's value as one string: bytes decoded per the character set, values joined."""
    value = element.value
    if value is None:
        return None
    if isinstance(value, bytes):  # InlineBinary: text sent as bytes, decoded or left out
        return decode_text(value, _value_vr(element), ds.encodings)
    if element.vm > 1 and isinstance(value, list):
        return "\\".join(str(v) for v in value)
    return str(value)


def _text(ds: _Attrs, keyword: str, within: str = "") -> str | None:
    """The cleaned value, checked against its VR; None when absent, empty or only spaces.

    A value invalid for its VR raises MappingError naming the attribute (``within`` is the path
    of the sequence holding it), never the value.
    """
    element = ds.get(keyword)
    if element is None:
        return None
    raw = _value_text(ds, element)
    text = clean_text(raw) if raw is not None else None
    if text is None:
        return None
    vr = _value_vr(element)
    if keyword in LEFT_OUT_WHEN_INVALID and vr_problem(text, vr) is not None:
        return None
    return check_value(text, vr, f"{within}{keyword}")


def _int(ds: _Attrs, keyword: str) -> int | None:
    text = _text(ds, keyword)
    if text is None:
        return None
    try:
        return int(text)
    except ValueError as exc:
        raise MappingError(f"{keyword} is not an integer", attribute=keyword) from exc


def _multi(ds: _Attrs, keyword: str) -> tuple[str, ...]:
    element = ds.get(keyword)
    if element is None or element.value in (None, ""):
        return ()
    value = element.value
    values = value if isinstance(value, list) else [value]
    cleaned = {clean_text(str(v)) for v in values}
    return tuple(sorted(check_value(v, element.vr, keyword) for v in cleaned if v))


def _joined(ds: _Attrs, keyword: str) -> str | None:
    """Every value of a text attribute, each cleaned and checked, in order, joined as DICOM joins them.

    For attributes that DICOM defines with one value but archives send with several (an
    AccessionNumber per requested procedure): kept whole, for the mapping to use each. A single
    value reads exactly as ``_text`` reads it.
    """
    element = ds.get(keyword)
    if element is None or element.vm <= 1 or not isinstance(element.value, list):
        return _text(ds, keyword)
    vr = _value_vr(element)
    values = (clean_text(str(v)) for v in element.value if v is not None)
    kept = dict.fromkeys(check_value(v, vr, keyword) for v in values if v)
    return "\\".join(kept) or None


def _items(ds: _Attrs, keyword: str) -> list[_Attrs]:
    element = ds.get(keyword)
    if element is None or not element.value:
        return []
    return [item for item in element.value if isinstance(item, _Attrs)]


def _issuer(ds: _Attrs, keyword: str) -> Issuer | None:
    items = _items(ds, keyword)
    if not items:
        return None
    item = items[0]
    within = f"{keyword}."
    issuer = Issuer(
        local=_text(item, "LocalNamespaceEntityID", within),
        universal=_text(item, "UniversalEntityID", within),
        universal_type=_text(item, "UniversalEntityIDType", within),
    )
    return issuer if issuer.local or issuer.universal else None


def _codes(ds: _Attrs, keyword: str) -> tuple[Code, ...]:
    codes = []
    within = f"{keyword}."
    for item in _items(ds, keyword):
        value = (
            _text(item, "CodeValue", within)
            or _text(item, "LongCodeValue", within)
            or _text(item, "URNCodeValue", within)
        )
        if value:
            scheme = _text(item, "CodingSchemeDesignator", within)
            codes.append(Code(value, scheme, _text(item, "CodeMeaning", within)))
    return tuple(codes)


def _other_ids(ds: _Attrs) -> tuple[OtherPatientId, ...]:
    found = []
    within = "OtherPatientIDsSequence."
    for item in _items(ds, "OtherPatientIDsSequence"):
        value = _text(item, "PatientID", within)
        if value:
            qualifier = _issuer(item, "IssuerOfPatientIDQualifiersSequence")
            found.append(OtherPatientId(value, _text(item, "IssuerOfPatientID", within), qualifier))
    return tuple(found)


def _person_names(ds: _Attrs, keyword: str) -> tuple[str, ...]:
    element = ds.get(keyword)
    if element is None or not element.value:
        return ()
    values = element.value if isinstance(element.value, list) else [element.value]
    names = (_name_text(ds, v, keyword) for v in values)
    return tuple(n for n in names if n)


def _name_text(ds: _Attrs, value: Any, keyword: str) -> str | None:
    """One PN value with its three component groups, cleaned and checked; None when empty."""
    if isinstance(value, bytes):
        decoded = decode_text(value, "PN", ds.encodings)
        if decoded is None:
            return None
        value = decoded
    text = clean_text(str(value))
    if text is None or not text.replace("=", "").replace("^", "").strip():
        return None
    return check_value(text, "PN", keyword)


def _person_name(ds: _Attrs, keyword: str) -> str | None:
    element = ds.get(keyword)
    if element is None or not element.value:
        return None
    if element.vm > 1:
        raise MappingError(f"{keyword} holds several values where one is expected", attribute=keyword)
    return _name_text(ds, element.value, keyword)


def _required(ds: _Attrs, keyword: str) -> str:
    value = _text(ds, keyword)
    if value is None:
        raise MappingError(f"{keyword} is missing", attribute=keyword)
    return value


def parse_study(row: DicomJson) -> StudyRecord:
    """Parse a study-level QIDO-RS row; raises MappingError naming the attribute at fault."""
    ds = _attrs(row, "study", STUDY_FIELDS)
    uid = _required(ds, "StudyInstanceUID")
    return StudyRecord(
        uid=uid,
        date=_text(ds, "StudyDate"),
        time=_text(ds, "StudyTime"),
        tz_offset=_text(ds, "TimezoneOffsetFromUTC"),
        accession=_joined(ds, "AccessionNumber"),
        description=_text(ds, "StudyDescription"),
        modalities=_multi(ds, "ModalitiesInStudy"),
        series_count=_int(ds, "NumberOfStudyRelatedSeries"),
        instance_count=_int(ds, "NumberOfStudyRelatedInstances"),
        patient_id=_text(ds, "PatientID"),
        patient_issuer=_text(ds, "IssuerOfPatientID"),
        **_patient_name(ds),
        birth_date=_text(ds, "PatientBirthDate"),
        sex=_text(ds, "PatientSex"),
        **_header_fields(ds),
    )


def _patient_name(ds: _Attrs) -> dict[str, Any]:
    """PatientName, or None with the reason when the archive's answer garbled it (see name_problem)."""
    element = ds.get("PatientName")
    values = element.value if element is not None else None
    for value in values if isinstance(values, list) else [values]:
        problem = name_problem(value, _charset_terms(ds)) if isinstance(value, str) else None
        if problem is not None:
            return {"patient_name": None, "patient_name_problem": problem}
    return {"patient_name": _person_name(ds, "PatientName")}


def _charset_terms(ds: _Attrs) -> list[str]:
    """The Specific Character Set's defined terms as the row declares them."""
    element = ds.get("SpecificCharacterSet")
    if element is None or element.value is None:
        return []
    values = element.value if isinstance(element.value, list) else [element.value]
    return [str(v).strip() for v in values]


def _header_fields(ds: _Attrs) -> dict[str, Any]:
    """The study fields that archives often return only in instance headers (WADO-RS metadata)."""
    return {
        "referring_physician": _person_name(ds, "ReferringPhysicianName"),
        "patient_issuer_qualifier": _issuer(ds, "IssuerOfPatientIDQualifiersSequence"),
        "other_patient_ids": _other_ids(ds),
        "procedure_codes": _codes(ds, "ProcedureCodeSequence"),
        "reason_codes": _codes(ds, "ReasonForRequestedProcedureCodeSequence"),
        "accession_issuer": _issuer(ds, "IssuerOfAccessionNumberSequence"),
    }


def with_header(study: StudyRecord, header: DicomJson) -> StudyRecord:
    """The study completed from an instance header: what QIDO left out is taken from the header."""
    # Only the attributes read here: a full header also holds bulk data (pixels) by reference.
    ds = _attrs({tag: header[tag] for tag in (*HEADER_FIELDS, CHARSET) if tag in header}, "instance header")
    found = _header_fields(ds)
    updates = {k: v for k, v in found.items() if v and not getattr(study, k)}
    return replace(study, **updates) if updates else study


def parse_series(row: DicomJson) -> SeriesRecord:
    """Parse a series-level QIDO-RS row; raises MappingError naming the attribute at fault."""
    ds = _attrs(row, "series", SERIES_FIELDS)
    uid = _required(ds, "SeriesInstanceUID")
    return SeriesRecord(
        uid=uid,
        number=_int(ds, "SeriesNumber"),
        modality=_text(ds, "Modality"),
        description=_text(ds, "SeriesDescription"),
        instance_count=_int(ds, "NumberOfSeriesRelatedInstances"),
        body_part=_text(ds, "BodyPartExamined"),
        laterality=_text(ds, "Laterality"),
        date=_text(ds, "SeriesDate"),
        time=_text(ds, "SeriesTime"),
        performers=_person_names(ds, "PerformingPhysicianName") or _person_names(ds, "OperatorsName"),
        patient=_patient(ds),
    )


def _patient(ds: _Attrs) -> PatientIdentity | None:
    """The patient identity a row names; None when it carries no PatientID attribute at all.

    Present but empty is an identity (the empty PatientID), unlike absent: an archive that leaves
    the attribute out of a row says nothing about whose row it is.
    """
    if ds.get("PatientID") is None:
        return None
    return PatientIdentity(_text(ds, "PatientID") or "", _text(ds, "IssuerOfPatientID"))


def header_patient(header: DicomJson) -> PatientIdentity | None:
    """The patient identity an instance header (WADO-RS metadata) names, if it carries PatientID."""
    fields = ("00100020", "00100021")
    return _patient(
        _attrs({tag: header[tag] for tag in (*fields, CHARSET) if tag in header}, "instance header")
    )


def parse_instance(row: DicomJson) -> InstanceRecord:
    """Parse an instance-level QIDO-RS row; raises MappingError naming the attribute at fault."""
    ds = _attrs(row, "instance", INSTANCE_FIELDS)
    uid = _required(ds, "SOPInstanceUID")
    series_uid = _text(ds, "SeriesInstanceUID")
    if series_uid is None:
        raise MappingError("an instance has no SeriesInstanceUID", attribute="SeriesInstanceUID")
    return InstanceRecord(uid, series_uid, _text(ds, "SOPClassUID"), _int(ds, "InstanceNumber"))


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
