"""Browser ways in: OpenID Connect login, SMART EHR launch, logout; and the login redirect of pages.

``/login`` sends the browser to the configured issuer; ``/launch?iss=&launch=`` is an EHR launch
(SMART App Launch, EHR launch) from an allowed EHR; both come back to ``/login/callback``, which
checks the answer, opens a server-side session and sets its cookie. A browser asking for a page
without a session is sent straight to the issuer and back to the page it asked for (the page's
address is kept server-side, never put in a URL). Not part of the JSON API's schema.
"""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import html
import logging
import secrets
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Annotated, Any, Literal
from urllib.parse import quote, urlsplit

from fastapi import APIRouter, Query, Request
from fastapi.responses import HTMLResponse, RedirectResponse, Response

from bridge.api import errors
from bridge.api.audit import note
from bridge.api.auth.oidc import CALLBACK_PATH, AuthServer, LoginError, OidcClient, Pkce
from bridge.api.auth.security import UNAUTHENTICATED
from bridge.api.auth.session import (
    LOGIN_COOKIE,
    PENDING_TTL,
    SessionData,
    SessionStore,
    clear_session_cookie,
    session_caller,
    session_store,
    set_cookie,
    set_session_cookie,
    sound_cookie,
)
from bridge.api.deps import ServicesDep
from bridge.api.errors import AuthenticationError
from bridge.api.services import mount_path, services_of
from bridge.config import Settings
from bridge.cookies import cookie_name

logger = logging.getLogger(__name__)

router = APIRouter(tags=["login"], include_in_schema=False)

LOGGED_OUT_PATH = "/logout/done"  # where the identity provider sends the browser after its logout
DEFAULT_NEXT = "/record"
# Pages a browser opens: without a session they go to login instead of getting a 401.
PAGE_PREFIXES = ("/record", "/IHEInvokeImageDisplay", "/operator")
VIEWER_PREFIXES = ("/imaging-studies/", "/studies/")  # .../{id}/viewer
_NO_STORE = {"Cache-Control": "no-store"}


@dataclass(frozen=True, slots=True)
class PendingLogin:
    """A login under way, kept server-side under its ``state`` (any replica may finish it)."""

    kind: Literal["login", "launch"]
    base: str  # the OpenID issuer (login) or the EHR's FHIR base (launch), to find the server again
    verifier: str
    nonce: str
    next: str  # a path on the bridge
    browser: str  # SHA-256 of the login cookie of the browser that began it: only that browser ends it

    def to_json(self) -> dict[str, Any]:
        """As stored."""
        return {
            "kind": self.kind,
            "base": self.base,
            "verifier": self.verifier,
            "nonce": self.nonce,
            "next": self.next,
            "browser": self.browser,
        }

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> PendingLogin | None:
        """As read back; None when it is not one of ours (a login begun before browsers were bound)."""
        names = ("kind", "base", "verifier", "nonce", "next", "browser")
        values = [data.get(name) for name in names]
        if not all(isinstance(v, str) for v in values) or values[0] not in ("login", "launch"):
            return None
        kind: Literal["login", "launch"] = "launch" if values[0] == "launch" else "login"
        return cls(kind, *(str(v) for v in values[1:]))

    def began_in(self, binding: str | None) -> bool:
        """Whether the browser showing login cookie ``binding`` is the one that began this login."""
        if binding is None:
            return False
        return hmac.compare_digest(_browser_digest(binding).encode(), self.browser.encode())


def _browser_digest(binding: str) -> str:
    return hashlib.sha256(binding.encode()).hexdigest()


def form_action(settings: Settings) -> str:
    """CSP form-action for a page with a logout button: here, and the login provider it redirects to."""
    if settings.oidc.issuer is None:
        return "'self'"
    issuer = urlsplit(str(settings.oidc.issuer))
    return f"'self' {issuer.scheme}://{issuer.netloc}"


def _page(title: str, body: str, status_code: int, *, forms: str = "'self'") -> HTMLResponse:
    document = (
        '<!doctype html>\n<html lang="en"><head><meta charset="utf-8">'
        f"<title>{html.escape(title)}</title>"
        '<meta name="referrer" content="no-referrer"></head>\n'
        f"<body>\n<h1>{html.escape(title)}</h1>\n{body}\n</body></html>\n"
    )
    headers = {
        **_NO_STORE,
        "X-Frame-Options": "DENY",
        "Content-Security-Policy": "default-src 'none'; frame-ancestors 'none'; base-uri 'none'; "
        f"form-action {forms}",
    }
    return HTMLResponse(document, status_code=status_code, headers=headers)


def _local_path(value: str | None) -> str:
    """``value`` if it is a path on this site, else the record: never a redirect to another site."""
    if value and value.startswith("/") and not value.startswith(("//", "/\\")) and len(value) <= 2048:
        if all(0x20 < ord(c) < 0x7F for c in value):
            return value
    return DEFAULT_NEXT


def _client(request: Request, kind: Literal["login", "launch"]) -> OidcClient:
    return services_of(request).oidc[kind]


def _store(request: Request) -> SessionStore:
    store = session_store(request)
    assert store is not None  # the routes are installed only with login configured
    return store


async def start_login(request: Request, next_path: str) -> Response:
    """Send the browser to the configured issuer to log in, then back to ``next_path``."""
    settings: Settings = services_of(request).settings
    if settings.oidc.issuer is None:
        return _page(
            "Open from your EHR",
            "<p>This bridge is opened from the electronic health record (SMART EHR launch); "
            "it has no login of its own.</p>",
            401,
        )
    client = _client(request, "login")
    try:
        server = await client.openid_server(str(settings.oidc.issuer).rstrip("/"))
    except LoginError as exc:
        return _failed(exc)
    issuer = str(settings.oidc.issuer).rstrip("/")
    return await _authorize(request, client, server, "login", issuer, settings.oidc.scopes, next_path, {})


async def _authorize(
    request: Request,
    client: OidcClient,
    server: AuthServer,
    kind: Literal["login", "launch"],
    base: str,
    scope: str,
    next_path: str,
    extra: dict[str, str],
) -> RedirectResponse:
    settings: Settings = services_of(request).settings
    pkce = Pkce.new()
    nonce = secrets.token_urlsafe(24)
    # The browser's login cookie: kept across logins begun in several tabs, so each can finish; two
    # or a forged one, and this browser gets a fresh one.
    binding = sound_cookie(request, cookie_name(settings, LOGIN_COOKIE)) or secrets.token_urlsafe(32)
    pending = PendingLogin(kind, base, pkce.verifier, nonce, next_path, _browser_digest(binding))
    state = await _store(request).begin_login(pending.to_json())
    url = client.authorization_url(server, scope=scope, state=state, nonce=nonce, pkce=pkce, extra=extra)
    response = RedirectResponse(url, status_code=302, headers=_NO_STORE)
    set_cookie(response, settings, LOGIN_COOKIE, binding, PENDING_TTL)
    return response


# What an authorization server may send back instead of a code (RFC 6749 4.1.2.1, OpenID Connect
# Core 3.1.2.6). Only these are shown or recorded: the callback's URL is anyone's to write.
OAUTH_ERRORS = frozenset(
    {
        "invalid_request",
        "unauthorized_client",
        "access_denied",
        "unsupported_response_type",
        "invalid_scope",
        "server_error",
        "temporarily_unavailable",
        "interaction_required",
        "login_required",
        "account_selection_required",
        "consent_required",
        "invalid_request_uri",
        "invalid_request_object",
        "request_not_supported",
        "request_uri_not_supported",
        "registration_not_supported",
    }
)


def _refused(request: Request, reason: str) -> None:
    """A refused login or launch: a security alert in the audit trail, and a log line.

    The alert is one per source address and audit window (bridge/audit/events.py, ``window_key``), as
    for refused credentials, so a prober replaying callbacks cannot flood the FHIR server. ``reason``
    is the bridge's own words: never a code, a state, a token or the patient in context.
    """
    note(request, UNAUTHENTICATED, "login", "refused", reason=reason)
    logger.warning("login refused: %s", reason)


def _failed(exc: LoginError, request: Request | None = None) -> HTMLResponse:
    """The page of a login that could not be completed; audited when ``request`` (a callback) is given."""
    if request is not None:
        _refused(request, str(exc))  # a LoginError's message carries no token and no patient data
    else:
        logger.warning("login failed: %s", exc)
    return _page("Login failed", f"<p>{html.escape(str(exc))}</p>", exc.status)


@router.get("/login")
async def login(
    request: Request,
    next: Annotated[str | None, Query(max_length=2048)] = None,  # noqa: A002
) -> Response:
    """Log in at the configured OpenID issuer, then go to ``next`` (a path here; default: the record)."""
    return await start_login(request, _local_path(next))


@router.get("/launch")
async def launch(
    request: Request,
    s: ServicesDep,
    iss: Annotated[str | None, Query(max_length=2048)] = None,
    launch: Annotated[str | None, Query(max_length=4096)] = None,
) -> Response:
    """SMART EHR launch: an allowed EHR (``iss``) opens the record in the context of one patient."""
    if not iss or not launch:
        missing = " and ".join(n for n, v in (("iss", iss), ("launch", launch)) if not v)
        return _page("Launch refused", f"<p>An EHR launch needs the {missing} parameter.</p>", 400)
    allowed = {i.rstrip("/") for i in s.settings.smart_launch.issuers}
    if iss.rstrip("/") not in allowed:
        _refused(request, "an EHR launch whose iss is not in BRIDGE_SMART_LAUNCH_ISSUERS")
        return _page(
            "Launch refused",
            "<p>This EHR is not allowed to launch the bridge (BRIDGE_SMART_LAUNCH_ISSUERS).</p>",
            403,
        )
    client = _client(request, "launch")
    try:
        server = await client.smart_server(iss)
    except LoginError as exc:
        return _failed(exc)
    extra = {"launch": launch, "aud": iss}
    scope = s.settings.smart_launch.scopes
    return await _authorize(request, client, server, "launch", iss, scope, DEFAULT_NEXT, extra)


@router.get(CALLBACK_PATH)
async def callback(
    request: Request,
    s: ServicesDep,
    state: Annotated[str | None, Query(max_length=256)] = None,
    code: Annotated[str | None, Query(max_length=4096)] = None,
    error: Annotated[str | None, Query(max_length=256)] = None,
) -> Response:
    """Where the identity provider sends the browser back: check, open the session, go on."""
    store = _store(request)
    stored = await store.finish_login(state) if state else None
    pending = PendingLogin.from_json(stored) if stored is not None else None
    again = f'<a href="{html.escape(mount_path(request))}/login">Sign in again</a>.'
    if pending is None:
        # a forged state, a callback replayed, or one kept past PENDING_TTL
        _refused(
            request,
            "a login callback whose state is unknown, already used or expired"
            if state
            else "a login callback without a state",
        )
        return _page(
            "Login expired",
            f"<p>This login was not started here, was already used, or took too long. {again}</p>",
            400,
        )
    if not pending.began_in(sound_cookie(request, cookie_name(s.settings, LOGIN_COOKIE))):
        # Someone else's login, its callback opened in this browser (login CSRF): refused, and the
        # session this browser has stays as it is. The login is used up either way.
        _refused(request, "a login callback from another browser than the one that began the login")
        return _page(
            "Login refused",
            f"<p>This login was begun in another browser, or this browser's login cookie is gone. "
            f"{again}</p>",
            403,
        )
    if error is not None or not code:
        said = (error if error in OAUTH_ERRORS else "an error") if error is not None else "no code"
        _refused(request, f"the identity provider answered {said}")
        return _page(
            "Login refused",
            f"<p>The identity provider answered: {html.escape(said)}. {again}</p>",
            401,
        )
    client = _client(request, pending.kind)
    try:
        if pending.kind == "launch":
            server = await client.smart_server(pending.base)
        else:
            server = await client.openid_server(pending.base)
        done = await client.exchange(server, code, verifier=pending.verifier, nonce=pending.nonce)
    except LoginError as exc:
        return _failed(exc, request)
    next_path = pending.next
    if pending.kind == "launch":
        if done.patient is None:
            missing = LoginError(
                "the EHR launch gave no patient in context: open the bridge from a patient's chart, "
                "and check that the EHR grants the launch/patient scope (BRIDGE_SMART_LAUNCH_SCOPES)",
                status=403,
            )
            return _failed(missing, request)
        next_path = f"/record/patients/{quote(done.patient, safe='')}"
    old = sound_cookie(request, cookie_name(s.settings))  # two, or not the bridge's: nothing to end
    if old:
        await store.end(old)
    session_id = await store.create(
        SessionData(done.subject, done.patient, done.scopes, client.client_id, roles=done.roles)
    )
    logger.info("session opened (%s)", pending.kind)
    response = RedirectResponse(mount_path(request) + next_path, status_code=303, headers=_NO_STORE)
    set_session_cookie(response, s.settings, session_id)
    return response


@router.get("/logout")
async def logout_page(request: Request) -> Response:
    """A button that logs out: logging out takes a POST, so another site cannot do it with a link."""
    form = (
        f'<form method="post" action="{html.escape(mount_path(request))}/logout">'
        '<button type="submit">Log out</button></form>'
    )
    # the form's answer redirects to the identity provider's logout, which form-action must allow
    return _page("Log out", form, 200, forms=form_action(services_of(request).settings))


@router.post("/logout")
async def logout(request: Request, s: ServicesDep) -> Response:
    """End the session here, on every replica, then at the identity provider where it offers that.

    Without the provider's logout the next person at a shared workstation would be signed in again
    silently by the provider's own session. A session opened by an EHR launch is the EHR's: its
    logout is left to the EHR.
    """
    session_id = sound_cookie(request, cookie_name(s.settings))  # two, or not the bridge's: nothing to end
    who = None
    if session_id:
        with contextlib.suppress(AuthenticationError):  # expired or ended already: still logged out
            who = await session_caller(request)
        await _store(request).end(session_id)
    provider = await _provider_logout(request, s.settings) if who is None or who.patient is None else None
    response = provider if provider is not None else _logged_out(request, s.settings)
    clear_session_cookie(response, s.settings)
    return response


async def _provider_logout(request: Request, settings: Settings) -> Response | None:
    """A redirect to the login provider's end-session endpoint, back to LOGGED_OUT_PATH; else None."""
    if settings.oidc.issuer is None or settings.public_url is None:
        return None
    client = _client(request, "login")
    try:
        server = await client.openid_server(str(settings.oidc.issuer).rstrip("/"))
    except LoginError as exc:  # the session here has ended: say so, and why the provider's has not
        logger.warning("logout at the identity provider skipped: %s", exc)
        return None
    url = client.logout_url(server, str(settings.public_url).rstrip("/") + LOGGED_OUT_PATH)
    return RedirectResponse(url, status_code=303, headers=_NO_STORE) if url is not None else None


def _logged_out(request: Request, settings: Settings) -> HTMLResponse:
    again = (
        f'<p><a href="{html.escape(mount_path(request))}/login">Log in again</a></p>'
        if settings.oidc.issuer is not None
        else ""
    )
    return _page("Logged out", "<p>Your session here has ended.</p>" + again, 200)


@router.get(LOGGED_OUT_PATH)
async def logged_out(request: Request, s: ServicesDep) -> Response:
    """Where the identity provider sends the browser once its own session has ended too."""
    return _logged_out(request, s.settings)


def _wants_page(request: Request) -> bool:
    """A browser navigating to a page (GET, HTML accepted), not a program calling the API."""
    if request.method != "GET" or "text/html" not in request.headers.get("accept", ""):
        return False
    path = request.url.path[len(mount_path(request)) :] if mount_path(request) else request.url.path
    return path.startswith(PAGE_PREFIXES) or (path.startswith(VIEWER_PREFIXES) and path.endswith("/viewer"))


async def authentication_error(request: Request, exc: Exception) -> Response:
    """401 for programs; a browser opening a page goes to login and comes back to it."""
    assert isinstance(exc, AuthenticationError)
    if not _wants_page(request) or request.headers.get("x-api-key") or request.headers.get("authorization"):
        return errors.response_for(exc)
    settings: Settings = services_of(request).settings
    if not settings.login_enabled:  # keys or tokens only: a person needs words, not a JSON 401
        refused = errors.response_for(exc)
        page = _page(
            "Sign-in needed",
            "<p>This page shows patient data to signed-in users only, and this bridge has no browser "
            "sign-in: it accepts API keys and bearer tokens from programs.</p>"
            "<p>Open it from your EHR, or ask the bridge's administrator to set up browser sign-in "
            "(BRIDGE_OIDC_ISSUER, BRIDGE_OIDC_CLIENT_ID and BRIDGE_PUBLIC_URL, or "
            "BRIDGE_SMART_LAUNCH_ISSUERS for an EHR launch).</p>",
            401,
        )
        if "www-authenticate" in refused.headers:
            page.headers["WWW-Authenticate"] = refused.headers["www-authenticate"]
        return page
    here = request.url.path[len(mount_path(request)) :] if mount_path(request) else request.url.path
    if request.url.query:
        here += "?" + request.url.query
    response = await start_login(request, _local_path(here))
    if cookie_name(settings) in request.cookies:
        clear_session_cookie(response, settings)
    return response
