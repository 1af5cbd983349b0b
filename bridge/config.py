"""Settings: one validated ``Settings`` object from ``BRIDGE_*`` variables and an optional YAML file.

Shape: the connection settings of an upstream are one model, ``UpstreamSettings``, used twice
(``Settings.dicomweb`` for the archive, ``Settings.fhir`` for the FHIR server); everything about one
archive is a ``SourceSettings``. The flat names keep working: ``BRIDGE_FHIR_CLIENT_ID`` (or the config
key ``fhir_client_id``) is ``fhir.client_id``. With ``sources``, each entry takes the top level's
per-source values it does not set itself.
"""

from __future__ import annotations

import difflib
import ipaddress
import os
import re
from collections.abc import Iterable, Iterator, Mapping
from enum import StrEnum
from functools import lru_cache
from pathlib import Path
from typing import Annotated, Any, Literal
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

import yaml
from pydantic import (
    AnyHttpUrl,
    BaseModel,
    ConfigDict,
    Field,
    PrivateAttr,
    SecretStr,
    ValidationError,
    field_validator,
    model_validator,
)
from pydantic.fields import FieldInfo
from pydantic_settings import (
    BaseSettings,
    NoDecode,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    SettingsError,
    YamlConfigSettingsSource,
)

from bridge.dicomweb.query import SeriesQuery
from bridge.errors import ConfigurationError
from bridge.mapping.identity import UnmappedIssuer
from bridge.sync.policy import (
    ChangeSourceKind,
    DeletePolicy,
    DemographicsCheck,
    DosePolicy,
    MissingModality,
    OrderPolicy,
    PatientPolicy,
    WriteStrategy,
)

ENV_PREFIX = "BRIDGE_"
CONFIG_FILE_VARIABLE = "BRIDGE_CONFIG_FILE"
UPSTREAMS = ("dicomweb", "fhir")
FRONT_SECRET_MIN = 32  # characters of the gateway front's shared secret

_URI = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*:\S+$")
_SOURCE_NAME = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$"


class AuthMode(StrEnum):
    """How the bridge authenticates to one upstream (bridge/upstream/credentials.py)."""

    NONE = "none"
    BASIC = "basic"
    BEARER = "bearer"  # a static token
    OAUTH2 = "oauth2"  # client credentials, client_secret_basic
    SMART = "smart"  # SMART Backend Services: client credentials with private_key_jwt


class AuditMode(StrEnum):
    """Where the access audit goes (bridge/audit)."""

    FHIR = "fhir"
    LOG = "log"
    OFF = "off"


class SigningAlg(StrEnum):
    """Signature algorithms of SMART Backend Services client assertions."""

    RS384 = "RS384"
    ES384 = "ES384"


Secret = Literal["password", "token", "client_secret"]

# Which settings each auth mode needs: (setting, secret-file setting or None).
_AUTH_NEEDS: dict[AuthMode, tuple[tuple[str, str | None], ...]] = {
    AuthMode.NONE: (),
    AuthMode.BASIC: (("username", None), ("password", "password_file")),
    AuthMode.BEARER: (("token", "token_file"),),
    AuthMode.OAUTH2: (("token_url", None), ("client_id", None), ("client_secret", "client_secret_file")),
    AuthMode.SMART: (("token_url", None), ("client_id", None), ("private_key_file", None)),
}
_SECRET_FILES: tuple[tuple[Secret, str], ...] = (
    ("password", "password_file"),
    ("token", "token_file"),
    ("client_secret", "client_secret_file"),
)


def _secret_from_file(given: SecretStr | None, path: Path | None, name: str) -> SecretStr | None:
    """The secret in file ``path`` (setting ``{name}_FILE``); None without a file. Start-up errors name it."""
    if path is None:
        return None
    if given is not None:
        raise ValueError(f"set {name} or {name}_FILE, not both")
    try:
        text = path.read_text(encoding="utf-8").strip()
    except (OSError, UnicodeError) as exc:
        raise ValueError(f"{name}_FILE: cannot read {path} ({type(exc).__name__})") from None
    if not text:
        raise ValueError(f"{name}_FILE: {path} is empty")
    return SecretStr(text)


def _check_uri(value: str) -> str:
    if not _URI.match(value):
        raise ValueError(f"{value!r} is not an absolute URI (e.g. urn:oid:1.2.3 or https://...)")
    return value


class UpstreamSettings(BaseModel):
    """How the bridge reaches one upstream: its URL, authentication and TLS (``BRIDGE_<UPSTREAM>_*``)."""

    model_config = ConfigDict(extra="forbid")

    url: AnyHttpUrl = Field(description="Base URL of the upstream")
    auth: AuthMode = Field(default=AuthMode.NONE, description="none|basic|bearer|oauth2|smart")
    username: str | None = Field(default=None, description="User for auth=basic")
    password: SecretStr | None = Field(default=None, description="Password for auth=basic")
    password_file: Path | None = Field(default=None, description="File holding the password")
    token: SecretStr | None = Field(default=None, description="Static token for auth=bearer")
    token_file: Path | None = Field(default=None, description="File holding the static token")
    token_url: AnyHttpUrl | None = Field(default=None, description="OAuth2 token endpoint")
    client_id: str | None = Field(default=None, description="OAuth2 client id")
    client_secret: SecretStr | None = Field(default=None, description="Secret for auth=oauth2")
    client_secret_file: Path | None = Field(default=None, description="File holding it")
    private_key_file: Path | None = Field(default=None, description="PEM key for auth=smart")
    key_id: str | None = Field(default=None, description="kid of the key (auth=smart)")
    signing_alg: SigningAlg = Field(default=SigningAlg.RS384, description="RS384 or ES384")
    scopes: str | None = Field(default=None, description="Scopes to request, space-separated")
    ca_bundle: Path | None = Field(default=None, description="PEM CAs trusted (replaces default)")
    client_cert: Path | None = Field(default=None, description="PEM client certificate (mTLS)")
    client_key: Path | None = Field(default=None, description="PEM key of the client certificate")
    verify_tls: bool = Field(default=True, description="Verify the server's certificate")

    # Secrets read from their *_file settings; kept apart so the settings as given stay as given.
    _from_files: dict[str, SecretStr] = PrivateAttr(default_factory=dict)

    @property
    def base(self) -> str:
        """The base URL, without a trailing slash."""
        return str(self.url).rstrip("/")

    @property
    def scope_list(self) -> tuple[str, ...]:
        """The scopes to request."""
        return tuple((self.scopes or "").split())

    def secret(self, name: Secret) -> SecretStr | None:
        """A secret as given, or as read from its file."""
        value: SecretStr | None = getattr(self, name)
        return value if value is not None else self._from_files.get(name)

    def check(self, prefix: str) -> None:
        """Read the secret files and check auth and TLS settings together; errors name ``prefix``+setting."""
        for secret, file_field in _SECRET_FILES:
            path: Path | None = getattr(self, file_field)
            found = _secret_from_file(getattr(self, secret), path, f"{prefix}{secret.upper()}")
            if found is not None:
                self._from_files[secret] = found
        for needed, secret_file in _AUTH_NEEDS[self.auth]:
            value = getattr(self, needed) if secret_file is None else self._from_files.get(needed)
            if value in (None, "") and getattr(self, needed) in (None, ""):
                alternative = f" (or {prefix}{secret_file.upper()})" if secret_file else ""
                raise ValueError(
                    f"{prefix}{needed.upper()}{alternative} is required when {prefix}AUTH is "
                    f"{self.auth.value}"
                )
        if self.auth is AuthMode.SMART:
            from bridge.upstream.credentials import load_private_key

            assert self.private_key_file is not None
            try:
                load_private_key(self.private_key_file, self.signing_alg.value)
            except ValueError as exc:
                raise ValueError(
                    f"{prefix}PRIVATE_KEY_FILE: {exc} ({prefix}SIGNING_ALG is {self.signing_alg.value})"
                ) from None
        from bridge.upstream.tls import check_files

        problem = check_files(
            ca_bundle=self.ca_bundle, client_cert=self.client_cert, client_key=self.client_key
        )
        if problem:
            raise ValueError(prefix + problem)


class ArchiveSettings(UpstreamSettings):
    """The DICOMweb archive: an upstream, plus the address viewers reach it at."""

    url: AnyHttpUrl = Field(
        description="DICOMweb base URL the worker polls (QIDO-RS/WADO-RS), e.g. http://pacs/dicom-web"
    )
    public_url: AnyHttpUrl | None = Field(
        default=None,
        description="WADO-RS base URL written into the Endpoint for viewers; defaults to dicomweb_url",
    )

    max_page_bytes: int = Field(
        default=16 * 1024 * 1024,
        ge=1024,
        description="Largest QIDO-RS page of studies or instances, in bytes",
    )
    max_series_bytes: int = Field(
        default=16 * 1024 * 1024, ge=1024, description="Largest answer to one series query, in bytes"
    )
    max_metadata_bytes: int = Field(
        default=16 * 1024 * 1024, ge=1024, description="Largest WADO-RS metadata answer, in bytes"
    )
    max_thumbnail_bytes: int = Field(
        default=8 * 1024 * 1024, ge=1024, description="Largest rendered thumbnail, in bytes"
    )
    max_pages: int = Field(
        default=100_000, ge=1, description="Most pages one QIDO-RS walk may take; more ends it with an error"
    )
    max_series: int = Field(
        default=10_000, ge=1, description="Studies with more series are parked, naming this setting"
    )
    series_query: SeriesQuery = Field(
        default=SeriesQuery.AUTO,
        description=(
            "Series of a page of studies: list (one StudyInstanceUID=a,b,... query per page), "
            "per-study, auto (list if the archive's first answer proves it matches UID lists), or "
            "paged (a whole-archive run pages through /series first, kept on disk; for archives "
            "without UID lists). Under list or auto a page of named studies (pushes, feed batches) "
            "is also asked in one StudyInstanceUID=a,b,... study query"
        ),
    )
    series_list_size: int = Field(
        default=100,
        ge=2,
        le=500,
        description="Most studies named in one UID-list query (series, or named studies' rows)",
    )
    series_page_size: int = Field(
        default=1000,
        ge=1,
        le=10_000,
        description="QIDO-RS page size of series queries (UID lists, and the paged sweep)",
    )

    @property
    def public_base(self) -> str:
        """The DICOMweb base viewers reach, without a trailing slash."""
        return str(self.public_url or self.url).rstrip("/")


class FhirServerSettings(UpstreamSettings):
    """The FHIR server: an upstream."""

    url: AnyHttpUrl = Field(description="FHIR R4 base URL, e.g. https://ehr/fhir/R4")
    scopes: str | None = Field(
        default=None, description="Scopes to request, space-separated, e.g. system/ImagingStudy.write"
    )
    max_response_bytes: int = Field(
        default=64 * 1024 * 1024, ge=1024, description="Largest answer from the FHIR server, in bytes"
    )
    batch_size: int = Field(
        default=100,
        ge=0,
        le=1000,
        description=(
            "Writes per FHIR batch Bundle (one per page of changed studies); 0 writes study by "
            "study. Used only if the CapabilityStatement lists batch; halved on 413"
        ),
    )


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

    @model_validator(mode="after")
    def _source_checks(self) -> PerSourceSettings:
        if self.change_source is ChangeSourceKind.ORTHANC and self.orthanc_url is None:
            raise ValueError("BRIDGE_ORTHANC_URL is required when BRIDGE_CHANGE_SOURCE is orthanc")
        self.dicomweb.check(f"{ENV_PREFIX}DICOMWEB_")
        return self


class SourceSettings(PerSourceSettings):
    """One DICOMweb source: its name and its per-source settings (its own, or the top level's)."""

    model_config = ConfigDict(extra="forbid")

    name: Annotated[str, Field(pattern=_SOURCE_NAME)] = Field(
        description="Stable name of this DICOMweb source; keys its Endpoint and its state"
    )


PER_SOURCE_SETTINGS = frozenset(PerSourceSettings.model_fields) - {"dicomweb"}
# Secrets and their files come as pairs: a source that sets either takes neither from the top level.
_SECRET_PAIRS = {name: pair for pair in _SECRET_FILES for name in pair}
_NOT_INHERITED = frozenset({"url", "public_url"})  # each archive has its own address


def _nest(data: Mapping[str, Any]) -> dict[str, Any]:
    """Flat keys of an upstream (``fhir_client_id``) as the nested setting (``fhir.client_id``)."""
    result: dict[str, Any] = {}
    nested: dict[str, dict[str, Any]] = {}
    for key, value in data.items():
        upstream, _, rest = key.partition("_")
        if upstream in UPSTREAMS and rest in _UPSTREAM_FIELDS[upstream]:
            nested.setdefault(upstream, {})[rest] = value
        else:
            result[key] = value
    for upstream, values in nested.items():
        given = result.get(upstream)
        result[upstream] = {**values, **given} if isinstance(given, Mapping) else values
    return result


def _inherit(top: Mapping[str, Any], entry: Mapping[str, Any]) -> dict[str, Any]:
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


def _entry_error(name: str, exc: ValidationError) -> str:
    details = "; ".join(
        f"{'_'.join(str(p) for p in e['loc']) or 'entry'}: {str(e['msg']).removeprefix('Value error, ')}"
        for e in exc.errors(include_input=False)
    )
    return f"BRIDGE_SOURCES entry {name!r}: {details}"


def _any_mapping_items(schema: dict[str, Any]) -> None:
    schema["items"] = {"type": "object", "additionalProperties": True}


class Settings(PerSourceSettings, BaseSettings):
    """Every setting of the bridge; each is read from ``BRIDGE_<NAME>`` or the config file."""

    model_config = SettingsConfigDict(
        env_prefix=ENV_PREFIX,
        env_nested_delimiter="_",
        env_nested_max_split=1,  # BRIDGE_FHIR_CLIENT_ID is fhir.client_id
        extra="forbid",
        case_sensitive=False,
        validate_default=True,
    )

    # Several sources (config file): each entry overrides the per-source settings
    sources: list[SourceSettings] = Field(
        default_factory=list,
        description=(
            "Several DICOMweb sources feeding this FHIR server (config file, or JSON): each entry "
            "has a unique `name` and any per-source setting (dicomweb_*, patient_*, accession_*, "
            "qido_page_size, change_source, orthanc_url, ...) overriding the top-level value"
        ),
        # Entries are given flat (dicomweb_url) or nested (dicomweb: {url}); the bridge checks them.
        json_schema_extra=_any_mapping_items,
    )
    source_name: Annotated[str, Field(pattern=_SOURCE_NAME)] = Field(
        default="default",
        description="Stable name of this DICOMweb source; keys its Endpoint and its state",
    )

    # Sink: the FHIR server
    fhir: FhirServerSettings
    write_strategy: WriteStrategy = Field(
        default=WriteStrategy.CLIENT_ID,
        description="client-id: PUT to ids derived from identifiers; conditional: PUT ?identifier=",
    )
    endpoint_identifier_system: str = Field(
        default="urn:fhir-dicomweb-bridge:source",
        description="Identifier system of the Endpoint resources (value: source_name)",
    )
    order_policy: OrderPolicy = Field(
        default=OrderPolicy.NONE, description="ImagingStudy.basedOn: none | match | match-or-logical"
    )
    demographics_check: DemographicsCheck = Field(
        default=DemographicsCheck.PARK,
        description=(
            "A study whose birth date, sex or family name disagrees with its Patient: park | warn "
            "(published, counted in the run and a metric) | off"
        ),
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
    # Connections to the upstreams (bridge/upstream/)
    http_timeout: float = Field(default=30.0, gt=0, description="Seconds per HTTP request")
    http_retries: int = Field(default=4, ge=0, le=20, description="Retries of a failed request")
    http_retry_max_wait: float = Field(
        default=30.0, ge=0, description="Longest single wait between retries, in seconds"
    )
    http_retry_total: float = Field(
        default=120.0, gt=0, description="Longest time one request may spend in retries, in seconds"
    )
    http_circuit_failures: int = Field(
        default=5, ge=1, le=1000, description="Consecutive failures that open an upstream's circuit"
    )
    http_circuit_reset: float = Field(
        default=30.0, gt=0, description="Seconds an open circuit waits before probing the upstream"
    )
    http2: bool = Field(default=True, description="Offer HTTP/2 to upstreams over TLS (ALPN)")
    # Bounds on what an upstream may make the bridge spend (operator guide, "Limits")
    http_deadline: float = Field(
        default=300.0,
        gt=0,
        le=86400,
        description="Longest one upstream request may take, connect to last byte, s",
    )
    http_stall: float = Field(
        default=15.0,
        gt=0,
        le=3600,
        description="An upstream answer with no byte for this many seconds is cut (headers included), s",
    )
    http_min_rate: int = Field(
        default=1024,
        ge=0,
        description="An upstream answer slower than this over any stretch of BRIDGE_HTTP_STALL seconds "
        "is cut, bytes/s (0: no rate check)",
    )

    log_level: str = Field(default="INFO", pattern=r"^(DEBUG|INFO|WARNING|ERROR)$")

    # Scheduled sync (bridge worker / bridge run)
    sync_interval: float | None = Field(
        default=300.0, gt=0, description="Seconds between incremental cycles (ignored if sync_cron is set)"
    )
    sync_cron: str | None = Field(
        default=None, description="Crontab expression for incremental cycles, e.g. '*/5 * * * *'"
    )
    reconcile_interval: float | None = Field(
        default=86400.0, gt=0, description="Seconds between full reconciliation sweeps"
    )
    reconcile_cron: str | None = Field(
        default=None, description="Crontab expression for reconciliation sweeps, e.g. '0 2 * * *'"
    )
    metrics_port: int | None = Field(
        default=None,
        ge=1,
        le=65535,
        description="bridge worker: serve Prometheus /metrics on this port (bridge run/serve use the API's)",
    )
    metrics_host: str = Field(default="127.0.0.1", description="Address of the worker's metrics server")
    delete_max_fraction: float = Field(
        default=0.2,
        ge=0,
        le=1,
        description="A sweep that finds more than this share of published studies gone applies no deletes",
    )

    # Resolver API (bridge serve); lists take comma-separated values
    viewers: Annotated[list[str] | None, NoDecode] = Field(
        default=None,
        description=(
            "Viewers offered, by name in mappings/viewers.yaml; default: those BRIDGE_VIEWER_URLS or "
            "BRIDGE_VIEWER_TEMPLATES configure"
        ),
    )
    default_viewer: str = Field(default="ohif", description="Viewer of /viewer when no ?viewer= is given")
    viewer_urls: dict[str, str] = Field(
        default_factory=dict, description="Viewer name -> base URL (its template's {base_url}), as JSON"
    )
    viewer_templates: dict[str, str] = Field(
        default_factory=dict, description="Viewer name -> URL template, adding or replacing one, as JSON"
    )
    api_keys: Annotated[list[SecretStr], NoDecode] = Field(
        default_factory=list, description="API keys accepted in the X-API-Key header; none: no key auth"
    )
    jwt_jwks_url: AnyHttpUrl | None = Field(
        default=None, description="JWKS URL whose keys sign the bearer JWTs callers send"
    )
    jwt_public_key: str | None = Field(default=None, description="PEM public key that signs bearer JWTs")
    jwt_audience: str | None = Field(default=None, description="Required 'aud' of bearer JWTs")
    jwt_issuer: str | None = Field(default=None, description="Required 'iss' of bearer JWTs, if set")
    jwt_algorithms: Annotated[list[str], NoDecode] = Field(
        default_factory=lambda: ["RS256", "PS256", "ES256", "EdDSA"],
        description="Accepted JWT signature algorithms (asymmetric only)",
    )
    cors_origins: Annotated[list[str], NoDecode] = Field(
        default_factory=list, description="Browser origins allowed to call the API (CORS); none: no CORS"
    )
    resolver_cache_ttl: float = Field(
        default=30.0, ge=0, le=3600, description="Seconds a resolved study is served from memory; 0: off"
    )
    resolver_cache_size: int = Field(default=10000, ge=1, description="Studies the resolver keeps cached")
    # Resolver API bounds and secure defaults (operator guide, "Limits" and "Security defaults")
    api_allow_anonymous: bool = Field(
        default=False,
        description="Let bridge serve/run listen on a non-loopback address with no API authentication",
    )
    api_metrics_auth: bool | None = Field(
        default=None,
        description=(
            "/metrics requires the API's authentication; unset: required whenever authentication is "
            "configured. false opens it (a scraper that cannot send credentials)"
        ),
    )
    api_docs_auth: bool | None = Field(
        default=None,
        description=(
            "/docs, /redoc and /openapi.json require the API's authentication; unset: required whenever "
            "authentication is configured. false opens them"
        ),
    )
    trusted_proxies: Annotated[list[str], NoDecode] = Field(
        default_factory=list,
        description=(
            "Addresses or networks (CIDR) of the proxies whose X-Forwarded-For / -Proto bridge serve "
            "believes (the nginx front's, a load balancer's); none: the connecting address is the "
            "client's, whatever a caller writes in those headers"
        ),
    )
    api_links_max_series: int = Field(
        default=1000,
        ge=1,
        le=100_000,
        description="Most series in one links answer (page with series_offset)",
    )
    api_sync_rate: int = Field(
        default=30, ge=1, le=100_000, description="On-demand syncs one client may start per minute; then 429"
    )
    push_queue_max: int = Field(
        default=10_000,
        ge=1,
        le=10_000_000,
        description="Most pushed studies waiting to be synced (Prefer: respond-async); then 429",
    )
    push_poll: float = Field(
        default=1.0,
        gt=0,
        le=3600,
        description="Seconds between looks at the push queue by bridge worker / bridge run (its own "
        "pushes are taken at once)",
    )
    # Browser login and SMART EHR launch (bridge/api/routes/login.py)
    public_url: AnyHttpUrl | None = Field(
        default=None,
        description="The bridge's address as browsers reach it; login returns to {public_url}/login/callback",
    )
    oidc_issuer: AnyHttpUrl | None = Field(
        default=None, description="OpenID Connect issuer clinicians log in at (authorization code + PKCE)"
    )
    oidc_client_id: str | None = Field(default=None, description="The bridge's client id at the issuer")
    oidc_client_secret: SecretStr | None = Field(
        default=None, description="The bridge's client secret; unset: a public client (PKCE only)"
    )
    oidc_client_secret_file: Path | None = Field(default=None, description="File holding the client secret")
    oidc_scopes: str = Field(default="openid profile", description="Scopes asked at login, space-separated")
    smart_launch_issuers: Annotated[list[str], NoDecode] = Field(
        default_factory=list,
        description="FHIR base URLs (iss) of EHRs allowed to SMART-launch the bridge; none: no EHR launch",
    )
    # The operator page (bridge/api/routes/operator.py; operator guide, "The operator page")
    operator_role: str | None = Field(
        default=None,
        description="Role a signed-in user or bearer JWT must hold (in BRIDGE_OPERATOR_ROLE_CLAIM) to use "
        "/operator; API-key callers may always; unset: API keys only",
        min_length=1,
        max_length=256,
    )
    operator_role_claim: str = Field(
        default="roles",
        description="ID token / JWT claim listing the caller's roles (a list, or a space-separated string)",
        min_length=1,
        max_length=64,
    )
    smart_launch_scopes: str = Field(
        default="launch openid fhirUser launch/patient patient/ImagingStudy.read",
        description="Scopes asked at an EHR launch, space-separated",
    )
    smart_launch_client_id: str | None = Field(
        default=None,
        description="The bridge's client id at the EHRs' authorization server; unset: BRIDGE_OIDC_CLIENT_ID",
    )
    smart_launch_client_secret: SecretStr | None = Field(
        default=None,
        description="Its client secret; unset with a launch client id: a public client (PKCE only)",
    )
    smart_launch_client_secret_file: Path | None = Field(
        default=None, description="File holding the launch client's secret"
    )
    session_max_age: float = Field(
        default=28800.0, ge=60, le=7 * 86400, description="Seconds a browser session lasts after login"
    )
    session_cache_ttl: float = Field(
        default=5.0,
        ge=0,
        le=60,
        description=(
            "Seconds a replica trusts a session it has read from the state store before reading it again; "
            "0: read it on every request. A logout on another replica takes effect here within this time"
        ),
    )

    # Image gateway and access audit (integrator guide, "SMART apps, the gateway and the audit trail")
    gateway: bool = Field(
        default=True,
        description="bridge serve answers DICOMweb at /dicom-web for the studies each caller may see",
    )
    gateway_max_response_bytes: int = Field(
        default=4 * 1024 * 1024 * 1024,
        ge=1024,
        description="Largest archive answer the gateway streams to a caller, in bytes",
    )
    gateway_front_secret: SecretStr | None = Field(
        default=None,
        description=(
            "Shared with the gateway's nginx front (bridge front-config), which sends it when it asks "
            "the bridge to authorize a study; unset: no front. At least 32 characters"
        ),
    )
    gateway_front_secret_file: Path | None = Field(
        default=None, description="File holding the front's shared secret"
    )
    audit: AuditMode = Field(
        default=AuditMode.LOG,
        description=(
            "Access audit: fhir (AuditEvents written to the FHIR server, kept in the state store "
            "until written) | log (one log line per access) | off"
        ),
    )
    audit_batch_size: int = Field(
        default=100, ge=1, le=1000, description="AuditEvents written to the FHIR server per request"
    )
    audit_flush_interval: float = Field(
        default=2.0, gt=0, le=3600, description="Seconds between writes of recorded AuditEvents"
    )
    audit_window: float = Field(
        default=60.0,
        ge=0,
        le=86400,
        description="Seconds within which one caller's accesses to one study are one AuditEvent",
    )

    # Read from oidc_client_secret_file; kept apart so the settings as given stay as given.
    _oidc_secret_from_file: SecretStr | None = PrivateAttr(default=None)
    _launch_secret_from_file: SecretStr | None = PrivateAttr(default=None)
    _front_secret_from_file: SecretStr | None = PrivateAttr(default=None)

    @field_validator(
        "viewers",
        "api_keys",
        "jwt_algorithms",
        "cors_origins",
        "smart_launch_issuers",
        "trusted_proxies",
        mode="before",
    )
    @classmethod
    def _comma_list(cls, value: Any) -> Any:
        if isinstance(value, str):
            return [item.strip() for item in value.split(",") if item.strip()]
        return value

    @field_validator("jwt_algorithms")
    @classmethod
    def _jwt_algorithms(cls, value: list[str]) -> list[str]:
        allowed = {"RS256", "RS384", "RS512", "PS256", "PS384", "PS512", "ES256", "ES384", "ES512", "EdDSA"}
        wrong = sorted(set(value) - allowed)
        if wrong or not value:
            raise ValueError(f"use asymmetric algorithms among {', '.join(sorted(allowed))}")
        return value

    @field_validator("cors_origins")
    @classmethod
    def _origins(cls, value: list[str]) -> list[str]:
        for origin in value:
            if origin != "*" and not re.fullmatch(r"https?://[^/\s?#]+", origin):
                raise ValueError(f"{origin!r} is not an origin (scheme://host[:port], no path) or *")
        return value

    @field_validator("trusted_proxies")
    @classmethod
    def _trusted_proxies(cls, value: list[str]) -> list[str]:
        for proxy in value:
            try:
                ipaddress.ip_network(proxy, strict=False)
            except ValueError:
                raise ValueError(
                    f"{proxy!r} is not an IP address or network (CIDR), e.g. 127.0.0.1 or 10.0.0.0/8"
                ) from None
        return value

    @field_validator("viewer_urls")
    @classmethod
    def _viewer_urls(cls, value: dict[str, str]) -> dict[str, str]:
        for url in value.values():
            if not re.fullmatch(r"https?://[^\s?#]+", url):
                raise ValueError(f"{url!r} is not an http(s) URL without query or fragment")
        return value

    @model_validator(mode="after")
    def _api_auth(self) -> Settings:
        if self.jwt_jwks_url is not None and self.jwt_public_key is not None:
            raise ValueError("set BRIDGE_JWT_JWKS_URL or BRIDGE_JWT_PUBLIC_KEY, not both")
        jwt_on = self.jwt_jwks_url is not None or self.jwt_public_key is not None
        if jwt_on and not self.jwt_audience:
            raise ValueError("BRIDGE_JWT_AUDIENCE is required when bearer JWTs are checked")
        if not jwt_on and (self.jwt_audience or self.jwt_issuer):
            raise ValueError("BRIDGE_JWT_AUDIENCE/ISSUER need BRIDGE_JWT_JWKS_URL or BRIDGE_JWT_PUBLIC_KEY")
        return self

    @field_validator("endpoint_identifier_system")
    @classmethod
    def _endpoint_system(cls, value: str) -> str:
        return _check_uri(value)

    @field_validator("state_url")
    @classmethod
    def _state_url(cls, value: str) -> str:
        from sqlalchemy.engine import make_url
        from sqlalchemy.exc import ArgumentError

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

    @field_validator("sync_cron", "reconcile_cron")
    @classmethod
    def _cron(cls, value: str | None) -> str | None:
        if value is not None:
            from apscheduler.triggers.cron import CronTrigger

            try:
                CronTrigger.from_crontab(value)
            except ValueError as exc:
                raise ValueError(f"not a crontab expression ({exc})") from exc
        return value

    @model_validator(mode="before")
    @classmethod
    def _shape(cls, data: Any) -> Any:
        """Flat upstream keys nested; each ``sources`` entry checked and given the top level's values."""
        if not isinstance(data, Mapping):
            return data
        data = _nest(data)
        for upstream in UPSTREAMS:  # a missing URL is then named BRIDGE_<UPSTREAM>_URL
            if not isinstance(data.get(upstream), Mapping | BaseModel):
                data.setdefault(upstream, {})
        sources = data.get("sources")
        if not isinstance(sources, list):
            return data
        dicomweb = data["dicomweb"]
        if isinstance(dicomweb, Mapping) and not dicomweb.get("url") and sources:
            first = _nest(sources[0]).get("dicomweb") if isinstance(sources[0], Mapping) else None
            if isinstance(first, Mapping) and first.get("url"):
                # With several sources, the top level needs no DICOMweb URL of its own.
                data["dicomweb"] = {**dicomweb, "url": first["url"]}
        data["sources"] = [*_resolved_sources(data, sources)]
        return data

    @model_validator(mode="after")
    def _fhir_checks(self) -> Settings:
        self.fhir.check(f"{ENV_PREFIX}FHIR_")
        return self

    @model_validator(mode="after")
    def _front_checks(self) -> Settings:
        self._front_secret_from_file = _secret_from_file(
            self.gateway_front_secret, self.gateway_front_secret_file, "BRIDGE_GATEWAY_FRONT_SECRET"
        )
        secret = self.front_secret
        if secret is not None and len(secret.get_secret_value()) < FRONT_SECRET_MIN:
            raise ValueError(f"BRIDGE_GATEWAY_FRONT_SECRET: at least {FRONT_SECRET_MIN} characters")
        if secret is not None and not self.gateway:
            raise ValueError("BRIDGE_GATEWAY_FRONT_SECRET: the front needs the gateway (BRIDGE_GATEWAY=true)")
        return self

    @property
    def front_secret(self) -> SecretStr | None:
        """The gateway front's shared secret, as given or read from its file."""
        given = self.gateway_front_secret
        return given if given is not None else self._front_secret_from_file

    @model_validator(mode="after")
    def _login_checks(self) -> Settings:
        from bridge.api.exposure import is_loopback

        self._oidc_secret_from_file = _secret_from_file(
            self.oidc_client_secret, self.oidc_client_secret_file, "BRIDGE_OIDC_CLIENT_SECRET"
        )
        self._launch_secret_from_file = _secret_from_file(
            self.smart_launch_client_secret,
            self.smart_launch_client_secret_file,
            "BRIDGE_SMART_LAUNCH_CLIENT_SECRET",
        )
        for issuer in self.smart_launch_issuers:
            if not re.match(r"^https?://[^\s/]+", issuer):
                raise ValueError(f"BRIDGE_SMART_LAUNCH_ISSUERS: {issuer!r} is not an http(s) URL")
        if not self.login_enabled:
            return self
        if self.oidc_issuer is not None and not self.oidc_client_id:
            raise ValueError("BRIDGE_OIDC_CLIENT_ID is required with BRIDGE_OIDC_ISSUER")
        if self.smart_launch_issuers and not (self.smart_launch_client_id or self.oidc_client_id):
            raise ValueError(
                "BRIDGE_SMART_LAUNCH_CLIENT_ID (or BRIDGE_OIDC_CLIENT_ID) is required with "
                "BRIDGE_SMART_LAUNCH_ISSUERS"
            )
        if self.public_url is None:
            raise ValueError(
                "BRIDGE_PUBLIC_URL is required for login: the identity provider sends browsers back to it"
            )
        if self.public_url.scheme != "https" and not is_loopback(self.public_url.host or ""):
            raise ValueError(
                "BRIDGE_PUBLIC_URL: must be https (the session cookie is Secure), except on loopback"
            )
        return self

    @property
    def login_enabled(self) -> bool:
        """Whether browsers may log in (an OpenID issuer, or EHRs allowed to launch the bridge)."""
        return self.oidc_issuer is not None or bool(self.smart_launch_issuers)

    @property
    def oidc_secret(self) -> SecretStr | None:
        """The client secret, as given or read from its file."""
        return self.oidc_client_secret if self.oidc_client_secret is not None else self._oidc_secret_from_file

    @property
    def launch_client(self) -> tuple[str, SecretStr | None]:
        """The EHR launch's client registration (id, secret): its own if set, else the login's."""
        if self.smart_launch_client_id:
            secret = self.smart_launch_client_secret or self._launch_secret_from_file
            return self.smart_launch_client_id, secret
        assert self.oidc_client_id is not None  # checked with the other login settings
        return self.oidc_client_id, self.oidc_secret

    def each_source(self) -> list[SourceSettings]:
        """The DICOMweb sources: the ``sources`` entries, or the top level as the only one."""
        if self.sources:
            return list(self.sources)
        values = {name: getattr(self, name) for name in PerSourceSettings.model_fields}
        return [SourceSettings.model_construct(name=self.source_name, **values)]

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
        sources: list[PydanticBaseSettingsSource] = [_Nested(init_settings), env_settings]
        config_file = os.environ.get(CONFIG_FILE_VARIABLE)
        if config_file:
            sources.append(_Nested(YamlConfigSettingsSource(settings_cls, yaml_file=config_file)))
        return tuple(sources)


_UPSTREAM_FIELDS = {
    "dicomweb": frozenset(ArchiveSettings.model_fields),
    "fhir": frozenset(FhirServerSettings.model_fields),
}


def _resolved_sources(top: Mapping[str, Any], entries: list[Any]) -> Iterator[SourceSettings]:
    names: set[str] = set()
    for index, entry in enumerate(entries):
        if not isinstance(entry, Mapping):
            raise ValueError(f"BRIDGE_SOURCES: entry {index} is not a mapping of settings")
        entry = dict(entry)
        name = entry.pop("name", None) or entry.get("source_name")
        entry.pop("source_name", None)
        if not name:
            raise ValueError(f"BRIDGE_SOURCES: entry {index} has no name")
        if name in names:
            raise ValueError(f"BRIDGE_SOURCES: two sources are named {name!r}; names must be unique")
        names.add(str(name))
        for key in entry:
            if key != "dicomweb" and not is_per_source(key):
                raise ValueError(f"BRIDGE_SOURCES entry {name!r}: {key!r} is not a per-source setting")
        try:
            yield SourceSettings.model_validate({"name": name, **_inherit(top, _nest(entry))})
        except ValidationError as exc:
            raise ValueError(_entry_error(str(name), exc)) from None


class _Nested(PydanticBaseSettingsSource):
    """A settings source whose flat upstream keys (``fhir_client_id``) are given nested."""

    def __init__(self, inner: PydanticBaseSettingsSource) -> None:
        super().__init__(inner.settings_cls)
        self._inner = inner

    def get_field_value(self, field: FieldInfo, field_name: str) -> tuple[Any, str, bool]:
        """Unused: values come from the inner source as a whole."""
        return self._inner.get_field_value(field, field_name)

    def __call__(self) -> dict[str, Any]:
        return _nest(self._inner())


def setting_names() -> dict[str, FieldInfo]:
    """Every setting by its flat name (``fhir_client_id``), as operators spell it, in order."""
    names: dict[str, FieldInfo] = {}
    for name, field in Settings.model_fields.items():
        if name in UPSTREAMS:
            model = ArchiveSettings if name == "dicomweb" else FhirServerSettings
            names.update((f"{name}_{sub}", info) for sub, info in model.model_fields.items())
        else:
            names[name] = field
    return names


def is_per_source(name: str) -> bool:
    """Whether a setting may differ between sources (everything about the archive side)."""
    return name in PER_SOURCE_SETTINGS or name.startswith("dicomweb_")


def _did_you_mean(name: str, known: Iterable[str]) -> str:
    """`` (did you mean X?)`` for the known name closest to a mistyped one, or nothing."""
    close = difflib.get_close_matches(name, list(known), n=1, cutoff=0.75)
    return f" (did you mean {close[0]}?)" if close else ""


def _file_lines(path: str) -> dict[tuple[str, ...], int]:
    """Each key path of a YAML config file (nested mappings too) -> its line, counted from 1."""
    try:
        with open(path, encoding="utf-8") as stream:
            root = yaml.compose(stream, Loader=yaml.SafeLoader)
    except (OSError, yaml.YAMLError):
        return {}
    lines: dict[tuple[str, ...], int] = {}

    def walk(node: yaml.Node, prefix: tuple[str, ...]) -> None:
        if not isinstance(node, yaml.MappingNode):
            return
        for key, value in node.value:
            if isinstance(key, yaml.ScalarNode):
                path_ = (*prefix, str(key.value).lower())
                lines[path_] = key.start_mark.line + 1
                walk(value, path_)

    if root is not None:
        walk(root, ())
    return lines


def _message(error: Mapping[str, Any]) -> str:
    message = str(error["msg"]).removeprefix("Value error, ")
    if error["type"] == "missing":
        return "is required but not set"
    if error["type"] == "url_parsing" and "relative URL without a base" in message:
        # pydantic's words for "no scheme": say what to write instead.
        return "is not an absolute URL: write it with its scheme, e.g. https://host/path"
    return message


def _describe(
    error: Mapping[str, Any], file_lines: Mapping[tuple[str, ...], int], config_file: str | None
) -> str:
    """One error, naming the variable, or the config file's key and line where it came from."""
    if not error["loc"]:  # a check across settings names them in its message
        return _message(error)
    loc = tuple(str(part).lower() for part in error["loc"])
    flat = "_".join(loc)
    env_name = ENV_PREFIX + flat.upper()
    in_file = next((key for key in (loc, (flat,)) if key in file_lines), None)
    known = setting_names()
    if in_file is not None and env_name not in {k.upper() for k in os.environ}:
        where = f"{CONFIG_FILE_VARIABLE} {config_file}, line {file_lines[in_file]}: key {'.'.join(in_file)}"
        if error["type"] == "extra_forbidden":
            return f"{where}: is not a known setting{_did_you_mean(flat, known)}"
        return f"{where}: {_message(error)}"
    if error["type"] == "extra_forbidden":
        return f"{env_name}: is not a known setting{_did_you_mean(env_name, _known_variables())}"
    return f"{env_name}: {_message(error)}"


def _known_variables() -> set[str]:
    return {ENV_PREFIX + name.upper() for name in setting_names()} | {CONFIG_FILE_VARIABLE}


# What a command that reads only the state store puts in place of an upstream URL left unset.
UNSET_URL = "http://unset.invalid/"


def _only_upstream_urls_missing(exc: ValidationError) -> list[str] | None:
    """The upstreams whose URL is missing, if that is all that is wrong."""
    missing = []
    for error in exc.errors():
        if error["type"] != "missing" or tuple(error["loc"]) not in {(u, "url") for u in UPSTREAMS}:
            return None
        missing.append(str(error["loc"][0]))
    return missing


def load_store_settings() -> Settings:
    """The settings of a command that reads only the state store (``bridge status``).

    The archive's and the FHIR server's URLs may be unset (they are then ``UNSET_URL``, never
    used); every other setting is checked as usual, so a bad one still stops the command.
    """
    try:
        return load_settings()
    except _UpstreamUrlsMissing as missing:
        return load_settings(**{f"{name}_url": UNSET_URL for name in missing.upstreams})


class _UpstreamUrlsMissing(ConfigurationError):
    """Only the upstreams' URLs are missing (a store-only command may go on without them)."""

    def __init__(self, message: str, upstreams: list[str]) -> None:
        super().__init__(message)
        self.upstreams = upstreams


def load_settings(**overrides: Any) -> Settings:
    """Build and validate the settings, turning any problem into a ConfigurationError naming it."""
    config_file = os.environ.get(CONFIG_FILE_VARIABLE)
    if config_file and not Path(config_file).is_file():
        raise ConfigurationError(f"{CONFIG_FILE_VARIABLE}: no such file: {config_file}")
    known = _known_variables()
    unknown = sorted(k for k in os.environ if k.upper().startswith(ENV_PREFIX) and k.upper() not in known)
    if unknown:
        hint = _did_you_mean(unknown[0].upper(), known)
        raise ConfigurationError(f"invalid configuration: {unknown[0]}: is not a known setting{hint}")
    try:
        return Settings(**overrides)
    except ValidationError as exc:
        lines = _file_lines(config_file) if config_file else {}
        details = "; ".join(_describe(e, lines, config_file) for e in exc.errors())
        upstreams = _only_upstream_urls_missing(exc)
        if upstreams:
            raise _UpstreamUrlsMissing(f"invalid configuration: {details}", upstreams) from None
        raise ConfigurationError(f"invalid configuration: {details}") from None
    except SettingsError as exc:  # a value that is not the JSON a map or list setting needs
        match = re.search(r'field "([a-z0-9_]+)"', str(exc))
        name = ENV_PREFIX + match[1].upper() if match else "a setting"
        raise ConfigurationError(f"invalid configuration: {name}: is not valid JSON") from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" (line {mark.line + 1})" if mark is not None else ""
        raise ConfigurationError(
            f"invalid configuration: {CONFIG_FILE_VARIABLE}: {config_file} is not valid YAML{where}"
        ) from None
    except (TypeError, ValueError) as exc:
        raise ConfigurationError(
            f"invalid configuration: {CONFIG_FILE_VARIABLE}: {config_file} must hold a mapping of "
            f"settings ({type(exc).__name__})"
        ) from None


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    """The process-wide settings, built once (tests call ``get_settings.cache_clear()``)."""
    return load_settings()
