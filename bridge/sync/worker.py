"""One sync pass: discover studies, skip the unchanged, map and publish the rest, record it all."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Mapping, Sequence
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from typing import Any

from bridge.config import DeletePolicy
from bridge.dicomweb.records import (
    DicomJson,
    InstanceRecord,
    StudyRecord,
    digest,
    parse_study,
    raw_uid,
    with_header,
)
from bridge.errors import (
    BridgeError,
    FatalUpstreamError,
    MappingError,
    PatientLinkError,
    RejectedResourceError,
    UpstreamUnavailableError,
)
from bridge.mapping.context import MappingContext
from bridge.mapping.dates import fhir_datetime
from bridge.mapping.imaging_study import fallbacks, map_imaging_study
from bridge.mapping.validate import validate
from bridge.state.store import KnownStudy, Published, RunCounts
from bridge.sync import metrics
from bridge.sync.diff import changed_paths
from bridge.sync.protocols import StateStore, StudySource
from bridge.sync.publisher import Publisher

logger = logging.getLogger(__name__)

_PLACEHOLDER_SUBJECT = {"reference": "Patient/unresolved"}


@dataclass(frozen=True, slots=True)
class ParkedReport:
    """A study parked in this run, and why."""

    study_uid: str
    kind: str
    attribute: str | None
    reason: str


@dataclass
class RunReport:
    """What a run did."""

    run_id: int
    counts: RunCounts = field(default_factory=RunCounts)
    parked: list[ParkedReport] = field(default_factory=list)
    status: str = "running"
    error: str | None = None
    deletions: list[dict[str, str]] = field(default_factory=list)
    newest_seen: str | None = None

    def saw(self, started: str | None) -> None:
        """Keep the latest study start seen in the archive (for the lag metric)."""
        if started and (self.newest_seen is None or _later(started, self.newest_seen)):
            self.newest_seen = started

    def add(self, **deltas: int) -> None:
        """Add to the counts."""
        self.counts = replace(self.counts, **{k: getattr(self.counts, k) + v for k, v in deltas.items()})


@dataclass
class _PageWork:
    """What the studies of one page leave to do once they are all through."""

    published: list[Published] = field(default_factory=list)
    claimed: list[str] = field(default_factory=list)


@dataclass(frozen=True, slots=True)
class Preview:
    """What a sync would do to one study: create, update (with the paths), unchanged, or park."""

    study_uid: str
    action: str
    changes: tuple[str, ...] = ()
    reason: str | None = None


def _later(a: str, b: str) -> bool:
    def instant(text: str) -> datetime:
        value = datetime.fromisoformat(text)
        return value if value.tzinfo else value.replace(tzinfo=UTC)

    return instant(a) > instant(b)


class SyncWorker:
    """Runs sync passes over one source into one FHIR server."""

    def __init__(
        self,
        source: StudySource,
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
        self._publisher = publisher
        self._store = store
        self._ctx = ctx
        self._concurrency = concurrency
        self._context_fingerprint = ctx.fingerprint()
        self._delete_policy = delete_policy
        self._delete_max_fraction = delete_max_fraction
        self._stop_requested = False
        self._read_header = read_instance_header

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
        return await self._run(kind, self._source.iter_studies(filters), reconcile=reconcile)

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
        """What a run would do, study by study, compared with what the FHIR server holds.

        Nothing is written: not to the FHIR server (Patients are searched, not created), not to
        the store.
        """
        self._publisher.begin_run()
        self._publisher.dry_run = True
        try:
            endpoint = await self._publisher.endpoint_reference()
            if study_uids:
                pages = [self._source.iter_studies({"StudyInstanceUID": uid}) for uid in study_uids]
            else:
                pages = [self._source.iter_studies(filters)]
            previews: list[Preview] = []
            for walk in pages:
                async for page in walk:
                    previews.extend(await self._preview_page(page, endpoint))
            return previews
        finally:
            self._publisher.dry_run = False

    async def _preview_page(self, rows: list[DicomJson], endpoint: str) -> list[Preview]:
        out: list[Preview] = []
        studies = []
        for row in rows:
            try:
                studies.append(parse_study(row))
            except MappingError as exc:
                out.append(Preview(raw_uid(row) or "unknown", "park", reason=str(exc)))
        known = await asyncio.to_thread(
            self._store.known_studies, self._ctx.source_name, [s.uid for s in studies]
        )
        for study in studies:
            seen = known.get(study.uid)
            fingerprint = digest([study.fingerprint(), self._context_fingerprint])
            if seen is not None and seen.qido_fingerprint == fingerprint:
                out.append(Preview(study.uid, "unchanged"))
                continue
            try:
                resource = await self.build(study, endpoint)
                current = await self._publisher.current_study(resource)
            except (MappingError, FatalUpstreamError) as exc:
                out.append(Preview(study.uid, "park", reason=str(exc)))
                continue
            if current is None:
                out.append(Preview(study.uid, "create"))
                continue
            changes = tuple(changed_paths(current, resource))
            out.append(Preview(study.uid, "update" if changes else "unchanged", changes))
        return out

    async def _run(
        self,
        kind: str,
        pages: AsyncIterator[list[DicomJson]],
        *,
        reconcile: bool = False,
        missing: list[str] | None = None,
    ) -> RunReport:
        """Run one pass over ``pages`` and record it.

        Studies that fail are parked and the pass goes on; an upstream that stays unreachable
        ends the pass with UpstreamUnavailableError after the run is recorded as failed.
        """
        source = self._ctx.source_name
        report = RunReport(await asyncio.to_thread(self._store.start_run, source, kind))
        queries_before = len(self._source.queries)
        writes_before = self._publisher.writes
        started = time.monotonic()
        logger.info("run %d (%s) started for source %s", report.run_id, kind, source)
        try:
            self._publisher.begin_run()
            endpoint = await self._publisher.ensure_endpoint()
            limit = asyncio.Semaphore(self._concurrency)
            async for page in pages:
                uids = await self._page(page, endpoint, limit, report)
                if reconcile:
                    await asyncio.to_thread(self._store.mark_seen, source, uids, report.run_id)
                if self._stop_requested:
                    break
            if self._stop_requested:
                report.status = "stopped"
            else:
                if reconcile:
                    gone = await asyncio.to_thread(self._store.unseen_studies, source, report.run_id)
                    await self._retire(gone, report, guard=True)
                elif missing:
                    known = await asyncio.to_thread(self._store.known_studies, source, missing)
                    await self._retire(list(known.values()), report, guard=False)
                report.status = "parked" if report.counts.parked else "ok"
        except BaseException as exc:
            report.status, report.error = "failed", f"{type(exc).__name__}: {exc}"
            raise
        finally:
            report.add(fhir_writes=self._publisher.writes - writes_before)
            await asyncio.to_thread(
                self._store.finish_run,
                report.run_id,
                status=report.status,
                counts=report.counts,
                qido_queries=self._source.queries[queries_before:],
                error=report.error,
                deletions=report.deletions,
            )
            metrics.observe_run(kind, report.status, report.counts, time.monotonic() - started)
            with contextlib.suppress(BridgeError):  # metrics never fail a run
                newest = await asyncio.to_thread(self._store.newest_published, source)
                metrics.set_lag(report.newest_seen, newest)
                parked = await asyncio.to_thread(self._store.counts, source)
                metrics.PARKED.set(parked["parked"])
            c = report.counts
            logger.info(
                "run %d %s: seen %d, created %d, updated %d, unchanged %d, parked %d, deleted %d, "
                "FHIR writes %d, fallbacks %d",
                report.run_id,
                report.status,
                c.seen,
                c.created,
                c.updated,
                c.unchanged,
                c.parked,
                c.deleted,
                c.fhir_writes,
                c.fallbacks,
            )
        return report

    async def _retire(self, gone: list[KnownStudy], report: RunReport, *, guard: bool) -> None:
        """Apply the delete policy to studies gone from the archive, recording each in the run."""
        if not gone:
            return
        source = self._ctx.source_name
        if guard:
            published = await asyncio.to_thread(self._store.published_count, source)
            if len(gone) > max(1, self._delete_max_fraction * published):
                report.error = (
                    f"{len(gone)} of {published} published studies are missing from the archive, "
                    "more than BRIDGE_DELETE_MAX_FRACTION allows: no delete applied (check the "
                    "archive; raise the setting if this is intended)"
                )
                logger.error("run %d: %s", report.run_id, report.error)
                return
        for known in gone:
            action, version = await self._publisher.retire_study(known.fhir_id, self._delete_policy)
            await asyncio.to_thread(
                self._store.record_gone,
                source,
                known.study_uid,
                fhir_version=version,
                removed=action in ("deleted", "absent"),
            )
            report.deletions.append({"study_uid": known.study_uid, "action": action})
            report.add(deleted=1)
            logger.info(
                "study %s gone from the archive: ImagingStudy/%s %s", known.study_uid, known.fhir_id, action
            )

    async def _page(
        self, rows: list[DicomJson], endpoint: str, limit: asyncio.Semaphore, report: RunReport
    ) -> list[str]:
        """Sync one page of studies; returns the UIDs on it."""
        studies: list[StudyRecord] = []
        for row in rows:
            report.add(seen=1)
            try:
                study = parse_study(row)
            except MappingError as exc:
                uid = raw_uid(row) or f"unknown:{digest(row)[:16]}"
                await self._park(report, uid, exc)
                continue
            studies.append(study)
            with contextlib.suppress(MappingError):  # a bad date is reported by the mapping
                report.saw(fhir_datetime(study.date, study.time, study.tz_offset, zone=self._ctx.timezone))
        known = await asyncio.to_thread(
            self._store.known_studies, self._ctx.source_name, [s.uid for s in studies]
        )

        page = _PageWork()

        async def one(study: StudyRecord) -> None:
            async with limit:
                await self._study(study, known.get(study.uid), endpoint, report, page)

        try:
            try:
                async with asyncio.TaskGroup() as group:
                    for study in studies:
                        group.create_task(one(study))
            except* BridgeError as failures:
                # The first failure ends the run; the group has cancelled the other studies.
                raise failures.exceptions[0] from None
        finally:
            # One transaction for the page's published studies (even when the run stops here:
            # they are on the FHIR server); claims are released only once they are recorded.
            await asyncio.to_thread(self._store.record_published_many, self._ctx.source_name, page.published)
            for uid in page.claimed:
                await asyncio.to_thread(self._store.release_study, self._ctx.source_name, uid)
        return [s.uid for s in studies]

    async def _study(
        self,
        study: StudyRecord,
        known: KnownStudy | None,
        endpoint: str,
        report: RunReport,
        page: _PageWork,
    ) -> None:
        if self._stop_requested:
            return  # left for the next cycle, untouched
        qido_fingerprint = digest([study.fingerprint(), self._context_fingerprint])
        if known is not None and known.qido_fingerprint == qido_fingerprint:
            report.add(unchanged=1)
            return
        source = self._ctx.source_name
        if self._store.claims_enabled:
            if not await asyncio.to_thread(self._store.claim_study, source, study.uid):
                report.add(claimed=1)  # another replica is publishing it now: not parked, not lost
                logger.info("study %s skipped: claimed by another worker", study.uid)
                return
            page.claimed.append(study.uid)
            # Read again under the claim: another replica may have published it since the page.
            fresh = await asyncio.to_thread(self._store.known_studies, source, [study.uid])
            known = fresh.get(study.uid)
            if known is not None and known.qido_fingerprint == qido_fingerprint:
                report.add(unchanged=1)
                return
        try:
            used: list[str] = []
            resource = await self.build(study, endpoint, used)
            resource_fingerprint = digest(resource)
            if known is not None and known.resource_fingerprint == resource_fingerprint:
                # The archive's answer changed in a way the ImagingStudy does not show.
                fhir_id, version, outcome = known.fhir_id, known.fhir_version, "unchanged"
            else:
                result = await self._publisher.put_study(resource, known.fhir_version if known else None)
                fhir_id, version = result.id, result.version
                outcome = "created" if known is None and result.created else "updated"
                logger.info("study %s %s as ImagingStudy/%s", study.uid, outcome, fhir_id)
            page.published.append(
                Published(
                    study.uid,
                    qido_fingerprint,
                    resource_fingerprint,
                    fhir_id,
                    version,
                    resource.get("started"),
                )
            )
            report.add(**{outcome: 1}, fallbacks=len(used))
            if used:
                logger.warning(
                    "study %s published with fallbacks for: %s", study.uid, ", ".join(sorted(set(used)))
                )
        except (MappingError, FatalUpstreamError) as exc:
            await self._park(report, study.uid, exc)
        except UpstreamUnavailableError as exc:
            # This study's request kept failing: park it, unless that upstream as a whole is down.
            peer = self._publisher if exc.service == "fhir" else self._source
            if not await peer.reachable():
                raise
            await self._park(report, study.uid, exc)

    async def build(self, study: StudyRecord, endpoint: str, used: list[str] | None = None) -> dict[str, Any]:
        """The ImagingStudy for a study, ready to write.

        Series (and, per the settings, instances and one instance header) are fetched, mapped and
        validated; then the order and the Patient are linked, the Patient only once the mapping
        has succeeded, so a bad study never creates a Patient.
        """
        series = await self._source.search_series(study.uid)
        if used is not None:  # the fallbacks the mapping will take, to count and log them
            used.extend(fallbacks(series, self._ctx))
        instances: list[InstanceRecord] = []
        if self._ctx.include_instances:
            instances = await self._source.search_instances(study.uid, limit=self._ctx.max_instances)
            if len(instances) > self._ctx.max_instances:
                logger.info(
                    "study %s has over %d instances: instance detail left out",
                    study.uid,
                    self._ctx.max_instances,
                )
        if self._read_header:
            header = await self._source.instance_header(study.uid, instances[0] if instances else None)
            if header is not None:
                study = with_header(study, header)
        resource = map_imaging_study(
            study,
            series,
            self._ctx,
            subject=_PLACEHOLDER_SUBJECT,
            endpoint_reference=endpoint,
            instances=instances,
        )
        validate(resource)
        based_on = await self._publisher.based_on(study)
        if based_on:
            resource["basedOn"] = based_on
        resource["subject"] = await self._publisher.subject(study)
        return resource

    async def _park(self, report: RunReport, uid: str, exc: Exception) -> None:
        if isinstance(exc, PatientLinkError):
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
