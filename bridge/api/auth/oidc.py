"""The bridge as an OpenID Connect / SMART client: discovery, the authorization request, code exchange.

Authorization code flow with PKCE (S256) and a nonce. The ID token is checked here (signature
against the issuer's JWKS, ``iss``, ``aud``, ``exp``, ``nonce``); the access token is never kept:
the bridge reads FHIR with its own credentials and only needs to know who logged in, and, for an
EHR launch, which patient is in context.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import secrets
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal
from urllib.parse import quote, urlencode

import httpx
import jwt

from bridge.api.auth.security import LEEWAY, JwksKeys, key_algorithms, roles_of
from bridge.config import Settings
from bridge.errors import BridgeError, UpstreamLimitError
from bridge.resolve.published import FHIR_ID
from bridge.upstream.bounds import FIXED_PACE, CallLimit, send_bounded

DISCOVERY_MAX_AGE = 3600.0  # seconds a discovery document is trusted
ANSWER_LIMIT = CallLimit(
    "OIDC", 1024 * 1024, "a 1 MiB OIDC answer limit", 30.0, "a 30 s OIDC deadline", FIXED_PACE
)


class LoginError(BridgeError):
    """A login could not be completed; the message is safe to show (no token, no patient data)."""

    def __init__(self, message: str, *, status: int = 400) -> None:
        super().__init__(message)
        self.status = status


@dataclass(frozen=True)
class AuthServer:
    """An authorization server as discovered: where browsers go, where codes are exchanged, its keys."""

    issuer: str
    authorization_endpoint: str
    token_endpoint: str
    jwks: JwksKeys = field(compare=False)
    # OpenID Connect RP-Initiated Logout 1.0: where a browser ends its session at the provider, if offered
    end_session_endpoint: str | None = None


@dataclass(frozen=True, slots=True)
class Pkce:
    """A PKCE verifier and its S256 challenge (RFC 7636)."""

    verifier: str
    challenge: str

    @classmethod
    def new(cls) -> Pkce:
        """A fresh verifier and its challenge."""
        verifier = secrets.token_urlsafe(48)
        digest = hashlib.sha256(verifier.encode("ascii")).digest()
        return cls(verifier, base64.urlsafe_b64encode(digest).rstrip(b"=").decode("ascii"))


@dataclass(frozen=True, slots=True)
class Login:
    """What a completed login tells the bridge."""

    subject: str
    scopes: frozenset[str]
    patient: str | None  # SMART launch context
    expires_in: float | None  # the access token's lifetime, if said
    roles: frozenset[str] = frozenset()  # from the ID token's role claim (the operator page's role)


class OidcClient:
    """Talks to authorization servers for one client registration (id, secret, redirect URI)."""

    def __init__(
        self,
        client_id: str,
        client_secret: str | None,
        redirect_uri: str,
        clock: Callable[[], float] = time.monotonic,
        role_claim: str = "roles",
    ) -> None:
        self.client_id = client_id
        self.role_claim = role_claim
        self._secret = client_secret
        self.redirect_uri = redirect_uri
        self.http: httpx.AsyncClient | None = None  # set by the app's lifespan
        self._clock = clock
        self._servers: dict[str, tuple[float, AuthServer]] = {}

    async def openid_server(self, issuer: str) -> AuthServer:
        """The OpenID provider ``issuer``, from its ``/.well-known/openid-configuration``."""
        return await self._discover(issuer, "openid-configuration", expect_issuer=issuer)

    async def smart_server(self, fhir_base: str) -> AuthServer:
        """The authorization server of the EHR at ``fhir_base``, from ``/.well-known/smart-configuration``."""
        return await self._discover(fhir_base, "smart-configuration", expect_issuer=None)

    async def _discover(self, base: str, document: str, *, expect_issuer: str | None) -> AuthServer:
        url = f"{base.rstrip('/')}/.well-known/{document}"
        cached = self._servers.get(url)
        if cached is not None and self._clock() - cached[0] < DISCOVERY_MAX_AGE:
            return cached[1]
        answer = await self._json("GET", url, what=f"the {document} document")
        endpoints = {
            name: answer.get(name)
            for name in ("issuer", "authorization_endpoint", "token_endpoint", "jwks_uri")
        }
        missing = [name for name, value in endpoints.items() if not _is_http_url(value)]
        if missing:
            raise LoginError(f"the {document} document lacks {', '.join(missing)}", status=502)
        issuer = str(endpoints["issuer"])
        if expect_issuer is not None and issuer.rstrip("/") != expect_issuer.rstrip("/"):
            raise LoginError(f"the {document} document names another issuer", status=502)
        jwks = JwksKeys(str(endpoints["jwks_uri"]))
        jwks.client = self.http
        end_session = answer.get("end_session_endpoint")
        server = AuthServer(
            issuer,
            str(endpoints["authorization_endpoint"]),
            str(endpoints["token_endpoint"]),
            jwks,
            end_session_endpoint=str(end_session) if _is_http_url(end_session) else None,
        )
        self._servers[url] = (self._clock(), server)
        return server

    def authorization_url(
        self,
        server: AuthServer,
        *,
        scope: str,
        state: str,
        nonce: str,
        pkce: Pkce,
        extra: Mapping[str, str] | None = None,
    ) -> str:
        """Where the browser goes to log in."""
        params = {
            "response_type": "code",
            "client_id": self.client_id,
            "redirect_uri": self.redirect_uri,
            "scope": scope,
            "state": state,
            "nonce": nonce,
            "code_challenge": pkce.challenge,
            "code_challenge_method": "S256",
            **(extra or {}),
        }
        separator = "&" if "?" in server.authorization_endpoint else "?"
        return server.authorization_endpoint + separator + urlencode(params)

    def logout_url(self, server: AuthServer, post_logout_redirect_uri: str) -> str | None:
        """Where the browser ends its session at the provider, then comes back; None if it offers none.

        The bridge keeps no token (bridge/api/auth/session.py), so it names itself with ``client_id``
        instead of an ``id_token_hint``, as RP-Initiated Logout allows; the provider may then ask
        the user to confirm, which on a shared workstation is no harm.
        """
        if server.end_session_endpoint is None:
            return None
        params = {"client_id": self.client_id, "post_logout_redirect_uri": post_logout_redirect_uri}
        separator = "&" if "?" in server.end_session_endpoint else "?"
        return server.end_session_endpoint + separator + urlencode(params)

    async def exchange(self, server: AuthServer, code: str, *, verifier: str, nonce: str) -> Login:
        """Trade the code for tokens, check the ID token, and say who logged in."""
        form = {
            "grant_type": "authorization_code",
            "code": code,
            "redirect_uri": self.redirect_uri,
            "code_verifier": verifier,
        }
        headers: dict[str, str] = {}
        if self._secret is None:
            form["client_id"] = self.client_id  # a public client names itself
        else:  # client_secret_basic: both parts form-encoded first (RFC 6749 2.3.1)
            pair = f"{quote(self.client_id, safe='')}:{quote(self._secret, safe='')}"
            headers["Authorization"] = "Basic " + base64.b64encode(pair.encode()).decode("ascii")
        answer = await self._json(
            "POST", server.token_endpoint, what="the token endpoint", data=form, headers=headers
        )
        id_token = answer.get("id_token")
        if not isinstance(id_token, str):
            raise LoginError(
                "the identity provider returned no ID token (is 'openid' a granted scope?)", status=502
            )
        claims = await self.verify_id_token(server, id_token, nonce=nonce)
        scope = answer.get("scope")
        patient = answer.get("patient")
        # SMART App Launch: `patient` is a FHIR id (a string) and `scope` a space-separated string. A
        # value of another type is refused (never read as "no patient in context" or "no scopes"),
        # and never repeated: the message names its type only.
        if patient is not None and not (isinstance(patient, str) and FHIR_ID.fullmatch(patient)):
            raise LoginError(
                f"the token answer's patient is {_kind(patient)}, not a FHIR id as SMART App Launch "
                "requires: ask the EHR's administrator to fix the launch context it sends",
                status=502,
            )
        if scope is not None and not isinstance(scope, str):
            raise LoginError(
                f"the token answer's scope is {_kind(scope)}, not a space-separated string as OAuth 2.0 "
                "and SMART App Launch require: ask the identity provider's administrator to fix it",
                status=502,
            )
        expires_in = answer.get("expires_in")
        return Login(
            subject=str(claims["sub"]),
            scopes=frozenset(scope.split()) if scope is not None else frozenset(),
            patient=patient,
            expires_in=float(expires_in) if isinstance(expires_in, int | float) and expires_in > 0 else None,
            roles=roles_of(claims, self.role_claim),
        )

    async def verify_id_token(self, server: AuthServer, token: str, *, nonce: str) -> dict[str, Any]:
        """The ID token's claims once its signature, issuer, audience, expiry and nonce check out."""
        try:
            header = jwt.get_unverified_header(token)
        except jwt.InvalidTokenError:
            raise LoginError("the ID token is not a JWT", status=502) from None
        kid = header.get("kid")
        try:
            key = (await server.jwks.key(kid if isinstance(kid, str) else None)).key
        except BridgeError as exc:
            raise LoginError(f"the ID token cannot be checked: {exc}", status=502) from None
        algorithm = header.get("alg")
        if not isinstance(algorithm, str) or algorithm not in key_algorithms(key):
            raise LoginError("the ID token's algorithm does not match its signing key", status=502)
        try:
            claims: dict[str, Any] = jwt.decode(
                token,
                key=key,
                algorithms=[algorithm],
                audience=self.client_id,
                issuer=server.issuer,
                leeway=LEEWAY,
                options={"require": ["iss", "aud", "exp", "iat", "sub"]},
            )
        except jwt.ExpiredSignatureError:
            raise LoginError("the ID token has expired", status=502) from None
        except jwt.InvalidAudienceError:
            raise LoginError("the ID token is for another client", status=502) from None
        except jwt.InvalidIssuerError:
            raise LoginError("the ID token is from another issuer", status=502) from None
        except (jwt.PyJWTError, TypeError, ValueError):
            raise LoginError("the ID token's signature or claims are invalid", status=502) from None
        audience = claims.get("aud")
        if isinstance(audience, list) and len(audience) > 1 and claims.get("azp") != self.client_id:
            # OpenID Connect Core 3.1.3.7: with several audiences, this client must be the authorized party
            raise LoginError("the ID token is for another client", status=502)
        given = claims.get("nonce")
        if not isinstance(given, str) or not hmac.compare_digest(given.encode(), nonce.encode()):
            raise LoginError("the ID token's nonce does not match this login", status=502)
        return claims

    async def _json(
        self,
        method: str,
        url: str,
        *,
        what: str,
        data: Mapping[str, str] | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> dict[str, Any]:
        if self.http is None:
            raise RuntimeError("the app's lifespan has not run")
        request = self.http.build_request(
            method, url, headers={"Accept": "application/json", **(headers or {})}, data=data
        )
        try:  # a discovery document or token answer is small and quick: bounded in size and time
            response = await send_bounded(self.http, request, ANSWER_LIMIT, "oidc")
        except httpx.HTTPError as exc:
            raise LoginError(f"{what} did not answer ({type(exc).__name__})", status=502) from None
        except UpstreamLimitError:
            raise LoginError(
                f"{what} answered more than {ANSWER_LIMIT.max_bytes} bytes or took over "
                f"{ANSWER_LIMIT.deadline:g} s",
                status=502,
            ) from None
        if not response.is_success:
            # the provider's error code only (e.g. invalid_grant): its description may echo input
            try:
                code = response.json().get("error")
            except (ValueError, AttributeError):
                code = None
            reason = f" ({code})" if isinstance(code, str) and code.isascii() and len(code) < 64 else ""
            raise LoginError(f"{what} refused the request: HTTP {response.status_code}{reason}", status=502)
        try:
            body = json.loads(response.content)
        except ValueError:
            raise LoginError(f"{what} did not answer JSON", status=502) from None
        if not isinstance(body, dict):
            raise LoginError(f"{what} did not answer a JSON object", status=502)
        return body


def _kind(value: Any) -> str:
    """What a JSON value is, for a message that must not repeat the value itself."""
    if isinstance(value, str):
        return "an empty string" if not value else "a string with characters or a length an id cannot have"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, int | float):
        return "a number"
    if isinstance(value, list):
        return "a list"
    return "an object"


def _is_http_url(value: Any) -> bool:
    return isinstance(value, str) and value.startswith(("https://", "http://")) and len(value) < 2048


CALLBACK_PATH = "/login/callback"  # where identity providers and EHRs send the browser back


def oidc_client(settings: Settings, kind: Literal["login", "launch"]) -> OidcClient:
    """The bridge's client registration at the login's identity provider, or at the EHRs (launch)."""
    assert settings.public_url is not None
    if kind == "launch":
        client_id, secret = settings.launch_client
    else:
        assert settings.oidc.client_id is not None
        client_id, secret = settings.oidc.client_id, settings.oidc.secret
    return OidcClient(
        client_id,
        secret.get_secret_value() if secret is not None else None,
        str(settings.public_url).rstrip("/") + CALLBACK_PATH,
        role_claim=settings.operator.role_claim,
    )
