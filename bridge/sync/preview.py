"""A dry run's write step: what a sync would write to each study, compared with what the FHIR server holds.

The dry run takes the run's own pipeline (bridge/sync/pipeline.py); only this step differs: it
writes nothing, to the FHIR server or the store, and reports per study what the run would do.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

from bridge.errors import BridgeError
from bridge.state.records import KnownStudy
from bridge.sync.diff import changed_paths
from bridge.sync.publisher import Publisher
from bridge.sync.report import RunReport
from bridge.sync.run import PageWork, StudyWork
from bridge.sync.write import Fail, note_parked

logger = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class Preview:
    """What a sync would do to one study: create, update (with the paths), unchanged, park or retire."""

    study_uid: str
    action: str
    changes: tuple[str, ...] = ()
    reason: str | None = None
    # The ImagingStudy the run would write (create or update), exactly as it would be written.
    resource: dict[str, Any] | None = field(default=None, compare=False, repr=False)


class DryRun:
    """The write step of ``bridge sync --dry-run``: reads the FHIR server, writes nothing, keeps previews."""

    claims = False  # nothing is published, so nothing is claimed from the other replicas

    def __init__(self, publisher: Publisher) -> None:
        self._publisher = publisher
        self.previews: list[Preview] = []

    async def endpoint(self) -> str:
        """The Endpoint reference, without writing the Endpoint."""
        return await self._publisher.endpoint_reference()

    async def claim(self, study_uid: str) -> bool:
        """Never asked: a dry run claims nothing."""
        return True

    async def park(self, report: RunReport, study_uid: str, exc: Exception) -> None:
        """The study would be parked; the store is left as it is."""
        self.previews.append(Preview(study_uid, "park", reason=note_parked(report, study_uid, exc).reason))

    async def withdraw(self, study_uid: str, known: KnownStudy) -> None:
        """A real run would withdraw the published study too; its preview says park, with the reason."""

    def unchanged_row(self, study_uid: str) -> None:
        """The archive's row did not change since the study was published: nothing would be done."""
        self.previews.append(Preview(study_uid, "unchanged"))

    def unchanged(self, item: StudyWork, resource: dict[str, Any], report: RunReport, page: PageWork) -> None:
        """The ImagingStudy would not change."""
        report.add(unchanged=1)
        self.previews.append(Preview(item.study.uid, "unchanged"))

    async def write_page(self, page: PageWork, report: RunReport, seen: list[str], fail: Fail) -> None:
        """Compare each study the run would write with what the FHIR server holds now."""
        for item in page.writes:
            resource = item.resource
            assert resource is not None
            try:
                current = await self._publisher.current_study(resource)
            except BridgeError as exc:
                await fail(report, item.study.uid, exc)
                continue
            if current is None:
                self.previews.append(Preview(item.study.uid, "create", resource=resource))
                continue
            changes = tuple(changed_paths(current, resource))
            action = "update" if changes else "unchanged"
            self.previews.append(Preview(item.study.uid, action, changes, resource=resource))

    async def finish_page(self, page: PageWork) -> None:
        """Nothing to record."""

    async def retire(self, gone: list[KnownStudy], report: RunReport, *, guard: bool) -> None:
        """The published studies the run would retire (a named study the archive no longer has)."""
        self.previews.extend(Preview(known.study_uid, "retire") for known in gone)
