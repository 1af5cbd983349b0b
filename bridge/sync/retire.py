"""Studies gone from the archive: the delete policy, behind a guard against mass deletes."""

from __future__ import annotations

import asyncio
import logging

from bridge.mapping.context import MappingContext
from bridge.state.records import KnownStudy
from bridge.sync.policy import DeletePolicy
from bridge.sync.protocols import StateStore
from bridge.sync.publisher import Publisher
from bridge.sync.report import RunReport

logger = logging.getLogger(__name__)


class Retirer:
    """Applies the delete policy to the ImagingStudies of studies the archive no longer has."""

    def __init__(
        self,
        publisher: Publisher,
        store: StateStore,
        ctx: MappingContext,
        *,
        policy: DeletePolicy,
        max_fraction: float,
    ) -> None:
        self._publisher = publisher
        self._store = store
        self._ctx = ctx
        self._policy = policy
        self._max_fraction = max_fraction

    async def retire(self, gone: list[KnownStudy], report: RunReport, *, guard: bool) -> None:
        """Apply the delete policy to studies gone from the archive, recording each in the run."""
        if not gone:
            return
        source = self._ctx.source_name
        if guard:
            published = await asyncio.to_thread(self._store.published_count, source)
            if len(gone) > max(1, self._max_fraction * published):
                report.error = (
                    f"{len(gone)} of {published} published studies are missing from the archive, "
                    "more than BRIDGE_DELETE_MAX_FRACTION allows: no delete applied (check the "
                    "archive; raise the setting if this is intended)"
                )
                logger.error("run %d: %s", report.run_id, report.error)
                return
        for known in gone:
            action, version = await self._publisher.retire_study(known.fhir_id, self._policy)
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
