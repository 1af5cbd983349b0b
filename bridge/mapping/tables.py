"""The code tables in the top-level ``mappings/`` folder, loaded once and validated into models."""

from __future__ import annotations

import sys
from functools import lru_cache
from pathlib import Path
from typing import Any, TypeVar

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from bridge.errors import ConfigurationError

TableModel = TypeVar("TableModel", bound=BaseModel)


def _bundled_mappings() -> Path:
    """The repository's mappings/ (source checkout, editable install), else the installed copy."""
    source = Path(__file__).resolve().parents[2] / "mappings"
    if source.is_dir():
        return source
    return Path(sys.prefix) / "share" / "fhir-dicomweb-bridge" / "mappings"


BUNDLED_MAPPINGS = _bundled_mappings()


class Code(BaseModel):
    """A code and its display in one code system."""

    model_config = ConfigDict(frozen=True, extra="forbid")
    code: str = Field(min_length=1)
    display: str = Field(min_length=1)


class TableFile(BaseModel):
    """What every file in ``mappings/`` states: its title and where its content came from."""

    model_config = ConfigDict(frozen=True, extra="forbid")
    title: str
    source: str = Field(min_length=1, description="the standard (part, table, edition) it came from")
    fhir: str = Field(min_length=1, description="FHIR version and the element it feeds")


class CodeTable(TableFile):
    """A DICOM defined term -> code table."""

    system: str = Field(pattern=r"^[a-z][a-z0-9+.-]*:\S+$")
    codes: dict[str, Code]
    notes: str | None = None

    @field_validator("codes", mode="before")
    @classmethod
    def _short_form(cls, value: Any) -> Any:
        return _expand_short_form(value)

    @model_validator(mode="after")
    def _snomed_codes_are_digits(self) -> CodeTable:
        if self.system == "http://snomed.info/sct":
            bad = sorted(k for k, v in self.codes.items() if not v.code.isdigit())
            if bad:
                raise ValueError(f"SNOMED CT codes must be digits; not so for {', '.join(bad)}")
        return self

    def coding(self, term: str | None) -> dict[str, str] | None:
        """The FHIR Coding for a defined term, or None when the table does not know it."""
        return self._coding_from(self.codes, term)

    def _coding_from(self, codes: dict[str, Code], term: str | None) -> dict[str, str] | None:
        entry = None if term is None else codes.get(term.strip().upper())
        if entry is None:
            return None
        return {"system": self.system, "code": entry.code, "display": entry.display}


def _expand_short_form(value: Any) -> Any:
    """Reads "CT: Computed Tomography" as shorthand for a code equal to the key."""
    if isinstance(value, dict):
        return {k: {"code": k, "display": v} if isinstance(v, str) else v for k, v in value.items()}
    return value


class ModalityTable(CodeTable):
    """Modality (0008,0060) terms: CID 29 acquisition modalities in ``codes``, the rest of CID 33 apart.

    R4 defines ImagingStudy.modality as the acquisition modalities only, while every series keeps
    its own modality (SR, SEG, KO, ...), so the table keeps the two groups apart.
    """

    non_acquisition_codes: dict[str, Code] = Field(default_factory=dict)

    @field_validator("non_acquisition_codes", mode="before")
    @classmethod
    def _short_form_too(cls, value: Any) -> Any:
        return _expand_short_form(value)

    @model_validator(mode="after")
    def _groups_are_disjoint(self) -> ModalityTable:
        both = sorted(set(self.codes) & set(self.non_acquisition_codes))
        if both:
            raise ValueError(f"codes listed as acquisition and non-acquisition modalities: {', '.join(both)}")
        return self

    def is_acquisition(self, term: str) -> bool:
        """Whether a modality term is a CID 29 acquisition modality (unknown terms are not)."""
        return term.strip().upper() in self.codes

    def coding(self, term: str | None) -> dict[str, str] | None:
        """The DCM Coding of any CID 33 term, acquisition or not; None when unknown."""
        return super().coding(term) or self._coding_from(self.non_acquisition_codes, term)


class SchemeTable(TableFile):
    """Coding Scheme Designator -> FHIR code system URI."""

    schemes: dict[str, str]

    @field_validator("schemes")
    @classmethod
    def _uris(cls, value: dict[str, str]) -> dict[str, str]:
        for designator, uri in value.items():
            if ":" not in uri:
                raise ValueError(f"{designator}: {uri!r} is not a URI")
        return value

    def system(self, designator: str | None) -> str | None:
        """The FHIR system of a designator (case as DICOM writes it), or None when unknown."""
        if designator is None:
            return None
        return self.schemes.get(designator) or self.schemes.get(designator.upper())


class Tables(BaseModel):
    """Every table the mapping uses."""

    model_config = ConfigDict(frozen=True)
    modality: ModalityTable
    body_part: CodeTable
    laterality: CodeTable
    coding_schemes: SchemeTable


class _UniqueKeyLoader(getattr(yaml, "CSafeLoader", yaml.SafeLoader)):  # type: ignore[misc]
    """A YAML loader that refuses duplicate keys (PyYAML keeps the last one silently).

    Built on libyaml's parser when PyYAML has it (its wheels do): the pure-Python one took about a
    tenth of a second of every command's start-up for the bundled tables.
    """


def _construct_mapping(loader: yaml.SafeLoader, node: yaml.MappingNode) -> dict[Any, Any]:
    keys = set()
    for key_node, _ in node.value:
        key = loader.construct_object(key_node)
        if key in keys:
            raise yaml.constructor.ConstructorError(None, None, f"duplicate key {key!r}", key_node.start_mark)
        keys.add(key)
    return loader.construct_mapping(node)


_UniqueKeyLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_mapping)


def load_table(path: Path, model: type[TableModel] = CodeTable) -> TableModel:  # type: ignore[assignment]
    """Load and validate one table file; a broken file is a configuration error naming it."""
    try:
        with path.open(encoding="utf-8") as handle:
            data = yaml.load(handle, Loader=_UniqueKeyLoader)  # noqa: S506 - safe loader subclass
        return model.model_validate(data)
    except (OSError, yaml.YAMLError, ValidationError) as exc:
        raise ConfigurationError(f"mapping table {path}: {exc}") from exc


@lru_cache(maxsize=4)
def load_tables(folder: Path = BUNDLED_MAPPINGS) -> Tables:
    """All tables from ``folder`` (default: the bundled ``mappings/``)."""
    return Tables(
        modality=load_table(folder / "modality.yaml", ModalityTable),
        body_part=load_table(folder / "body-part.yaml"),
        laterality=load_table(folder / "laterality.yaml"),
        coding_schemes=load_table(folder / "coding-schemes.yaml", SchemeTable),
    )
