"""The direct reading of DICOM JSON rows reads what pydicom reads, or leaves the row to pydicom.

The parsers read common rows straight from the JSON (pydicom's per-attribute cost was the sync's
largest beyond HTTP); each row the direct reading accepts must give exactly the attributes a
pydicom Dataset of the same row gives, and any row it does not accept goes through pydicom.
"""

from __future__ import annotations

import random
from typing import Any

import pytest

from bridge.errors import MappingError
from bridge.mapping import dicomjson, records
from bridge.mapping.dicomjson import decode_inline_text
from tests.builders import load_json

# Values per VR, the awkward ones included: padding, NULs, a non-breaking space, backslashes,
# several values, JSON numbers where strings are due and the other way round, empty and null.
_TEXT = ["CT", " CT ", "CT\x00", "", "a\\b", "Ünïcödé", "\xa01.2.3 ", "x" * 80, "1.2.840.10008.1"]
_VALUES: dict[str, list[Any]] = {
    "UI": [["1.2.3"], [" 1.2.3 "], ["\xa01.2.3\x00"], ["1.2.3", "1.2.4"], ["01.2"], [""], [None], []],
    "CS": [["CT"], [" CT "], ["CT", "MR"], ["CT\\MR"], ["ct"], [""], [5], [None, "CT"]],
    "DA": [["20240101"], ["2024.01.01"], ["2024"], ["20240101 "], [""], []],
    "TM": [["101530.25"], ["10"], ["25:00"], [" 1015 "]],
    "LO": [[t] for t in _TEXT] + [["a", "b"]],
    "SH": [["ACC1"], [" ACC 1 "], ["x" * 20], ["a\\b"]],
    "LT": [["line\\with backslash"], ["text\r\nmore"]],
    "IS": [[3], [0], [-2], ["3"], ["007 "], [3.0], [3.5], [True], [12345678901234], [1, 2], []],
    "PN": [
        [{"Alphabetic": "Doe^John"}],
        [{"Alphabetic": "Yamada^Tarou", "Ideographic": "山田^太郎", "Phonetic": "やまだ^たろう"}],
        [{"Ideographic": "山田^太郎"}],
        [{"Phonetic": "x"}],
        [{"Alphabetic": "a\\b"}],
        [{"Alphabetic": "A"}, {"Alphabetic": "B"}],
        [{}],
        ["Doe^John"],
        [{"Alphabetic": 5}],
        [{"Alphabetic": "A", "Other": "B"}],
    ],
}
_STUDY_TAGS = {
    "0020000D": "UI",
    "00080020": "DA",
    "00080030": "TM",
    "00080050": "SH",
    "00081030": "LO",
    "00080061": "CS",
    "00201206": "IS",
    "00201208": "IS",
    "00100010": "PN",
    "00100020": "LO",
    "00100030": "DA",
    "00100040": "CS",
    "00080090": "PN",
}


def _element(vr: str, values: list[Any]) -> dict[str, Any]:
    return {"vr": vr, "Value": values} if values else {"vr": vr}


def _random_rows(count: int, seed: int) -> list[dict[str, Any]]:
    rng = random.Random(seed)
    rows = []
    for _ in range(count):
        row: dict[str, Any] = {}
        for tag, vr in _STUDY_TAGS.items():
            if rng.random() < 0.8:
                pool = _VALUES.get(vr) or _VALUES["LO"]
                # mostly an ordinary value, sometimes any: rows of each kind are compared
                row[tag] = _element(vr, list(pool[0] if rng.random() < 0.85 else rng.choice(pool)))
        if rng.random() < 0.5:
            item = {
                "00400031": _element("UT", [rng.choice(_TEXT)]),
                "00400032": _element("UT", [rng.choice(["1.2.3", " 1.2.3", ""])]),
                "00400033": _element("CS", list(rng.choice(_VALUES["CS"]))),
                "00091010": _element("LO", ["private"]),
            }
            row["00080051"] = {"vr": "SQ", "Value": [item] if rng.random() < 0.8 else []}
        if rng.random() < 0.2:
            row["00080005"] = {"vr": "CS", "Value": [rng.choice(["ISO_IR 100", "ISO_IR 192"])]}
        rows.append(row)
    return rows


def _pydicom_reading(row: dict[str, Any]) -> dict[str, Any] | MappingError:
    try:
        return _plain(dicomjson._from_dataset(dicomjson._dataset(row, "study")))
    except MappingError as exc:
        return exc


_READ = frozenset(dicomjson.KEYWORDS.values())


def _plain(attrs: dicomjson.Attrs) -> dict[str, Any]:
    """The attributes the parsers read, as plain data (items included), to compare the readings.

    pydicom names every attribute its dictionary knows; the direct reading only those the parsers
    ask for, which is all a parser can tell apart.
    """
    out: dict[str, Any] = {}
    for keyword, element in attrs.elements.items():
        if keyword not in _READ:
            continue
        value = element.value
        if element.vr == "SQ":
            value = [_plain(item) for item in value or ()]
        out[keyword] = (element.tag, element.vr, value, element.vm)
    return out


def _rows() -> list[dict[str, Any]]:
    recorded = load_json("qido-studies.json") + load_json("qido-series.json")
    return [decode_inline_text(r) for r in recorded + _random_rows(2000, seed=16)]


def test_a_row_read_directly_reads_as_pydicom_reads_it() -> None:
    direct = 0
    for row in _rows():
        read = dicomjson._plain_item(row)
        if read is None:
            continue
        direct += 1
        expected = _pydicom_reading(row)
        assert not isinstance(expected, MappingError), f"pydicom refuses a row read directly: {row}"
        assert _plain(read) == expected, row
    assert direct > 200  # most rows are read directly; the test would prove nothing otherwise


@pytest.mark.parametrize(
    ("vr", "values"),
    [
        ("IS", ["007 "]),  # pydicom normalises the string
        ("IS", [3.0]),
        ("LO", ["a\\b"]),  # pydicom splits it into two values
        ("PN", ["Doe^John"]),  # a PN value that is not an object
        ("LO", [None]),
        ("DS", ["1.5"]),  # a VR the direct reading leaves to pydicom
    ],
)
def test_a_value_of_an_unusual_shape_is_left_to_pydicom(vr: str, values: list[Any]) -> None:
    assert dicomjson._plain_item({"00081030": {"vr": vr, "Value": values}}) is None


def test_inline_binary_and_a_value_that_is_not_a_list_are_left_to_pydicom() -> None:
    assert dicomjson._plain_item({"00081030": {"vr": "OB", "InlineBinary": "AAAA"}}) is None
    assert dicomjson._plain_item({"00081030": {"vr": "LO", "Value": "CT"}}) is None
    assert dicomjson._plain_item({"00081030": {"vr": "LO"}}) is not None  # empty: read directly


def test_the_keywords_read_directly_are_pydicoms() -> None:
    from pydicom.datadict import keyword_for_tag

    assert {tag: keyword_for_tag(tag) for tag in dicomjson.KEYWORDS} == dicomjson.KEYWORDS


def test_every_attribute_a_parser_reads_has_its_keyword_in_the_table() -> None:
    """A parser asking for a keyword outside the table would silently read nothing."""
    import inspect
    import re

    from pydicom.datadict import tag_for_keyword

    source = inspect.getsource(records)
    readers = r"(?<![a-z])(?:read_(?:text|int|multi|items|person_names?|required)|_issuer|_codes)"
    asked = set(re.findall(readers + r'\([a-z]+, "(\w+)"', source))
    asked |= {"OtherPatientIDsSequence"}
    assert len(asked) > 30  # the pattern still finds the readers' calls
    assert all(tag_for_keyword(k) is not None for k in asked)
    assert asked <= _READ, asked - _READ


def test_uid_validity_is_pydicoms() -> None:
    from pydicom import config
    from pydicom.uid import UID

    from bridge.mapping.uid import archive_uid

    rng = random.Random(5)
    alphabet = "0123456789.. \t\n\x00a\xa0"
    samples = ["1.2.3", "0", "01.2", "1..2", "1.2.", ".1", " 1.2 ", "1.2\n", "1." + "2" * 63, "1." + "2" * 62]
    samples += ["".join(rng.choice(alphabet) for _ in range(rng.randint(0, 70))) for _ in range(3000)]
    for value in samples:
        valid = UID(value, validation_mode=config.IGNORE).is_valid
        assert (archive_uid(value) is not None) == valid, repr(value)
