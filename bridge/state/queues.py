"""The store's queues: pushes an archive asked for, and AuditEvents waiting for the FHIR server."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime

from sqlalchemy import delete, func, select
from sqlalchemy.exc import IntegrityError

from bridge.errors import StoreError
from bridge.state.base import StoreBase
from bridge.state.models import AuditBacklog, Push


class PushQueue(StoreBase):
    """Studies an archive asked to be synced, kept until they are (bridge/sync/pushes.py)."""

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
        return self.pushes([study_uid]).get(study_uid)

    def pushes(self, study_uids: Sequence[str]) -> dict[str, tuple[float, float, int]]:
        """:meth:`push` for many studies in one read; the studies done already are left out."""
        if not study_uids:
            return {}
        with self._session() as session:
            rows = session.execute(
                select(Push.study_uid, Push.received_at, Push.requested_at, Push.attempts).where(
                    Push.study_uid.in_(list(study_uids))
                )
            ).all()
            return {str(r[0]): (float(r[1]), float(r[2]), int(r[3])) for r in rows}

    def finish_push(self, study_uid: str, requested_at: float) -> bool:
        """Forget a synced push, unless it was pushed again after ``requested_at`` (its sync began).

        Returns whether it was forgotten; one pushed again stays, to be synced once more.
        """
        return study_uid in self.finish_pushes([(study_uid, requested_at)])

    def finish_pushes(self, synced: Sequence[tuple[str, float]]) -> set[str]:
        """:meth:`finish_push` for many (study UID, requested at) in one transaction; the forgotten."""
        forgotten: set[str] = set()
        if not synced:
            return forgotten
        with self._session() as session:
            for study_uid, requested_at in synced:
                result = session.execute(
                    delete(Push).where(Push.study_uid == study_uid, Push.requested_at <= requested_at)
                )
                if int(getattr(result, "rowcount", 0) or 0):
                    forgotten.add(study_uid)
                    continue
                row = session.get(Push, study_uid)
                if row is not None:
                    # Pushed again while syncing: what was pushed later is measured from then.
                    row.received_at, row.attempts, row.last_error = row.requested_at, 0, None
        return forgotten

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


class AuditQueue(StoreBase):
    """AuditEvents recorded by the API, kept until the FHIR server has them."""

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
