"""Per-study claims that keep replicas off each other's studies: PostgreSQL advisory locks.

A claim is a session-level ``pg_try_advisory_lock`` keyed by a 64-bit hash of (source, study
UID), taken on one connection that the store keeps for its claims alone (in autocommit, so it
never sits idle in a transaction). PostgreSQL frees session locks when the session ends, so a
replica that dies, is killed or loses its network leaves its studies to the others with no
lease to expire and nothing to clean up. On SQLite (one process) every claim succeeds.
"""

from __future__ import annotations

import hashlib
import logging
import threading

from sqlalchemy import Connection, Engine, text
from sqlalchemy.exc import SQLAlchemyError

from bridge.errors import StoreError

logger = logging.getLogger(__name__)


def claim_key(source: str, study_uid: str) -> int:
    """The signed 64-bit advisory-lock key of a study (stable across processes and versions)."""
    digest = hashlib.blake2b(f"study\x00{source}\x00{study_uid}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big", signed=True)


class StudyClaims:
    """The claims one store holds. Thread-safe: the worker calls it from several threads."""

    def __init__(self, engine: Engine) -> None:
        self._engine = engine
        self.enabled = engine.dialect.name == "postgresql"
        self._lock = threading.Lock()
        self._connection: Connection | None = None
        # Held here as well as in PostgreSQL: advisory locks are re-entrant within a session, so
        # without this two tasks of one process could both "claim" the same study.
        self._held: set[int] = set()

    @property
    def held(self) -> int:
        """How many claims this store holds now."""
        with self._lock:
            return len(self._held)

    def _conn(self) -> Connection:
        if self._connection is None or self._connection.closed or self._connection.invalidated:
            connection = self._engine.connect()
            self._connection = connection.execution_options(isolation_level="AUTOCOMMIT")
        return self._connection

    def _drop_connection(self) -> None:
        if self._held:
            # The session is gone, and its locks with it: another replica may take these studies
            # now. Publishing stays idempotent, so the worst case is a duplicate write, not data.
            logger.warning("lost the claims connection while holding %d study claims", len(self._held))
        self._held.clear()
        if self._connection is not None:
            try:
                # Invalidate rather than return it to the pool: a pooled session would keep its
                # advisory locks.
                self._connection.invalidate()
                self._connection.close()
            except SQLAlchemyError:
                pass
        self._connection = None

    def claim(self, source: str, study_uid: str) -> bool:
        """Try to claim a study; False when another replica (or task) holds it. Never waits."""
        if not self.enabled:
            return True
        key = claim_key(source, study_uid)
        with self._lock:
            if key in self._held:
                return False
            for attempt in (1, 2):
                try:
                    got = bool(
                        self._conn().execute(text("SELECT pg_try_advisory_lock(:key)"), {"key": key}).scalar()
                    )
                    break
                except SQLAlchemyError as exc:
                    self._drop_connection()
                    if attempt == 2:
                        message = f"cannot claim a study in the state store ({type(exc).__name__})"
                        raise StoreError(message) from exc
            if got:
                self._held.add(key)
            return got

    def release(self, source: str, study_uid: str) -> None:
        """Release a claim this store holds (a no-op for one it does not)."""
        if not self.enabled:
            return
        key = claim_key(source, study_uid)
        with self._lock:
            if key not in self._held:
                return
            self._held.discard(key)
            try:
                self._conn().execute(text("SELECT pg_advisory_unlock(:key)"), {"key": key})
            except SQLAlchemyError:
                # With the session gone the lock is gone too; nothing is left to release.
                self._drop_connection()

    def close(self) -> None:
        """Release every claim, then end the claims session.

        The locks are released by a statement that PostgreSQL has answered before this returns:
        ending the session alone frees them only once the server has noticed the closed socket,
        so another replica claiming right after this could still be refused.
        """
        with self._lock:
            if self._held and self._connection is not None and not self._connection.closed:
                try:
                    self._connection.execute(text("SELECT pg_advisory_unlock_all()"))
                except SQLAlchemyError:
                    pass  # the session is gone already, and its locks with it
            self._held.clear()
            self._drop_connection()
