"""SQLAlchemy state store (SQLite by default, PostgreSQL for several replicas)."""

from __future__ import annotations

import logging
import os
import socket
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import Engine, create_engine, delete, event, func, insert, or_, select, update
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
    PatientCheck,
    PublishedEndpoint,
    PublishedStudy,
    Push,
    Run,
)
from bridge.state.records import KnownStudy, Published, RunCounts

logger = logging.getLogger(__name__)


def utcnow() -> datetime:
    """Now, in UTC."""
    return datetime.now(UTC)


def safe_url(url: str) -> str:
    """The store's URL as it may be shown: the password hidden."""
    try:
        return make_url(url).render_as_string(hide_password=True)
    except Exception:  # noqa: BLE001 - checked at start-up; never let a message fail
        return "BRIDGE_STATE_URL"


def _open_problem(url: str, exc: SQLAlchemyError) -> str:
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


def _sqlite_pragmas(dbapi_connection: Any, _record: Any) -> None:
    cursor = dbapi_connection.cursor()
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute("PRAGMA synchronous=NORMAL")
    cursor.execute("PRAGMA busy_timeout=10000")
    cursor.close()


# Names this process in the runs it records (the pod name on Kubernetes).
WORKER_ID = f"{socket.gethostname()}:{os.getpid()}"[:128]


def _known(row: PublishedStudy) -> KnownStudy:
    if row.gone or row.withdrawn:
        # No fingerprint matches: a study that returns to the archive is republished, and a
        # withdrawn one is examined again every run until its archive rows agree once more.
        return KnownStudy(
            row.study_uid, "", "", row.fhir_id, row.fhir_version, row.patient_identity, row.withdrawn
        )
    return KnownStudy(
        row.study_uid,
        row.qido_fingerprint,
        row.resource_fingerprint,
        row.fhir_id,
        row.fhir_version,
        row.patient_identity,
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
            raise StoreError(_open_problem(url, exc)) from exc

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
                f"the state store at {safe_url(self.url)} opens but takes no write ({type(exc).__name__}); "
                "check the file's or the database user's permissions, or set BRIDGE_STATE_URL"
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
                row.withdrawn = None  # published as it now is: clinicians may see it again
                if study.patient_identity is not None:
                    row.patient_identity = study.patient_identity
                row.patient_id = study.patient_id
            session.execute(
                delete(ParkedStudy).where(ParkedStudy.source == source, ParkedStudy.study_uid.in_(uids))
            )

    def withdraw(self, source: str, study_uid: str, *, reason: str, fhir_version: str | None) -> None:
        """Remember that a published study is withdrawn (its ImagingStudy has the withdrawal extension)."""
        with self._session() as session:
            row = session.get(PublishedStudy, (source, study_uid))
            if row is None:
                return
            row.withdrawn = reason
            row.fhir_version = fhir_version
            row.last_synced_at = utcnow()

    def withdrawn(self, source: str | None = None) -> list[tuple[str, str, str]]:
        """Withdrawn studies: (source, Study Instance UID, reason)."""
        with self._session() as session:
            query = select(PublishedStudy).where(PublishedStudy.withdrawn.is_not(None))
            if source is not None:
                query = query.where(PublishedStudy.source == source)
            rows = session.scalars(query.order_by(PublishedStudy.study_uid)).all()
            return [(r.source, r.study_uid, str(r.withdrawn)) for r in rows]

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

    # Patient links
    def demographics_check(self, source: str, study_uid: str) -> tuple[str, bool] | None:
        """The Patient id the demographics check last compared the study with, and whether it is accepted."""
        with self._session() as session:
            row = session.get(PatientCheck, (source, study_uid))
            return (row.patient_id, row.accepted) if row else None

    def record_demographics_check(
        self, source: str, study_uid: str, *, patient_id: str, attributes: str
    ) -> None:
        """Remember that the check parked the study for this Patient (attribute names only).

        An acceptance given for the same Patient stays; one given for another Patient is dropped,
        since the integrator accepted a link to that Patient, not to this one.
        """
        with self._session() as session:
            row = session.get(PatientCheck, (source, study_uid))
            if row is None:
                row = PatientCheck(source=source, study_uid=study_uid, accepted=False)
                session.add(row)
            elif row.patient_id != patient_id:
                row.accepted = False
            row.patient_id, row.attributes, row.updated_at = patient_id, attributes, utcnow()

    def accept_demographics(self, source: str, study_uid: str) -> bool:
        """Accept the link the demographics check parked (bridge retry --accept-demographics).

        False when the check never parked this study: there is nothing to accept.
        """
        with self._session() as session:
            row = session.get(PatientCheck, (source, study_uid))
            if row is None:
                return False
            row.accepted, row.updated_at = True, utcnow()
            return True

    def studies_linked_to(self, source: str, patient_ids: Iterable[str]) -> dict[str, str]:
        """Published studies still in the archive (UID -> Patient id) linked to any of these Patients."""
        wanted = list(patient_ids)
        if not wanted:
            return {}
        with self._session() as session:
            rows = session.execute(
                select(PublishedStudy.study_uid, PublishedStudy.patient_id).where(
                    PublishedStudy.source == source,
                    PublishedStudy.patient_id.in_(wanted),
                    PublishedStudy.gone.is_(False),
                )
            ).all()
            return {uid: str(pid) for uid, pid in rows}

    def linked_patients(self, source: str) -> list[str]:
        """The distinct Patient ids the source's published studies (still in the archive) link to."""
        with self._session() as session:
            rows = session.scalars(
                select(PublishedStudy.patient_id)
                .where(
                    PublishedStudy.source == source,
                    PublishedStudy.patient_id.is_not(None),
                    PublishedStudy.gone.is_(False),
                )
                .distinct()
                .order_by(PublishedStudy.patient_id)
            ).all()
            return [str(p) for p in rows]

    def forget_fingerprints(self, source: str, uids: Iterable[str]) -> None:
        """Make these published studies count as changed: the next run that sees them maps them again."""
        wanted = list(uids)
        if not wanted:
            return
        with self._session() as session:
            session.execute(
                update(PublishedStudy)
                .where(PublishedStudy.source == source, PublishedStudy.study_uid.in_(wanted))
                .values(qido_fingerprint="")
            )

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
        relinked: list[dict[str, str]] | None = None,
        patient_events: list[dict[str, str]] | None = None,
    ) -> None:
        """Close a run record with its outcome (``series_query``: how series were asked for, if at all).

        ``patient_events``: what the run did to Patient links (demographics warnings, accepted
        overrides, re-links after a merge), FHIR ids and attribute names only.
        """
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
            run.relinked = list(relinked or [])
            run.patient_events = list(patient_events) if patient_events else None
            run.error = error

    def note_run(self, run_id: int, note: str) -> None:
        """Say why a run was made (a gap in the change feed, say)."""
        with self._session() as session:
            run = session.get(Run, run_id)
            if run is not None:
                run.note = note[:512]

    def last_run(
        self, source: str, kind: str | None, statuses: Sequence[str] = ("ok", "parked")
    ) -> datetime | None:
        """When the last run of ``kind`` (None: of any kind) that ended in one of ``statuses`` finished."""
        with self._session() as session:
            query = select(func.max(Run.finished_at)).where(
                Run.source == source, Run.status.in_(list(statuses))
            )
            if kind is not None:
                query = query.where(Run.kind == kind)
            return session.scalar(query)

    def runs(self, limit: int = 10, source: str | None = None) -> list[Run]:
        """The most recent runs (of one source, or of all), newest first."""
        query = select(Run).order_by(Run.id.desc()).limit(limit)
        if source is not None:
            query = query.where(Run.source == source)
        with self._session() as session:
            return list(session.scalars(query).all())

    def last_successful_run(self, source: str) -> Run | None:
        """The latest run of ``source`` that finished, every study published or parked."""
        query = (
            select(Run)
            .where(Run.source == source, Run.status.in_(("ok", "parked")), Run.finished_at.is_not(None))
            .order_by(Run.finished_at.desc())
            .limit(1)
        )
        with self._session() as session:
            return session.scalars(query).first()

    def sources(self) -> list[str]:
        """Every source the store knows of: those with runs, published or parked studies."""
        with self._session() as session:
            names: set[str] = set()
            for column in (Run.source, PublishedStudy.source, ParkedStudy.source):
                names.update(session.scalars(select(column).distinct()).all())
            return sorted(names)

    def counts(self, source: str | None = None) -> dict[str, int]:
        """How many studies are published, gone from the archive (retired), and parked."""
        with self._session() as session:
            published = select(func.count()).select_from(PublishedStudy)
            parked = select(func.count()).select_from(ParkedStudy)
            if source is not None:
                published = published.where(PublishedStudy.source == source)
                parked = parked.where(ParkedStudy.source == source)
            gone = published.where(PublishedStudy.gone.is_(True))
            withdrawn = published.where(PublishedStudy.withdrawn.is_not(None))
            published = published.where(PublishedStudy.gone.is_(False))
            return {
                "published": int(session.scalar(published) or 0),
                "gone": int(session.scalar(gone) or 0),
                "parked": int(session.scalar(parked) or 0),
                "withdrawn": int(session.scalar(withdrawn) or 0),
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

    # Browser sessions and logins under way (bridge/api/auth/session.py), keyed by a hash, never a token
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
