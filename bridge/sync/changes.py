"""Change sources: how an incremental cycle finds what changed in the archive.

QIDO-RS has no change feed, so the default source polls a window of recent StudyDates (late
arrivals into older studies and deletes are left to the periodic reconciliation sweep). Where the
archive has a feed, a :class:`FeedChangeSource` follows it with a checkpoint that is saved only
after the studies before it are published. Other feeds (Azure DICOM's change feed, Google Cloud
Pub/Sub notifications) fit in as :class:`ChangeFeed` adapters.
"""

from __future__ import annotations

import asyncio
import logging
from datetime import date, timedelta
from functools import partial
from typing import Protocol

from bridge.dicomweb.results import ChangeBatch
from bridge.sync.freshness import measured
from bridge.sync.protocols import StateStore
from bridge.sync.report import RunReport
from bridge.sync.worker import SyncWorker

logger = logging.getLogger(__name__)


class ChangeSource(Protocol):
    """One incremental cycle's way of finding and syncing what changed."""

    async def poll(self, worker: SyncWorker) -> RunReport:
        """Sync what changed since the last cycle."""
        ...


class ChangeFeed(Protocol):
    """An archive's feed of changed studies, read from a checkpoint."""

    name: str

    async def changes(self, checkpoint: str | None) -> ChangeBatch:
        """Studies changed after ``checkpoint`` (None: start at the feed's current end)."""
        ...


class QidoWindowSource:
    """Polls studies whose StudyDate lies in the last ``days`` days.

    The range is open-ended, so studies dated in the future by a clock or zone error are seen too.
    """

    def __init__(self, days: int, today: type[date] = date) -> None:
        self._days = days
        self._today = today

    def window(self) -> dict[str, str]:
        """The QIDO-RS filter of the window."""
        start = self._today.today() - timedelta(days=self._days)
        return {"StudyDate": f"{start:%Y%m%d}-"}

    async def poll(self, worker: SyncWorker) -> RunReport:
        """Sync the studies in the window."""
        return await worker.run(self.window(), kind="incremental")


class FeedChangeSource:
    """Follows a ChangeFeed; the checkpoint moves only after a batch ended without failure."""

    def __init__(
        self, feed: ChangeFeed, store: StateStore, source: str, max_batches: int = 10, *, per_page: int = 1
    ) -> None:
        self._feed = feed
        self._store = store
        self._source = source
        self._max_batches = max_batches
        self._per_page = per_page  # a batch's studies share pages (one series query, one FHIR batch)

    async def poll(self, worker: SyncWorker) -> RunReport:
        """Sync the studies the feed reports, batch by batch, saving the checkpoint after each."""
        name = self._feed.name
        checkpoint = await asyncio.to_thread(self._store.checkpoint, self._source, name)
        report: RunReport | None = None
        for _ in range(self._max_batches):
            batch = await self._feed.changes(checkpoint)
            if batch.gap is not None:
                report = await self._sweep(worker, batch.gap)
            else:
                changed_at = {
                    uid: batch.changed_at[uid] for uid in batch.study_uids if uid in batch.changed_at
                }
                run = partial(worker.run_studies, batch.study_uids, kind="changes", per_page=self._per_page)
                report = await measured(self._store, self._source, "feed", changed_at, run)
            if report.status not in ("ok", "parked"):
                break  # stopped: the same batch is read again next cycle
            # Parked studies are in the store and retried by reconciliation, so moving on is safe.
            await asyncio.to_thread(self._store.save_checkpoint, self._source, name, batch.checkpoint)
            checkpoint = batch.checkpoint
            if not batch.more:
                break
        assert report is not None
        return report

    async def _sweep(self, worker: SyncWorker, why: str) -> RunReport:
        """Sweep the archive for what a gap in the feed hid: every study, the unchanged ones skipped.

        Which studies changed in the gap cannot be told (QIDO-RS has no arrival time), so the sweep
        covers the archive; fingerprints make it cost reads, not writes. It is not a
        reconciliation: a replaced database may be missing studies, and deletes stay with the
        reconciliation sweep and its safety fraction. The run is recorded with the reason.
        """
        logger.warning("%s; sweeping the archive for what changed meanwhile", why)
        report = await worker.run(kind="feed-gap")
        await asyncio.to_thread(self._store.note_run, report.run_id, why)
        return report
