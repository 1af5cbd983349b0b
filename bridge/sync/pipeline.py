"""The sync pipeline, one way for every run: select -> fetch -> link -> map -> validate -> write.

A full run, a one-study sync, a push, a scheduled cycle and ``bridge sync --dry-run`` all walk their
pages through :class:`Pipeline`; they differ only in the pages they give it and in its write step
(bridge/sync/write.py writes, bridge/sync/preview.py shows what would be written).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from bridge.dicomweb.guard import check_value_sizes
from bridge.dicomweb.results import SeriesOutcome
from bridge.errors import (
    BridgeError,
    FatalUpstreamError,
    MappingError,
    PatientConflictError,
    UpstreamUnavailableError,
)
from bridge.mapping.context import MappingContext
from bridge.mapping.dates import fhir_datetime
from bridge.mapping.records import (
    DicomJson,
    PatientIdentity,
    SeriesRecord,
    StudyRecord,
    digest,
    parse_study,
    raw_uid,
)
from bridge.mapping.validate import validate
from bridge.state.records import KnownStudy
from bridge.sync.assemble import StudyAssembler
from bridge.sync.identity import conflict, conflicting, identity_digest
from bridge.sync.protocols import StateStore, StudySource
from bridge.sync.publisher import Publisher
from bridge.sync.report import RunReport
from bridge.sync.run import PageWork, RunState, StudyWork, content_fingerprint
from bridge.sync.write import WriteStep

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


@dataclass(frozen=True)
class Parts:
    """What every run of a worker shares: the peers, the store and the mapping's inputs."""

    source: StudySource
    assembler: StudyAssembler
    publisher: Publisher
    store: StateStore
    ctx: MappingContext
    context_fingerprint: str


class Pipeline:
    """One run's way through its pages; made for the run, with the run's state and write step."""

    def __init__(self, parts: Parts, write: WriteStep, state: RunState, stopping: Callable[[], bool]) -> None:
        self._parts = parts
        self._write = write
        self._state = state
        self._stopping = stopping

    async def start(self, *, reconcile: bool) -> None:
        """Before the first page: re-link the studies of merged Patients, and the source's Endpoint."""
        if reconcile:  # the whole archive is walked: re-link studies of Patients merged since
            await self._state.linker.notice_merges()
        self._state.endpoint = await self._write.endpoint()

    async def finish(self, *, reconcile: bool, missing: Sequence[str]) -> None:
        """After the last page: retire the published studies the archive no longer has.

        A reconciling run retires those it did not see (behind the mass-delete guard); a run of
        named studies retires those the archive no longer lists, and reports the never-known.
        """
        report, store, source = self._state.report, self._parts.store, self._parts.ctx.source_name
        if reconcile:
            gone = await asyncio.to_thread(store.unseen_studies, source, report.run_id)
            await self._write.retire(gone, report, guard=True)
        elif missing:
            known = await asyncio.to_thread(store.known_studies, source, missing)
            await self._write.retire(list(known.values()), report, guard=False)
            report.not_found = [uid for uid in missing if uid not in known]

    async def close(self) -> None:
        """End the source's sweep of the run's series, if one was made."""
        self._state.sweep = None
        if self._state.swept:
            self._state.swept = False
            await asyncio.to_thread(self._parts.source.end_sweep)

    async def walk(self, pages: AsyncIterator[list[DicomJson]], *, reconcile: bool) -> None:
        """Every page, each page's write overlapping the next page's preparation.

        A page is prepared (parsed, selected, its series fetched, its Patients linked or created,
        its studies mapped and validated) while the page before it is written and recorded: the
        bridge's own CPU then overlaps the FHIR server's time instead of adding to it. Only
        writes overlap: preparations run one page after the other, so Patient look-ups and
        creates keep the single-page order (never two creates for one identifier in flight), and
        a page's ImagingStudies are written only after its own Patients exist. At most one page
        is written while one is prepared (and one read ahead): memory stays flat in N.
        """
        report = self._state.report
        writing: asyncio.Task[None] | None = None
        in_flight: dict[str, PatientIdentity] = {}  # the studies of the page being written, and whose
        try:
            async for rows in _read_ahead(pages):
                # A study on the page being written may come again on the next (offset paging
                # shifts when the archive changes mid-walk, and an archive lists one UID once per
                # patient): that page leaves it to the write, unless the row names another patient.
                prepared, page, late = await self._page(rows, skip=in_flight)
                in_flight = prepared
                uids = list(prepared)
                if writing is not None:
                    task, writing = writing, None
                    await task  # one page written at a time, in order
                if late:
                    # Conflicts with studies of the page just written: handled once it is recorded.
                    known = await asyncio.to_thread(
                        self._parts.store.known_studies, self._parts.ctx.source_name, late
                    )
                    for uid in late:
                        await self._conflict(uid, known.get(uid), conflict(_ROWS))
                # A reconciling run marks the page's studies seen once they are recorded: a study
                # it publishes for the first time has no row to mark before that.
                seen = uids if reconcile else []
                writing = asyncio.create_task(self._write.write_page(page, report, seen, self.fail))
                if self._stopping():
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
        self, rows: list[DicomJson], *, skip: Mapping[str, PatientIdentity]
    ) -> tuple[dict[str, PatientIdentity], PageWork, list[str]]:
        """Prepare one page's studies (not those in ``skip``).

        Returns the studies of the page (each UID once, with the identity its rows name), what is
        left to write, and the UIDs in ``skip`` (the page being written) that a row here names
        under another patient: the caller handles those conflicts once that page is recorded.
        """
        report, ctx = self._state.report, self._parts.ctx
        by_uid: dict[str, list[StudyRecord]] = {}
        late: list[str] = []
        for row in rows:
            report.add(seen=1)
            try:
                study = parse_study(check_value_sizes(row))
            except MappingError as exc:
                uid = raw_uid(row) or f"unknown:{digest(row)[:16]}"
                await self._write.park(report, uid, exc)
                continue
            if study.uid in skip:
                if conflicting([skip[study.uid], study.patient]) and study.uid not in late:
                    late.append(study.uid)
                continue
            by_uid.setdefault(study.uid, []).append(study)
            with contextlib.suppress(MappingError):  # a bad date is reported by the mapping
                report.saw(fhir_datetime(study.date, study.time, study.tz_offset, zone=ctx.timezone))
        known = await asyncio.to_thread(self._parts.store.known_studies, ctx.source_name, list(by_uid))
        # One UID listed twice on a page (an archive lists it once per patient): one study, and a
        # conflict when the rows name different patients.
        studies: list[StudyRecord] = []
        for uid, same in by_uid.items():
            if conflicting(s.patient for s in same):
                await self._conflict(uid, known.get(uid), conflict(_ROWS))
            elif uid not in self._state.conflicted:  # its conflict is parked already in this run
                studies.append(same[0])

        page = PageWork()
        try:
            await self._page_studies(studies, known, page)
        except BaseException:
            await self._write.finish_page(page)
            raise
        return {uid: same[0].patient for uid, same in by_uid.items()}, page, late

    async def _page_studies(
        self, studies: list[StudyRecord], known: Mapping[str, KnownStudy], page: PageWork
    ) -> None:
        """A page's changed studies: select -> fetch -> link -> map -> validate; ``page.writes`` is left.

        Reads and writes are made for the page at once where the peers allow it (the series of all
        its changed studies in one UID-list query, its new Patients in one batch; its ImagingStudies
        are then written in one batch by the write step), and study by study otherwise; a study's
        failure parks that study only.
        """
        state, source = self._state, self._parts.source
        todo: list[StudyWork] = []
        for study in studies:
            item = await self._select(study, known.get(study.uid), page)
            if item is not None:
                todo.append(item)
        if not todo:
            return
        if state.sweep is not None and len(todo) > 1:
            # Once per run, for the first page with changes (one study alone is asked alone).
            filters, state.sweep = state.sweep, None
            state.swept = await source.sweep_series(filters)
        prefetched = await source.search_series_many([t.study.uid for t in todo])

        async def fetch(item: StudyWork) -> None:
            async with state.limit:
                await self._guard(item, self._fetch(item, prefetched.get(item.study.uid)))

        await self._each(todo, fetch)
        todo = [t for t in todo if t.records is not None]
        if len(todo) > 1 and await self._parts.publisher.batching():
            assembler = self._parts.assembler
            await state.linker.prime_patients(
                [
                    (t.records.study, assembler.patient_check(t.records, state.endpoint))
                    for t in todo
                    if t.records
                ]
            )

        async def assemble(item: StudyWork) -> None:
            async with state.limit:
                await self._guard(item, self._assemble(item, page))

        await self._each(todo, assemble)
        page.writes = [t for t in todo if t.resource is not None and not t.done]

    async def _each(
        self, todo: list[StudyWork], step: Callable[[StudyWork], Coroutine[Any, Any, None]]
    ) -> None:
        """Run ``step`` for every study at once (bounded by the semaphore the step takes)."""
        try:
            async with asyncio.TaskGroup() as group:
                for item in todo:
                    group.create_task(step(item))
        except* BridgeError as failures:
            # The first failure ends the run; the group has cancelled the other studies.
            raise failures.exceptions[0] from None

    async def _select(self, study: StudyRecord, known: KnownStudy | None, page: PageWork) -> StudyWork | None:
        """The study, if it changed since it was published and this run holds it."""
        if self._stopping():
            return None  # left for the next cycle, untouched
        report = self._state.report
        qido_fingerprint = digest([study.fingerprint(), self._parts.context_fingerprint])
        if known is not None and known.qido_fingerprint == qido_fingerprint:
            report.add(unchanged=1)
            self._write.unchanged_row(study.uid)
            return None
        if self._write.claims:
            if not await self._write.claim(study.uid):
                report.add(claimed=1)  # another replica is publishing it now: not parked, not lost
                logger.info("study %s skipped: claimed by another worker", study.uid)
                return None
            page.claimed.append(study.uid)
            # Read again under the claim: another replica may have published it since the page.
            fresh = await asyncio.to_thread(
                self._parts.store.known_studies, self._parts.ctx.source_name, [study.uid]
            )
            known = fresh.get(study.uid)
            if known is not None and known.qido_fingerprint == qido_fingerprint:
                report.add(unchanged=1)
                return None
        return StudyWork(study, known, qido_fingerprint)

    async def _fetch(self, item: StudyWork, prefetched: SeriesOutcome | None) -> None:
        if isinstance(prefetched, BridgeError):
            raise prefetched
        series = prefetched
        if series is not None and item.study.series_count not in (None, len(series)):
            series = None  # the list answer disagrees with the study's own count: ask alone
        elif series is not None and self._state.swept and not _sweep_complete(item.study, series):
            series = None
        assembler = self._parts.assembler
        records = await assembler.fetch(item.study, series)
        known = item.known
        if known is not None and known.patient_identity not in (None, identity_digest(item.study.patient)):
            # Published under another patient: a correction moves every row of the UID, a
            # conflicting newcomer leaves the published row beside its own.
            await assembler.every_row_agrees(item.study.uid)
            item.moved = True
        item.records = records

    async def _assemble(self, item: StudyWork, page: PageWork) -> None:
        """Link, map and validate the study; an ImagingStudy that did not change is recorded, not written."""
        assert item.records is not None
        records, assembler, endpoint = item.records, self._parts.assembler, self._state.endpoint
        if records.all_withdrawn:
            await self._retire_all_rejected(item)
            return
        item.fallbacks = assembler.fallbacks(records)
        links = await assembler.link(records, endpoint, self._state.linker)
        resource = assembler.map(records, links, endpoint)
        validate(resource)  # the resource exactly as it is written, subject and basedOn included
        item.observations = assembler.observations(records, links, resource)
        for observation in item.observations:
            validate(observation)
        known = item.known
        if known is not None and known.resource_fingerprint == content_fingerprint(
            resource, item.observations
        ):
            # The archive's answer changed in a way the ImagingStudy does not show.
            self._write.unchanged(item, resource, self._state.report, page)
            item.done = True
            return
        item.resource = resource

    async def _retire_all_rejected(self, item: StudyWork) -> None:
        """Rejection notes withdrew every instance: the study is retired per the delete policy."""
        item.done = True
        if item.known is None or not item.known.qido_fingerprint:
            # Never published, or retired already (the store keeps no fingerprint of a retired study):
            # nothing to write, and no second retirement to report on every run.
            logger.info("study %s: every instance is rejected; nothing published", item.study.uid)
            return
        logger.info("study %s: every instance is rejected; retiring its ImagingStudy", item.study.uid)
        await self._write.retire([item.known], self._state.report, guard=False)

    async def _guard(self, item: StudyWork, step: Awaitable[None]) -> None:
        """Run one study's step; a failure of that study parks it and drops it from the page."""
        try:
            await step
        except PatientConflictError as exc:
            item.records, item.resource, item.done = None, None, True
            await self._conflict(item.study.uid, item.known, exc)
        except BridgeError as exc:
            item.records, item.resource, item.done = None, None, True
            await self.fail(self._state.report, item.study.uid, exc)

    async def _conflict(self, uid: str, known: KnownStudy | None, exc: PatientConflictError) -> None:
        """Park a study whose archive rows name several patients; withdraw it if it is published."""
        if uid in self._state.conflicted:
            return
        self._state.conflicted.add(uid)
        await self._write.park(self._state.report, uid, exc)
        if known is not None and known.withdrawn is None:
            await self._write.withdraw(uid, known)

    async def fail(self, report: RunReport, uid: str, exc: BridgeError) -> None:
        """Park the study, unless the failure is the whole run's (an unreachable peer)."""
        if isinstance(exc, MappingError | FatalUpstreamError):
            await self._write.park(report, uid, exc)
        elif isinstance(exc, UpstreamUnavailableError):
            # This study's request kept failing: park it, unless that upstream as a whole is down.
            peer = self._parts.publisher if exc.service == "fhir" else self._parts.source
            if not await peer.reachable():
                raise exc
            await self._write.park(report, uid, exc)
        else:
            raise exc
