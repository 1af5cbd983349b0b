"""The store's runs: one record per sync run, with its counts and exact QIDO queries."""

from __future__ import annotations

import os
import socket
from collections.abc import Sequence
from datetime import datetime

from sqlalchemy import func, select

from bridge.errors import StoreError
from bridge.state.base import StoreBase, utcnow
from bridge.state.models import ParkedStudy, PublishedStudy, Run
from bridge.state.records import RunCounts

# Names this process in the runs it records (the pod name on Kubernetes).
WORKER_ID = f"{socket.gethostname()}:{os.getpid()}"[:128]


class RunStore(StoreBase):
    """Run records, and the summaries (sources, counts) the CLI and the API show."""

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

    def last_successful_run(self, source: str, kinds: Sequence[str] | None = None) -> Run | None:
        """The latest run of ``source`` that finished, every study published or parked.

        With ``kinds``, the latest of those kinds (the polls, for the poll's lag).
        """
        query = (
            select(Run)
            .where(Run.source == source, Run.status.in_(("ok", "parked")), Run.finished_at.is_not(None))
            .order_by(Run.finished_at.desc())
            .limit(1)
        )
        if kinds is not None:
            query = query.where(Run.kind.in_(list(kinds)))
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
