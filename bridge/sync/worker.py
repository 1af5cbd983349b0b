"""One sync pass: discover studies, skip the unchanged, map and publish the rest, record it all."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from bridge.dicomweb.guard import check_value_sizes
from bridge.dicomweb.records import (
    DicomJson,
    PatientIdentity,
    SeriesRecord,
    StudyRecord,
    digest,
    parse_study,
    raw_uid,
)
from bridge.dicomweb.results import SeriesOutcome
from bridge.errors import (
    BridgeError,
    FatalUpstreamError,
    MappingError,
    PatientConflictError,
    PatientLinkError,
    RejectedResourceError,
    UpstreamUnavailableError,
)
from bridge.mapping.context import MappingContext
from bridge.mapping.dates import fhir_datetime
from bridge.mapping.identity import subject_patient_id
from bridge.mapping.validate import validate
from bridge.state.records import KnownStudy, Published, RunCounts
from bridge.sync import metrics
from bridge.sync.assemble import StudyAssembler, StudyRecords
from bridge.sync.identity import CONFLICT_CODE, CONFLICT_REASON, conflict, conflicting, identity_digest
from bridge.sync.link import Linker
from bridge.sync.policy import DeletePolicy
from bridge.sync.preview import Preview, Previewer
from bridge.sync.protocols import StateStore, StudySource
from bridge.sync.publisher import Publisher
from bridge.sync.report import ParkedReport, RunReport
from bridge.sync.retire import Retirer

logger = logging.getLogger(__name__)

_ROWS = "the archive's study rows of this Study Instance UID"


async def _read_ahead(pages: AsyncIterator[list[DicomJson]]) -> AsyncIterator[list[DicomJson]]:
    """The pages, the next one asked of the archive while the current one is worked on.

    A study page costs the archive more the further it is (Orthanc: 0.1 s at offset 0, 0.3 s at
    offset 4,900 of 5,000); asked ahead, that wait overlaps the page's own series and FHIR work.
    One page ahead at most, so memory stays flat; a run that ends early cancels it.
    """
    pending: asyncio.Future[list[DicomJson]] = asyncio.ensure_future(anext(pages))
    try:
        while True:
            try:
                page = await pending
            except StopAsyncIteration:
                return
            pending = asyncio.ensure_future(anext(pages))
            yield page
    finally:
        if not pending.done():
            pending.cancel()
            with contextlib.suppress(asyncio.CancelledError, StopAsyncIteration):
                await pending
        elif not pending.cancelled():
            pending.exception()  # retrieved: a failure after the run ended is not "never retrieved"


def _sweep_complete(study: StudyRecord, series: Sequence[SeriesRecord]) -> bool:
    """Whether a sweep's series are all of the study's, as its own (newer) row counts them.

    The sweep and the study rows are read at different times (minutes apart on a large archive):
    a series or instance added in between, or a series missed as pages shifted, shows as a count
    that differs. Without the counts nothing vouches for the sweep, and the study is asked alone.
    """
    if study.series_count is None or study.series_count != len(series):
        return False
    counts = [s.instance_count for s in series]
    if study.instance_count is None or any(c is None for c in counts):
        return study.instance_count is None  # nothing more to compare
    return sum(c for c in counts if c is not None) == study.instance_count


@dataclass
class _PageWork:
    """What the studies of one page leave to do once they are all through."""

    published: list[Published] = field(default_factory=list)
    claimed: list[str] = field(default_factory=list)
    writes: list[_Todo] = field(default_factory=list)  # mapped and validated, to be written


@dataclass
class _Todo:
    """A changed study on its way through the page."""

    study: StudyRecord
    known: KnownStudy | None
    qido_fingerprint: str
    records: StudyRecords | None = None
    resource: dict[str, Any] | None = None
    fallbacks: list[str] = field(default_factory=list)
    done: bool = False  # recorded already (unchanged resource) or parked
    moved: bool = False  # every row of the study now names another patient identity (a correction)
    observations: list[dict[str, Any]] = field(default_factory=list)  # dose summaries, with the study


def content_fingerprint(resource: dict[str, Any], observations: Sequence[dict[str, Any]] = ()) -> str:
    """What the store remembers of a study's published content: its ImagingStudy and dose Observations.

    A study without Observations keeps the digest of its ImagingStudy alone, as before they existed.
    """
    return digest([resource, *observations]) if observations else digest(resource)


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
    ) -> None:
        self._source = source
        self._linker = linker
        self._publisher = publisher
        self._store = store
        self._ctx = ctx
        self._concurrency = concurrency
        self._context_fingerprint = ctx.fingerprint()
        self._stop_requested = False
        self._swept = False  # series come from the source's sweep of the whole run (see _fetch)
        self._sweep_filters: Mapping[str, str] | None = None  # the run may sweep, not yet done
        self._conflicted: set[str] = set()  # studies parked for conflicting identity in this run
        self._assembler = StudyAssembler(source, linker, ctx, read_instance_header=read_instance_header)
        self._retirer = Retirer(publisher, store, ctx, policy=delete_policy, max_fraction=delete_max_fraction)
        # Told each run's counts as they change (``bridge sync``'s progress display).
        self.on_progress: Callable[[RunCounts], None] | None = None

    def _fhir_writes(self) -> int:
        return self._linker.writes + self._publisher.writes

    def _fhir_write_requests(self) -> int:
        return self._linker.write_requests + self._publisher.write_requests

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
        # Only a run over the whole archive may sweep its series: a run with filters (an
        # incremental window) would page through every series if the archive ignored them.
        sweep: dict[str, str] | None = None if filters else {}
        return await self._run(kind, self._source.iter_studies(filters), reconcile=reconcile, sweep=sweep)

    async def run_studies(self, study_uids: Sequence[str], kind: str = "on-demand") -> RunReport:
        """Sync the named studies now; a named study the archive no longer has is retired."""
        missing: list[str] = []

        async def pages() -> AsyncIterator[list[DicomJson]]:
            for uid in study_uids:
                found = False
                async for page in self._source.iter_studies({"StudyInstanceUID": uid}):
                    found = True
                    yield page
                if not found:
                    missing.append(uid)

        return await self._run(kind, pages(), missing=missing)

    async def preview(
        self, filters: Mapping[str, str] | None = None, study_uids: Sequence[str] = ()
    ) -> list[Preview]:
        """What a run would do, study by study (bridge sync --dry-run); nothing is written."""
        previewer = Previewer(
            self._source,
            self._assembler,
            self._linker,
            self._publisher,
            self._store,
            self._ctx,
            self._context_fingerprint,
        )
        return await previewer.preview(filters, study_uids)

    async def _run(
        self,
        kind: str,
        pages: AsyncIterator[list[DicomJson]],
        *,
        reconcile: bool = False,
        missing: list[str] | None = None,
        sweep: Mapping[str, str] | None = None,
    ) -> RunReport:
        """Run one pass over ``pages`` and record it.

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
        writes_before = self._fhir_writes()
        requests_before = self._fhir_write_requests()
        started = time.monotonic()
        logger.info("run %d (%s) started for source %s", report.run_id, kind, source)
        self._conflicted = set()
        try:
            self._linker.begin_run()
            if reconcile:  # the whole archive is walked: re-link studies of Patients merged since
                await self._linker.notice_merges()
            endpoint = await self._publisher.ensure_endpoint()
            self._sweep_filters = sweep
            limit = asyncio.Semaphore(self._concurrency)
            await self._pages(pages, endpoint, limit, report, reconcile=reconcile)
            if self._stop_requested:
                report.status = "stopped"
            else:
                if reconcile:
                    gone = await asyncio.to_thread(self._store.unseen_studies, source, report.run_id)
                    await self._retirer.retire(gone, report, guard=True)
                elif missing:
                    known = await asyncio.to_thread(self._store.known_studies, source, missing)
                    await self._retirer.retire(list(known.values()), report, guard=False)
                    report.not_found = [uid for uid in missing if uid not in known]
                report.status = "parked" if report.counts.parked else "ok"
        except BaseException as exc:
            report.status, report.error = "failed", f"{type(exc).__name__}: {exc}"
            raise
        finally:
            self._sweep_filters = None
            if self._swept:
                self._swept = False
                await asyncio.to_thread(self._source.end_sweep)
            report.add(fhir_writes=self._fhir_writes() - writes_before)
            report.fhir_write_requests = self._fhir_write_requests() - requests_before
            # Which way series were asked (list or per-study); the exact queries are in the run record.
            report.series_query = self._source.series_query_used
            report.patient_events = self._linker.take_events()
            queries = self._source.queries[queries_before:]
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
            )
        return report

    async def _pages(
        self,
        pages: AsyncIterator[list[DicomJson]],
        endpoint: str,
        limit: asyncio.Semaphore,
        report: RunReport,
        *,
        reconcile: bool,
    ) -> None:
        """Every page, each page's ImagingStudy writes overlapping the next page's preparation.

        A page is prepared (parsed, selected, its series fetched, its Patients linked or created,
        its studies mapped and validated) while the page before it is written and recorded: the
        bridge's own CPU then overlaps the FHIR server's time instead of adding to it. Only
        writes overlap: preparations run one page after the other, so Patient look-ups and
        creates keep the single-page order (never two creates for one identifier in flight), and
        a page's ImagingStudies are written only after its own Patients exist. At most one page
        is written while one is prepared (and one read ahead): memory stays flat in N.
        """
        writing: asyncio.Task[None] | None = None
        in_flight: dict[str, PatientIdentity] = {}  # the studies of the page being written, and whose
        try:
            async for rows in _read_ahead(pages):
                # A study on the page being written may come again on the next (offset paging
                # shifts when the archive changes mid-walk, and an archive lists one UID once per
                # patient): that page leaves it to the write, unless the row names another patient.
                prepared, page, late = await self._page(rows, endpoint, limit, report, skip=in_flight)
                in_flight = prepared
                uids = list(prepared)
                if writing is not None:
                    task, writing = writing, None
                    await task  # one page written at a time, in order
                if late:
                    # Conflicts with studies of the page just written: handled once it is recorded.
                    known = await asyncio.to_thread(self._store.known_studies, self._ctx.source_name, late)
                    for uid in late:
                        await self._conflict(report, uid, known.get(uid), conflict(_ROWS))
                # A reconciling run marks the page's studies seen once they are recorded: a study
                # it publishes for the first time has no row to mark before that.
                writing = asyncio.create_task(self._write_page(page, report, uids if reconcile else []))
                if self._stop_requested:
                    break
            if writing is not None:
                task, writing = writing, None
                await task
        finally:
            if writing is not None:
                # The run failed while a page was being written: let that page finish and be
                # recorded (its writes are bounded by the FHIR deadlines), the failure stands.
                await asyncio.wait([writing])
                if not writing.cancelled() and writing.exception() is not None:
                    logger.warning("a page written while the run failed failed too: %s", writing.exception())

    async def _page(
        self,
        rows: list[DicomJson],
        endpoint: str,
        limit: asyncio.Semaphore,
        report: RunReport,
        *,
        skip: Mapping[str, PatientIdentity] | None = None,
    ) -> tuple[dict[str, PatientIdentity], _PageWork, list[str]]:
        """Prepare one page's studies (not those in ``skip``).

        Returns the studies of the page (each UID once, with the identity its rows name), what is
        left to write, and the UIDs in ``skip`` (the page being written) that a row here names
        under another patient: the caller handles those conflicts once that page is recorded.
        """
        skip = skip or {}
        by_uid: dict[str, list[StudyRecord]] = {}
        late: list[str] = []
        for row in rows:
            report.add(seen=1)
            try:
                study = parse_study(check_value_sizes(row))
            except MappingError as exc:
                uid = raw_uid(row) or f"unknown:{digest(row)[:16]}"
                await self._park(report, uid, exc)
                continue
            if study.uid in skip:
                if conflicting([skip[study.uid], study.patient]) and study.uid not in late:
                    late.append(study.uid)
                continue
            by_uid.setdefault(study.uid, []).append(study)
            with contextlib.suppress(MappingError):  # a bad date is reported by the mapping
                report.saw(fhir_datetime(study.date, study.time, study.tz_offset, zone=self._ctx.timezone))
        known = await asyncio.to_thread(self._store.known_studies, self._ctx.source_name, list(by_uid))
        # One UID listed twice on a page (an archive lists it once per patient): one study, and a
        # conflict when the rows name different patients.
        studies: list[StudyRecord] = []
        for uid, same in by_uid.items():
            if conflicting(s.patient for s in same):
                await self._conflict(report, uid, known.get(uid), conflict(_ROWS))
            elif uid not in self._conflicted:  # its conflict is parked already in this run
                studies.append(same[0])

        page = _PageWork()
        try:
            await self._page_studies(studies, known, endpoint, limit, report, page)
        except BaseException:
            await self._finish_page(page)
            raise
        return {uid: same[0].patient for uid, same in by_uid.items()}, page, late

    async def _write_page(self, page: _PageWork, report: RunReport, seen: list[str]) -> None:
        """Write a prepared page's ImagingStudies (in batches where the server takes them), record them.

        Then, in a reconciling run, mark the page's studies (``seen``) as seen by the run.
        """
        try:
            if not page.writes:
                return
            writes = page.writes
            results = await self._publisher.put_studies(
                [(t.resource, t.known.fhir_version if t.known else None) for t in writes if t.resource]
            )
            for item, result in zip(writes, results, strict=True):
                if isinstance(result, BridgeError):
                    await self._fail(report, item.study.uid, result)
                    continue
                if item.observations:
                    try:
                        await self._publisher.put_observations(item.observations, f"ImagingStudy/{result.id}")
                    except BridgeError as exc:  # retried whole: the writes are idempotent
                        await self._fail(report, item.study.uid, exc)
                        continue
                # Created: the study had no ImagingStudy before. The server's 201 says so; with no
                # record of the study, a first version says so too (servers that answer 200 to a
                # PUT that creates); anything else updated one that was there.
                created = result.created or (item.known is None and self._publisher.created(result))
                outcome = "created" if created else "updated"
                logger.info("study %s %s as ImagingStudy/%s", item.study.uid, outcome, result.id)
                self._published(item, result.id, result.version, outcome, report, page)
        finally:
            await self._finish_page(page)
            if seen:
                await asyncio.to_thread(self._store.mark_seen, self._ctx.source_name, seen, report.run_id)

    async def _finish_page(self, page: _PageWork) -> None:
        """Record the page's published studies and release its claims.

        One transaction for the page (even when the run stops or fails here: what is published
        is on the FHIR server); claims are released only once their studies are recorded.
        """
        await asyncio.to_thread(self._store.record_published_many, self._ctx.source_name, page.published)
        page.published = []
        for uid in page.claimed:
            await asyncio.to_thread(self._store.release_study, self._ctx.source_name, uid)
        page.claimed = []

    async def _page_studies(
        self,
        studies: list[StudyRecord],
        known: Mapping[str, KnownStudy],
        endpoint: str,
        limit: asyncio.Semaphore,
        report: RunReport,
        page: _PageWork,
    ) -> None:
        """A page's changed studies: select -> fetch -> link -> map -> validate; ``page.writes`` is left.

        Reads and writes are made for the page at once where the peers allow it (the series of all
        its changed studies in one UID-list query, its new Patients in one batch; its ImagingStudies
        are then written in one batch by :meth:`_write_page`), and study by study otherwise; a
        study's failure parks that study only.
        """
        todo: list[_Todo] = []
        for study in studies:
            item = await self._select(study, known.get(study.uid), report, page)
            if item is not None:
                todo.append(item)
        if not todo:
            return
        if self._sweep_filters is not None and len(todo) > 1:
            # Once per run, for the first page with changes (one study alone is asked alone).
            filters, self._sweep_filters = self._sweep_filters, None
            self._swept = await self._source.sweep_series(filters)
        prefetched = await self._source.search_series_many([t.study.uid for t in todo])

        async def fetch(item: _Todo) -> None:
            async with limit:
                await self._guard(report, item, self._fetch(item, prefetched.get(item.study.uid), endpoint))

        await self._each(todo, fetch)
        todo = [t for t in todo if t.records is not None]
        if len(todo) > 1 and await self._publisher.batching():
            await self._linker.prime_patients(
                [
                    (t.records.study, self._assembler.patient_check(t.records, endpoint))
                    for t in todo
                    if t.records
                ]
            )

        async def assemble(item: _Todo) -> None:
            async with limit:
                await self._guard(report, item, self._assemble(item, endpoint, report, page))

        await self._each(todo, assemble)
        page.writes = [t for t in todo if t.resource is not None and not t.done]

    async def _each(self, todo: list[_Todo], step: Callable[[_Todo], Coroutine[Any, Any, None]]) -> None:
        """Run ``step`` for every study at once (bounded by the semaphore the step takes)."""
        try:
            async with asyncio.TaskGroup() as group:
                for item in todo:
                    group.create_task(step(item))
        except* BridgeError as failures:
            # The first failure ends the run; the group has cancelled the other studies.
            raise failures.exceptions[0] from None

    async def _select(
        self, study: StudyRecord, known: KnownStudy | None, report: RunReport, page: _PageWork
    ) -> _Todo | None:
        """The study, if it changed since it was published and this worker holds it."""
        if self._stop_requested:
            return None  # left for the next cycle, untouched
        qido_fingerprint = digest([study.fingerprint(), self._context_fingerprint])
        if known is not None and known.qido_fingerprint == qido_fingerprint:
            report.add(unchanged=1)
            return None
        source = self._ctx.source_name
        if self._store.claims_enabled:
            if not await asyncio.to_thread(self._store.claim_study, source, study.uid):
                report.add(claimed=1)  # another replica is publishing it now: not parked, not lost
                logger.info("study %s skipped: claimed by another worker", study.uid)
                return None
            page.claimed.append(study.uid)
            # Read again under the claim: another replica may have published it since the page.
            fresh = await asyncio.to_thread(self._store.known_studies, source, [study.uid])
            known = fresh.get(study.uid)
            if known is not None and known.qido_fingerprint == qido_fingerprint:
                report.add(unchanged=1)
                return None
        return _Todo(study, known, qido_fingerprint)

    async def _fetch(self, item: _Todo, prefetched: SeriesOutcome | None, endpoint: str) -> None:
        if isinstance(prefetched, BridgeError):
            raise prefetched
        series = prefetched
        if series is not None and item.study.series_count not in (None, len(series)):
            series = None  # the list answer disagrees with the study's own count: ask alone
        elif series is not None and self._swept and not _sweep_complete(item.study, series):
            series = None
        records = await self._assembler.fetch(item.study, series)
        known = item.known
        if known is not None and known.patient_identity not in (None, identity_digest(item.study.patient)):
            # Published under another patient: a correction moves every row of the UID, a
            # conflicting newcomer leaves the published row beside its own.
            await self._assembler.every_row_agrees(item.study.uid)
            item.moved = True
        item.records = records

    async def _assemble(self, item: _Todo, endpoint: str, report: RunReport, page: _PageWork) -> None:
        """Link, map and validate the study; an ImagingStudy that did not change is recorded, not written."""
        assert item.records is not None
        records = item.records
        if records.all_withdrawn:
            await self._retire_all_rejected(item, report)
            return
        item.fallbacks = self._assembler.fallbacks(records)
        links = await self._assembler.link(records, endpoint)
        resource = self._assembler.map(records, links, endpoint)
        validate(resource)  # the resource exactly as it is written, subject and basedOn included
        item.observations = self._assembler.observations(records, links, resource)
        for observation in item.observations:
            validate(observation)
        known = item.known
        if known is not None and known.resource_fingerprint == content_fingerprint(
            resource, item.observations
        ):
            # The archive's answer changed in a way the ImagingStudy does not show.
            self._published(item, known.fhir_id, known.fhir_version, "unchanged", report, page, resource)
            item.done = True
            return
        item.resource = resource

    async def _retire_all_rejected(self, item: _Todo, report: RunReport) -> None:
        """Rejection notes withdrew every instance: the study is retired per the delete policy."""
        item.done = True
        if item.known is None or not item.known.qido_fingerprint:
            # Never published, or retired already (the store keeps no fingerprint of a retired study):
            # nothing to write, and no second retirement to report on every run.
            logger.info("study %s: every instance is rejected; nothing published", item.study.uid)
            return
        logger.info("study %s: every instance is rejected; retiring its ImagingStudy", item.study.uid)
        await self._retirer.retire([item.known], report, guard=False)

    def _published(
        self,
        item: _Todo,
        fhir_id: str,
        version: str | None,
        outcome: str,
        report: RunReport,
        page: _PageWork,
        resource: dict[str, Any] | None = None,
    ) -> None:
        resource = resource or item.resource or {}
        page.published.append(
            Published(
                item.study.uid,
                item.qido_fingerprint,
                content_fingerprint(resource, item.observations),
                fhir_id,
                version,
                resource.get("started"),
                patient_identity=identity_digest(item.study.patient),
                patient_id=subject_patient_id(resource),
            )
        )
        if item.moved and outcome != "unchanged":
            report.relinked.append(
                {"study_uid": item.study.uid, "action": "every archive row names another patient: re-linked"}
            )
            logger.info(
                "study %s re-linked: every archive row names another patient identity", item.study.uid
            )
        used = item.fallbacks
        report.add(**{outcome: 1}, fallbacks=len(used))
        if used:
            logger.warning(
                "study %s published with fallbacks for: %s", item.study.uid, ", ".join(sorted(set(used)))
            )

    async def _guard(self, report: RunReport, item: _Todo, step: Awaitable[None]) -> None:
        """Run one study's step; a failure of that study parks it and drops it from the page."""
        try:
            await step
        except PatientConflictError as exc:
            item.records, item.resource, item.done = None, None, True
            await self._conflict(report, item.study.uid, item.known, exc)
        except BridgeError as exc:
            item.records, item.resource, item.done = None, None, True
            await self._fail(report, item.study.uid, exc)

    async def _conflict(
        self, report: RunReport, uid: str, known: KnownStudy | None, exc: PatientConflictError
    ) -> None:
        """Park a study whose archive rows name several patients; withdraw it if it is published.

        The published ImagingStudy keeps its subject: only the bridge's withdrawal extension is added
        (every API replica then refuses it, bridge/resolve/links.py), and the store remembers the
        withdrawal for `bridge status` and the metrics until the archive is corrected.
        """
        if uid in self._conflicted:
            return
        self._conflicted.add(uid)
        await self._park(report, uid, exc)
        if known is None or known.withdrawn is not None:
            return
        try:
            version = await self._publisher.withdraw_study(known.fhir_id, CONFLICT_CODE)
        except FatalUpstreamError as exc:
            # The study stays parked and its newcomer row keeps it in every run's work: the
            # withdrawal is tried again next run. (An unreachable FHIR server ends the run.)
            logger.error("study %s: withdrawing its ImagingStudy failed, tried again next run: %s", uid, exc)
            return
        await asyncio.to_thread(
            self._store.withdraw, self._ctx.source_name, uid, reason=CONFLICT_REASON, fhir_version=version
        )
        logger.warning("study %s withdrawn from clinicians: %s", uid, CONFLICT_REASON)

    async def _fail(self, report: RunReport, uid: str, exc: BridgeError) -> None:
        """Park the study, unless the failure is the whole run's (an unreachable peer)."""
        if isinstance(exc, MappingError | FatalUpstreamError):
            await self._park(report, uid, exc)
        elif isinstance(exc, UpstreamUnavailableError):
            # This study's request kept failing: park it, unless that upstream as a whole is down.
            peer = self._publisher if exc.service == "fhir" else self._source
            if not await peer.reachable():
                raise exc
            await self._park(report, uid, exc)
        else:
            raise exc

    async def _park(self, report: RunReport, uid: str, exc: Exception) -> None:
        if isinstance(exc, PatientConflictError):
            kind = "identity"
        elif isinstance(exc, PatientLinkError):
            kind = "patient"
        elif isinstance(exc, MappingError):
            kind = "mapping"
        elif isinstance(exc, RejectedResourceError):
            kind = "rejected"
        else:
            kind = "upstream"
        attribute = getattr(exc, "attribute", None)
        reason = str(exc)
        await asyncio.to_thread(
            self._store.park, self._ctx.source_name, uid, kind=kind, reason=reason, attribute=attribute
        )
        report.add(parked=1)
        report.parked.append(ParkedReport(uid, kind, attribute, reason))
        logger.warning("study %s parked (%s%s)", uid, kind, f", {attribute}" if attribute else "")
