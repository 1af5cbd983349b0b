"""The store's studies: published and parked studies, fingerprints, checkpoints, Patient links, Endpoints."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from datetime import UTC

from sqlalchemy import delete, func, or_, select, update

from bridge.state.base import StoreBase, utcnow
from bridge.state.models import Checkpoint, ParkedStudy, PatientCheck, PublishedEndpoint, PublishedStudy
from bridge.state.records import KnownStudy, Published


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


class StudyStore(StoreBase):
    """What the store remembers of each study and of each source's Endpoint."""

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
