"""One sync pass: discover studies, skip the unchanged, map and publish the rest, record it all.

The worker drives the pipeline (bridge/sync/pipeline.py) for each kind of run: a full or windowed
pass, named studies (on demand, pushes), and the dry run, which takes the same steps with a write
step that writes nothing. Each run's state is made for that run (bridge/sync/run.py).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from datetime import UTC, datetime, timedelta

from bridge.errors import BridgeError
from bridge.mapping.context import MappingContext
from bridge.mapping.records import DicomJson
from bridge.state.records import RunCounts
from bridge.sync import metrics
from bridge.sync.assemble import StudyAssembler
from bridge.sync.link import Linker, RunLinker
from bridge.sync.pipeline import Parts, Pipeline
from bridge.sync.policy import DeletePolicy
from bridge.sync.preview import DryRun, Preview
from bridge.sync.protocols import StateStore, StudySource
from bridge.sync.publisher import Publisher
from bridge.sync.report import SHOWN_AS_PROGRESS, RunReport
from bridge.sync.retire import Retirer
from bridge.sync.run import RunState
from bridge.sync.write import Publish

logger = logging.getLogger(__name__)


# The checkpoint of the last merge check, and how far before it the next one looks (the FHIR
# server's clock may be behind the bridge's).
MERGE_CHECK = "merge-check"
MERGE_CHECK_MARGIN = timedelta(minutes=10)
_RELINK_PAGE = 50  # studies a page when re-linking merged Patients' studies by UID


class SyncWorker:
    """Runs sync passes over one source into one FHIR server."""

    def __init__(
        self,
        source: StudySource,
        linker: Linker,
        publisher: Publisher,
        store: StateStore,
        ctx: MappingContext,
        *,
        concurrency: int = 4,
        delete_policy: DeletePolicy = DeletePolicy.MARK,
        delete_max_fraction: float = 0.2,
        read_instance_header: bool = False,
        merge_check_interval: float = 0.0,
    ) -> None:
        self._source = source
        self._linker = linker
        self._publisher = publisher
        self._store = store
        self._ctx = ctx
        self._concurrency = concurrency
        self._stop_requested = False
        self._merge_check_interval = merge_check_interval
        assembler = StudyAssembler(source, ctx, read_instance_header=read_instance_header)
        self._parts = Parts(source, assembler, publisher, store, ctx, ctx.fingerprint())
        retirer = Retirer(publisher, store, ctx, policy=delete_policy, max_fraction=delete_max_fraction)
        self._publish = Publish(publisher, store, ctx, retirer)
        # Told each run's counts as they change (``bridge sync``'s progress display).
        self.on_progress: Callable[[RunCounts], None] | None = None

    def request_stop(self) -> None:
        """Finish the studies in flight, start no new one, and end the run as ``stopped``."""
        self._stop_requested = True

    @property
    def stopping(self) -> bool:
        """Whether a stop was requested."""
        return self._stop_requested

    async def run(
        self, filters: Mapping[str, str] | None = None, kind: str = "full", *, reconcile: bool = False
    ) -> RunReport:
        """One pass over the studies matching ``filters`` (all of them by default).

        With ``reconcile`` the pass must cover the whole archive: published studies it did not
        see are gone from the archive, and the delete policy is applied to them.
        """
        return await self._run(
            kind, self._source.iter_studies(filters), reconcile=reconcile, sweep=_sweep(filters)
        )

    async def run_studies(
        self, study_uids: Sequence[str], kind: str = "on-demand", *, per_page: int = 1
    ) -> RunReport:
        """Sync the named studies now; a named study the archive no longer has is retired.

        ``per_page`` named studies share a page (one series query, one FHIR batch): a drained
        burst of pushes then costs what a full sync of it costs, not a page per study.
        """
        missing: list[str] = []
        return await self._run(kind, self._named(study_uids, missing, per_page), missing=missing)

    async def follow_merges(self) -> RunReport | None:
        """Re-link the studies of Patients merged on the FHIR server since the last check, if one is due.

        Every ``merge_check_interval`` seconds (0: never; the reconciliation sweep still asks about
        every linked Patient) a cycle asks the FHIR server once for the Patients made inactive
        since the last check, less a margin for the server's clock; the studies linked to those
        with a ``replaced-by`` link are synced by name in a run of kind ``relink`` (exact identity
        and demographics checked anew; the run records each re-link). So an EHR's merge is
        followed within a cycle or two, and a no-change cycle between checks asks the FHIR server
        nothing. The first check only marks its time (what came before is the sweep's). Returns
        the relink run's report, or None when there was nothing to re-link.
        """
        if self._merge_check_interval <= 0:
            return None
        source = self._ctx.source_name
        now = datetime.now(UTC)
        last = await asyncio.to_thread(self._store.checkpoint, source, MERGE_CHECK)
        since = datetime.fromisoformat(last) if last else None
        if since is not None and now - since < timedelta(seconds=self._merge_check_interval):
            return None
        report = None
        if since is not None:
            linker = self._linker.begin_run()
            relink = await linker.notice_recent_merges(since - MERGE_CHECK_MARGIN)
            if relink is None:  # more merges than one search shows: ask about every linked Patient
                await linker.notice_merges()
                relink = linker.relinking
            if relink:
                report = await self._run("relink", self._named(relink, [], _RELINK_PAGE), linker=linker)
                if report.status not in ("ok", "parked"):
                    return report  # the next cycle checks the same span again
        await asyncio.to_thread(self._store.save_checkpoint, source, MERGE_CHECK, now.isoformat())
        return report

    async def preview(
        self, filters: Mapping[str, str] | None = None, study_uids: Sequence[str] = ()
    ) -> list[Preview]:
        """What a run would do, study by study (bridge sync --dry-run); nothing is written.

        The same pipeline as :meth:`run` (or :meth:`run_studies`, given UIDs) with the dry run's
        write step: Patients are searched, not created; nothing goes to the FHIR server or the store.
        """
        dry = DryRun(self._publisher)
        missing: list[str] = []
        if study_uids:
            pages, sweep = self._named(study_uids, missing), None
        else:
            pages, sweep = self._source.iter_studies(filters), _sweep(filters)
        state = self._state(RunReport(0), self._linker.begin_run(dry_run=True), sweep)
        pipeline = Pipeline(self._parts, dry, state, lambda: self._stop_requested)
        try:
            await pipeline.start(reconcile=False)
            await pipeline.walk(pages, reconcile=False)
            await pipeline.finish(reconcile=False, missing=missing)
        finally:
            await pipeline.close()
        return dry.previews

    def _named(
        self, study_uids: Sequence[str], missing: list[str], per_page: int = 1
    ) -> AsyncIterator[list[DicomJson]]:
        """The archive's rows of the named studies, ``per_page`` studies a page.

        A page's rows come in one UID-list query where the archive matches lists (a full sync's
        cost); each study the list answer leaves out is asked alone, as every study is where the
        archive does not match lists. The UIDs no query of their own finds are added to ``missing``:
        a list answer never makes a study missing.
        """
        limit = asyncio.Semaphore(self._concurrency)

        async def rows_of(uid: str) -> list[DicomJson]:
            async with limit:  # a page's queries by UID at once, as many as studies are synced at once
                query = self._source.iter_studies({"StudyInstanceUID": uid})
                return [row async for page in query for row in page]

        async def pages() -> AsyncIterator[list[DicomJson]]:
            for start in range(0, len(study_uids), per_page):
                chunk = study_uids[start : start + per_page]
                listed = await self._source.search_studies_many(chunk)
                alone = list(dict.fromkeys(uid for uid in chunk if uid not in listed))
                # Every query ends (each has its deadline) before the first failure is raised.
                found = await asyncio.gather(*(rows_of(uid) for uid in alone), return_exceptions=True)
                if failed := next((f for f in found if isinstance(f, BaseException)), None):
                    raise failed
                rows_alone = (f for f in found if not isinstance(f, BaseException))
                answers = dict(zip(alone, rows_alone, strict=True))
                missing.extend(uid for uid, rows in answers.items() if not rows)
                if rows := [row for uid in chunk for row in listed.get(uid) or answers.get(uid, [])]:
                    yield rows

        return pages()

    def _state(self, report: RunReport, linker: RunLinker, sweep: Mapping[str, str] | None) -> RunState:
        return RunState(report, linker, asyncio.Semaphore(self._concurrency), sweep=sweep)

    async def _run(
        self,
        kind: str,
        pages: AsyncIterator[list[DicomJson]],
        *,
        reconcile: bool = False,
        missing: list[str] | None = None,
        sweep: Mapping[str, str] | None = None,
        linker: RunLinker | None = None,
    ) -> RunReport:
        """Run one recorded pass over ``pages``.

        ``sweep``: the pass covers every study matching these filters, so the source may fetch
        all their series at once (``BRIDGE_DICOMWEB_SERIES_QUERY=paged``), which it does when the
        first page with changed studies needs them: a run that changes nothing asks for no series.

        Studies that fail are parked and the pass goes on; an upstream that stays unreachable
        ends the pass with UpstreamUnavailableError after the run is recorded as failed.
        """
        source = self._ctx.source_name
        report = RunReport(
            await asyncio.to_thread(self._store.start_run, source, kind), listener=self.on_progress
        )
        queries_before = len(self._source.queries)
        writes_before, requests_before = self._publisher.writes, self._publisher.write_requests
        started = time.monotonic()
        logger.info("run %d (%s) started for source %s", report.run_id, kind, source, extra=SHOWN_AS_PROGRESS)
        linker = linker or self._linker.begin_run()
        pipeline = Pipeline(
            self._parts, self._publish, self._state(report, linker, sweep), lambda: self._stop_requested
        )
        try:
            await pipeline.start(reconcile=reconcile)
            await pipeline.walk(pages, reconcile=reconcile)
            if self._stop_requested:
                report.status = "stopped"
            else:
                await pipeline.finish(reconcile=reconcile, missing=missing or [])
                report.status = "parked" if report.counts.parked else "ok"
        except BaseException as exc:
            report.status, report.error = "failed", f"{type(exc).__name__}: {exc}"
            raise
        finally:
            await pipeline.close()
            report.add(fhir_writes=linker.writes + self._publisher.writes - writes_before)
            report.fhir_write_requests = (
                linker.write_requests + self._publisher.write_requests - requests_before
            )
            report.patient_events = linker.events
            await self._record(kind, report, self._source.queries[queries_before:], started)
        return report

    async def _record(self, kind: str, report: RunReport, queries: list[str], started: float) -> None:
        """Record the finished run in the store, the metrics and the log."""
        source = self._ctx.source_name
        # Which way series were asked (list or per-study); the exact queries are in the run record.
        report.series_query = self._source.series_query_used
        asked_series = any(q.split("?", 1)[0].endswith("/series") for q in queries)
        await asyncio.to_thread(
            self._store.finish_run,
            report.run_id,
            status=report.status,
            counts=report.counts,
            qido_queries=queries,
            error=report.error,
            deletions=report.deletions,
            series_query=report.series_query if asked_series else None,
            relinked=report.relinked,
            patient_events=report.patient_events,
        )
        metrics.observe_run(kind, report.status, report.counts, time.monotonic() - started)
        with contextlib.suppress(BridgeError):  # metrics never fail a run
            newest = await asyncio.to_thread(self._store.newest_published, source)
            metrics.set_lag(report.newest_seen, newest)
            stored = await asyncio.to_thread(self._store.counts, source)
            metrics.PARKED.set(stored["parked"])
            metrics.WITHDRAWN.set(stored.get("withdrawn", 0))
        c = report.counts
        logger.info(
            "run %d %s: seen %d, created %d, updated %d, unchanged %d, parked %d, deleted %d, "
            "FHIR writes %d in %d requests, fallbacks %d, series asked %s",
            report.run_id,
            report.status,
            c.seen,
            c.created,
            c.updated,
            c.unchanged,
            c.parked,
            c.deleted,
            c.fhir_writes,
            report.fhir_write_requests,
            c.fallbacks,
            report.series_query,
            extra=SHOWN_AS_PROGRESS,
        )


def _sweep(filters: Mapping[str, str] | None) -> dict[str, str] | None:
    """Whether a pass over ``filters`` may sweep its series: only one over the whole archive may.

    A run with filters (an incremental window) would page through every series if the archive
    ignored them.
    """
    return None if filters else {}
