"""SQLAlchemy state store (SQLite by default, PostgreSQL for several replicas)."""

from __future__ import annotations

import logging
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import Engine, create_engine, delete, event, func, select
from sqlalchemy.engine import make_url
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.orm import Session, sessionmaker

from bridge.errors import StoreError
from bridge.state.models import (
    SCHEMA_VERSION,
    Base,
    ParkedStudy,
    PublishedEndpoint,
    PublishedStudy,
    Run,
    SchemaInfo,
)

logger = logging.getLogger(__name__)


def utcnow() -> datetime:
    """Now, in UTC."""
    return datetime.now(UTC)


@dataclass(frozen=True, slots=True)
class KnownStudy:
    """What the store remembers of a published study."""

    study_uid: str
    qido_fingerprint: str
    resource_fingerprint: str
    fhir_id: str
    fhir_version: str | None


@dataclass(frozen=True, slots=True)
class RunCounts:
    """The outcome counts of a run."""

    seen: int = 0
    created: int = 0
    updated: int = 0
    unchanged: int = 0
    parked: int = 0
    fhir_writes: int = 0


def _sqlite_pragmas(dbapi_connection: Any, _record: Any) -> None:
    cursor = dbapi_connection.cursor()
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute("PRAGMA synchronous=NORMAL")
    cursor.execute("PRAGMA busy_timeout=10000")
    cursor.close()


class SqlStore:
    """The state store. Its methods are blocking; async callers run them in a thread."""

    def __init__(self, url: str) -> None:
        self.url = url
        try:
            self._engine: Engine = create_engine(url, pool_pre_ping=True)
            if make_url(url).get_backend_name() == "sqlite":
                event.listen(self._engine, "connect", _sqlite_pragmas)
            self._sessions = sessionmaker(self._engine, expire_on_commit=False)
            self._migrate()
        except SQLAlchemyError as exc:
            raise StoreError(f"cannot open the state store ({type(exc).__name__}): {exc}") from exc

    def close(self) -> None:
        """Release the engine's connections."""
        self._engine.dispose()

    @contextmanager
    def _session(self) -> Iterator[Session]:
        try:
            with self._sessions.begin() as session:
                yield session
        except SQLAlchemyError as exc:
            raise StoreError(f"state store failed ({type(exc).__name__})") from exc

    def _migrate(self) -> None:
        """Create the schema, or check that an existing one is one this version can use."""
        Base.metadata.create_all(self._engine)
        with self._sessions.begin() as session:
            info = session.get(SchemaInfo, 1)
            if info is None:
                session.add(SchemaInfo(id=1, version=SCHEMA_VERSION))
            elif info.version > SCHEMA_VERSION:
                raise StoreError(
                    f"the state store is at schema {info.version}, newer than this bridge "
                    f"({SCHEMA_VERSION}); upgrade the bridge"
                )

    def ping(self) -> None:
        """Raise StoreError unless the store answers."""
        with self._session() as session:
            session.execute(select(1))

    # Studies
    def known_studies(self, source: str, uids: Iterable[str]) -> dict[str, KnownStudy]:
        """The remembered state of those of ``uids`` that were published."""
        wanted = list(uids)
        if not wanted:
            return {}
        with self._session() as session:
            rows = session.scalars(
                select(PublishedStudy).where(
                    PublishedStudy.source == source, PublishedStudy.study_uid.in_(wanted)
                )
            ).all()
            return {
                r.study_uid: KnownStudy(
                    r.study_uid,
                    r.qido_fingerprint,
                    r.resource_fingerprint,
                    r.fhir_id,
                    r.fhir_version,
                )
                for r in rows
            }

    def record_published(
        self,
        source: str,
        study_uid: str,
        *,
        qido_fingerprint: str,
        resource_fingerprint: str,
        fhir_id: str,
        fhir_version: str | None,
    ) -> None:
        """Remember a published study and clear any parked failure of it."""
        now = utcnow()
        with self._session() as session:
            row = session.get(PublishedStudy, (source, study_uid))
            if row is None:
                row = PublishedStudy(source=source, study_uid=study_uid, first_synced_at=now)
                session.add(row)
            row.qido_fingerprint = qido_fingerprint
            row.resource_fingerprint = resource_fingerprint
            row.fhir_id = fhir_id
            row.fhir_version = fhir_version
            row.last_synced_at = now
            session.execute(
                delete(ParkedStudy).where(ParkedStudy.source == source, ParkedStudy.study_uid == study_uid)
            )

    def park(self, source: str, study_uid: str, *, kind: str, reason: str, attribute: str | None) -> None:
        """Park a study with the reason it failed (and the DICOM attribute at fault, if any)."""
        now = utcnow()
        with self._session() as session:
            row = session.get(ParkedStudy, (source, study_uid))
            if row is None:
                session.add(
                    ParkedStudy(
                        source=source,
                        study_uid=study_uid,
                        kind=kind,
                        attribute=attribute,
                        reason=reason,
                        first_failed_at=now,
                        last_failed_at=now,
                        attempts=1,
                    )
                )
            else:
                row.kind, row.attribute, row.reason = kind, attribute, reason
                row.last_failed_at = now
                row.attempts += 1

    def parked(self, source: str | None = None) -> list[ParkedStudy]:
        """Parked studies, oldest first."""
        with self._session() as session:
            query = select(ParkedStudy).order_by(ParkedStudy.first_failed_at)
            if source is not None:
                query = query.where(ParkedStudy.source == source)
            return list(session.scalars(query).all())

    # Endpoints
    def endpoint_fingerprint(self, source: str) -> str | None:
        """Fingerprint of the source's Endpoint as last published."""
        with self._session() as session:
            row = session.get(PublishedEndpoint, source)
            return row.fingerprint if row else None

    def record_endpoint(
        self, source: str, *, fingerprint: str, fhir_id: str, fhir_version: str | None
    ) -> None:
        """Remember the source's published Endpoint."""
        with self._session() as session:
            row = session.get(PublishedEndpoint, source) or PublishedEndpoint(source=source)
            row.fingerprint, row.fhir_id, row.fhir_version = fingerprint, fhir_id, fhir_version
            row.updated_at = utcnow()
            session.merge(row)

    # Runs
    def start_run(self, source: str, kind: str = "full") -> int:
        """Open a run record; returns its id."""
        with self._session() as session:
            run = Run(source=source, kind=kind, started_at=utcnow(), status="running")
            session.add(run)
            session.flush()
            return run.id

    def finish_run(
        self,
        run_id: int,
        *,
        status: str,
        counts: RunCounts,
        qido_queries: list[str],
        error: str | None = None,
    ) -> None:
        """Close a run record with its outcome."""
        with self._session() as session:
            run = session.get(Run, run_id)
            if run is None:
                raise StoreError(f"run {run_id} is not in the store")
            run.finished_at = utcnow()
            run.status = status
            run.seen, run.created, run.updated = counts.seen, counts.created, counts.updated
            run.unchanged, run.parked = counts.unchanged, counts.parked
            run.fhir_writes = counts.fhir_writes
            run.qido_queries = list(qido_queries)
            run.error = error

    def runs(self, limit: int = 10) -> list[Run]:
        """The most recent runs, newest first."""
        with self._session() as session:
            return list(session.scalars(select(Run).order_by(Run.id.desc()).limit(limit)).all())

    def counts(self, source: str | None = None) -> dict[str, int]:
        """How many studies are published and parked."""
        with self._session() as session:
            published = select(func.count()).select_from(PublishedStudy)
            parked = select(func.count()).select_from(ParkedStudy)
            if source is not None:
                published = published.where(PublishedStudy.source == source)
                parked = parked.where(ParkedStudy.source == source)
            return {
                "published": int(session.scalar(published) or 0),
                "parked": int(session.scalar(parked) or 0),
            }
