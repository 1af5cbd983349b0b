"""Caller authentication: off unless configured; API keys and bearer JWTs (JWKS URL or PEM key)."""

from __future__ import annotations

import asyncio
import hmac
import logging
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import httpx
import jwt
from cryptography.hazmat.primitives.asymmetric import ec, ed448, ed25519, rsa
from cryptography.hazmat.primitives.serialization import load_pem_public_key

from bridge.api.errors import AuthenticationError
from bridge.config import Settings
from bridge.errors import ConfigurationError, UpstreamLimitError
from bridge.resolve.published import FHIR_ID
from bridge.upstream.bounds import FIXED_PACE, CallLimit, send_bounded

logger = logging.getLogger(__name__)

JWKS_MAX_AGE = 300.0  # seconds a fetched key set is trusted
JWKS_MIN_REFRESH = 30.0  # an unknown kid refetches the set at most this often
JWKS_BACKOFF = 5.0  # seconds before the first retry after a failed fetch; doubles per failure
JWKS_MAX_BACKOFF = 300.0
# An IdP that drips or sends without end holds no request (they wait for the fetch) for long.
JWKS_LIMIT = CallLimit("JWKS", 1024 * 1024, "a 1 MiB JWKS limit", 10.0, "a 10 s JWKS deadline", FIXED_PACE)
_RSA_ALGORITHMS = frozenset({"RS256", "RS384", "RS512", "PS256", "PS384", "PS512"})
_EC_ALGORITHMS = {"secp256r1": "ES256", "secp384r1": "ES384", "secp521r1": "ES512"}


def key_algorithms(key: Any) -> frozenset[str]:
    """The JWT algorithms a public key can verify: a token is checked only with its key's own kind."""
    if isinstance(key, rsa.RSAPublicKey):
        return _RSA_ALGORITHMS
    if isinstance(key, ec.EllipticCurvePublicKey):
        alg = _EC_ALGORITHMS.get(key.curve.name)
        return frozenset({alg}) if alg else frozenset()
    if isinstance(key, ed25519.Ed25519PublicKey | ed448.Ed448PublicKey):
        return frozenset({"EdDSA"})
    return frozenset()


LEEWAY = 30  # seconds of clock skew accepted on exp/nbf/iat


@dataclass(frozen=True, slots=True)
class Caller:
    """Who called: how they authenticated (never the credential itself)."""

    method: str  # "anonymous" | "api-key" | "jwt" | "session"
    subject: str | None = None
    # SMART context: the one Patient (FHIR id) this caller may see, None when not limited to one;
    # and the scopes granted (e.g. "patient/ImagingStudy.read", "user/*.read").
    patient: str | None = None
    scopes: frozenset[str] = frozenset()
    client_id: str | None = None
    expires: float | None = None  # when the session or token ends (Unix time), if it says
    roles: frozenset[str] = frozenset()  # from the token's or ID token's BRIDGE_OPERATOR_ROLE_CLAIM


def roles_of(claims: Mapping[str, Any], claim: str) -> frozenset[str]:
    """The roles a token's claim lists: a JSON list of strings, or one space-separated string."""
    value = claims.get(claim)
    if isinstance(value, str):
        return frozenset(value.split())
    if isinstance(value, list):
        return frozenset(v for v in value if isinstance(v, str) and v)
    return frozenset()  # claims are checked by type: anything else grants nothing


UNAUTHENTICATED = Caller("unauthenticated")  # whoever sent credentials that were refused, or none
ANONYMOUS = Caller("anonymous")  # every caller, when no authentication is configured


class JwksKeys:
    """The signing keys at a JWKS URL, fetched with the app's HTTP client and cached."""

    def __init__(
        self, url: str, clock: Callable[[], float] = time.monotonic, limit: CallLimit = JWKS_LIMIT
    ) -> None:
        self.url = url
        self._limit = limit
        self.client: httpx.AsyncClient | None = None
        self._keys: dict[str, jwt.PyJWK] = {}
        self._clock = clock
        self._fetched = -1e18  # last successful fetch
        self._attempted = -1e18  # last fetch, successful or not
        self._retry_at = -1e18  # no fetch before this, after failures
        self._failures = 0
        self._lock = asyncio.Lock()
        self.fetches = 0  # for tests and logs

    async def key(self, kid: str | None) -> jwt.PyJWK:
        """The key for ``kid`` (or the only key when the token names none).

        The set is fetched once for any number of callers waiting at the same time, an unknown
        ``kid`` refetches it at most every JWKS_MIN_REFRESH seconds, and after a failed fetch the
        next one waits a back-off (doubling up to JWKS_MAX_BACKOFF).
        """
        now = self._clock()
        unknown = (kid not in self._keys) if kid is not None else not self._keys
        due = now - self._fetched > JWKS_MAX_AGE or (unknown and now - self._attempted > JWKS_MIN_REFRESH)
        if due and now >= self._retry_at:
            await self._refresh(now)
        if not self._keys:
            raise AuthenticationError("the token cannot be checked now (JWKS unavailable)")
        if kid is None and len(self._keys) == 1:
            return next(iter(self._keys.values()))
        found = self._keys.get(kid or "")
        if found is None:
            raise AuthenticationError(
                "the token's signing key is not in the configured JWKS", bearer_error="invalid_token"
            )
        return found

    async def _refresh(self, asked_at: float) -> None:
        async with self._lock:
            if self._attempted >= asked_at:
                return  # another caller fetched while this one waited: single flight
            if self.client is None:
                raise AuthenticationError("the JWKS is not available yet")
            self._attempted = self._clock()
            self.fetches += 1
            try:
                request = self.client.build_request("GET", self.url, headers={"Accept": "application/json"})
                response = await send_bounded(self.client, request, self._limit, "jwks")
                response.raise_for_status()
                key_set = jwt.PyJWKSet.from_dict(response.json())
            except (
                httpx.HTTPError,
                UpstreamLimitError,
                ValueError,
                TypeError,
                jwt.PyJWKSetError,
                jwt.PyJWKError,
            ) as exc:
                self._failures += 1
                wait = min(JWKS_MAX_BACKOFF, JWKS_BACKOFF * 2 ** (self._failures - 1))
                self._retry_at = self._attempted + wait
                logger.warning("cannot fetch the JWKS (%s); next try in %.0f s", type(exc).__name__, wait)
                return
            self._failures = 0
            self._retry_at = -1e18
            self._keys = {k.key_id or "": k for k in key_set.keys}
            self._fetched = self._attempted


class Authenticator:
    """Checks a request's X-API-Key or bearer JWT against the settings; anonymous when auth is off."""

    def __init__(self, settings: Settings) -> None:
        self._api_keys = [k.get_secret_value().encode() for k in settings.api.keys]
        self._audience = settings.jwt.audience
        self._issuer = settings.jwt.issuer
        self._algorithms = list(settings.jwt.algorithms)
        self._role_claim = settings.operator.role_claim
        self._static_key: Any = None
        self.jwks: JwksKeys | None = None
        if settings.jwt.public_key:
            pem = settings.jwt.public_key.replace("\\n", "\n").encode()
            try:
                self._static_key = load_pem_public_key(pem)
            except (ValueError, TypeError) as exc:
                raise ConfigurationError(f"BRIDGE_JWT_PUBLIC_KEY: not a PEM public key ({exc})") from None
            if not key_algorithms(self._static_key) & set(self._algorithms):
                raise ConfigurationError(
                    "BRIDGE_JWT_PUBLIC_KEY: the key (RSA, EC P-256/384/521 or Ed25519/Ed448) verifies none "
                    "of BRIDGE_JWT_ALGORITHMS"
                )
        elif settings.jwt.jwks_url is not None:
            self.jwks = JwksKeys(str(settings.jwt.jwks_url))

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
            return ANONYMOUS
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
        algorithm = header.get("alg")
        if algorithm not in self._algorithms:
            raise AuthenticationError("the token's algorithm is not accepted", bearer_error="invalid_token")
        key: Any = self._static_key
        if self.jwks is not None:
            kid = header.get("kid")
            key = (await self.jwks.key(kid if isinstance(kid, str) else None)).key
        if algorithm not in key_algorithms(key):
            raise AuthenticationError(
                "the token's algorithm does not match its signing key", bearer_error="invalid_token"
            )
        required = ["exp", "aud"] + (["iss"] if self._issuer else [])
        try:
            claims = jwt.decode(
                token,
                key=key,
                algorithms=[algorithm],
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
        except (jwt.PyJWTError, TypeError, ValueError):
            # every other failure of verification (a key that does not fit, a malformed signature)
            raise AuthenticationError(
                "the token's signature or claims are invalid", bearer_error="invalid_token"
            ) from None
        subject = claims.get("sub")
        patient = claims.get("patient")
        scope = claims.get("scope")
        client = claims.get("client_id", claims.get("azp"))
        # SMART App Launch: `patient` is a FHIR id (a string) and `scope` a space-separated string. A
        # claim of another type is refused, never read as "not limited to a patient" or "no scopes".
        if patient is not None and not (isinstance(patient, str) and FHIR_ID.fullmatch(patient)):
            raise AuthenticationError(
                "the token's patient claim is not a FHIR id (a non-empty string)",
                bearer_error="invalid_token",
            )
        if scope is not None and not isinstance(scope, str):
            raise AuthenticationError(
                "the token's scope claim is not a space-separated string", bearer_error="invalid_token"
            )
        return Caller(
            "jwt",
            str(subject) if subject is not None else None,
            patient=patient,
            scopes=frozenset(scope.split()) if scope is not None else frozenset(),
            client_id=str(client) if isinstance(client, str) else None,
            expires=float(exp) if isinstance(exp := claims.get("exp"), int | float) else None,
            roles=roles_of(claims, self._role_claim),
        )
