"""One sync pass: discover studies, skip the unchanged, map and publish the rest, record it all."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Mapping
from dataclasses import dataclass, field, replace

from bridge.dicomweb.records import DicomJson, StudyRecord, digest, parse_study, raw_uid
from bridge.errors import (
    FatalUpstreamError,
    MappingError,
    PatientLinkError,
    RejectedResourceError,
    UpstreamUnavailableError,
)
from bridge.mapping.context import MappingContext
from bridge.mapping.imaging_study import map_imaging_study
from bridge.mapping.validate import validate
from bridge.state.store import KnownStudy, RunCounts
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

    def add(self, **deltas: int) -> None:
        """Add to the counts."""
        self.counts = replace(self.counts, **{k: getattr(self.counts, k) + v for k, v in deltas.items()})


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
    ) -> None:
        self._source = source
        self._publisher = publisher
        self._store = store
        self._ctx = ctx
        self._concurrency = concurrency
        self._context_fingerprint = ctx.fingerprint()

    async def run(self, filters: Mapping[str, str] | None = None, kind: str = "full") -> RunReport:
        """One pass over the studies matching ``filters`` (all of them by default).

        Studies that fail are parked and the pass goes on; an upstream that stays unreachable
        ends the pass with UpstreamUnavailableError after the run is recorded as failed.
        """
        source = self._ctx.source_name
        report = RunReport(await asyncio.to_thread(self._store.start_run, source, kind))
        queries_before = len(self._source.queries)
        writes_before = self._publisher.writes
        logger.info("run %d started for source %s", report.run_id, source)
        try:
            endpoint = await self._publisher.ensure_endpoint()
            limit = asyncio.Semaphore(self._concurrency)
            async for page in self._source.iter_studies(filters):
                await self._page(page, endpoint, limit, report)
            report.status = "parked" if report.counts.parked else "ok"
        except UpstreamUnavailableError as exc:
            report.status, report.error = "failed", str(exc)
            raise
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
            )
            c = report.counts
            logger.info(
                "run %d %s: seen %d, created %d, updated %d, unchanged %d, parked %d, FHIR writes %d",
                report.run_id,
                report.status,
                c.seen,
                c.created,
                c.updated,
                c.unchanged,
                c.parked,
                c.fhir_writes,
            )
        return report

    async def _page(
        self, rows: list[DicomJson], endpoint: str, limit: asyncio.Semaphore, report: RunReport
    ) -> None:
        studies: list[StudyRecord] = []
        for row in rows:
            report.add(seen=1)
            try:
                studies.append(parse_study(row))
            except MappingError as exc:
                uid = raw_uid(row) or f"unknown:{digest(row)[:16]}"
                await self._park(report, uid, exc)
        known = await asyncio.to_thread(
            self._store.known_studies, self._ctx.source_name, [s.uid for s in studies]
        )

        async def one(study: StudyRecord) -> None:
            async with limit:
                await self._study(study, known.get(study.uid), endpoint, report)

        async with asyncio.TaskGroup() as group:
            for study in studies:
                group.create_task(one(study))

    async def _study(
        self, study: StudyRecord, known: KnownStudy | None, endpoint: str, report: RunReport
    ) -> None:
        qido_fingerprint = digest([study.fingerprint(), self._context_fingerprint])
        if known is not None and known.qido_fingerprint == qido_fingerprint:
            report.add(unchanged=1)
            return
        try:
            series = await self._source.search_series(study.uid)
            resource = map_imaging_study(
                study, series, self._ctx, subject=_PLACEHOLDER_SUBJECT, endpoint_reference=endpoint
            )
            validate(resource)
            resource["subject"] = await self._publisher.subject(study)
            resource_fingerprint = digest(resource)
            if known is not None and known.resource_fingerprint == resource_fingerprint:
                # The archive's answer changed in a way the ImagingStudy does not show.
                fhir_id, version, outcome = known.fhir_id, known.fhir_version, "unchanged"
            else:
                result = await self._publisher.put_study(resource, known.fhir_version if known else None)
                fhir_id, version = result.id, result.version
                outcome = "created" if known is None and result.created else "updated"
                logger.info("study %s %s as ImagingStudy/%s", study.uid, outcome, fhir_id)
            await asyncio.to_thread(
                self._store.record_published,
                self._ctx.source_name,
                study.uid,
                qido_fingerprint=qido_fingerprint,
                resource_fingerprint=resource_fingerprint,
                fhir_id=fhir_id,
                fhir_version=version,
            )
            report.add(**{outcome: 1})
        except (MappingError, FatalUpstreamError) as exc:
            await self._park(report, study.uid, exc)

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
