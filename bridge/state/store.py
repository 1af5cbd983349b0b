"""SQLAlchemy state store (SQLite by default, PostgreSQL for several replicas).

``SqlStore`` opens the engine and composes the store's parts, one module per concern: studies
(state/studies.py), runs (state/runs.py), the push and audit queues (state/queues.py) and browser
sessions (state/browser.py). Each part is typed against the protocol its users name.
"""

from __future__ import annotations

import logging
from typing import Any

from sqlalchemy import Engine, create_engine, event, insert, select
from sqlalchemy.engine import make_url
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.orm import sessionmaker

from bridge.errors import StoreError
from bridge.state.base import driver_words, location, open_problem, utcnow
from bridge.state.browser import BrowserSessions
from bridge.state.claims import StudyClaims
from bridge.state.migrate import upgrade_engine
from bridge.state.models import Checkpoint
from bridge.state.queues import AuditQueue, PushQueue
from bridge.state.runs import RunStore
from bridge.state.studies import StudyStore

logger = logging.getLogger(__name__)


def _sqlite_pragmas(dbapi_connection: Any, _record: Any) -> None:
    cursor = dbapi_connection.cursor()
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute("PRAGMA synchronous=NORMAL")
    cursor.execute("PRAGMA busy_timeout=10000")
    cursor.close()


class SqlStore(StudyStore, RunStore, PushQueue, AuditQueue, BrowserSessions):
    """The state store. Its methods are blocking; async callers run them in a thread."""

    def __init__(self, url: str) -> None:
        self.url = url
        try:
            self._engine: Engine = create_engine(url, pool_pre_ping=True)
            if make_url(url).get_backend_name() == "sqlite":
                event.listen(self._engine, "connect", _sqlite_pragmas)
            self._sessions = sessionmaker(self._engine, expire_on_commit=False)
            self._claims = StudyClaims(self._engine)
            try:
                self._migrate()
            except BaseException:
                self._engine.dispose()  # a refused store leaves no connection behind
                raise
        except SQLAlchemyError as exc:
            raise StoreError(open_problem(url, exc)) from exc

    def close(self) -> None:
        """Release the study claims and the engine's connections."""
        self._claims.close()
        self._engine.dispose()

    def _migrate(self) -> None:
        """Bring the schema to this version with the Alembic migrations (adopting a pre-Alembic store)."""
        before, after = upgrade_engine(self._engine)
        if before != after:
            logger.info("state store migrated from %s to %s", before or "empty", after)

    def check_writable(self) -> None:
        """Raise StoreError unless the store takes a write (made in a transaction rolled back)."""
        try:
            with self._engine.connect() as connection, connection.begin() as transaction:
                connection.execute(
                    insert(Checkpoint).values(source="~check", name="~check", value="", updated_at=utcnow())
                )
                transaction.rollback()
        except SQLAlchemyError as exc:
            raise StoreError(
                f"the state store at {location(self.url)} opens but takes no write "
                f"({type(exc).__name__}: {driver_words(exc)}); check the file's or the database user's "
                "permissions (a read-only file, mount or replica), or point BRIDGE_STATE_URL at a store "
                "that takes writes"
            ) from exc

    # Claims: which replica works on which study (see bridge.state.claims)
    def claim_study(self, source: str, study_uid: str) -> bool:
        """Claim a study for this process; False if another replica holds it (always True on SQLite)."""
        return self._claims.claim(source, study_uid)

    def release_study(self, source: str, study_uid: str) -> None:
        """Release a claim taken with claim_study."""
        self._claims.release(source, study_uid)

    def ping(self) -> None:
        """Raise StoreError unless the store answers."""
        with self._session() as session:
            session.execute(select(1))

    @property
    def claims_enabled(self) -> bool:
        """Whether claims coordinate several replicas (PostgreSQL); on SQLite every claim succeeds."""
        return self._claims.enabled
