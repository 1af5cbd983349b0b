"""DICOM JSON values read into plain attributes: the one place a DICOM JSON value is parsed.

A row (or sequence item) is read directly when its shape is common, and through pydicom when it
is not; each value is then cleaned and checked against its VR (``bridge.mapping.values``), and a
value that fails raises MappingError naming the attribute, never the value. Pure; no I/O.
"""

from __future__ import annotations

import base64
import binascii
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from bridge.errors import MappingError
from bridge.mapping.values import (
    LEFT_OUT_WHEN_INVALID,
    TEXT_VRS,
    check_value,
    clean_text,
    decode_text,
    pydicom_reading,
    vr_problem,
)

if TYPE_CHECKING:
    # pydicom itself is imported only for a row the direct reading leaves to it (see read_row)
    from pydicom import Dataset

DicomJson = dict[str, Any]
CHARSET = "00080005"  # SpecificCharacterSet: needed to read the others right


@dataclass(frozen=True, slots=True)
class Element:
    """One attribute of a row, as the parsers read it.

    ``value`` is what pydicom's ``DataElement.value`` would be with its single values made
    ``str`` (every reader below takes ``str()`` of them): None when empty, a str, bytes (a value
    pydicom kept as bytes), a list of those when the attribute holds several values, or a list of
    items (``Attrs``) for a sequence.
    """

    tag: int
    vr: str
    value: Any
    vm: int


@dataclass(frozen=True, slots=True)
class Attrs:
    """A row or a sequence item: its attributes by keyword, and its character set as codecs."""

    elements: dict[str, Element]
    encodings: tuple[str, ...] = ()

    def get(self, keyword: str) -> Element | None:
        """The attribute named ``keyword``, or None when the row does not carry it."""
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


def read_row(row: DicomJson, level: str, fields: Sequence[str] | None = None) -> Attrs:
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


def _plain_item(row: DicomJson) -> Attrs | None:
    """The row read directly, or None when any attribute needs pydicom's reading."""
    elements: dict[str, Element] = {}
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
            elements[keyword] = Element(number, vr, values or None, len(values))
            continue
        if len(values) > 1:
            elements[keyword] = Element(number, vr, values, len(values))
        elif values and values[0] != "":
            elements[keyword] = Element(number, vr, values[0], 1)
        else:
            elements[keyword] = Element(number, vr, None, 0)
    elements.pop("", None)  # private and unknown attributes: no reader asks for them
    return Attrs(elements)


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


def _from_dataset(ds: Dataset) -> Attrs:
    """The attributes of a pydicom Dataset, in the form the parsers read."""
    from pydicom.multival import MultiValue

    elements: dict[str, Element] = {}
    for element in ds:
        keyword = element.keyword
        if not keyword:
            continue
        value = element.value
        if element.VR == "SQ":
            items = [_from_dataset(item) for item in value or ()]
            elements[keyword] = Element(element.tag, "SQ", items or None, len(items))
            continue
        if isinstance(value, MultiValue | list | tuple):
            value = [v if isinstance(v, bytes) else str(v) for v in value]
        elif value is not None and not isinstance(value, bytes):
            value = str(value)
        if value == "" or value == []:
            value = None  # empty and absent read the same
        elements[keyword] = Element(element.tag, str(element.VR), value, element.VM)
    return Attrs(elements, tuple(_encodings(ds)))


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


def _value_vr(element: Element) -> str:
    if element.vr not in ("UN", "OB", "OW"):
        return element.vr
    from pydicom.datadict import dictionary_VR

    return str(dictionary_VR(element.tag))


def _value_text(ds: Attrs, element: Element) -> str | None:
    """The element's value as one string: bytes decoded per the character set, values joined."""
    value = element.value
    if value is None:
        return None
    if isinstance(value, bytes):  # InlineBinary: text sent as bytes, decoded or left out
        return decode_text(value, _value_vr(element), ds.encodings)
    if element.vm > 1 and isinstance(value, list):
        return "\\".join(str(v) for v in value)
    return str(value)


def read_text(ds: Attrs, keyword: str, within: str = "") -> str | None:
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


def read_int(ds: Attrs, keyword: str) -> int | None:
    """An IS value as an int; None when absent or empty, MappingError when not an integer."""
    text = read_text(ds, keyword)
    if text is None:
        return None
    try:
        return int(text)
    except ValueError as exc:
        raise MappingError(f"{keyword} is not an integer", attribute=keyword) from exc


def read_multi(ds: Attrs, keyword: str) -> tuple[str, ...]:
    """Every value of a multi-valued attribute, each cleaned and checked, distinct and sorted."""
    element = ds.get(keyword)
    if element is None or element.value in (None, ""):
        return ()
    value = element.value
    values = value if isinstance(value, list) else [value]
    cleaned = {clean_text(str(v)) for v in values}
    return tuple(sorted(check_value(v, element.vr, keyword) for v in cleaned if v))


def read_joined(ds: Attrs, keyword: str) -> str | None:
    """Every value of a text attribute, each cleaned and checked, in order, joined as DICOM joins them.

    For attributes that DICOM defines with one value but archives send with several (an
    AccessionNumber per requested procedure): kept whole, for the mapping to use each. A single
    value reads exactly as ``read_text`` reads it.
    """
    element = ds.get(keyword)
    if element is None or element.vm <= 1 or not isinstance(element.value, list):
        return read_text(ds, keyword)
    vr = _value_vr(element)
    values = (clean_text(str(v)) for v in element.value if v is not None)
    kept = dict.fromkeys(check_value(v, vr, keyword) for v in values if v)
    return "\\".join(kept) or None


def read_items(ds: Attrs, keyword: str) -> list[Attrs]:
    """The items of a sequence attribute (none when absent or empty)."""
    element = ds.get(keyword)
    if element is None or not element.value:
        return []
    return [item for item in element.value if isinstance(item, Attrs)]


def read_person_names(ds: Attrs, keyword: str) -> tuple[str, ...]:
    """Every name of a PN attribute, each cleaned and checked; empty names are left out."""
    element = ds.get(keyword)
    if element is None or not element.value:
        return ()
    values = element.value if isinstance(element.value, list) else [element.value]
    names = (_name_text(ds, v, keyword) for v in values)
    return tuple(n for n in names if n)


def _name_text(ds: Attrs, value: Any, keyword: str) -> str | None:
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


def read_person_name(ds: Attrs, keyword: str) -> str | None:
    """The one name of a PN attribute; MappingError when it holds several."""
    element = ds.get(keyword)
    if element is None or not element.value:
        return None
    if element.vm > 1:
        raise MappingError(f"{keyword} holds several values where one is expected", attribute=keyword)
    return _name_text(ds, element.value, keyword)


def read_required(ds: Attrs, keyword: str) -> str:
    """The value of an attribute the record cannot be without; MappingError when it is missing."""
    value = read_text(ds, keyword)
    if value is None:
        raise MappingError(f"{keyword} is missing", attribute=keyword)
    return value


def charset_terms(ds: Attrs) -> list[str]:
    """The Specific Character Set's defined terms as the row declares them."""
    element = ds.get("SpecificCharacterSet")
    if element is None or element.value is None:
        return []
    values = element.value if isinstance(element.value, list) else [element.value]
    return [str(v).strip() for v in values]


def decode_inline_text(row: dict[str, Any], charset: Sequence[str] | None = None) -> dict[str, Any]:
    """A DICOM JSON object with its text values sent as bytes made plain ``Value`` text.

    Archives send a value as InlineBinary (base64 of the encoded bytes) when they cannot or will
    not transcode it, and as BulkDataURI when it is long. Text VRs (and UN elements whose tag is a
    text VR in the dictionary) are decoded with the object's Specific Character Set (``charset``
    for sequence items, which inherit it); what cannot be decoded, and bulk data, is left out.
    Other elements are kept as they are.
    """
    if charset is None:
        terms = (row.get(CHARSET) or {}).get("Value") or []
        charset = [str(t) for t in terms] if isinstance(terms, list) else []
    out: dict[str, Any] = {}
    for tag, element in row.items():
        if not isinstance(element, dict):
            out[tag] = element
            continue
        vr = _text_vr(tag, str(element.get("vr", "")))
        if vr == "SQ" and isinstance(element.get("Value"), list):
            items = [decode_inline_text(i, charset) if isinstance(i, dict) else i for i in element["Value"]]
            out[tag] = {**element, "Value": items}
        elif vr is None or ("InlineBinary" not in element and "BulkDataURI" not in element):
            out[tag] = element
        elif "InlineBinary" in element:
            text = _inline(element["InlineBinary"], vr, charset)
            if text is not None:
                out[tag] = {"vr": vr, "Value": [_json_value(text, vr)]}
            elif tag == PATIENT_NAME:
                # Bytes the declared character set cannot hold: kept as a replacement character,
                # so the name rule reads the name from the instance's Part 10 header instead.
                out[tag] = {"vr": vr, "Value": [{"Alphabetic": "\ufffd"}]}
    return out


PATIENT_NAME = "00100010"


def _text_vr(tag: str, vr: str) -> str | None:
    """The element's text VR (from the dictionary for UN), None when it is not text; SQ for SQ."""
    if vr == "SQ":
        return vr
    if vr == "UN":
        from pydicom.datadict import dictionary_VR

        try:
            vr = str(dictionary_VR(int(tag, 16)))
        except (KeyError, ValueError):
            return None
    return vr if vr in TEXT_VRS else None


def _inline(data: Any, vr: str, charset: Sequence[str]) -> str | None:
    from pydicom.charset import convert_encodings

    try:
        raw = base64.b64decode(str(data), validate=True)
    except (binascii.Error, ValueError):
        return None
    with pydicom_reading("raise"):
        try:
            encodings = convert_encodings(list(charset) or ["ISO_IR 6"])
        except LookupError:
            return None
    return decode_text(raw, vr, encodings)


def _json_value(text: str, vr: str) -> Any:
    if vr != "PN":
        return text
    groups = dict(zip(("Alphabetic", "Ideographic", "Phonetic"), text.split("=")[:3], strict=False))
    return {k: v for k, v in groups.items() if v}
