"""One upstream's connection settings (auth, TLS, retries) taken from the Settings, and built into objects."""

from __future__ import annotations

import ssl
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import httpx
from pydantic import SecretStr

from bridge.auth import BearerToken, ClientCredentials, SmartBackendServices, load_private_key
from bridge.config import AuthMode, Settings, SigningAlg
from bridge.http import CircuitBreaker, RetryPolicy
from bridge.tls import ssl_context

Service = Literal["dicomweb", "fhir"]


@dataclass(frozen=True, slots=True)
class UpstreamSettings:
    """The ``BRIDGE_<SERVICE>_*`` connection settings of one upstream."""

    service: Service
    auth: AuthMode
    username: str | None
    password: SecretStr | None
    token: SecretStr | None
    token_url: str | None
    client_id: str | None
    client_secret: SecretStr | None
    private_key_file: Path | None
    key_id: str | None
    signing_alg: SigningAlg
    scopes: tuple[str, ...]
    ca_bundle: Path | None
    client_cert: Path | None
    client_key: Path | None
    verify_tls: bool

    def ssl_context(self) -> ssl.SSLContext:
        """The TLS context for this upstream (and its token endpoint)."""
        return ssl_context(
            verify=self.verify_tls,
            ca_bundle=self.ca_bundle,
            client_cert=self.client_cert,
            client_key=self.client_key,
            service=self.service,
        )


def upstream_settings(settings: Settings, service: Service) -> UpstreamSettings:
    """The connection settings of ``service``."""
    if service == "dicomweb":
        s = settings
        return UpstreamSettings(
            service,
            s.dicomweb_auth,
            s.dicomweb_username,
            s.dicomweb_password,
            s.dicomweb_token,
            str(s.dicomweb_token_url) if s.dicomweb_token_url else None,
            s.dicomweb_client_id,
            s.dicomweb_client_secret,
            s.dicomweb_private_key_file,
            s.dicomweb_key_id,
            s.dicomweb_signing_alg,
            tuple((s.dicomweb_scopes or "").split()),
            s.dicomweb_ca_bundle,
            s.dicomweb_client_cert,
            s.dicomweb_client_key,
            s.dicomweb_verify_tls,
        )
    s = settings
    return UpstreamSettings(
        service,
        s.fhir_auth,
        s.fhir_username,
        s.fhir_password,
        s.fhir_token,
        str(s.fhir_token_url) if s.fhir_token_url else None,
        s.fhir_client_id,
        s.fhir_client_secret,
        s.fhir_private_key_file,
        s.fhir_key_id,
        s.fhir_signing_alg,
        tuple((s.fhir_scopes or "").split()),
        s.fhir_ca_bundle,
        s.fhir_client_cert,
        s.fhir_client_key,
        s.fhir_verify_tls,
    )


def build_auth(upstream: UpstreamSettings, token_client: httpx.AsyncClient | None) -> httpx.Auth | None:
    """The httpx.Auth of an upstream; token-based modes need ``token_client`` for the token endpoint."""
    mode = upstream.auth
    if mode is AuthMode.NONE:
        return None
    if mode is AuthMode.BASIC:
        assert upstream.username is not None and upstream.password is not None
        return httpx.BasicAuth(upstream.username, upstream.password.get_secret_value())
    if mode is AuthMode.BEARER:
        assert upstream.token is not None
        return BearerToken(upstream.token)
    assert token_client is not None and upstream.token_url and upstream.client_id
    if mode is AuthMode.OAUTH2:
        return ClientCredentials(
            service=upstream.service,
            token_url=upstream.token_url,
            client_id=upstream.client_id,
            client_secret=upstream.client_secret,
            scopes=upstream.scopes,
            client=token_client,
        )
    assert upstream.private_key_file is not None
    algorithm = upstream.signing_alg.value
    return SmartBackendServices(
        service=upstream.service,
        token_url=upstream.token_url,
        client_id=upstream.client_id,
        private_key=load_private_key(upstream.private_key_file, algorithm),
        algorithm=algorithm,
        key_id=upstream.key_id,
        scopes=upstream.scopes,
        client=token_client,
    )


def needs_token_client(upstream: UpstreamSettings) -> bool:
    """Whether the auth mode fetches tokens from a token endpoint."""
    return upstream.auth in (AuthMode.OAUTH2, AuthMode.SMART)


def retry_policy(settings: Settings, service: Service) -> RetryPolicy:
    """The retry policy of one upstream, with that upstream's own circuit breaker."""
    breaker = CircuitBreaker(
        service, failures=settings.http_circuit_failures, reset_after=settings.http_circuit_reset
    )
    return RetryPolicy(
        retries=settings.http_retries,
        max_wait=settings.http_retry_max_wait,
        total=settings.http_retry_total,
        breaker=breaker,
        clock=time.monotonic,
    )


class _Borrowed(httpx.AsyncBaseTransport):
    """A transport shared with the client that owns it: closing the borrower leaves it open."""

    def __init__(self, inner: httpx.AsyncBaseTransport) -> None:
        self._inner = inner

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        """Send through the owner's transport."""
        return await self._inner.handle_async_request(request)

    async def aclose(self) -> None:
        """The owner closes the transport."""


def connection_options(settings: Settings, service: Service, limits: httpx.Limits) -> dict[str, object]:
    """``httpx.AsyncClient`` arguments for one upstream: its transport (TLS, HTTP/2, pool) and auth.

    The token endpoint, when the auth mode has one, is reached through the same transport (so
    with the same TLS settings) by a client that does not own it; closing the upstream's client
    closes everything.
    """
    upstream = upstream_settings(settings, service)
    transport = httpx.AsyncHTTPTransport(
        verify=upstream.ssl_context(), http2=settings.http2, limits=limits, retries=0
    )
    token_client = None
    if needs_token_client(upstream):
        token_client = httpx.AsyncClient(
            transport=_Borrowed(transport),
            timeout=httpx.Timeout(settings.http_timeout),
            follow_redirects=False,
        )
    return {"transport": transport, "auth": build_auth(upstream, token_client)}
