"""What may differ between DICOMweb sources: ``PerSourceSettings``, and one named ``SourceSettings``."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Annotated, Any
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from pydantic import (
    AnyHttpUrl,
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

from bridge.config.choices import (
    ChangeSourceKind,
    DeletePolicy,
    DosePolicy,
    MissingModality,
    PatientPolicy,
    UnmappedIssuer,
)
from bridge.config.upstream import SECRET_FILES, ArchiveSettings, check_uri

ENV_PREFIX = "BRIDGE_"
SOURCE_NAME = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$"


class PerSourceSettings(BaseModel):
    """The settings that may differ between DICOMweb sources (everything about the archive side)."""

    dicomweb: ArchiveSettings
    qido_page_size: int = Field(default=100, ge=1, le=5000, description="QIDO-RS page size")

    # Patients
    patient_policy: PatientPolicy = Field(
        default=PatientPolicy.MATCH_OR_CREATE,
        description="match-or-create | match-only | logical",
    )
    patient_identifier_system: str = Field(
        default="urn:fhir-dicomweb-bridge:patient-id",
        description="Identifier system for PatientID without an Issuer of Patient ID (0010,0021)",
    )
    patient_issuer_systems: dict[str, str] = Field(
        default_factory=dict,
        description="Issuer of Patient ID (0010,0021) -> identifier system, as JSON",
    )
    unmapped_issuer: UnmappedIssuer = Field(
        default=UnmappedIssuer.PARK,
        description=(
            "An Issuer of Patient ID not in BRIDGE_PATIENT_ISSUER_SYSTEMS: park (the study, naming "
            "the setting) | derive (system urn:fhir-dicomweb-bridge:issuer:<issuer>) | default "
            "(BRIDGE_PATIENT_IDENTIFIER_SYSTEM: only for archives with a single issuer)"
        ),
    )

    # Accession numbers
    accession_identifier_system: str | None = Field(
        default=None,
        description="Identifier system for accession numbers without a mapped issuer",
    )
    accession_issuer_systems: dict[str, str] = Field(
        default_factory=dict,
        description="Issuer of Accession Number (0008,0051) entity id -> identifier system, as JSON",
    )

    # Mapping
    include_instances: bool = Field(
        default=False, description="List each series' instances (uid, SOP class, number)"
    )
    max_instances: int = Field(
        default=2000, ge=1, description="Studies with more instances are published without instance detail"
    )
    missing_modality: MissingModality = Field(
        default=MissingModality.OT,
        description="A series without Modality: ot (published as OT, counted as a fallback) | park",
    )
    dose: DosePolicy = Field(
        default=DosePolicy.OFF,
        description=(
            "Radiation dose SRs (X-Ray, Enhanced X-Ray, Radiopharmaceutical, Patient Radiation Dose): "
            "observation (one Observation per report, HL7 Radiation Dose Summary) | off"
        ),
    )
    read_instance_header: bool = Field(
        default=False,
        description=(
            "Read one instance's WADO-RS metadata per changed study, for what the archive's QIDO-RS "
            "leaves out (issuer sequences, procedure and reason codes); Orthanc needs it"
        ),
    )
    dicom_timezone: str | None = Field(
        default=None,
        description="IANA zone for StudyTime without TimezoneOffsetFromUTC; default: the host's",
    )

    # Change detection and deletes
    poll_window_days: int = Field(
        default=2, ge=0, le=3650, description="Incremental cycles poll studies dated this many days back"
    )
    change_source: ChangeSourceKind = Field(
        default=ChangeSourceKind.QIDO, description="qido (StudyDate window) or orthanc (/changes feed)"
    )
    orthanc_url: AnyHttpUrl | None = Field(
        default=None, description="Orthanc REST root for change_source=orthanc, e.g. http://pacs:8042"
    )
    delete_policy: DeletePolicy = Field(
        default=DeletePolicy.MARK, description="Studies gone from the archive: mark | delete | ignore"
    )

    @field_validator("patient_identifier_system", "accession_identifier_system")
    @classmethod
    def _uri(cls, value: str | None) -> str | None:
        return None if value is None else check_uri(value)

    @field_validator("patient_issuer_systems", "accession_issuer_systems")
    @classmethod
    def _uri_map(cls, value: dict[str, str]) -> dict[str, str]:
        for system in value.values():
            check_uri(system)
        return value

    @field_validator("dicom_timezone")
    @classmethod
    def _zone(cls, value: str | None) -> str | None:
        if value is not None:
            try:
                ZoneInfo(value)
            except (ZoneInfoNotFoundError, ValueError) as exc:
                raise ValueError(f"unknown time zone {value!r} (use an IANA name)") from exc
        return value

    @model_validator(mode="after")
    def _source_checks(self) -> PerSourceSettings:
        if self.change_source is ChangeSourceKind.ORTHANC and self.orthanc_url is None:
            raise ValueError("BRIDGE_ORTHANC_URL is required when BRIDGE_CHANGE_SOURCE is orthanc")
        self.dicomweb.check(f"{ENV_PREFIX}DICOMWEB_")
        return self


class SourceSettings(PerSourceSettings):
    """One DICOMweb source: its name and its per-source settings (its own, or the top level's)."""

    model_config = ConfigDict(extra="forbid")

    name: Annotated[str, Field(pattern=SOURCE_NAME)] = Field(
        description="Stable name of this DICOMweb source; keys its Endpoint and its state"
    )


PER_SOURCE_SETTINGS = frozenset(PerSourceSettings.model_fields) - {"dicomweb"}
# Secrets and their files come as pairs: a source that sets either takes neither from the top level.
_SECRET_PAIRS = {name: pair for pair in SECRET_FILES for name in pair}
_NOT_INHERITED = frozenset({"url", "public_url"})  # each archive has its own address


def is_per_source(name: str) -> bool:
    """Whether a setting may differ between sources (everything about the archive side)."""
    return name in PER_SOURCE_SETTINGS or name.startswith("dicomweb_")


def inherit(top: Mapping[str, Any], entry: Mapping[str, Any]) -> dict[str, Any]:
    """A ``sources`` entry with the top level's per-source values it does not set itself."""
    merged = {key: top[key] for key in PER_SOURCE_SETTINGS if key in top}
    merged.update((key, value) for key, value in entry.items() if key != "dicomweb")
    own = dict(entry.get("dicomweb") or {})
    given = top.get("dicomweb")
    inherited = {
        key: value
        for key, value in (given.items() if isinstance(given, Mapping) else ())
        if key not in _NOT_INHERITED and not any(other in own for other in _SECRET_PAIRS.get(key, (key,)))
    }
    merged["dicomweb"] = {**inherited, **own}
    return merged


@dataclass(frozen=True, slots=True)
class EntryProblem:
    """One thing wrong in a ``sources`` entry: the key it is about (none: the entry), a kind, and why.

    ``kind`` is pydantic's error type (``extra_forbidden`` for an unknown key, ``missing``...), or
    ``not_per_source`` for a known setting that only the top level takes.
    """

    key: tuple[str, ...]
    kind: str
    message: str

    def reason(self) -> str:
        """The problem in words, after its key."""
        if self.kind == "not_per_source":
            return "is not a per-source setting (set it once, at the top level)"
        if self.kind == "extra_forbidden":
            return "is not a known setting"
        return self.message

    def text(self) -> str:
        """The key and the problem."""
        flat = "_".join(self.key)
        return f"{flat}: {self.reason()}" if flat else self.reason()


class SourceEntryError(ValueError):
    """What is wrong with one ``sources`` entry, problem by problem, each with its key.

    Its text is a whole message; the loader (bridge/config/load.py) reads the parts to name the
    config file's line of each key and the key most likely meant.
    """

    def __init__(self, index: int, name: str | None, problems: list[EntryProblem]) -> None:
        self.index = index
        self.name = name
        self.problems = problems
        super().__init__(f"{self.where}: {'; '.join(p.text() for p in problems)}")

    @property
    def where(self) -> str:
        """The entry, by its name when it has one."""
        return (
            f"{ENV_PREFIX}SOURCES entry {self.name!r}"
            if self.name
            else f"{ENV_PREFIX}SOURCES: entry {self.index}"
        )


def entry_error(index: int, name: str, exc: ValidationError) -> SourceEntryError:
    """The error for what is wrong with the ``sources`` entry ``name``, naming its settings."""
    problems = [
        EntryProblem(tuple(str(p) for p in e["loc"]), e["type"], str(e["msg"]).removeprefix("Value error, "))
        for e in exc.errors(include_input=False)
    ]
    return SourceEntryError(index, name, problems)
