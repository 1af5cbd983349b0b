"""The pipeline's write step: what a run changes on the FHIR server and in the store.

Everything before it (select, fetch, link, map, validate) only reads; a real run writes here
(:class:`Publish`), a dry run shows here what it would write (bridge/sync/preview.py).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from typing import Any, Protocol

from bridge.errors import (
    BridgeError,
    FatalUpstreamError,
    MappingError,
    PatientConflictError,
    PatientLinkError,
    RejectedResourceError,
)
from bridge.mapping.context import MappingContext
from bridge.mapping.identity import subject_patient_id
from bridge.state.records import KnownStudy, Published
from bridge.sync.bundles import StudyWrite
from bridge.sync.identity import CONFLICT_CODE, CONFLICT_REASON, identity_digest
from bridge.sync.protocols import StateStore
from bridge.sync.publisher import Publisher
from bridge.sync.report import SHOWN_AS_PROGRESS, ParkedReport, RunReport
from bridge.sync.retire import Retirer
from bridge.sync.run import PageWork, StudyWork, content_fingerprint

logger = logging.getLogger(__name__)

# How the pipeline handles a study's failure: park it, or end the run (an unreachable peer).
Fail = Callable[[RunReport, str, BridgeError], Awaitable[None]]


class WriteStep(Protocol):
    """What the pipeline asks of its write step; the real one and the dry run's differ only here."""

    @property
    def claims(self) -> bool:
        """Whether studies are claimed before they are worked on (several replicas share the store)."""

    async def endpoint(self) -> str:
        """The reference to the source's Endpoint (written first if it changed)."""

    async def claim(self, study_uid: str) -> bool:
        """Claim a study for this run; False when another replica holds it."""

    async def park(self, report: RunReport, study_uid: str, exc: Exception) -> None:
        """Park a study with its reason."""

    async def withdraw(self, study_uid: str, known: KnownStudy) -> None:
        """Withdraw a published study from clinicians: its archive rows name several patients."""

    def unchanged_row(self, study_uid: str) -> None:
        """A study whose archive row did not change since it was published: nothing to do."""

    def unchanged(self, item: StudyWork, resource: dict[str, Any], report: RunReport, page: PageWork) -> None:
        """A study whose ImagingStudy did not change: recorded, not written."""

    async def write_page(self, page: PageWork, report: RunReport, seen: list[str], fail: Fail) -> None:
        """Write a page's mapped and validated studies; ``fail`` handles a study's failure."""

    async def finish_page(self, page: PageWork) -> None:
        """Record what the page published and release its claims."""

    async def retire(self, gone: list[KnownStudy], report: RunReport, *, guard: bool) -> None:
        """Apply the delete policy to published studies the archive no longer has."""


def park_kind(exc: Exception) -> str:
    """The kind of a parked study's failure, as `bridge status` and the run record show it."""
    if isinstance(exc, PatientConflictError):
        return "identity"
    if isinstance(exc, PatientLinkError):
        return "patient"
    if isinstance(exc, MappingError):
        return "mapping"
    if isinstance(exc, RejectedResourceError):
        return "rejected"
    return "upstream"


def note_parked(report: RunReport, study_uid: str, exc: Exception) -> ParkedReport:
    """Count and log a parked study in the run's report; returns what was noted."""
    parked = ParkedReport(study_uid, park_kind(exc), getattr(exc, "attribute", None), str(exc))
    report.add(parked=1)
    report.parked.append(parked)
    attribute = f", {parked.attribute}" if parked.attribute else ""
    logger.warning("study %s parked (%s%s)", study_uid, parked.kind, attribute)
    return parked


class Publish:
    """The real write step: ImagingStudies and Observations to the FHIR server, outcomes to the store."""

    def __init__(
        self, publisher: Publisher, store: StateStore, ctx: MappingContext, retirer: Retirer
    ) -> None:
        self._publisher = publisher
        self._store = store
        self._source = ctx.source_name
        self._retirer = retirer

    @property
    def claims(self) -> bool:
        """Whether the store shares studies among replicas by claims."""
        return self._store.claims_enabled

    async def endpoint(self) -> str:
        """Publish the source's Endpoint if it changed; the reference to it."""
        return await self._publisher.ensure_endpoint()

    async def claim(self, study_uid: str) -> bool:
        """Claim the study in the store (released once it is recorded)."""
        return await asyncio.to_thread(self._store.claim_study, self._source, study_uid)

    async def park(self, report: RunReport, study_uid: str, exc: Exception) -> None:
        """Park the study in the store, to be retried, and in the run's report."""
        kind, attribute = park_kind(exc), getattr(exc, "attribute", None)
        await asyncio.to_thread(
            self._store.park, self._source, study_uid, kind=kind, reason=str(exc), attribute=attribute
        )
        note_parked(report, study_uid, exc)

    async def withdraw(self, study_uid: str, known: KnownStudy) -> None:
        """Add the withdrawal extension to the published ImagingStudy; the store remembers it.

        The study keeps its subject: only the bridge's withdrawal extension is added (every API
        replica then refuses it, bridge/resolve/links.py) until the archive is corrected.
        """
        try:
            version = await self._publisher.withdraw_study(known.fhir_id, CONFLICT_CODE)
        except FatalUpstreamError as exc:
            # The study stays parked and its newcomer row keeps it in every run's work: the
            # withdrawal is tried again next run. (An unreachable FHIR server ends the run.)
            logger.error(
                "study %s: withdrawing its ImagingStudy failed, tried again next run: %s", study_uid, exc
            )
            return
        await asyncio.to_thread(
            self._store.withdraw, self._source, study_uid, reason=CONFLICT_REASON, fhir_version=version
        )
        logger.warning("study %s withdrawn from clinicians: %s", study_uid, CONFLICT_REASON)

    def unchanged_row(self, study_uid: str) -> None:
        """Nothing to write or record: the store holds the study as it is."""

    def unchanged(self, item: StudyWork, resource: dict[str, Any], report: RunReport, page: PageWork) -> None:
        """The archive's answer changed in a way the ImagingStudy does not show: recorded, not written."""
        known = item.known
        assert known is not None
        self._published(item, known.fhir_id, known.fhir_version, "unchanged", report, page, resource)

    async def write_page(self, page: PageWork, report: RunReport, seen: list[str], fail: Fail) -> None:
        """Write a prepared page's ImagingStudies (in batches where the server takes them), record them.

        Then, in a reconciling run, mark the page's studies (``seen``) as seen by the run.
        """
        try:
            if not page.writes:
                return
            writes = page.writes
            results = await self._publisher.put_studies(  # each study's dose Observations with it
                [
                    StudyWrite(t.resource, t.known.fhir_version if t.known else None, t.observations)
                    for t in writes
                    if t.resource
                ]
            )
            for item, result in zip(writes, results, strict=True):
                if isinstance(result, BridgeError):  # retried whole: the writes are idempotent
                    await fail(report, item.study.uid, result)
                    continue
                # Created: the study had no ImagingStudy before. The server's 201 says so; with no
                # record of the study, a first version says so too (servers that answer 200 to a
                # PUT that creates); anything else updated one that was there.
                created = result.created or (item.known is None and self._publisher.created(result))
                outcome = "created" if created else "updated"
                shown = SHOWN_AS_PROGRESS
                logger.info("study %s %s as ImagingStudy/%s", item.study.uid, outcome, result.id, extra=shown)
                self._published(item, result.id, result.version, outcome, report, page)
        finally:
            await self.finish_page(page)
            if seen:
                await asyncio.to_thread(self._store.mark_seen, self._source, seen, report.run_id)

    async def finish_page(self, page: PageWork) -> None:
        """Record the page's published studies and release its claims.

        One transaction for the page (even when the run stops or fails here: what is published
        is on the FHIR server); claims are released only once their studies are recorded.
        """
        await asyncio.to_thread(self._store.record_published_many, self._source, page.published)
        page.published = []
        for uid in page.claimed:
            await asyncio.to_thread(self._store.release_study, self._source, uid)
        page.claimed = []

    async def retire(self, gone: list[KnownStudy], report: RunReport, *, guard: bool) -> None:
        """Apply the delete policy (behind its guard against mass deletes in a reconciling run)."""
        await self._retirer.retire(gone, report, guard=guard)

    def _published(
        self,
        item: StudyWork,
        fhir_id: str,
        version: str | None,
        outcome: str,
        report: RunReport,
        page: PageWork,
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
