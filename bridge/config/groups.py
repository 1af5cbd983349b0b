"""The settings that belong together, one model per group (``Settings.http``, ``Settings.jwt``, ...).

Each field keeps its flat name, ``<group>_<field>`` unless the group's ``flat_names`` says otherwise:
``BRIDGE_HTTP_TIMEOUT`` (config key ``http_timeout``) is ``http.timeout``, ``BRIDGE_GATEWAY`` is
``gateway.enabled``. Checks within a group live on its model and name the flat settings they refuse.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from enum import StrEnum
from pathlib import Path
from typing import Annotated, Any, ClassVar

from pydantic import (
    AnyHttpUrl,
    BaseModel,
    ConfigDict,
    Field,
    PrivateAttr,
    SecretStr,
    field_validator,
    model_validator,
)
from pydantic_settings import NoDecode

from bridge.config.files import secret_from_file

FRONT_SECRET_MIN = 32  # characters of the gateway front's shared secret
_JWT_ALGORITHMS = frozenset(
    {"RS256", "RS384", "RS512", "PS256", "PS384", "PS512", "ES256", "ES384", "ES512", "EdDSA"}
)


def split_commas(value: Any) -> Any:
    """A list setting given as text: its comma-separated items."""
    if isinstance(value, str):
        return [item.strip() for item in value.split(",") if item.strip()]
    return value


def check_cron(value: str | None) -> str | None:
    """``value`` if it is a crontab expression (the scheduler's own parser decides)."""
    if value is not None:
        from apscheduler.triggers.cron import CronTrigger

        try:
            CronTrigger.from_crontab(value)
        except ValueError as exc:
            raise ValueError(f"not a crontab expression ({exc})") from exc
    return value


class Group(BaseModel):
    """A group of settings; its fields are read flat, as ``<group>_<field>`` or their ``flat_names``."""

    model_config = ConfigDict(extra="forbid")

    flat_names: ClassVar[Mapping[str, str]] = {}  # field -> flat name, where not <group>_<field>


class HttpSettings(Group):
    """Connections to the upstreams (bridge/upstream/: credentials, TLS, retries, bounds)."""

    flat_names: ClassVar[Mapping[str, str]] = {"http2": "http2"}

    timeout: float = Field(default=30.0, gt=0, description="Seconds per HTTP request")
    retries: int = Field(default=4, ge=0, le=20, description="Retries of a failed request")
    retry_max_wait: float = Field(
        default=30.0, ge=0, description="Longest single wait between retries, in seconds"
    )
    retry_total: float = Field(
        default=120.0, gt=0, description="Longest time one request may spend in retries, in seconds"
    )
    circuit_failures: int = Field(
        default=5, ge=1, le=1000, description="Consecutive failures that open an upstream's circuit"
    )
    circuit_reset: float = Field(
        default=30.0, gt=0, description="Seconds an open circuit waits before probing the upstream"
    )
    http2: bool = Field(default=True, description="Offer HTTP/2 to upstreams over TLS (ALPN)")
    # Bounds on what an upstream may make the bridge spend (operator guide, "Limits")
    deadline: float = Field(
        default=300.0,
        gt=0,
        le=86400,
        description="Longest one upstream request may take, connect to last byte, s",
    )
    stall: float = Field(
        default=15.0,
        gt=0,
        le=3600,
        description="An upstream answer with no byte for this many seconds is cut (headers included), s",
    )
    min_rate: int = Field(
        default=1024,
        ge=0,
        description="An upstream answer slower than this over any stretch of BRIDGE_HTTP_STALL seconds "
        "is cut, bytes/s (0: no rate check)",
    )


class SyncSettings(Group):
    """How the sync runs: studies at once, and the schedule of incremental cycles (bridge worker / run)."""

    concurrency: int = Field(default=4, ge=1, le=64, description="Studies synced at once")
    interval: float | None = Field(
        default=300.0, gt=0, description="Seconds between incremental cycles (ignored if sync_cron is set)"
    )
    cron: str | None = Field(
        default=None, description="Crontab expression for incremental cycles, e.g. '*/5 * * * *'"
    )
    merge_check_interval: float = Field(
        default=300.0,
        ge=0,
        description=(
            "Seconds between the cycles' checks for Patients merged on the FHIR server (one search; "
            "their studies are re-linked); 0: only the reconciliation sweep checks"
        ),
    )

    _cron = field_validator("cron")(check_cron)


class ReconcileSettings(Group):
    """The schedule of full reconciliation sweeps."""

    interval: float | None = Field(
        default=86400.0, gt=0, description="Seconds between full reconciliation sweeps"
    )
    cron: str | None = Field(
        default=None, description="Crontab expression for reconciliation sweeps, e.g. '0 2 * * *'"
    )

    _cron = field_validator("cron")(check_cron)


class MetricsSettings(Group):
    """The worker's own Prometheus server."""

    port: int | None = Field(
        default=None,
        ge=1,
        le=65535,
        description="bridge worker: serve Prometheus /metrics on this port (bridge run/serve use the API's)",
    )
    host: str = Field(default="127.0.0.1", description="Address of the worker's metrics server")


class ApiSettings(Group):
    """The resolver API's keys, bounds and secure defaults (operator guide, "Limits", "Security defaults")."""

    keys: Annotated[list[SecretStr], NoDecode] = Field(
        default_factory=list, description="API keys accepted in the X-API-Key header; none: no key auth"
    )
    allow_anonymous: bool = Field(
        default=False,
        description="Let bridge serve/run listen on a non-loopback address with no API authentication",
    )
    metrics_auth: bool | None = Field(
        default=None,
        description=(
            "/metrics requires the API's authentication; unset: required whenever authentication is "
            "configured. false opens it (a scraper that cannot send credentials)"
        ),
    )
    docs_auth: bool | None = Field(
        default=None,
        description=(
            "/docs, /redoc and /openapi.json require the API's authentication; unset: required whenever "
            "authentication is configured. false opens them"
        ),
    )
    links_max_series: int = Field(
        default=1000,
        ge=1,
        le=100_000,
        description="Most series in one links answer (page with series_offset)",
    )
    sync_rate: int = Field(
        default=30, ge=1, le=100_000, description="On-demand syncs one client may start per minute; then 429"
    )

    _keys = field_validator("keys", mode="before")(split_commas)


class JwtSettings(Group):
    """Bearer JWTs callers of the API send, and how they are checked."""

    jwks_url: AnyHttpUrl | None = Field(
        default=None, description="JWKS URL whose keys sign the bearer JWTs callers send"
    )
    public_key: str | None = Field(default=None, description="PEM public key that signs bearer JWTs")
    audience: str | None = Field(default=None, description="Required 'aud' of bearer JWTs")
    issuer: str | None = Field(default=None, description="Required 'iss' of bearer JWTs, if set")
    algorithms: Annotated[list[str], NoDecode] = Field(
        default_factory=lambda: ["RS256", "PS256", "ES256", "EdDSA"],
        description="Accepted JWT signature algorithms (asymmetric only)",
    )

    _algorithms_split = field_validator("algorithms", mode="before")(split_commas)

    @field_validator("algorithms")
    @classmethod
    def _algorithms(cls, value: list[str]) -> list[str]:
        wrong = sorted(set(value) - _JWT_ALGORITHMS)
        if wrong or not value:
            raise ValueError(f"use asymmetric algorithms among {', '.join(sorted(_JWT_ALGORITHMS))}")
        return value

    @property
    def enabled(self) -> bool:
        """Whether bearer JWTs are checked (a JWKS URL or a public key is set)."""
        return self.jwks_url is not None or self.public_key is not None

    @model_validator(mode="after")
    def _together(self) -> JwtSettings:
        if self.jwks_url is not None and self.public_key is not None:
            raise ValueError("set BRIDGE_JWT_JWKS_URL or BRIDGE_JWT_PUBLIC_KEY, not both")
        if self.enabled and not self.audience:
            raise ValueError("BRIDGE_JWT_AUDIENCE is required when bearer JWTs are checked")
        if not self.enabled and (self.audience or self.issuer):
            raise ValueError("BRIDGE_JWT_AUDIENCE/ISSUER need BRIDGE_JWT_JWKS_URL or BRIDGE_JWT_PUBLIC_KEY")
        return self


class ResolverSettings(Group):
    """The resolver's cache of resolved studies."""

    cache_ttl: float = Field(
        default=30.0, ge=0, le=3600, description="Seconds a resolved study is served from memory; 0: off"
    )
    cache_size: int = Field(default=10000, ge=1, description="Studies the resolver keeps cached")


class PushSettings(Group):
    """Studies pushed to the bridge (Prefer: respond-async), waiting to be synced."""

    queue_max: int = Field(
        default=10_000,
        ge=1,
        le=10_000_000,
        description="Most pushed studies waiting to be synced (Prefer: respond-async); then 429",
    )
    poll: float = Field(
        default=1.0,
        gt=0,
        le=3600,
        description="Seconds between looks at the push queue by bridge worker / bridge run (its own "
        "pushes are taken at once)",
    )


class ClientRegistration(Group):
    """The bridge's registration at an authorization server: its client id and secret (or its file)."""

    secret_setting: ClassVar[str]  # the variable of client_secret, which start-up errors name

    client_id: str | None = None
    client_secret: SecretStr | None = None
    client_secret_file: Path | None = None

    # Read from client_secret_file; kept apart so the settings as given stay as given.
    _secret_from_file: SecretStr | None = PrivateAttr(default=None)

    @property
    def secret(self) -> SecretStr | None:
        """The client secret, as given or read from its file."""
        return self.client_secret if self.client_secret is not None else self._secret_from_file

    @model_validator(mode="after")
    def _read_secret_file(self) -> ClientRegistration:
        self._secret_from_file = secret_from_file(
            self.client_secret, self.client_secret_file, self.secret_setting
        )
        return self


class OidcSettings(ClientRegistration):
    """Browser login at an OpenID Connect issuer (bridge/api/routes/login.py)."""

    secret_setting: ClassVar[str] = "BRIDGE_OIDC_CLIENT_SECRET"

    issuer: AnyHttpUrl | None = Field(
        default=None, description="OpenID Connect issuer clinicians log in at (authorization code + PKCE)"
    )
    client_id: str | None = Field(default=None, description="The bridge's client id at the issuer")
    client_secret: SecretStr | None = Field(
        default=None, description="The bridge's client secret; unset: a public client (PKCE only)"
    )
    client_secret_file: Path | None = Field(default=None, description="File holding the client secret")
    scopes: str = Field(default="openid profile", description="Scopes asked at login, space-separated")


class SmartLaunchSettings(ClientRegistration):
    """EHRs allowed to SMART-launch the bridge, and its client registration there."""

    secret_setting: ClassVar[str] = "BRIDGE_SMART_LAUNCH_CLIENT_SECRET"

    issuers: Annotated[list[str], NoDecode] = Field(
        default_factory=list,
        description="FHIR base URLs (iss) of EHRs allowed to SMART-launch the bridge; none: no EHR launch",
    )
    scopes: str = Field(
        default="launch openid fhirUser launch/patient patient/ImagingStudy.read",
        description="Scopes asked at an EHR launch, space-separated",
    )
    client_id: str | None = Field(
        default=None,
        description="The bridge's client id at the EHRs' authorization server; unset: BRIDGE_OIDC_CLIENT_ID",
    )
    client_secret: SecretStr | None = Field(
        default=None,
        description="Its client secret; unset with a launch client id: a public client (PKCE only)",
    )
    client_secret_file: Path | None = Field(
        default=None, description="File holding the launch client's secret"
    )

    _issuers_split = field_validator("issuers", mode="before")(split_commas)

    @field_validator("issuers")
    @classmethod
    def _issuers(cls, value: list[str]) -> list[str]:
        for issuer in value:
            if not re.match(r"^https?://[^\s/]+", issuer):
                raise ValueError(f"{issuer!r} is not an http(s) URL")
        return value


class OperatorSettings(Group):
    """Who may use the operator page (bridge/api/routes/operator.py; operator guide, "The operator page")."""

    role: str | None = Field(
        default=None,
        description="Role a signed-in user or bearer JWT must hold (in BRIDGE_OPERATOR_ROLE_CLAIM) to use "
        "/operator; API-key callers may always; unset: API keys only",
        min_length=1,
        max_length=256,
    )
    role_claim: str = Field(
        default="roles",
        description="ID token / JWT claim listing the caller's roles (a list, or a space-separated string)",
        min_length=1,
        max_length=64,
    )


class SessionSettings(Group):
    """Browser sessions after login."""

    max_age: float = Field(
        default=28800.0, ge=60, le=7 * 86400, description="Seconds a browser session lasts after login"
    )
    cache_ttl: float = Field(
        default=5.0,
        ge=0,
        le=60,
        description=(
            "Seconds a replica trusts a session it has read from the state store before reading it again; "
            "0: read it on every request. A logout on another replica takes effect here within this time"
        ),
    )


class GatewaySettings(Group):
    """The image gateway and its nginx front (integrator guide, "SMART apps, the gateway and the audit")."""

    flat_names: ClassVar[Mapping[str, str]] = {"enabled": "gateway"}

    enabled: bool = Field(
        default=True,
        description="bridge serve answers DICOMweb at /dicom-web for the studies each caller may see",
    )
    max_response_bytes: int = Field(
        default=4 * 1024 * 1024 * 1024,
        ge=1024,
        description="Largest archive answer the gateway streams to a caller, in bytes",
    )
    front_secret: SecretStr | None = Field(
        default=None,
        description=(
            "Shared with the gateway's nginx front (bridge front-config), which sends it when it asks "
            "the bridge to authorize a study; unset: no front. At least 32 characters"
        ),
    )
    front_secret_file: Path | None = Field(default=None, description="File holding the front's shared secret")

    # Read from front_secret_file; kept apart so the settings as given stay as given.
    _secret_from_file: SecretStr | None = PrivateAttr(default=None)

    @property
    def secret(self) -> SecretStr | None:
        """The front's shared secret, as given or read from its file."""
        return self.front_secret if self.front_secret is not None else self._secret_from_file

    @model_validator(mode="after")
    def _front(self) -> GatewaySettings:
        self._secret_from_file = secret_from_file(
            self.front_secret, self.front_secret_file, "BRIDGE_GATEWAY_FRONT_SECRET"
        )
        secret = self.secret
        if secret is not None and len(secret.get_secret_value()) < FRONT_SECRET_MIN:
            raise ValueError(f"BRIDGE_GATEWAY_FRONT_SECRET: at least {FRONT_SECRET_MIN} characters")
        if secret is not None and not self.enabled:
            raise ValueError("BRIDGE_GATEWAY_FRONT_SECRET: the front needs the gateway (BRIDGE_GATEWAY=true)")
        return self


class AuditMode(StrEnum):
    """Where the access audit goes (bridge/audit)."""

    FHIR = "fhir"
    LOG = "log"
    OFF = "off"


class AuditSettings(Group):
    """The access audit (bridge/audit)."""

    flat_names: ClassVar[Mapping[str, str]] = {"mode": "audit"}

    mode: AuditMode = Field(
        default=AuditMode.LOG,
        description=(
            "Access audit: fhir (AuditEvents written to the FHIR server, kept in the state store "
            "until written) | log (one log line per access) | off"
        ),
    )
    batch_size: int = Field(
        default=100, ge=1, le=1000, description="AuditEvents written to the FHIR server per request"
    )
    flush_interval: float = Field(
        default=2.0, gt=0, le=3600, description="Seconds between writes of recorded AuditEvents"
    )
    window: float = Field(
        default=60.0,
        ge=0,
        le=86400,
        description="Seconds within which one caller's accesses to one study are one AuditEvent",
    )
