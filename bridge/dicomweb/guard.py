"""A guard on the size of the values in a QIDO-RS row, before anything is built from them.

DICOM bounds most value representations to a few dozen characters (LO 64, UI 64, SH 16); real
archives overshoot them a little, so that alone is not a reason to park. A value hundreds of
times too long is: it would become a FHIR identifier, a search URL and a Patient, and no FHIR
server takes it. Such a study is parked naming the attribute, never its value.
"""

from __future__ import annotations

from typing import Any

from bridge.errors import MappingError

# Value representations whose values are short by definition (PS3.5 6.2); LT, ST, UT, UC and UR
# are long text and left alone.
SHORT_VRS = frozenset({"AE", "AS", "CS", "DA", "DS", "DT", "IS", "LO", "PN", "SH", "TM", "UI"})
MAX_SHORT_VALUE = 1024  # characters: sixteen times LO's 64


def _length(value: Any) -> int:
    if isinstance(value, str):
        return len(value)
    if isinstance(value, dict):  # a PN value: its Alphabetic, Ideographic and Phonetic groups
        return sum(len(v) for v in value.values() if isinstance(v, str))
    return 0


def check_value_sizes(row: Any) -> Any:
    """``row`` unchanged, or MappingError naming the first short-VR attribute with an outsized value."""
    if not isinstance(row, dict):
        return row  # the parser says what is wrong with it
    for tag, element in row.items():
        if not isinstance(element, dict) or element.get("vr") not in SHORT_VRS:
            continue
        values = element.get("Value")
        if not isinstance(values, list):
            continue
        longest = max((_length(v) for v in values), default=0)
        if longest > MAX_SHORT_VALUE:
            from pydicom.datadict import keyword_for_tag  # only to name the attribute at fault

            try:
                name = keyword_for_tag(int(tag, 16)) or tag
            except ValueError:
                name = str(tag)[:16]
            raise MappingError(
                f"{name} ({str(tag)[:4]},{str(tag)[4:8]}) holds a value of {longest} characters, over the "
                f"{MAX_SHORT_VALUE} the bridge accepts for VR {element['vr']}: fix it in the archive",
                attribute=name,
            )
    return row
