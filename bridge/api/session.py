"""Browser sessions: an opaque random id in a cookie; who logged in, and for which patient, kept server-side.

Sessions live in this process's memory: one replica, or replicas behind sticky sessions (a session
made on one replica is unknown to another, whose pages then send the browser to log in again).
The store keys sessions by a hash of the cookie value, so what it holds cannot be replayed as a cookie.
"""

from __future__ import annotations

import hashlib
import secrets
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Generic, TypeVar

from fastapi import Request, Response

from bridge.api.errors import AuthenticationError
from bridge.api.exposure import is_loopback
from bridge.api.security import Caller
from bridge.config import Settings

COOKIE = "bridge_session"
MAX_SESSIONS = 10_000  # the oldest is dropped beyond this: memory stays bounded whoever logs in
MAX_PENDING = 10_000  # logins started and not finished
PENDING_TTL = 600.0  # seconds a browser may spend at the identity provider

T = TypeVar("T")


@dataclass(frozen=True, slots=True)
class SessionData:
    """What a session stands for; never a token."""

    subject: str | None
    patient: str | None  # FHIR Patient id the session is limited to (EHR launch), None: not limited
    scopes: frozenset[str]
    client_id: str | None
    expires_at: float  # the store's clock

    def caller(self) -> Caller:
        """The session as the API's caller."""
        return Caller(
            "session", self.subject, patient=self.patient, scopes=self.scopes, client_id=self.client_id
        )


def _digest(value: str) -> str:
    return hashlib.sha256(value.encode()).hexdigest()


class _Expiring(Generic[T]):
    """A bounded map of entries that expire, keyed by the digest of a random handle."""

    def __init__(self, limit: int, clock: Callable[[], float]) -> None:
        self._items: OrderedDict[str, tuple[float, T]] = OrderedDict()
        self._limit = limit
        self._clock = clock

    def put(self, item: T, expires_at: float) -> str:
        handle = secrets.token_urlsafe(32)
        self._purge()
        while len(self._items) >= self._limit:
            self._items.popitem(last=False)
        self._items[_digest(handle)] = (expires_at, item)
        return handle

    def get(self, handle: str) -> T | None:
        found = self._items.get(_digest(handle))
        if found is None:
            return None
        if found[0] <= self._clock():
            self._items.pop(_digest(handle), None)
            return None
        return found[1]

    def pop(self, handle: str) -> T | None:
        found = self.get(handle)
        self._items.pop(_digest(handle), None)
        return found

    def _purge(self) -> None:
        now = self._clock()
        for key in [k for k, (expires, _) in self._items.items() if expires <= now]:
            del self._items[key]

    def __len__(self) -> int:
        return len(self._items)


class SessionStore(Generic[T]):
    """Sessions by cookie value, and logins under way (``T``) by their OAuth ``state``."""

    def __init__(self, max_age: float, clock: Callable[[], float] = time.time) -> None:
        self.max_age = max_age
        self._clock = clock
        self._sessions: _Expiring[SessionData] = _Expiring(MAX_SESSIONS, clock)
        self._pending: _Expiring[T] = _Expiring(MAX_PENDING, clock)

    def create(
        self,
        *,
        subject: str | None,
        patient: str | None,
        scopes: frozenset[str],
        client_id: str | None,
        lifetime: float | None = None,
    ) -> str:
        """A new session; returns the cookie value (a fresh random id: no session fixation)."""
        age = self.max_age if lifetime is None else min(self.max_age, lifetime)
        data = SessionData(subject, patient, scopes, client_id, self._clock() + age)
        return self._sessions.put(data, data.expires_at)

    def get(self, session_id: str) -> SessionData | None:
        """The live session with this id, or None (unknown, ended or expired)."""
        return self._sessions.get(session_id)

    def end(self, session_id: str) -> None:
        """Forget a session (logout)."""
        self._sessions.pop(session_id)

    def begin_login(self, pending: T) -> str:
        """Remember a login under way; returns its ``state``."""
        return self._pending.put(pending, self._clock() + PENDING_TTL)

    def finish_login(self, state: str) -> T | None:
        """The login under way with this ``state``, at most once."""
        return self._pending.pop(state)

    @property
    def count(self) -> int:
        """Live sessions (for tests and metrics)."""
        return len(self._sessions)


def cookie_secure(settings: Settings) -> bool:
    """Secure cookies, except for a plain-http public URL on loopback (a developer's machine)."""
    url = settings.public_url
    return url is None or url.scheme == "https" or not is_loopback(url.host or "")


def cookie_path(settings: Settings) -> str:
    """The public URL's path, so the cookie goes only to the bridge behind a path prefix."""
    path = settings.public_url.path if settings.public_url is not None else None
    return (path or "/").rstrip("/") or "/"


def set_session_cookie(response: Response, settings: Settings, session_id: str) -> None:
    """Hand the browser its session id: HttpOnly, SameSite=Lax, Secure (see cookie_secure)."""
    response.set_cookie(
        COOKIE,
        session_id,
        max_age=int(settings.session_max_age),
        path=cookie_path(settings),
        secure=cookie_secure(settings),
        httponly=True,
        samesite="lax",
    )


def clear_session_cookie(response: Response, settings: Settings) -> None:
    """Tell the browser to drop its session cookie."""
    response.delete_cookie(
        COOKIE, path=cookie_path(settings), secure=cookie_secure(settings), httponly=True, samesite="lax"
    )


def session_store(request: Request) -> SessionStore[object] | None:
    """The app's session store, None when login is not configured."""
    store: SessionStore[object] | None = getattr(request.app.state, "sessions", None)
    return store


async def session_caller(request: Request) -> Caller | None:
    """The caller of the request's session cookie; None when there is no cookie or no login.

    A cookie naming no live session (expired, ended, or made by another replica) is a 401, so a
    viewer mid-way gets "log in again" rather than an archive error.
    """
    store = session_store(request)
    session_id = request.cookies.get(COOKIE)
    if store is None or not session_id:
        return None
    found = store.get(session_id)
    if found is None:
        raise AuthenticationError("the session has expired or ended; log in again")
    return found.caller()
