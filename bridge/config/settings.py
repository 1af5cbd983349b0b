"""``Settings``: every setting of the bridge, in groups, each also read by its flat ``BRIDGE_*`` name.

Shape: the upstreams (``dicomweb``, ``fhir``) and the groups (``http``, ``jwt``, ``oidc``, ...) are
nested models; the rest, and everything that may differ between DICOMweb sources, sits at the top.
Every source of values (keyword arguments, the environment, the YAML file) may use the flat names
operators know: ``BRIDGE_HTTP_TIMEOUT`` and the config key ``http_timeout`` are ``http.timeout``.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterator, Mapping
from functools import lru_cache
from pathlib import Path
from typing import Annotated, Any

from pydantic import (
    AnyHttpUrl,
    BaseModel,
    Field,
    SecretStr,
    ValidationError,
    create_model,
    field_validator,
    model_validator,
)
from pydantic.fields import FieldInfo
from pydantic_settings import (
    BaseSettings,
    EnvSettingsSource,
    NoDecode,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    YamlConfigSettingsSource,
)

from bridge.config.choices import DemographicsCheck, OrderPolicy, WriteStrategy
from bridge.config.groups import (
    ApiSettings,
    AuditSettings,
    GatewaySettings,
    Group,
    HttpSettings,
    JwtSettings,
    MetricsSettings,
    OidcSettings,
    OperatorSettings,
    PushSettings,
    ReconcileSettings,
    ResolverSettings,
    SessionSettings,
    SmartLaunchSettings,
    SyncSettings,
    split_commas,
)
from bridge.config.hosts import is_loopback
from bridge.config.source import (
    ENV_PREFIX,
    SOURCE_NAME,
    EntryProblem,
    PerSourceSettings,
    SourceEntryError,
    SourceSettings,
    entry_error,
    inherit,
    is_per_source,
)
from bridge.config.upstream import FhirServerSettings, check_uri

CONFIG_FILE_VARIABLE = "BRIDGE_CONFIG_FILE"
UPSTREAMS = ("dicomweb", "fhir")


def _any_mapping_items(schema: dict[str, Any]) -> None:
    schema["items"] = {"type": "object", "additionalProperties": True}


class Settings(PerSourceSettings, BaseSettings):
    """Every setting of the bridge; each is read from ``BRIDGE_<NAME>`` or the config file."""

    model_config = SettingsConfigDict(extra="forbid", case_sensitive=False, validate_default=True)

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
    source_name: Annotated[str, Field(pattern=SOURCE_NAME)] = Field(
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
    sync: SyncSettings = Field(default_factory=SyncSettings)
    http: HttpSettings = Field(default_factory=HttpSettings)
    log_level: str = Field(default="INFO", pattern=r"^(DEBUG|INFO|WARNING|ERROR)$")
    reconcile: ReconcileSettings = Field(default_factory=ReconcileSettings)
    metrics: MetricsSettings = Field(default_factory=MetricsSettings)
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
    api: ApiSettings = Field(default_factory=ApiSettings)
    jwt: JwtSettings = Field(default_factory=JwtSettings)
    cors_origins: Annotated[list[str], NoDecode] = Field(
        default_factory=list, description="Browser origins allowed to call the API (CORS); none: no CORS"
    )
    resolver: ResolverSettings = Field(default_factory=ResolverSettings)
    trusted_proxies: Annotated[list[str], NoDecode] = Field(
        default_factory=list,
        description=(
            "Addresses or networks (CIDR) of the proxies whose X-Forwarded-For / -Proto the API "
            "believes (a load balancer's; the nginx front needs no entry, it sends its secret); none: "
            "the connecting address is the client's, whatever a caller writes in those headers"
        ),
    )
    push: PushSettings = Field(default_factory=PushSettings)

    # Browser login and SMART EHR launch (bridge/api/routes/login.py)
    public_url: AnyHttpUrl | None = Field(
        default=None,
        description="The bridge's address as browsers reach it; login returns to {public_url}/login/callback",
    )
    oidc: OidcSettings = Field(default_factory=OidcSettings)
    smart_launch: SmartLaunchSettings = Field(default_factory=SmartLaunchSettings)
    operator: OperatorSettings = Field(default_factory=OperatorSettings)
    session: SessionSettings = Field(default_factory=SessionSettings)

    # Image gateway and access audit (integrator guide, "SMART apps, the gateway and the audit trail")
    gateway: GatewaySettings = Field(default_factory=GatewaySettings)
    audit: AuditSettings = Field(default_factory=AuditSettings)

    _lists = field_validator("viewers", "cors_origins", "trusted_proxies", mode="before")(split_commas)

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
        import ipaddress

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

    @field_validator("endpoint_identifier_system")
    @classmethod
    def _endpoint_system(cls, value: str) -> str:
        return check_uri(value)

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

    @model_validator(mode="before")
    @classmethod
    def _shape(cls, data: Any) -> Any:
        """Flat keys nested; each ``sources`` entry checked and given the top level's values."""
        if not isinstance(data, Mapping):
            return data
        data = nest(data)
        for upstream in UPSTREAMS:  # a missing URL is then named BRIDGE_<UPSTREAM>_URL
            if not isinstance(data.get(upstream), Mapping | BaseModel):
                data.setdefault(upstream, {})
        sources = data.get("sources")
        if not isinstance(sources, list):
            return data
        dicomweb = data["dicomweb"]
        if isinstance(dicomweb, Mapping) and not dicomweb.get("url") and sources:
            first = nest(sources[0]).get("dicomweb") if isinstance(sources[0], Mapping) else None
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
    def _login_checks(self) -> Settings:
        if not self.login_enabled:
            return self
        if self.oidc.issuer is not None and not self.oidc.client_id:
            raise ValueError("BRIDGE_OIDC_CLIENT_ID is required with BRIDGE_OIDC_ISSUER")
        if self.smart_launch.issuers and not (self.smart_launch.client_id or self.oidc.client_id):
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
        return self.oidc.issuer is not None or bool(self.smart_launch.issuers)

    @property
    def launch_client(self) -> tuple[str, SecretStr | None]:
        """The EHR launch's client registration (id, secret): its own if set, else the login's."""
        if self.smart_launch.client_id:
            return self.smart_launch.client_id, self.smart_launch.secret
        assert self.oidc.client_id is not None  # checked with the other login settings
        return self.oidc.client_id, self.oidc.secret

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
        sources: list[PydanticBaseSettingsSource] = [_Nested(init_settings), _Nested(_flat_environment())]
        config_file = os.environ.get(CONFIG_FILE_VARIABLE)
        if config_file:
            sources.append(_Nested(YamlConfigSettingsSource(settings_cls, yaml_file=config_file)))
        return tuple(sources)


def _resolved_sources(top: Mapping[str, Any], entries: list[Any]) -> Iterator[SourceSettings]:
    names: set[str] = set()
    for index, entry in enumerate(entries):
        if not isinstance(entry, Mapping):
            problem = EntryProblem((), "value_error", "is not a mapping of settings")
            raise SourceEntryError(index, None, [problem])
        entry = dict(entry)
        name = entry.pop("name", None) or entry.get("source_name")
        entry.pop("source_name", None)
        if not name:
            raise SourceEntryError(index, None, [EntryProblem((), "value_error", "has no name")])
        if name in names:
            raise SourceEntryError(
                index,
                str(name),
                [EntryProblem((), "value_error", f"two sources are named {name!r}; names must be unique")],
            )
        names.add(str(name))
        known = setting_paths()
        wrong = [
            EntryProblem((key,), "extra_forbidden" if key not in known else "not_per_source", "")
            for key in entry
            if key != "dicomweb" and (key not in known or not is_per_source(key))
        ]
        if wrong:
            raise SourceEntryError(index, str(name), wrong)
        try:
            yield SourceSettings.model_validate({"name": name, **inherit(top, nest(entry))})
        except ValidationError as exc:
            raise entry_error(index, str(name), exc) from None


@lru_cache(maxsize=1)
def setting_paths() -> dict[str, tuple[str, ...]]:
    """Every setting's flat name, as operators spell it, in order, with where it sits in ``Settings``.

    ``fhir_client_id`` is ``("fhir", "client_id")``, ``gateway`` is ``("gateway", "enabled")``.
    """
    paths: dict[str, tuple[str, ...]] = {}
    for name, field in Settings.model_fields.items():
        model = field.annotation
        if isinstance(model, type) and issubclass(model, BaseModel):
            renamed = model.flat_names if issubclass(model, Group) else {}
            for sub in model.model_fields:
                paths[renamed.get(sub, f"{name}_{sub}")] = (name, sub)
        else:
            paths[name] = (name,)
    return paths


def setting_names() -> dict[str, FieldInfo]:
    """Every setting by its flat name (``fhir_client_id``), as operators spell it, in order."""
    names: dict[str, FieldInfo] = {}
    for flat, path in setting_paths().items():
        field = Settings.model_fields[path[0]]
        if len(path) == 2:
            assert isinstance(field.annotation, type) and issubclass(field.annotation, BaseModel)
            field = field.annotation.model_fields[path[1]]
        names[flat] = field
    return names


@lru_cache(maxsize=1)
def nested_models() -> frozenset[str]:
    """The top-level settings that are nested models (the upstreams and the groups)."""
    return frozenset(path[0] for path in setting_paths().values() if len(path) == 2)


def nest(data: Mapping[str, Any]) -> dict[str, Any]:
    """Flat keys (``fhir_client_id``, ``http_timeout``) as the nested setting (``fhir.client_id``)."""
    paths = setting_paths()
    models = nested_models()
    result: dict[str, Any] = {}
    nested: dict[str, dict[str, Any]] = {}
    for key, value in data.items():
        path = paths.get(key)
        if key in models and isinstance(value, Mapping | BaseModel):
            result[key] = value  # the group given whole; a flat name that is also a group is not
        elif path is not None and len(path) == 2:
            nested.setdefault(path[0], {})[path[1]] = value
        else:
            result[key] = value
    for model, values in nested.items():
        given = result.get(model)
        result[model] = {**values, **given} if isinstance(given, Mapping) else values
    return result


class _Nested(PydanticBaseSettingsSource):
    """A settings source whose flat keys (``fhir_client_id``) are given nested."""

    def __init__(self, inner: PydanticBaseSettingsSource) -> None:
        super().__init__(inner.settings_cls)
        self._inner = inner

    def get_field_value(self, field: FieldInfo, field_name: str) -> tuple[Any, str, bool]:
        """Unused: values come from the inner source as a whole."""
        return self._inner.get_field_value(field, field_name)

    def __call__(self) -> dict[str, Any]:
        return nest(self._inner())


class _FlatVariables(BaseSettings):
    """How ``BRIDGE_*`` variables are read: one per flat setting name (its fields are added lazily)."""

    # Never validated: EnvSettingsSource reads only its fields, so its schema is not built (~15 ms).
    model_config = SettingsConfigDict(
        env_prefix=ENV_PREFIX, case_sensitive=False, extra="ignore", defer_build=True
    )


@lru_cache(maxsize=1)
def _flat_model() -> type[BaseSettings]:
    """A settings class with a field per flat name, for reading the ``BRIDGE_*`` variables.

    pydantic-settings then reads and decodes each variable (JSON maps, comma lists) as it would a
    field of its own; ``_Nested`` puts the values where they belong.
    """
    fields: dict[str, Any] = {name: (info.annotation, info) for name, info in setting_names().items()}
    return create_model("FlatSettings", __base__=_FlatVariables, **fields)


def _flat_environment() -> EnvSettingsSource:
    return EnvSettingsSource(_flat_model())
