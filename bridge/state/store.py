"""SQLAlchemy state store (SQLite by default, PostgreSQL for several replicas)."""

from __future__ import annotations

import logging
import os
import socket
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import Engine, create_engine, delete, event, func, or_, select, update
from sqlalchemy.engine import make_url
from sqlalchemy.exc import IntegrityError, SQLAlchemyError
from sqlalchemy.orm import Session, sessionmaker

from bridge.errors import StoreError
from bridge.state.claims import StudyClaims
from bridge.state.migrate import upgrade_engine
from bridge.state.models import (
    AuditBacklog,
    BrowserSession,
    Checkpoint,
    ParkedStudy,
    PublishedEndpoint,
    PublishedStudy,
    Push,
    Run,
)
from bridge.sync.protocols import KnownStudy, Published, RunCounts

logger = logging.getLogger(__name__)


def utcnow() -> datetime:
    """Now, in UTC."""
    return datetime.now(UTC)


def _sqlite_pragmas(dbapi_connection: Any, _record: Any) -> None:
    cursor = dbapi_connection.cursor()
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute("PRAGMA synchronous=NORMAL")
    cursor.execute("PRAGMA busy_timeout=10000")
    cursor.close()


# Names this process in the runs it records (the pod name on Kubernetes).
WORKER_ID = f"{socket.gethostname()}:{os.getpid()}"[:128]


def _known(row: PublishedStudy) -> KnownStudy:
    if row.gone:  # no fingerprint matches: a study that returns to the archive is republished
        return KnownStudy(row.study_uid, "", "", row.fhir_id, row.fhir_version)
    return KnownStudy(
        row.study_uid, row.qido_fingerprint, row.resource_fingerprint, row.fhir_id, row.fhir_version
    )


class SqlStore:
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
            raise StoreError(f"cannot open the state store ({type(exc).__name__}): {exc}") from exc

    def close(self) -> None:
        """Release the study claims and the engine's connections."""
        self._claims.close()
        self._engine.dispose()

    @contextmanager
    def _session(self) -> Iterator[Session]:
        try:
            with self._sessions.begin() as session:
                yield session
        except SQLAlchemyError as exc:
            raise StoreError(f"state store failed ({type(exc).__name__})") from exc

    def _migrate(self) -> None:
        """Bring the schema to this version with the Alembic migrations (adopting a pre-Alembic store)."""
        before, after = upgrade_engine(self._engine)
        if before != after:
            logger.info("state store migrated from %s to %s", before or "empty", after)

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
            return {r.study_uid: _known(r) for r in rows}

    def record_published_many(self, source: str, studies: Sequence[Published]) -> None:
        """Remember several published studies in one transaction, clearing their parked failures."""
        if not studies:
            return
        now = utcnow()
        uids = [s.study_uid for s in studies]
        with self._session() as session:
            rows = {
                r.study_uid: r
                for r in session.scalars(
                    select(PublishedStudy).where(
                        PublishedStudy.source == source, PublishedStudy.study_uid.in_(uids)
                    )
                )
            }
            for study in studies:
                row = rows.get(study.study_uid)
                if row is None:
                    row = PublishedStudy(source=source, study_uid=study.study_uid, first_synced_at=now)
                    session.add(row)
                    rows[study.study_uid] = row
                row.qido_fingerprint = study.qido_fingerprint
                row.resource_fingerprint = study.resource_fingerprint
                row.fhir_id = study.fhir_id
                row.fhir_version = study.fhir_version
                row.last_synced_at = now
                row.started = study.started
                row.gone = False
            session.execute(
                delete(ParkedStudy).where(ParkedStudy.source == source, ParkedStudy.study_uid.in_(uids))
            )

    def sync_marks(self, source: str, uids: Sequence[str]) -> dict[str, tuple[str | None, float]]:
        """Published studies' FHIR version and when they were last recorded (epoch s), by UID."""
        with self._session() as session:
            rows = session.execute(
                select(
                    PublishedStudy.study_uid, PublishedStudy.fhir_version, PublishedStudy.last_synced_at
                ).where(PublishedStudy.source == source, PublishedStudy.study_uid.in_(list(uids)))
            ).all()
        marks = {}
        for uid, version, at in rows:
            at = at if at.tzinfo else at.replace(tzinfo=UTC)  # SQLite gives back naive UTC
            marks[str(uid)] = (version, at.timestamp())
        return marks

    @property
    def claims_enabled(self) -> bool:
        """Whether claims coordinate several replicas (PostgreSQL); on SQLite every claim succeeds."""
        return self._claims.enabled

    def mark_seen(self, source: str, uids: Iterable[str], run_id: int) -> None:
        """Note that a reconciliation run saw these studies in the archive."""
        wanted = list(uids)
        if not wanted:
            return
        with self._session() as session:
            session.execute(
                update(PublishedStudy)
                .where(PublishedStudy.source == source, PublishedStudy.study_uid.in_(wanted))
                .values(last_seen_run=run_id)
            )

    def unseen_studies(self, source: str, run_id: int) -> list[KnownStudy]:
        """Published studies that reconciliation run ``run_id`` did not see (gone from the archive)."""
        with self._session() as session:
            rows = session.scalars(
                select(PublishedStudy).where(
                    PublishedStudy.source == source,
                    PublishedStudy.gone.is_(False),
                    or_(PublishedStudy.last_seen_run.is_(None), PublishedStudy.last_seen_run != run_id),
                )
            ).all()
            return [_known(r) for r in rows]

    def record_gone(self, source: str, study_uid: str, *, fhir_version: str | None, removed: bool) -> None:
        """Remember that a study left the archive.

        Forget it if its resource was deleted; else mark it, so it is republished if it returns.
        """
        with self._session() as session:
            row = session.get(PublishedStudy, (source, study_uid))
            if row is None:
                return
            if removed:
                session.delete(row)
            else:
                row.gone = True
                row.fhir_version = fhir_version
                row.last_synced_at = utcnow()

    def published_count(self, source: str) -> int:
        """How many of the source's studies are published and still in the archive."""
        with self._session() as session:
            query = select(func.count()).select_from(PublishedStudy)
            query = query.where(PublishedStudy.source == source, PublishedStudy.gone.is_(False))
            return int(session.scalar(query) or 0)

    def newest_published(self, source: str) -> str | None:
        """The latest ``started`` among published studies (FHIR dateTime), for the lag metric."""
        with self._session() as session:
            value = session.scalar(
                select(func.max(PublishedStudy.started)).where(PublishedStudy.source == source)
            )
            return str(value) if value is not None else None

    # Checkpoints
    def checkpoint(self, source: str, name: str) -> str | None:
        """A change source's saved position."""
        with self._session() as session:
            row = session.get(Checkpoint, (source, name))
            return row.value if row else None

    def save_checkpoint(self, source: str, name: str, value: str) -> None:
        """Save a change source's position (only after what comes before it is published)."""

        def write() -> None:
            with self._session() as session:
                row = session.get(Checkpoint, (source, name))
                if row is None:
                    session.add(Checkpoint(source=source, name=name, value=value, updated_at=utcnow()))
                else:
                    row.value, row.updated_at = value, utcnow()

        self._upsert(write)

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
    def published_endpoint(self, source: str) -> tuple[str, str] | None:
        """Fingerprint and FHIR id of the source's Endpoint as last published."""
        with self._session() as session:
            row = session.get(PublishedEndpoint, source)
            return (row.fingerprint, row.fhir_id) if row else None

    def record_endpoint(
        self, source: str, *, fingerprint: str, fhir_id: str, fhir_version: str | None
    ) -> None:
        """Remember the source's published Endpoint."""

        def write() -> None:
            with self._session() as session:
                row = session.get(PublishedEndpoint, source) or PublishedEndpoint(source=source)
                row.fingerprint, row.fhir_id, row.fhir_version = fingerprint, fhir_id, fhir_version
                row.updated_at = utcnow()
                session.merge(row)

        self._upsert(write)

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

    # Runs
    def start_run(self, source: str, kind: str = "full") -> int:
        """Open a run record; returns its id."""
        with self._session() as session:
            run = Run(source=source, kind=kind, started_at=utcnow(), status="running", worker=WORKER_ID)
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
        deletions: list[dict[str, str]] | None = None,
        series_query: str | None = None,
    ) -> None:
        """Close a run record with its outcome (``series_query``: how series were asked for, if at all)."""
        with self._session() as session:
            run = session.get(Run, run_id)
            if run is None:
                raise StoreError(f"run {run_id} is not in the store")
            run.finished_at = utcnow()
            run.status = status
            run.seen, run.created, run.updated = counts.seen, counts.created, counts.updated
            run.unchanged, run.parked = counts.unchanged, counts.parked
            run.fhir_writes = counts.fhir_writes
            run.deleted = counts.deleted
            run.claimed = counts.claimed
            run.deletions = list(deletions or [])
            run.qido_queries = list(qido_queries)
            run.series_query = series_query
            run.error = error

    def note_run(self, run_id: int, note: str) -> None:
        """Say why a run was made (a gap in the change feed, say)."""
        with self._session() as session:
            run = session.get(Run, run_id)
            if run is not None:
                run.note = note[:512]

    def last_run(self, source: str, kind: str, statuses: Sequence[str] = ("ok", "parked")) -> datetime | None:
        """When the last run of ``kind`` that ended in one of ``statuses`` finished."""
        with self._session() as session:
            return session.scalar(
                select(func.max(Run.finished_at)).where(
                    Run.source == source, Run.kind == kind, Run.status.in_(list(statuses))
                )
            )

    def runs(self, limit: int = 10) -> list[Run]:
        """The most recent runs, newest first."""
        with self._session() as session:
            return list(session.scalars(select(Run).order_by(Run.id.desc()).limit(limit)).all())

    def counts(self, source: str | None = None) -> dict[str, int]:
        """How many studies are published, gone from the archive (retired), and parked."""
        with self._session() as session:
            published = select(func.count()).select_from(PublishedStudy)
            parked = select(func.count()).select_from(ParkedStudy)
            if source is not None:
                published = published.where(PublishedStudy.source == source)
                parked = parked.where(ParkedStudy.source == source)
            gone = published.where(PublishedStudy.gone.is_(True))
            published = published.where(PublishedStudy.gone.is_(False))
            return {
                "published": int(session.scalar(published) or 0),
                "gone": int(session.scalar(gone) or 0),
                "parked": int(session.scalar(parked) or 0),
            }

    # Pushes: studies an archive asked to be synced, kept until they are (bridge/sync/pushes.py)
    def queue_push(self, study_uid: str, now: float, max_queued: int) -> str | None:
        """Record a push before it is answered; None when ``max_queued`` studies wait already.

        ``"queued"``: a new row; ``"coalesced"``: the study was waiting already, one sync does for both.
        """
        try:
            with self._session() as session:
                row = session.get(Push, study_uid)
                if row is not None:
                    row.requested_at = max(row.requested_at, now)
                    return "coalesced"
                waiting = int(session.scalar(select(func.count()).select_from(Push)) or 0)
                if waiting >= max_queued:
                    return None
                session.add(
                    Push(study_uid=study_uid, received_at=now, requested_at=now, not_before=now, attempts=0)
                )
                return "queued"
        except StoreError as exc:
            if isinstance(exc.__cause__, IntegrityError):
                return "coalesced"  # another replica recorded the same study at the same moment
            raise

    def due_pushes(self, now: float, limit: int) -> list[tuple[str, float, float]]:
        """Waiting pushes that may be tried now, oldest first: (study UID, received, requested)."""
        with self._session() as session:
            rows = session.execute(
                select(Push.study_uid, Push.received_at, Push.requested_at)
                .where(Push.not_before <= now)
                .order_by(Push.received_at)
                .limit(limit)
            ).all()
            return [(str(r[0]), float(r[1]), float(r[2])) for r in rows]

    def push(self, study_uid: str) -> tuple[float, float, int] | None:
        """A waiting push's received and requested times and failed tries, or None once it is done."""
        with self._session() as session:
            row = session.get(Push, study_uid)
            return (row.received_at, row.requested_at, row.attempts) if row is not None else None

    def finish_push(self, study_uid: str, requested_at: float) -> bool:
        """Forget a synced push, unless it was pushed again after ``requested_at`` (its sync began).

        Returns whether it was forgotten; one pushed again stays, to be synced once more.
        """
        with self._session() as session:
            result = session.execute(
                delete(Push).where(Push.study_uid == study_uid, Push.requested_at <= requested_at)
            )
            if int(getattr(result, "rowcount", 0) or 0):
                return True
            row = session.get(Push, study_uid)
            if row is not None:
                # Pushed again while syncing: what was pushed later is measured from then.
                row.received_at, row.attempts, row.last_error = row.requested_at, 0, None
            return False

    def defer_push(self, study_uid: str, not_before: float, error: str) -> int:
        """A push whose sync failed waits until ``not_before``; returns how many tries have failed."""
        with self._session() as session:
            row = session.get(Push, study_uid)
            if row is None:
                return 0
            row.attempts += 1
            row.not_before = not_before
            row.last_error = error[:512]
            return row.attempts

    def push_queue(self) -> tuple[int, float | None]:
        """How many pushes wait, and when the oldest of them arrived (None when none wait)."""
        with self._session() as session:
            count, oldest = session.execute(select(func.count(), func.min(Push.received_at))).one()
            return int(count or 0), (float(oldest) if oldest is not None else None)

    # Audit backlog: AuditEvents recorded by the API, kept until the FHIR server has them
    def queue_audit(self, events: Sequence[tuple[str, str, datetime]]) -> None:
        """Keep AuditEvents (id, R4 JSON, when recorded) until they are written."""
        if not events:
            return
        with self._session() as session:
            known = set(
                session.scalars(
                    select(AuditBacklog.event_id).where(AuditBacklog.event_id.in_([e[0] for e in events]))
                )
            )
            session.add_all(
                AuditBacklog(event_id=eid, body=body, recorded_at=at, attempts=0)
                for eid, body, at in events
                if eid not in known
            )

    def pending_audit(self, limit: int) -> list[tuple[int, str]]:
        """The oldest AuditEvents not yet written: (row id, R4 JSON)."""
        with self._session() as session:
            rows = session.execute(
                select(AuditBacklog.id, AuditBacklog.body).order_by(AuditBacklog.id).limit(limit)
            ).all()
            return [(int(r[0]), str(r[1])) for r in rows]

    def written_audit(self, ids: Sequence[int]) -> None:
        """Forget AuditEvents the FHIR server now holds."""
        if ids:
            with self._session() as session:
                session.execute(delete(AuditBacklog).where(AuditBacklog.id.in_(list(ids))))

    def audit_backlog(self) -> int:
        """How many AuditEvents wait to be written."""
        with self._session() as session:
            return int(session.scalar(select(func.count()).select_from(AuditBacklog)) or 0)

    # Browser sessions and logins under way (bridge/api/session.py), keyed by a hash, never a token
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
