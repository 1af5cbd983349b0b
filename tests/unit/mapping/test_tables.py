"""The code tables in mappings/: every file loads and validates; broken files are refused."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from bridge.errors import ConfigurationError
from bridge.mapping.tables import BUNDLED_MAPPINGS, ModalityTable, SchemeTable, load_table, load_tables
from bridge.resolve.viewers import load_viewer_table

ALL_FILES = sorted(BUNDLED_MAPPINGS.glob("*.yaml")) + sorted(BUNDLED_MAPPINGS.glob("*.json"))
# Files with their own loader and model; every other file in mappings/ is a code table.
OTHER_LOADERS = {
    "viewers.yaml": lambda folder: load_viewer_table(folder),
    "coding-schemes.yaml": lambda folder: load_table(folder / "coding-schemes.yaml", SchemeTable),
    "modality.yaml": lambda folder: load_table(folder / "modality.yaml", ModalityTable),
}
TABLE_FILES = [p for p in ALL_FILES if p.name not in OTHER_LOADERS]

GOOD_TABLE = """\
title: test
source: made up for a test
fhir: R4 nothing
system: http://snomed.info/sct
codes:
  L: {code: "7771000", display: Left}
"""


def test_the_bundled_folder_has_the_three_tables() -> None:
    assert {p.name for p in ALL_FILES} >= {"modality.yaml", "body-part.yaml", "laterality.yaml"}


@pytest.mark.parametrize("path", TABLE_FILES, ids=lambda p: p.name)
def test_every_mapping_file_loads_and_validates(path: Path) -> None:
    table = load_table(path)
    assert table.codes
    for key, code in table.codes.items():
        assert key == key.strip().upper(), f"{path.name}: key {key!r} would never match a DICOM value"
        assert code.code and code.display


@pytest.mark.parametrize("name", sorted(OTHER_LOADERS))
def test_every_other_mapping_file_loads_with_its_own_loader(name: str) -> None:
    assert (BUNDLED_MAPPINGS / name).is_file()
    OTHER_LOADERS[name](BUNDLED_MAPPINGS)


@pytest.mark.parametrize("name", ["body-part.yaml", "laterality.yaml"])
def test_snomed_codes_are_strings_of_digits(name: str) -> None:
    table = load_table(BUNDLED_MAPPINGS / name)
    assert table.system == "http://snomed.info/sct"
    assert all(re.fullmatch(r"\d{6,18}", c.code) for c in table.codes.values())


def test_row_counts_match_the_mappings_readme() -> None:
    readme = (BUNDLED_MAPPINGS / "README.md").read_text(encoding="utf-8")
    for name, tables_attr in (
        ("modality.yaml", "modality"),
        ("body-part.yaml", "body_part"),
        ("laterality.yaml", "laterality"),
    ):
        row = next(line for line in readme.splitlines() if line.startswith(f"| `{name}`"))
        documented = int(row.rstrip(" |").rsplit("|", 1)[-1])
        table = getattr(load_tables(), tables_attr)
        rows = len(table.codes) + len(getattr(table, "non_acquisition_codes", {}))
        assert rows == documented, name


def test_load_tables_gives_codings_with_the_table_system() -> None:
    tables = load_tables()
    assert tables.modality.coding("CT") == {
        "system": "http://dicom.nema.org/resources/ontology/DCM",
        "code": "CT",
        "display": "Computed Tomography",
    }
    assert tables.laterality.coding("U") is None


def test_the_modality_table_tells_acquisition_modalities_apart() -> None:
    modality = load_tables().modality
    assert len(modality.codes) == 51, "CID 29 has 51 acquisition modalities"
    assert all(modality.is_acquisition(m) for m in ("CT", "MR", "PT", "US", "DX", "mg"))
    assert not any(modality.is_acquisition(m) for m in ("SR", "SEG", "KO", "PR", "OT", "RTPLAN", "XYZ"))
    assert modality.coding("SEG") == {
        "system": "http://dicom.nema.org/resources/ontology/DCM",
        "code": "SEG",
        "display": "Segmentation",
    }


def test_a_modality_listed_in_both_groups_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "modality.yaml"
    path.write_text(
        "title: t\nsource: s\nfhir: f\nsystem: http://dicom.nema.org/resources/ontology/DCM\n"
        "codes:\n  CT: Computed Tomography\nnon_acquisition_codes:\n  CT: Computed Tomography\n",
        encoding="utf-8",
    )
    with pytest.raises(ConfigurationError, match="CT"):
        load_table(path, ModalityTable)


def test_a_good_table_file_loads(tmp_path: Path) -> None:
    path = tmp_path / "t.yaml"
    path.write_text(GOOD_TABLE, encoding="utf-8")
    assert load_table(path).coding("L") == {
        "system": "http://snomed.info/sct",
        "code": "7771000",
        "display": "Left",
    }


def test_a_duplicate_key_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "dup.yaml"
    path.write_text(GOOD_TABLE + '  L: {code: "24028007", display: Right}\n', encoding="utf-8")
    with pytest.raises(ConfigurationError, match="duplicate key 'L'") as caught:
        load_table(path)
    assert str(path) in str(caught.value)


@pytest.mark.parametrize(
    "text",
    [
        GOOD_TABLE.replace('"7771000"', "7771000"),  # an unquoted code is an int, not a code
        GOOD_TABLE.replace("display: Left", "display: ''"),
        GOOD_TABLE.replace("system: http://snomed.info/sct", "system: not a uri"),
        GOOD_TABLE + "colour: blue\n",
        "title: [unclosed\n",
        "- just\n- a list\n",
    ],
    ids=["int-code", "empty-display", "bad-system", "unknown-key", "bad-yaml", "not-a-mapping"],
)
def test_a_bad_file_gives_a_configuration_error_naming_it(tmp_path: Path, text: str) -> None:
    path = tmp_path / "broken-table.yaml"
    path.write_text(text, encoding="utf-8")
    with pytest.raises(ConfigurationError, match="broken-table.yaml"):
        load_table(path)


def test_a_missing_file_gives_a_configuration_error_naming_it(tmp_path: Path) -> None:
    with pytest.raises(ConfigurationError, match="absent.yaml"):
        load_table(tmp_path / "absent.yaml")


def test_a_non_numeric_snomed_code_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "t.yaml"
    path.write_text(GOOD_TABLE.replace('"7771000"', '"left"'), encoding="utf-8")
    with pytest.raises(ConfigurationError):
        load_table(path)


def test_coding_schemes_give_fhir_systems() -> None:
    schemes = load_tables().coding_schemes
    assert schemes.system("SCT") == "http://snomed.info/sct"
    assert schemes.system("LN") == "http://loinc.org"
    assert schemes.system("99LOCAL") is None
