"""What every part of the state store shares: its sessions, the retried upsert, URL and time helpers."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import UTC, datetime

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


def open_problem(url: str, exc: SQLAlchemyError) -> str:
    """Why the store did not open, with where it is and the setting that moves it."""
    parsed = make_url(url)
    where = safe_url(url)
    hint = "check that the database server runs and that BRIDGE_STATE_URL's host, database and user are right"
    if parsed.get_backend_name() == "sqlite" and parsed.database not in (None, "", ":memory:"):
        path = os.path.abspath(parsed.database)
        folder = os.path.dirname(path)
        where = f"{where} (file {path})"
        if not os.path.isdir(folder):
            hint = f"the folder {folder} does not exist: create it, or point BRIDGE_STATE_URL elsewhere"
        elif not os.access(folder, os.W_OK):
            hint = f"the folder {folder} is not writable by this user: fix its permissions or move the store"
        else:
            hint = "check the file's permissions, or point BRIDGE_STATE_URL at another file"
    first_line = str(getattr(exc, "orig", None) or exc).splitlines()[0]
    return f"cannot open the state store at {where} ({type(exc).__name__}: {first_line}); {hint}"


class StoreBase:
    """The sessions the store's parts (studies, runs, queues, browser sessions) run their queries in."""

    _sessions: sessionmaker[Session]

    @contextmanager
    def _session(self) -> Iterator[Session]:
        try:
            with self._sessions.begin() as session:
                yield session
        except SQLAlchemyError as exc:
            raise StoreError(f"state store failed ({type(exc).__name__})") from exc

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
