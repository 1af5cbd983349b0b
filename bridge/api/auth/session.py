"""Browser sessions: an opaque random id in a cookie; who logged in, and for which patient, kept server-side.

Sessions and logins under way are kept in the state store (``browser_sessions``), so every API
replica knows every session and a login may come back to any replica; in memory only when the
store cannot be opened (then one replica, or sticky sessions). Entries are keyed by the SHA-256
of the cookie value or OAuth ``state``, so what the store holds cannot be replayed as a cookie,
and they hold who logged in, never a token.

Each replica keeps the sessions it has read for a few seconds (``BRIDGE_SESSION_CACHE_TTL``), so a
viewer fetching a hundred images does not read the store a hundred times: a logout here ends the
session here at once, a logout on another replica ends it here within that time. A cached
session never outlives its own expiry.
"""

from __future__ import annotations

import hashlib
import secrets
import time
from collections import OrderedDict
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Protocol

import anyio.to_thread
from fastapi import Request, Response

from bridge.api.auth.security import Caller
from bridge.api.errors import AuthenticationError, RateLimitedError
from bridge.config import Settings
from bridge.config.hosts import is_loopback
from bridge.cookies import COOKIE, cookie_name, host_prefixed, read
from bridge.state.store import SqlStore

LOGIN_COOKIE = "bridge_login"  # binds a login under way to the browser that began it
SESSION = "session"
LOGIN = "login"
MAX_SESSIONS = 10_000  # in memory: the oldest is dropped beyond this
MAX_PENDING = 10_000  # logins started and not finished; beyond this /login answers 429
PENDING_TTL = 600.0  # seconds a browser may spend at the identity provider
PURGE_EVERY = 60.0  # seconds between sweeps of expired sessions from the store
CACHE_SIZE = 1024  # sessions a replica keeps in memory between reads of the store; the oldest go first
_EXPIRES = "expires_at"  # stored beside the session, so a cached copy knows when it ends


@dataclass(frozen=True, slots=True)
class SessionData:
    """What a session stands for; never a token."""

    subject: str | None
    patient: str | None  # FHIR Patient id the session is limited to (EHR launch), None: not limited
    scopes: frozenset[str]
    client_id: str | None
    expires: float | None = None  # when the session ends (Unix time); kept beside it, not in it
    roles: frozenset[str] = frozenset()  # the ID token's roles at login (the operator page's role)

    def caller(self) -> Caller:
        """The session as the API's caller."""
        return Caller(
            "session",
            self.subject,
            patient=self.patient,
            scopes=self.scopes,
            client_id=self.client_id,
            expires=self.expires,
            roles=self.roles,
        )

    def to_json(self) -> dict[str, Any]:
        """As stored."""
        return {
            "subject": self.subject,
            "patient": self.patient,
            "scopes": sorted(self.scopes),
            "client_id": self.client_id,
            "roles": sorted(self.roles),
        }

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> SessionData:
        """As read back from the store."""

        def text(name: str) -> str | None:
            value = data.get(name)
            return value if isinstance(value, str) else None

        def texts(name: str) -> frozenset[str]:
            value = data.get(name)
            return (
                frozenset(s for s in value if isinstance(s, str)) if isinstance(value, list) else frozenset()
            )

        expires = data.get(_EXPIRES)
        return cls(
            text("subject"),
            text("patient"),
            texts("scopes"),
            text("client_id"),
            float(expires) if isinstance(expires, int | float) else None,
            texts("roles"),
        )


class SessionBackend(Protocol):
    """Where entries live: blocking calls (the store), or in memory."""

    threaded: bool  # whether calls block and so run in a worker thread

    def put(
        self, key: str, kind: str, data: dict[str, Any], expires_at: float, now: float, limit: int
    ) -> bool:
        """Store an entry; False when ``limit`` live entries of ``kind`` exist already."""
        ...

    def get(self, key: str, kind: str, now: float) -> dict[str, Any] | None:
        """The live entry, or None."""
        ...

    def take(self, key: str, kind: str, now: float) -> dict[str, Any] | None:
        """The live entry, removed (at most once)."""
        ...

    def delete(self, key: str) -> None:
        """Forget an entry."""
        ...

    def purge(self, now: float) -> None:
        """Drop expired entries."""
        ...


class MemoryBackend:
    """Entries in this process only: bounded, the oldest dropped first."""

    threaded = False

    def __init__(self) -> None:
        self._items: OrderedDict[str, tuple[str, float, dict[str, Any]]] = OrderedDict()

    def put(
        self, key: str, kind: str, data: dict[str, Any], expires_at: float, now: float, limit: int
    ) -> bool:
        """Store an entry, dropping the oldest of its kind beyond ``limit``."""
        self.purge(now)
        mine = [k for k, (kd, _, _) in self._items.items() if kd == kind]
        for old in mine[: max(0, len(mine) - limit + 1)]:
            del self._items[old]
        self._items[key] = (kind, expires_at, data)
        return True

    def get(self, key: str, kind: str, now: float) -> dict[str, Any] | None:
        """The live entry, or None."""
        found = self._items.get(key)
        if found is None or found[0] != kind or found[1] <= now:
            return None
        return found[2]

    def take(self, key: str, kind: str, now: float) -> dict[str, Any] | None:
        """The live entry, removed."""
        found = self.get(key, kind, now)
        self._items.pop(key, None)
        return found

    def delete(self, key: str) -> None:
        """Forget an entry."""
        self._items.pop(key, None)

    def purge(self, now: float) -> None:
        """Drop expired entries."""
        for key in [k for k, (_, expires, _) in self._items.items() if expires <= now]:
            del self._items[key]


class StoreBackend:
    """Entries in the state store's ``browser_sessions`` table, shared by every replica."""

    threaded = True

    def __init__(self, store: SqlStore) -> None:
        self._store = store

    def put(
        self, key: str, kind: str, data: dict[str, Any], expires_at: float, now: float, limit: int
    ) -> bool:
        """Store an entry; False beyond ``limit`` live entries of its kind."""
        return self._store.put_browser_session(key, kind, data, expires_at, now=now, limit=limit)

    def get(self, key: str, kind: str, now: float) -> dict[str, Any] | None:
        """The live entry, or None."""
        return self._store.browser_session(key, kind, now)

    def take(self, key: str, kind: str, now: float) -> dict[str, Any] | None:
        """The live entry, removed."""
        return self._store.take_browser_session(key, kind, now)

    def delete(self, key: str) -> None:
        """Forget an entry."""
        self._store.end_browser_session(key)

    def purge(self, now: float) -> None:
        """Drop expired entries."""
        self._store.purge_browser_sessions(now)


def _digest(value: str) -> str:
    return hashlib.sha256(value.encode()).hexdigest()


class SessionStore:
    """Sessions by cookie value, and logins under way by their OAuth ``state``."""

    def __init__(
        self,
        max_age: float,
        backend: SessionBackend | None = None,
        clock: Callable[[], float] = time.time,
        *,
        cache_ttl: float = 0.0,
    ) -> None:
        self.max_age = max_age
        self.backend: SessionBackend = backend or MemoryBackend()
        self.cache_ttl = cache_ttl
        self._clock = clock
        self._purged = clock()
        # digest -> (session, trusted until): sessions read lately, so most requests skip the store
        self._cache: OrderedDict[str, tuple[SessionData, float]] = OrderedDict()
        self.reads = 0  # reads of the backend, for tests

    async def _call(self, function: Callable[..., Any], *args: Any) -> Any:
        if self.backend.threaded:
            return await anyio.to_thread.run_sync(function, *args)
        return function(*args)

    async def create(self, data: SessionData) -> str:
        """A new session; returns the cookie value (a fresh random id: no session fixation)."""
        now = self._clock()
        if now - self._purged > PURGE_EVERY:
            self._purged = now
            await self._call(self.backend.purge, now)
        handle = secrets.token_urlsafe(32)
        expires = now + self.max_age
        stored = {**data.to_json(), _EXPIRES: expires}
        await self._call(self.backend.put, _digest(handle), SESSION, stored, expires, now, MAX_SESSIONS)
        return handle

    async def get(self, session_id: str) -> SessionData | None:
        """The live session with this id, or None (unknown, ended or expired).

        A session read within the last ``cache_ttl`` seconds is not read again; only live sessions
        are kept, so an unknown or ended one is asked of the store every time.
        """
        key = _digest(session_id)
        now = self._clock()
        cached = self._cache.get(key)
        if cached is not None:
            if now < cached[1]:
                return cached[0]
            del self._cache[key]
        self.reads += 1
        found = await self._call(self.backend.get, key, SESSION, now)
        if found is None:
            return None
        session = SessionData.from_json(found)
        if self.cache_ttl > 0:
            expires = found.get(_EXPIRES)
            until = now + self.cache_ttl
            if isinstance(expires, int | float):
                until = min(until, float(expires))
            self._cache[key] = (session, until)
            while len(self._cache) > CACHE_SIZE:
                self._cache.popitem(last=False)
        return session

    async def end(self, session_id: str) -> None:
        """Forget a session (logout), here at once and in the store for every replica."""
        key = _digest(session_id)
        self._cache.pop(key, None)
        await self._call(self.backend.delete, key)

    async def begin_login(self, pending: dict[str, Any]) -> str:
        """Remember a login under way; returns its ``state``, or 429 when too many are under way."""
        state = secrets.token_urlsafe(32)
        now = self._clock()
        stored = await self._call(
            self.backend.put, _digest(state), LOGIN, pending, now + PENDING_TTL, now, MAX_PENDING
        )
        if not stored:
            raise RateLimitedError(
                "too many logins under way; try again shortly", retry_after=PENDING_TTL / 10
            )
        return state

    async def finish_login(self, state: str) -> dict[str, Any] | None:
        """The login under way with this ``state``, at most once."""
        found: dict[str, Any] | None = await self._call(
            self.backend.take, _digest(state), LOGIN, self._clock()
        )
        return found


def cookie_secure(settings: Settings) -> bool:
    """Secure cookies, except for a plain-http public URL on loopback (a developer's machine)."""
    url = settings.public_url
    return url is None or url.scheme == "https" or not is_loopback(url.host or "")


def cookie_path(settings: Settings) -> str:
    """The public URL's path, so the cookie goes only to the bridge behind a path prefix.

    A ``__Host-`` cookie must have Path=/, so over https the cookies go to the whole host.
    """
    if host_prefixed(settings):
        return "/"
    path = settings.public_url.path if settings.public_url is not None else None
    return (path or "/").rstrip("/") or "/"


def set_cookie(response: Response, settings: Settings, base: str, value: str, max_age: float) -> None:
    """Hand the browser a bridge cookie: HttpOnly, SameSite=Lax, Secure (see cookie_secure)."""
    response.set_cookie(
        cookie_name(settings, base),
        value,
        max_age=int(max_age),
        path=cookie_path(settings),
        secure=cookie_secure(settings),
        httponly=True,
        samesite="lax",
    )


def set_session_cookie(response: Response, settings: Settings, session_id: str) -> None:
    """Hand the browser its session id."""
    set_cookie(response, settings, COOKIE, session_id, settings.session.max_age)


def clear_session_cookie(response: Response, settings: Settings) -> None:
    """Tell the browser to drop its session cookie."""
    response.delete_cookie(
        cookie_name(settings),
        path=cookie_path(settings),
        secure=cookie_secure(settings),
        httponly=True,
        samesite="lax",
    )


def read_cookie(request: Request, name: str) -> str | None:
    """The one value of cookie ``name`` across every Cookie header; None when absent.

    Read strictly (bridge/cookies.py `read`), as the nginx front reads it: two cookies of that name,
    a name written with spaces or control characters by it, or a value the bridge never makes are
    refused (401), never one picked or trimmed. The front keys its grants on the same cookie, and a
    browser sends none of these, so each is someone's attempt to have the bridge authenticate one
    value while the front files the grant under another (or under none).
    """
    reading = read(request.headers.getlist("cookie"), name)
    if reading.refused is not None:
        raise AuthenticationError(reading.refused)
    return reading.value


def sound_cookie(request: Request, name: str) -> str | None:
    """The one well-formed value of cookie ``name``, else None (absent, two, or not the bridge's own).

    For the login's own routes, which act only on a cookie that is plainly theirs and refuse nothing.
    """
    try:
        return read_cookie(request, name)
    except AuthenticationError:
        return None


def session_cookie(request: Request) -> str | None:
    """The request's session cookie (see read_cookie), under this app's cookie name."""
    settings: Settings = request.app.state.services.settings
    return read_cookie(request, cookie_name(settings))


def session_store(request: Request) -> SessionStore | None:
    """The app's session store, None when login is not configured."""
    store: SessionStore | None = request.app.state.services.sessions
    return store


async def session_caller(request: Request) -> Caller | None:
    """The caller of the request's session cookie; None when there is no cookie or no login.

    A cookie naming no live session (expired or ended) is a 401, so a viewer mid-way gets
    "log in again" rather than an archive error.
    """
    store = session_store(request)
    if store is None:
        return None
    session_id = session_cookie(request)
    if not session_id:
        return None
    found = await store.get(session_id)
    if found is None:
        raise AuthenticationError("the session has expired or ended; log in again")
    return found.caller()
