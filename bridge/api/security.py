"""Caller authentication: off unless configured; API keys and bearer JWTs (JWKS URL or PEM key)."""

from __future__ import annotations

import asyncio
import hmac
import logging
import time
from dataclasses import dataclass
from typing import Any

import httpx
import jwt
from cryptography.hazmat.primitives.serialization import load_pem_public_key

from bridge.api.errors import AuthenticationError
from bridge.config import Settings
from bridge.errors import ConfigurationError

logger = logging.getLogger(__name__)

JWKS_MAX_AGE = 300.0  # seconds a fetched key set is trusted
JWKS_MIN_REFRESH = 30.0  # an unknown kid refetches the set at most this often
LEEWAY = 30  # seconds of clock skew accepted on exp/nbf/iat


@dataclass(frozen=True, slots=True)
class Caller:
    """Who called: how they authenticated (never the credential itself)."""

    method: str  # "anonymous" | "api-key" | "jwt"
    subject: str | None = None


class JwksKeys:
    """The signing keys at a JWKS URL, fetched with the app's HTTP client and cached."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.client: httpx.AsyncClient | None = None
        self._keys: dict[str, jwt.PyJWK] = {}
        self._fetched = -1e18
        self._lock = asyncio.Lock()

    async def key(self, kid: str | None) -> jwt.PyJWK:
        """The key for ``kid`` (or the only key when the token names none)."""
        now = time.monotonic()
        if now - self._fetched > JWKS_MAX_AGE or (
            kid not in self._keys and now - self._fetched > JWKS_MIN_REFRESH
        ):
            await self._refresh()
        if kid is None and len(self._keys) == 1:
            return next(iter(self._keys.values()))
        found = self._keys.get(kid or "")
        if found is None:
            raise AuthenticationError(
                "the token's signing key is not in the configured JWKS", bearer_error="invalid_token"
            )
        return found

    async def _refresh(self) -> None:
        async with self._lock:
            if self.client is None:
                raise AuthenticationError("the JWKS is not available yet")
            try:
                response = await self.client.get(self.url, headers={"Accept": "application/json"})
                response.raise_for_status()
                key_set = jwt.PyJWKSet.from_dict(response.json())
            except (httpx.HTTPError, ValueError, jwt.PyJWKSetError) as exc:
                logger.warning("cannot fetch the JWKS (%s)", type(exc).__name__)
                if not self._keys:
                    raise AuthenticationError("the token cannot be checked now (JWKS unavailable)") from None
                return
            self._keys = {k.key_id or "": k for k in key_set.keys}
            self._fetched = time.monotonic()


class Authenticator:
    """Checks a request's X-API-Key or bearer JWT against the settings; anonymous when auth is off."""

    def __init__(self, settings: Settings) -> None:
        self._api_keys = [k.get_secret_value().encode() for k in settings.api_keys]
        self._audience = settings.jwt_audience
        self._issuer = settings.jwt_issuer
        self._algorithms = list(settings.jwt_algorithms)
        self._static_key: Any = None
        self.jwks: JwksKeys | None = None
        if settings.jwt_public_key:
            pem = settings.jwt_public_key.replace("\\n", "\n").encode()
            try:
                self._static_key = load_pem_public_key(pem)
            except (ValueError, TypeError) as exc:
                raise ConfigurationError(f"BRIDGE_JWT_PUBLIC_KEY: not a PEM public key ({exc})") from None
        elif settings.jwt_jwks_url is not None:
            self.jwks = JwksKeys(str(settings.jwt_jwks_url))

    @property
    def enabled(self) -> bool:
        """Whether callers must authenticate."""
        return bool(self._api_keys) or self._static_key is not None or self.jwks is not None

    @property
    def jwt_enabled(self) -> bool:
        """Whether bearer JWTs are accepted."""
        return self._static_key is not None or self.jwks is not None

    async def check(self, api_key: str | None, bearer: str | None) -> Caller:
        """The caller, or AuthenticationError."""
        if not self.enabled:
            return Caller("anonymous")
        if api_key is not None and self._api_keys:
            given = api_key.encode()
            # compare with every key, so the time taken does not tell which one was close
            matched = [hmac.compare_digest(given, key) for key in self._api_keys]
            if any(matched):
                return Caller("api-key")
            raise AuthenticationError("the API key is not valid")
        if bearer is not None and self.jwt_enabled:
            return await self._check_jwt(bearer)
        wanted = " or ".join(
            w
            for w, on in (("an X-API-Key header", bool(self._api_keys)), ("a bearer JWT", self.jwt_enabled))
            if on
        )
        raise AuthenticationError(f"authentication required: send {wanted}")

    async def _check_jwt(self, token: str) -> Caller:
        try:
            header = jwt.get_unverified_header(token)
        except jwt.InvalidTokenError:
            raise AuthenticationError("the bearer token is not a JWT", bearer_error="invalid_token") from None
        if header.get("alg") not in self._algorithms:
            raise AuthenticationError("the token's algorithm is not accepted", bearer_error="invalid_token")
        key: Any = self._static_key
        if self.jwks is not None:
            key = (await self.jwks.key(header.get("kid"))).key
        required = ["exp", "aud"] + (["iss"] if self._issuer else [])
        try:
            claims = jwt.decode(
                token,
                key=key,
                algorithms=self._algorithms,
                audience=self._audience,
                issuer=self._issuer,
                leeway=LEEWAY,
                options={"require": required},
            )
        except jwt.ExpiredSignatureError:
            raise AuthenticationError("the token has expired", bearer_error="invalid_token") from None
        except jwt.InvalidAudienceError:
            raise AuthenticationError(
                "the token is not for this audience", bearer_error="invalid_token"
            ) from None
        except jwt.InvalidIssuerError:
            raise AuthenticationError(
                "the token's issuer is not accepted", bearer_error="invalid_token"
            ) from None
        except jwt.MissingRequiredClaimError as exc:
            raise AuthenticationError(
                f"the token lacks the {exc.claim!r} claim", bearer_error="invalid_token"
            ) from None
        except jwt.InvalidTokenError:
            raise AuthenticationError(
                "the token's signature or claims are invalid", bearer_error="invalid_token"
            ) from None
        subject = claims.get("sub")
        return Caller("jwt", str(subject) if subject is not None else None)
