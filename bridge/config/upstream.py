"""How the bridge reaches an upstream: ``UpstreamSettings``, used for the archive and the FHIR server."""

from __future__ import annotations

import re
from enum import StrEnum
from pathlib import Path
from typing import Literal

from pydantic import AnyHttpUrl, BaseModel, ConfigDict, Field, PrivateAttr, SecretStr

from bridge.config.choices import SeriesQuery
from bridge.config.files import SigningAlg, check_files, load_private_key, secret_from_file

Secret = Literal["password", "token", "client_secret"]
# Each secret setting and the setting naming a file that may hold it instead.
SECRET_FILES: tuple[tuple[Secret, str], ...] = (
    ("password", "password_file"),
    ("token", "token_file"),
    ("client_secret", "client_secret_file"),
)
_URI = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*:\S+$")


def check_uri(value: str) -> str:
    """``value`` if it is an absolute URI; the ValueError says what one looks like."""
    if not _URI.match(value):
        raise ValueError(f"{value!r} is not an absolute URI (e.g. urn:oid:1.2.3 or https://...)")
    return value


class AuthMode(StrEnum):
    """How the bridge authenticates to one upstream, with the settings each kind needs.

    A new kind is one member here (its value and what it needs) and its credential in
    bridge/upstream/client.py (built from bridge/upstream/credentials.py).
    """

    needs: tuple[str, ...]  # settings required (a secret may come from its file)

    def __new__(cls, value: str, *needs: str) -> AuthMode:
        """A member: its value, then the settings it needs."""
        member = str.__new__(cls, value)
        member._value_ = value
        member.needs = needs
        return member

    NONE = ("none",)
    BASIC = ("basic", "username", "password")
    BEARER = ("bearer", "token")  # a static token
    OAUTH2 = ("oauth2", "token_url", "client_id", "client_secret")  # client credentials, client_secret_basic
    # SMART Backend Services: client credentials with private_key_jwt
    SMART = ("smart", "token_url", "client_id", "private_key_file")


class UpstreamSettings(BaseModel):
    """How the bridge reaches one upstream: its URL, authentication and TLS (``BRIDGE_<UPSTREAM>_*``)."""

    model_config = ConfigDict(extra="forbid")

    url: AnyHttpUrl = Field(description="Base URL of the upstream")
    auth: AuthMode = Field(default=AuthMode.NONE, description="|".join(AuthMode))
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
        files: dict[str, str] = dict(SECRET_FILES)
        for secret, file_field in SECRET_FILES:
            path: Path | None = getattr(self, file_field)
            found = secret_from_file(getattr(self, secret), path, f"{prefix}{secret.upper()}")
            if found is not None:
                self._from_files[secret] = found
        for needed in self.auth.needs:
            if getattr(self, needed) in (None, "") and needed not in self._from_files:
                secret_file = files.get(needed)
                alternative = f" (or {prefix}{secret_file.upper()})" if secret_file else ""
                raise ValueError(
                    f"{prefix}{needed.upper()}{alternative} is required when {prefix}AUTH is "
                    f"{self.auth.value}"
                )
        if "private_key_file" in self.auth.needs:
            assert self.private_key_file is not None
            try:
                load_private_key(self.private_key_file, self.signing_alg.value)
            except ValueError as exc:
                raise ValueError(
                    f"{prefix}PRIVATE_KEY_FILE: {exc} ({prefix}SIGNING_ALG is {self.signing_alg.value})"
                ) from None
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
