"""Settings: one validated ``Settings`` object from ``BRIDGE_*`` variables and an optional YAML file."""

from __future__ import annotations

import os
import re
from enum import StrEnum
from functools import lru_cache
from pathlib import Path
from typing import Annotated, Any
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

import yaml
from pydantic import AnyHttpUrl, Field, SecretStr, ValidationError, field_validator, model_validator
from pydantic_settings import (
    BaseSettings,
    NoDecode,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    SettingsError,
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


class DeletePolicy(StrEnum):
    """What happens to the ImagingStudy of a study that is gone from the archive."""

    MARK = "mark"  # status entered-in-error
    DELETE = "delete"  # only resources the bridge wrote (meta.tag of this source)
    IGNORE = "ignore"  # left as it is; still recorded in the run


class ChangeSourceKind(StrEnum):
    """How each scheduled cycle finds what changed."""

    QIDO = "qido"  # a window of recent StudyDates, polled with QIDO-RS
    ORTHANC = "orthanc"  # Orthanc's /changes feed


class OrderPolicy(StrEnum):
    """How ImagingStudy.basedOn links the order (ServiceRequest) by accession number."""

    NONE = "none"  # no basedOn
    MATCH = "match"  # a reference to the one ServiceRequest with the accession; else none
    MATCH_OR_LOGICAL = "match-or-logical"  # else a logical reference by the accession identifier


class WriteStrategy(StrEnum):
    """How ImagingStudy and Endpoint writes are keyed on the FHIR server."""

    CLIENT_ID = "client-id"  # PUT to an id derived from the business identifier
    CONDITIONAL = "conditional"  # PUT Type?identifier=..., for servers refusing client ids


class AuthMode(StrEnum):
    """How the bridge authenticates to one upstream (bridge/auth.py)."""

    NONE = "none"
    BASIC = "basic"
    BEARER = "bearer"  # a static token
    OAUTH2 = "oauth2"  # client credentials, client_secret_basic
    SMART = "smart"  # SMART Backend Services: client credentials with private_key_jwt


class SigningAlg(StrEnum):
    """Signature algorithms of SMART Backend Services client assertions."""

    RS384 = "RS384"
    ES384 = "ES384"


# Which settings each auth mode needs, per upstream: (setting suffix, secret-file suffix or None).
_AUTH_NEEDS: dict[AuthMode, tuple[tuple[str, str | None], ...]] = {
    AuthMode.NONE: (),
    AuthMode.BASIC: (("username", None), ("password", "password_file")),
    AuthMode.BEARER: (("token", "token_file"),),
    AuthMode.OAUTH2: (("token_url", None), ("client_id", None), ("client_secret", "client_secret_file")),
    AuthMode.SMART: (("token_url", None), ("client_id", None), ("private_key_file", None)),
}
_SECRET_FILES = (
    ("password", "password_file"),
    ("token", "token_file"),
    ("client_secret", "client_secret_file"),
)


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

    # Several sources (config file): each entry overrides the per-source settings below
    sources: list[dict[str, Any]] = Field(
        default_factory=list,
        description=(
            "Several DICOMweb sources feeding this FHIR server (config file, or JSON): each entry "
            "has a unique `name` and any per-source setting (dicomweb_*, patient_*, accession_*, "
            "qido_page_size, change_source, orthanc_url, ...) overriding the top-level value"
        ),
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

    # Orders
    order_policy: OrderPolicy = Field(
        default=OrderPolicy.NONE, description="ImagingStudy.basedOn: none | match | match-or-logical"
    )

    # Mapping
    include_instances: bool = Field(
        default=False, description="List each series' instances (uid, SOP class, number)"
    )
    max_instances: int = Field(
        default=2000, ge=1, description="Studies with more instances are published without instance detail"
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
    # Connections to the upstreams (bridge/auth.py, bridge/tls.py, bridge/http.py)
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
    dicomweb_max_page_bytes: int = Field(
        default=16 * 1024 * 1024,
        ge=1024,
        description="Largest QIDO-RS page of studies or instances, in bytes",
    )
    dicomweb_max_series_bytes: int = Field(
        default=16 * 1024 * 1024, ge=1024, description="Largest answer to one series query, in bytes"
    )
    dicomweb_max_metadata_bytes: int = Field(
        default=16 * 1024 * 1024, ge=1024, description="Largest WADO-RS metadata answer, in bytes"
    )
    dicomweb_max_thumbnail_bytes: int = Field(
        default=8 * 1024 * 1024, ge=1024, description="Largest rendered thumbnail, in bytes"
    )
    dicomweb_max_pages: int = Field(
        default=100_000, ge=1, description="Most pages one QIDO-RS walk may take; more ends it with an error"
    )
    dicomweb_max_series: int = Field(
        default=10_000, ge=1, description="Studies with more series are parked, naming this setting"
    )
    fhir_max_response_bytes: int = Field(
        default=64 * 1024 * 1024, ge=1024, description="Largest answer from the FHIR server, in bytes"
    )
    dicomweb_auth: AuthMode = Field(default=AuthMode.NONE, description="none|basic|bearer|oauth2|smart")
    dicomweb_username: str | None = Field(default=None, description="User for auth=basic")
    dicomweb_password: SecretStr | None = Field(default=None, description="Password for auth=basic")
    dicomweb_password_file: Path | None = Field(default=None, description="File holding the password")
    dicomweb_token: SecretStr | None = Field(default=None, description="Static token for auth=bearer")
    dicomweb_token_file: Path | None = Field(default=None, description="File holding the static token")
    dicomweb_token_url: AnyHttpUrl | None = Field(default=None, description="OAuth2 token endpoint")
    dicomweb_client_id: str | None = Field(default=None, description="OAuth2 client id")
    dicomweb_client_secret: SecretStr | None = Field(default=None, description="Secret for auth=oauth2")
    dicomweb_client_secret_file: Path | None = Field(default=None, description="File holding it")
    dicomweb_private_key_file: Path | None = Field(default=None, description="PEM key for auth=smart")
    dicomweb_key_id: str | None = Field(default=None, description="kid of the key (auth=smart)")
    dicomweb_signing_alg: SigningAlg = Field(default=SigningAlg.RS384, description="RS384 or ES384")
    dicomweb_scopes: str | None = Field(default=None, description="Scopes to request, space-separated")
    dicomweb_ca_bundle: Path | None = Field(default=None, description="PEM CAs trusted (replaces default)")
    dicomweb_client_cert: Path | None = Field(default=None, description="PEM client certificate (mTLS)")
    dicomweb_client_key: Path | None = Field(default=None, description="PEM key of the client certificate")
    dicomweb_verify_tls: bool = Field(default=True, description="Verify the server's certificate")
    fhir_auth: AuthMode = Field(default=AuthMode.NONE, description="none|basic|bearer|oauth2|smart")
    fhir_username: str | None = Field(default=None, description="User for auth=basic")
    fhir_password: SecretStr | None = Field(default=None, description="Password for auth=basic")
    fhir_password_file: Path | None = Field(default=None, description="File holding the password")
    fhir_token: SecretStr | None = Field(default=None, description="Static token for auth=bearer")
    fhir_token_file: Path | None = Field(default=None, description="File holding the static token")
    fhir_token_url: AnyHttpUrl | None = Field(default=None, description="OAuth2 token endpoint")
    fhir_client_id: str | None = Field(default=None, description="OAuth2 client id")
    fhir_client_secret: SecretStr | None = Field(default=None, description="Secret for auth=oauth2")
    fhir_client_secret_file: Path | None = Field(default=None, description="File holding it")
    fhir_private_key_file: Path | None = Field(default=None, description="PEM key for auth=smart")
    fhir_key_id: str | None = Field(default=None, description="kid of the key (auth=smart)")
    fhir_signing_alg: SigningAlg = Field(default=SigningAlg.RS384, description="RS384 or ES384")
    fhir_scopes: str | None = Field(
        default=None, description="Scopes to request, space-separated, e.g. system/ImagingStudy.write"
    )
    fhir_ca_bundle: Path | None = Field(default=None, description="PEM CAs trusted (replaces default)")
    fhir_client_cert: Path | None = Field(default=None, description="PEM client certificate (mTLS)")
    fhir_client_key: Path | None = Field(default=None, description="PEM key of the client certificate")
    fhir_verify_tls: bool = Field(default=True, description="Verify the server's certificate")
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
    delete_max_fraction: float = Field(
        default=0.2,
        ge=0,
        le=1,
        description="A sweep that finds more than this share of published studies gone applies no deletes",
    )

    # Resolver API (bridge serve); lists take comma-separated values
    viewers: Annotated[list[str] | None, NoDecode] = Field(
        default=None, description="Viewers offered, by name in mappings/viewers.yaml; default: every one"
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
    api_metrics_auth: bool = Field(
        default=False, description="/metrics requires the API's authentication too (when it is configured)"
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

    @field_validator("viewers", "api_keys", "jwt_algorithms", "cors_origins", mode="before")
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
    def _first_source_is_the_default(cls, data: Any) -> Any:
        # With several sources, the top level needs no DICOMweb URL of its own.
        if isinstance(data, dict) and not data.get("dicomweb_url"):
            sources = data.get("sources")
            if isinstance(sources, list) and sources and isinstance(sources[0], dict):
                if sources[0].get("dicomweb_url"):
                    data = {**data, "dicomweb_url": sources[0]["dicomweb_url"]}
        return data

    @field_validator("sources")
    @classmethod
    def _sources(cls, value: list[dict[str, Any]]) -> list[dict[str, Any]]:
        names: set[str] = set()
        for index, entry in enumerate(value):
            name = entry.get("name", entry.get("source_name"))
            if not name:
                raise ValueError(f"entry {index} has no name")
            if name in names:
                raise ValueError(f"two sources are named {name!r}; names must be unique")
            names.add(str(name))
            for key in entry:
                if key not in ("name", "source_name") and not is_per_source(key):
                    raise ValueError(f"entry {name!r}: {key!r} is not a per-source setting")
        return value

    def for_each_source(self) -> list[Settings]:
        """One Settings per source: the top level alone, or each ``sources`` entry over it."""
        if not self.sources:
            return [self]
        base = self.model_dump(exclude={"sources"})
        result = []
        for entry in self.sources:
            data = {**base, "dicomweb_public_url": None, "sources": []}
            data.update({("source_name" if k == "name" else k): v for k, v in entry.items()})
            try:
                result.append(type(self)(**data))
            except ValidationError as exc:
                details = "; ".join(
                    f"{'.'.join(str(p) for p in e['loc']) or 'entry'}: {e['msg']}"
                    for e in exc.errors(include_input=False)
                )
                raise ConfigurationError(
                    f"invalid configuration: BRIDGE_SOURCES entry {data['source_name']!r}: {details}"
                ) from None
        return result

    @model_validator(mode="after")
    def _defaults(self) -> Settings:
        if self.dicomweb_public_url is None:
            self.dicomweb_public_url = self.dicomweb_url
        if self.change_source is ChangeSourceKind.ORTHANC and self.orthanc_url is None:
            raise ValueError("BRIDGE_ORTHANC_URL is required when BRIDGE_CHANGE_SOURCE is orthanc")
        return self

    @model_validator(mode="after")
    def _connections(self) -> Settings:
        """Secrets read from their files, and each upstream's auth and TLS settings checked together."""
        for service in ("dicomweb", "fhir"):
            prefix = f"{ENV_PREFIX}{service.upper()}_"
            for secret, file_field in _SECRET_FILES:
                path = getattr(self, f"{service}_{file_field}")
                if path is None:
                    continue
                file_setting = f"{prefix}{file_field.upper()}"
                if getattr(self, f"{service}_{secret}") is not None:
                    raise ValueError(f"set {prefix}{secret.upper()} or {file_setting}, not both")
                try:
                    text = Path(path).read_text(encoding="utf-8").strip()
                except (OSError, UnicodeError) as exc:
                    raise ValueError(f"{file_setting}: cannot read {path} ({type(exc).__name__})") from None
                if not text:
                    raise ValueError(f"{file_setting}: {path} is empty")
                setattr(self, f"{service}_{secret}", SecretStr(text))
            mode: AuthMode = getattr(self, f"{service}_auth")
            for needed, secret_file in _AUTH_NEEDS[mode]:
                if getattr(self, f"{service}_{needed}") in (None, ""):
                    alternative = f" (or {prefix}{secret_file.upper()})" if secret_file else ""
                    raise ValueError(
                        f"{prefix}{needed.upper()}{alternative} is required when {prefix}AUTH is {mode.value}"
                    )
            if mode is AuthMode.SMART:
                from bridge.auth import load_private_key

                algorithm: SigningAlg = getattr(self, f"{service}_signing_alg")
                try:
                    load_private_key(getattr(self, f"{service}_private_key_file"), algorithm.value)
                except ValueError as exc:
                    raise ValueError(
                        f"{prefix}PRIVATE_KEY_FILE: {exc} ({prefix}SIGNING_ALG is {algorithm.value})"
                    ) from None
            from bridge.tls import check_files

            problem = check_files(
                ca_bundle=getattr(self, f"{service}_ca_bundle"),
                client_cert=getattr(self, f"{service}_client_cert"),
                client_key=getattr(self, f"{service}_client_key"),
            )
            if problem:
                raise ValueError(prefix + problem)
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


PER_SOURCE_SETTINGS = frozenset(
    {
        "source_name",
        "qido_page_size",
        "patient_policy",
        "patient_identifier_system",
        "patient_issuer_systems",
        "accession_identifier_system",
        "accession_issuer_systems",
        "dicom_timezone",
        "include_instances",
        "max_instances",
        "read_instance_header",
        "change_source",
        "orthanc_url",
        "poll_window_days",
        "delete_policy",
    }
)


def is_per_source(name: str) -> bool:
    """Whether a setting may differ between sources (everything about the archive side)."""
    return name in PER_SOURCE_SETTINGS or name.startswith("dicomweb_")


def _describe(error: dict[str, Any]) -> str:
    message = str(error["msg"]).removeprefix("Value error, ")
    if not error["loc"]:  # a check across settings names them in its message
        return message
    name = ENV_PREFIX + str(error["loc"][0]).upper()
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
