"""The store's browser sessions and logins under way (bridge/api/auth/session.py), keyed by a hash."""

from __future__ import annotations

from typing import Any

from sqlalchemy import delete, func, select

from bridge.state.base import StoreBase
from bridge.state.models import BrowserSession


class BrowserSessions(StoreBase):
    """Entries shared by every replica: a browser's session, or a login waiting for its callback."""

    def put_browser_session(
        self,
        key: str,
        kind: str,
        data: dict[str, Any],
        expires_at: float,
        *,
        now: float,
        limit: int | None = None,
    ) -> bool:
        """Store an entry; False when ``limit`` live entries of this kind exist already."""
        with self._session() as session:
            if limit is not None:
                session.execute(delete(BrowserSession).where(BrowserSession.expires_at <= now))
                live = session.scalar(
                    select(func.count()).select_from(BrowserSession).where(BrowserSession.kind == kind)
                )
                if (live or 0) >= limit:
                    return False
            session.merge(BrowserSession(key=key, kind=kind, data=data, expires_at=expires_at))
        return True

    def browser_session(self, key: str, kind: str, now: float) -> dict[str, Any] | None:
        """The live entry under ``key``, or None."""
        with self._session() as session:
            row = session.get(BrowserSession, key)
            if row is None or row.kind != kind or row.expires_at <= now:
                return None
            return dict(row.data)

    def take_browser_session(self, key: str, kind: str, now: float) -> dict[str, Any] | None:
        """The live entry under ``key``, removed: at most one caller, on any replica, gets it."""
        with self._session() as session:
            row = session.get(BrowserSession, key)
            if row is None or row.kind != kind:
                return None
            data, live = dict(row.data), row.expires_at > now
            taken = session.execute(delete(BrowserSession).where(BrowserSession.key == key))
            return data if live and getattr(taken, "rowcount", 1) == 1 else None

    def end_browser_session(self, key: str) -> None:
        """Forget an entry."""
        with self._session() as session:
            session.execute(delete(BrowserSession).where(BrowserSession.key == key))

    def purge_browser_sessions(self, now: float) -> int:
        """Drop expired entries; returns how many."""
        with self._session() as session:
            result = session.execute(delete(BrowserSession).where(BrowserSession.expires_at <= now))
            return int(getattr(result, "rowcount", 0) or 0)
