"""One upstream's connection settings (auth, TLS, retries) built into the objects httpx uses.

``http_client`` is the one place an ``httpx.AsyncClient`` is made.
"""

from __future__ import annotations

import ssl
import time
from typing import Any, Literal

import httpx

from bridge import __version__
from bridge.config import AuthMode, Settings, UpstreamSettings
from bridge.config.files import load_private_key
from bridge.upstream.breaker import CircuitBreaker
from bridge.upstream.credentials import BearerToken, ClientCredentials, SmartBackendServices
from bridge.upstream.retry import RetryPolicy
from bridge.upstream.tls import ssl_context

Service = Literal["dicomweb", "fhir"]

USER_AGENT = f"fhir-dicomweb-bridge/{__version__}"


def ssl_context_of(upstream: UpstreamSettings, service: Service) -> ssl.SSLContext:
    """The TLS context for an upstream (and its token endpoint)."""
    return ssl_context(
        verify=upstream.verify_tls,
        ca_bundle=upstream.ca_bundle,
        client_cert=upstream.client_cert,
        client_key=upstream.client_key,
        service=service,
    )


def build_auth(
    upstream: UpstreamSettings, service: Service, token_client: httpx.AsyncClient | None
) -> httpx.Auth | None:
    """The httpx.Auth of an upstream; token-based modes need ``token_client`` for the token endpoint."""
    mode = upstream.auth
    if mode is AuthMode.NONE:
        return None
    if mode is AuthMode.BASIC:
        password = upstream.secret("password")
        assert upstream.username is not None and password is not None
        return httpx.BasicAuth(upstream.username, password.get_secret_value())
    if mode is AuthMode.BEARER:
        token = upstream.secret("token")
        assert token is not None
        return BearerToken(token)
    assert token_client is not None and upstream.token_url and upstream.client_id
    token_url = str(upstream.token_url)
    if mode is AuthMode.OAUTH2:
        return ClientCredentials(
            service=service,
            token_url=token_url,
            client_id=upstream.client_id,
            client_secret=upstream.secret("client_secret"),
            scopes=upstream.scope_list,
            client=token_client,
        )
    assert upstream.private_key_file is not None
    algorithm = upstream.signing_alg.value
    return SmartBackendServices(
        service=service,
        token_url=token_url,
        client_id=upstream.client_id,
        private_key=load_private_key(upstream.private_key_file, algorithm),
        algorithm=algorithm,
        key_id=upstream.key_id,
        scopes=upstream.scope_list,
        client=token_client,
    )


def needs_token_client(upstream: UpstreamSettings) -> bool:
    """Whether the auth mode fetches tokens from a token endpoint."""
    return upstream.auth in (AuthMode.OAUTH2, AuthMode.SMART)


def retry_policy(settings: Settings, service: Service) -> RetryPolicy:
    """The retry policy of one upstream, with that upstream's own circuit breaker."""
    breaker = CircuitBreaker(
        service, failures=settings.http.circuit_failures, reset_after=settings.http.circuit_reset
    )
    return RetryPolicy(
        retries=settings.http.retries,
        max_wait=settings.http.retry_max_wait,
        total=settings.http.retry_total,
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


def connection_options(
    settings: Settings, upstream: UpstreamSettings, service: Service, limits: httpx.Limits
) -> dict[str, object]:
    """``httpx.AsyncClient`` arguments for one upstream: its transport (TLS, HTTP/2, pool) and auth.

    The token endpoint, when the auth mode has one, is reached through the same transport (so
    with the same TLS settings) by a client that does not own it; closing the upstream's client
    closes everything.
    """
    transport = httpx.AsyncHTTPTransport(
        verify=ssl_context_of(upstream, service), http2=settings.http.http2, limits=limits, retries=0
    )
    token_client = None
    if needs_token_client(upstream):
        token_client = httpx.AsyncClient(
            transport=_Borrowed(transport),
            timeout=httpx.Timeout(settings.http.timeout),
            follow_redirects=False,
        )
    return {"transport": transport, "auth": build_auth(upstream, service, token_client)}


def http_client(
    settings: Settings,
    upstream: UpstreamSettings | None = None,
    service: Service | None = None,
    *,
    limits: httpx.Limits,
    transport: httpx.AsyncBaseTransport | None = None,
) -> httpx.AsyncClient:
    """An AsyncClient with the bridge's timeout, User-Agent and no redirects.

    For an upstream, with its TLS, HTTP/2 and auth; ``transport`` replaces the network (tests),
    the upstream's auth still applies (its token endpoint reached through that transport too).
    """
    options: dict[str, Any] = {}
    if transport is None and upstream is not None and service is not None:
        options = connection_options(settings, upstream, service, limits)
    elif transport is not None:
        options["transport"] = transport
        if upstream is not None and service is not None:
            token_client = None
            if needs_token_client(upstream):
                token_client = httpx.AsyncClient(transport=_Borrowed(transport), follow_redirects=False)
            options["auth"] = build_auth(upstream, service, token_client)
    return httpx.AsyncClient(
        timeout=httpx.Timeout(settings.http.timeout),
        limits=limits,
        headers={"User-Agent": USER_AGENT},
        follow_redirects=False,
        **options,
    )


async def authorization_for(client: httpx.AsyncClient, url: str) -> str | None:
    """The Authorization header ``client`` would send with a request to ``url`` (its auth flow's first step).

    For the gateway's front, which sends retrieves to the archive itself with the bridge's credentials.
    A token-based flow fetches or reuses its token as for any request.
    """
    auth = client.auth
    if auth is None:
        return None
    flow = auth.async_auth_flow(client.build_request("GET", url))
    try:
        prepared = await flow.__anext__()
    finally:
        await flow.aclose()
    found: str | None = prepared.headers.get("authorization")
    return found
