"""What every part of the state store shares: its sessions, the retried upsert, URL and time helpers."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from urllib.parse import urlsplit

from sqlalchemy.engine import make_url
from sqlalchemy.exc import IntegrityError, SQLAlchemyError
from sqlalchemy.orm import Session, sessionmaker

from bridge.errors import StoreError


def utcnow() -> datetime:
    """Now, in UTC."""
    return datetime.now(UTC)


def safe_url(url: str) -> str:
    """The store's URL as it may be shown: the password hidden."""
    try:
        return make_url(url).render_as_string(hide_password=True)
    except Exception:  # noqa: BLE001 - checked at start-up; never let a message fail
        return "BRIDGE_STATE_URL"


def sqlite_file(url: str) -> str | None:
    """The file of a SQLite store, as an absolute path (also for a ``file:`` URI); None otherwise."""
    try:
        parsed = make_url(url)
    except Exception:  # noqa: BLE001 - checked at start-up; never let a message fail
        return None
    database = parsed.database
    if parsed.get_backend_name() != "sqlite" or database in (None, "", ":memory:"):
        return None
    if str(parsed.query.get("uri", "")).lower() in ("true", "1") and database.startswith("file:"):
        database = urlsplit(database).path or database  # file:/path (the query is the URL's)
    return os.path.abspath(database)


def location(url: str) -> str:
    """Where the store is, as a message says it: its URL (password hidden), and its file if SQLite."""
    path = sqlite_file(url)
    return f"{safe_url(url)} (file {path})" if path else safe_url(url)


def driver_words(exc: SQLAlchemyError) -> str:
    """The database's own first line about a failure (never the statement or its parameters)."""
    return str(getattr(exc, "orig", None) or exc).splitlines()[0][:200]


def open_problem(url: str, exc: SQLAlchemyError) -> str:
    """Why the store did not open, with where it is and the setting that moves it."""
    where = location(url)
    hint = "check that the database server runs and that BRIDGE_STATE_URL's host, database and user are right"
    path = sqlite_file(url)
    if path is not None:
        folder = os.path.dirname(path)
        if not os.path.isdir(folder):
            hint = f"the folder {folder} does not exist: create it, or point BRIDGE_STATE_URL elsewhere"
        elif not os.access(folder, os.W_OK):
            hint = f"the folder {folder} is not writable by this user: fix its permissions or move the store"
        else:
            hint = "check the file's permissions, or point BRIDGE_STATE_URL at another file"
    return f"cannot open the state store at {where} ({type(exc).__name__}: {driver_words(exc)}); {hint}"


class StoreBase:
    """The sessions the store's parts (studies, runs, queues, browser sessions) run their queries in."""

    _sessions: sessionmaker[Session]
    url: str  # BRIDGE_STATE_URL

    @contextmanager
    def _session(self) -> Iterator[Session]:
        try:
            with self._sessions.begin() as session:
                yield session
        except SQLAlchemyError as exc:
            # Where the store is and what the database said (a file turned read-only, a full disk, a
            # lost server): the operator's fix is there or in BRIDGE_STATE_URL.
            raise StoreError(
                f"the state store at {location(self.url)} (BRIDGE_STATE_URL) failed "
                f"({type(exc).__name__}: {driver_words(exc)})"
            ) from exc

    def _upsert(self, write: Callable[[], None]) -> None:
        """Run ``write`` (read a row, insert it if missing) once more if another replica inserted it first.

        Two replicas that find the row missing at the same moment both insert it; the second gets
        an IntegrityError, and its second try finds the row and updates it.
        """
        try:
            write()
        except StoreError as exc:
            if not isinstance(exc.__cause__, IntegrityError):
                raise
            write()
