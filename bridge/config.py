"""Settings: one validated ``Settings`` object from ``BRIDGE_*`` variables and an optional YAML file."""

from __future__ import annotations

import os
import re
from enum import StrEnum
from functools import lru_cache
from pathlib import Path
from typing import Annotated, Any
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from pydantic import AnyHttpUrl, Field, ValidationError, field_validator, model_validator
from pydantic_settings import (
    BaseSettings,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    YamlConfigSettingsSource,
)
from sqlalchemy.engine import make_url
from sqlalchemy.exc import ArgumentError

from bridge.errors import ConfigurationError

ENV_PREFIX = "BRIDGE_"
CONFIG_FILE_VARIABLE = "BRIDGE_CONFIG_FILE"

_URI = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*:\S+$")


class PatientPolicy(StrEnum):
    """How a study's subject is found or made."""

    MATCH_OR_CREATE = "match-or-create"
    MATCH_ONLY = "match-only"
    LOGICAL = "logical"


class WriteStrategy(StrEnum):
    """How ImagingStudy and Endpoint writes are keyed on the FHIR server."""

    CLIENT_ID = "client-id"  # PUT to an id derived from the business identifier
    CONDITIONAL = "conditional"  # PUT Type?identifier=..., for servers refusing client ids


def _check_uri(value: str) -> str:
    if not _URI.match(value):
        raise ValueError(f"{value!r} is not an absolute URI (e.g. urn:oid:1.2.3 or https://...)")
    return value


class Settings(BaseSettings):
    """Every setting of the bridge; each is read from ``BRIDGE_<NAME>`` or the config file."""

    model_config = SettingsConfigDict(
        env_prefix=ENV_PREFIX,
        extra="forbid",
        case_sensitive=False,
        validate_default=True,
    )

    # Source: the DICOMweb archive
    dicomweb_url: AnyHttpUrl = Field(
        description="DICOMweb base URL the worker polls (QIDO-RS/WADO-RS), e.g. http://pacs/dicom-web"
    )
    dicomweb_public_url: AnyHttpUrl | None = Field(
        default=None,
        description="WADO-RS base URL written into the Endpoint for viewers; defaults to dicomweb_url",
    )
    source_name: Annotated[str, Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")] = Field(
        default="default",
        description="Stable name of this DICOMweb source; keys its Endpoint and its state",
    )
    qido_page_size: int = Field(default=100, ge=1, le=5000, description="QIDO-RS page size")

    # Sink: the FHIR server
    fhir_url: AnyHttpUrl = Field(description="FHIR R4 base URL, e.g. https://ehr/fhir/R4")
    write_strategy: WriteStrategy = Field(
        default=WriteStrategy.CLIENT_ID,
        description="client-id: PUT to ids derived from identifiers; conditional: PUT ?identifier=",
    )
    endpoint_identifier_system: str = Field(
        default="urn:fhir-dicomweb-bridge:source",
        description="Identifier system of the Endpoint resources (value: source_name)",
    )

    # Patients
    patient_policy: PatientPolicy = Field(
        default=PatientPolicy.MATCH_OR_CREATE,
        description="match-or-create | match-only | logical",
    )
    patient_identifier_system: str = Field(
        default="urn:fhir-dicomweb-bridge:patient-id",
        description="Identifier system for PatientID when Issuer of Patient ID is absent or unmapped",
    )
    patient_issuer_systems: dict[str, str] = Field(
        default_factory=dict,
        description="Issuer of Patient ID (0010,0021) -> identifier system, as JSON",
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
    dicom_timezone: str | None = Field(
        default=None,
        description="IANA zone for StudyTime without TimezoneOffsetFromUTC; default: the host's",
    )
    mappings_dir: Path | None = Field(
        default=None, description="Folder of mapping tables; default: the bundled mappings/"
    )

    # Running
    state_url: str = Field(
        default="sqlite:///bridge-state.db",
        description="SQLAlchemy URL of the state store (SQLite file by default)",
    )
    sync_concurrency: int = Field(default=4, ge=1, le=64, description="Studies synced at once")
    http_timeout: float = Field(default=30.0, gt=0, description="Seconds per HTTP request")
    http_retries: int = Field(default=4, ge=0, le=20, description="Retries of a failed request")
    http_retry_max_wait: float = Field(
        default=30.0, ge=0, description="Longest single wait between retries, in seconds"
    )
    log_level: str = Field(default="INFO", pattern=r"^(DEBUG|INFO|WARNING|ERROR)$")

    @field_validator("patient_identifier_system", "endpoint_identifier_system", "accession_identifier_system")
    @classmethod
    def _uri(cls, value: str | None) -> str | None:
        return None if value is None else _check_uri(value)

    @field_validator("patient_issuer_systems", "accession_issuer_systems")
    @classmethod
    def _uri_map(cls, value: dict[str, str]) -> dict[str, str]:
        for system in value.values():
            _check_uri(system)
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

    @field_validator("state_url")
    @classmethod
    def _state_url(cls, value: str) -> str:
        try:
            make_url(value)
        except ArgumentError as exc:
            raise ValueError("not a SQLAlchemy database URL") from exc
        return value

    @field_validator("mappings_dir")
    @classmethod
    def _mappings_dir(cls, value: Path | None) -> Path | None:
        if value is not None and not value.is_dir():
            raise ValueError(f"{value} is not a folder")
        return value

    @model_validator(mode="after")
    def _defaults(self) -> Settings:
        if self.dicomweb_public_url is None:
            self.dicomweb_public_url = self.dicomweb_url
        return self

    @property
    def dicomweb_base(self) -> str:
        """The polled DICOMweb base, without a trailing slash."""
        return str(self.dicomweb_url).rstrip("/")

    @property
    def public_base(self) -> str:
        """The DICOMweb base viewers reach, without a trailing slash."""
        return str(self.dicomweb_public_url or self.dicomweb_url).rstrip("/")

    @property
    def fhir_base(self) -> str:
        """The FHIR base URL, without a trailing slash."""
        return str(self.fhir_url).rstrip("/")

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        """Explicit values first, then the environment, then the YAML file named by BRIDGE_CONFIG_FILE."""
        sources: list[PydanticBaseSettingsSource] = [init_settings, env_settings]
        config_file = os.environ.get(CONFIG_FILE_VARIABLE)
        if config_file:
            sources.append(YamlConfigSettingsSource(settings_cls, yaml_file=config_file))
        return tuple(sources)


def _describe(error: dict[str, Any]) -> str:
    field = str(error["loc"][0]) if error["loc"] else "settings"
    name = ENV_PREFIX + field.upper()
    message = str(error["msg"])
    if error["type"] == "missing":
        message = "is required but not set"
    elif error["type"] == "extra_forbidden":
        message = "is not a known setting"
    return f"{name}: {message}"


def load_settings(**overrides: Any) -> Settings:
    """Build and validate the settings, turning any problem into a ConfigurationError naming it."""
    config_file = os.environ.get(CONFIG_FILE_VARIABLE)
    if config_file and not Path(config_file).is_file():
        raise ConfigurationError(f"{CONFIG_FILE_VARIABLE}: no such file: {config_file}")
    known = {ENV_PREFIX + name.upper() for name in Settings.model_fields} | {CONFIG_FILE_VARIABLE}
    unknown = sorted(k for k in os.environ if k.upper().startswith(ENV_PREFIX) and k.upper() not in known)
    if unknown:
        raise ConfigurationError(f"invalid configuration: {unknown[0]}: is not a known setting")
    try:
        return Settings(**overrides)
    except ValidationError as exc:
        details = "; ".join(_describe(dict(e)) for e in exc.errors())
        raise ConfigurationError(f"invalid configuration: {details}") from None


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    """The process-wide settings, built once (tests call ``get_settings.cache_clear()``)."""
    return load_settings()
