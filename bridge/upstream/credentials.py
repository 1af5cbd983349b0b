"""httpx.Auth for the upstreams: none, basic, static bearer, OAuth2 client credentials, SMART backend.

The token-based schemes fetch an access token from the upstream's token endpoint, keep it until
shortly before it expires, and on a 401 fetch a fresh one and resend the request once. Token
requests go through a client of their own (same TLS settings as the upstream) and make a single
attempt each: a failing token endpoint surfaces inside the request being sent, so the one retry
policy of :mod:`bridge.upstream.retry` retries the whole request. Secrets are never logged nor put into
error messages.
"""

from __future__ import annotations

import asyncio
import base64
import logging
import time
import uuid
from collections.abc import AsyncGenerator, Callable, Generator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any
from urllib.parse import quote

import httpx
from pydantic import SecretStr

from bridge.config.files import check_key
from bridge.errors import UpstreamAuthError, UpstreamLimitError
from bridge.upstream.bounds import FIXED_PACE, CallLimit, send_bounded
from bridge.upstream.errors import (
    RETRIABLE_STATUS,
    TRANSPORT_ERRORS,
    error_for_exception,
    error_for_response,
    setting_prefix,
    where,
)

if TYPE_CHECKING:
    from bridge.config.files import PrivateKey

logger = logging.getLogger(__name__)

CLIENT_ASSERTION_TYPE = "urn:ietf:params:oauth:client-assertion-type:jwt-bearer"
ASSERTION_LIFETIME = 300  # SMART Backend Services: no more than five minutes
DEFAULT_TOKEN_LIFETIME = 300.0  # when the token endpoint gives no expires_in
# A token answer is small and quick; one that drips or never ends must not hold every request.
TOKEN_LIMIT = CallLimit(
    "token", 1024 * 1024, "a 1 MiB token-answer limit", 60.0, "a 60 s token deadline", FIXED_PACE
)
_DESCRIPTION_LIMIT = 200


class BearerToken(httpx.Auth):
    """A static bearer token (an API key issued out of band)."""

    def __init__(self, token: SecretStr | str) -> None:
        self._token = token if isinstance(token, SecretStr) else SecretStr(token)

    def auth_flow(self, request: httpx.Request) -> Generator[httpx.Request, httpx.Response, None]:
        """Add the Authorization header."""
        request.headers["Authorization"] = f"Bearer {self._token.get_secret_value()}"
        yield request


@dataclass(frozen=True, slots=True)
class AccessToken:
    """A token from the token endpoint and when (on the auth's clock) it stops being used."""

    value: str
    refresh_at: float
    expires_at: float


class ClientCredentials(httpx.Auth):
    """OAuth2 client credentials grant (RFC 6749 section 4.4), client_secret_basic.

    The token is cached and shared by concurrent requests; it is refreshed when a fifth of its
    lifetime (at most a minute) is left, and once more when the upstream answers 401 to it.
    """

    requires_response_body = False

    def __init__(
        self,
        *,
        service: str,
        token_url: str,
        client_id: str,
        client_secret: SecretStr | None = None,
        scopes: Sequence[str] = (),
        client: httpx.AsyncClient,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.service = service
        self.token_url = token_url
        self.client_id = client_id
        self._secret = client_secret
        self.scopes = tuple(scopes)
        self._client = client
        self._clock = clock
        self._token: AccessToken | None = None
        self._lock = asyncio.Lock()
        self.fetched = 0  # tokens fetched, for tests and metrics

    def sync_auth_flow(self, request: httpx.Request) -> Generator[httpx.Request, httpx.Response, None]:
        """The bridge is async only; a sync client cannot fetch tokens here."""
        raise RuntimeError(f"{type(self).__name__} works with httpx.AsyncClient only")
        yield request  # pragma: no cover - makes this a generator

    async def async_auth_flow(self, request: httpx.Request) -> AsyncGenerator[httpx.Request, httpx.Response]:
        """Send with the cached token; on 401 fetch a fresh one and resend once."""
        token = await self.token()
        request.headers["Authorization"] = f"Bearer {token.value}"
        response = yield request
        if response.status_code == 401:
            logger.info("%s: 401 with a cached token; fetching a new one and resending once", self.service)
            fresh = await self.token(stale=token)
            request.headers["Authorization"] = f"Bearer {fresh.value}"
            yield request

    async def token(self, stale: AccessToken | None = None) -> AccessToken:
        """The current token, fetched if there is none, it is due for refresh, or it is ``stale``."""
        async with self._lock:
            current = self._token
            if current is not None and current is not stale and self._clock() < current.refresh_at:
                return current
            self._token = None
            self._token = await self._fetch()
            return self._token

    def _client_authentication(self) -> tuple[dict[str, str], dict[str, str]]:
        """Headers and form fields that authenticate the client at the token endpoint."""
        secret = self._secret.get_secret_value() if self._secret is not None else ""
        # RFC 6749 section 2.3.1: form-urlencode both parts before the Basic encoding.
        pair = f"{quote(self.client_id, safe='')}:{quote(secret, safe='')}".encode()
        return {"Authorization": "Basic " + base64.b64encode(pair).decode("ascii")}, {}

    def _credential_settings(self) -> str:
        prefix = setting_prefix(self.service)
        return f"{prefix}CLIENT_ID and {prefix}CLIENT_SECRET"

    async def _fetch(self) -> AccessToken:
        headers, form = self._client_authentication()
        data = {"grant_type": "client_credentials", **form}
        if self.scopes:
            data["scope"] = " ".join(self.scopes)
        request = self._client.build_request(
            "POST", self.token_url, data=data, headers={"Accept": "application/json", **headers}
        )
        try:
            response = await send_bounded(self._client, request, TOKEN_LIMIT, self.service)
        except TRANSPORT_ERRORS as exc:
            raise error_for_exception(exc, request, self.service) from exc
        except UpstreamLimitError as exc:  # no study's fault: no token, no study can pass
            raise UpstreamAuthError(
                f"{exc}; check {setting_prefix(self.service)}TOKEN_URL", service=self.service
            ) from None
        if response.status_code in RETRIABLE_STATUS:
            raise error_for_response(response, self.service, "token endpoint")
        if not response.is_success:
            raise self._refused(response)
        try:
            body = response.json()
            value = body["access_token"]
            kind = str(body.get("token_type", "Bearer"))
            lifetime = float(body.get("expires_in") or DEFAULT_TOKEN_LIFETIME)
        except (ValueError, KeyError, TypeError, AttributeError):
            raise UpstreamAuthError(
                f"{self.service}: the token endpoint {where(request)} answered without a usable "
                "access_token; check " + setting_prefix(self.service) + "TOKEN_URL",
                service=self.service,
                status=response.status_code,
            ) from None
        if kind.lower() != "bearer" or not isinstance(value, str) or not value:
            raise UpstreamAuthError(
                f"{self.service}: the token endpoint {where(request)} issued a {kind!r} token; "
                "only bearer tokens are supported",
                service=self.service,
                status=response.status_code,
            )
        now = self._clock()
        margin = min(60.0, lifetime / 5)
        self.fetched += 1
        logger.info("%s: access token fetched, valid %.0f s", self.service, lifetime)
        return AccessToken(value, now + lifetime - margin, now + lifetime)

    def _refused(self, response: httpx.Response) -> UpstreamAuthError:
        code, description = "", ""
        try:
            body = response.json()
            code = str(body.get("error", ""))
            description = str(body.get("error_description", ""))[:_DESCRIPTION_LIMIT]
        except (ValueError, AttributeError):
            pass
        said = ": ".join(part for part in (code, description) if part) or "no reason given"
        return UpstreamAuthError(
            f"{self.service}: the token endpoint {where(response.request)} refused the client "
            f"({response.status_code} {said}); check {self._credential_settings()}"
            + (f" and {setting_prefix(self.service)}SCOPES" if code == "invalid_scope" else ""),
            service=self.service,
            status=response.status_code,
        )


class SmartBackendServices(ClientCredentials):
    """SMART Backend Services: client credentials with a private_key_jwt client assertion.

    The assertion is signed RS384 or ES384 with the client's private key, names the key by
    ``kid``, and lives five minutes with a fresh ``jti``, as the SMART App Launch guide asks.
    """

    def __init__(
        self,
        *,
        service: str,
        token_url: str,
        client_id: str,
        private_key: PrivateKey,
        algorithm: str,
        key_id: str | None = None,
        scopes: Sequence[str] = (),
        client: httpx.AsyncClient,
        clock: Callable[[], float] = time.monotonic,
        wall_clock: Callable[[], float] = time.time,
    ) -> None:
        super().__init__(
            service=service,
            token_url=token_url,
            client_id=client_id,
            scopes=scopes,
            client=client,
            clock=clock,
        )
        check_key(private_key, algorithm)
        self._key = private_key
        self.algorithm = algorithm
        self.key_id = key_id
        self._wall_clock = wall_clock

    def client_assertion(self) -> str:
        """A signed, single-use client assertion for the token endpoint."""
        now = int(self._wall_clock())
        claims: dict[str, Any] = {
            "iss": self.client_id,
            "sub": self.client_id,
            "aud": self.token_url,
            "iat": now,
            "exp": now + ASSERTION_LIFETIME,
            "jti": str(uuid.uuid4()),
        }
        import jwt  # PyJWT: only SMART Backend Services sign, so only they pay its import

        headers = {"typ": "JWT", **({"kid": self.key_id} if self.key_id else {})}
        return jwt.encode(claims, self._key, algorithm=self.algorithm, headers=headers)

    def _client_authentication(self) -> tuple[dict[str, str], dict[str, str]]:
        form = {"client_assertion_type": CLIENT_ASSERTION_TYPE, "client_assertion": self.client_assertion()}
        return {}, form

    def _credential_settings(self) -> str:
        prefix = setting_prefix(self.service)
        return f"{prefix}CLIENT_ID, {prefix}PRIVATE_KEY_FILE and {prefix}KEY_ID (the key registered there)"
