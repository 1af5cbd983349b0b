"""APScheduler wiring: incremental cycles and reconciliation sweeps, never overlapping."""

from __future__ import annotations

import asyncio
import logging
from datetime import UTC, datetime, timedelta

from apscheduler.schedulers.asyncio import AsyncIOScheduler
from apscheduler.triggers.base import BaseTrigger
from apscheduler.triggers.cron import CronTrigger
from apscheduler.triggers.interval import IntervalTrigger

from bridge.errors import BridgeError
from bridge.sync.changes import ChangeSource
from bridge.sync.protocols import StateStore
from bridge.sync.worker import SyncWorker

logger = logging.getLogger(__name__)


def trigger(interval: float | None, cron: str | None) -> BaseTrigger | None:
    """A cron trigger when ``cron`` is set, else an interval trigger, else None (job disabled)."""
    if cron:
        return CronTrigger.from_crontab(cron, timezone=UTC)
    if interval:
        return IntervalTrigger(seconds=interval, timezone=UTC)
    return None


class SyncScheduler:
    """Runs the worker on schedules; one cycle at a time, missed runs coalesced into one."""

    def __init__(
        self,
        worker: SyncWorker,
        changes: ChangeSource,
        store: StateStore,
        source: str,
        *,
        incremental: BaseTrigger | None,
        reconcile: BaseTrigger | None,
    ) -> None:
        self._worker = worker
        self._changes = changes
        self._store = store
        self._source = source
        self._incremental = incremental
        self._reconcile = reconcile
        self._cycle = asyncio.Lock()  # incremental and reconcile never run at the same time
        self._scheduler: AsyncIOScheduler | None = None
        self.cycles = 0

    async def start(self) -> None:
        """Schedule the jobs; the first sweep runs at once if none ever completed."""
        self._scheduler = AsyncIOScheduler(timezone=UTC)
        now = datetime.now(UTC)
        common = {"max_instances": 1, "coalesce": True, "misfire_grace_time": None}
        if self._reconcile is not None:
            last = await asyncio.to_thread(self._store.last_run, self._source, "reconcile")
            first = now if last is None else None
            self._scheduler.add_job(
                self.reconcile, self._reconcile, id="reconcile", next_run_time=first, **common
            )
        if self._incremental is not None:
            self._scheduler.add_job(
                self.incremental,
                self._incremental,
                id="incremental",
                next_run_time=now + timedelta(seconds=1),
                **common,
            )
        self._scheduler.start()
        logger.info("scheduler started for source %s", self._source)

    async def incremental(self) -> None:
        """One incremental cycle: what changed in the archive, then any Patient merges to follow."""
        await self._guarded("incremental", self._incremental_cycle())

    async def _incremental_cycle(self) -> None:
        await self._changes.poll(self._worker)
        await self._worker.follow_merges()

    async def reconcile(self) -> None:
        """One full reconciliation sweep (late arrivals into old studies, deletes)."""
        await self._guarded("reconcile", self._worker.run(kind="reconcile", reconcile=True))

    async def _guarded(self, name: str, cycle: object) -> None:
        async with self._cycle:
            if self._worker.stopping:
                cycle.close()  # type: ignore[attr-defined]
                return
            try:
                await cycle  # type: ignore[misc]
            except BridgeError as exc:
                # Logged and left for the next cycle; the run record holds the details.
                logger.error("%s cycle failed: %s", name, exc)
            finally:
                self.cycles += 1

    async def shutdown(self) -> None:
        """Stop scheduling, let the cycle in flight finish its current studies, then return."""
        self._worker.request_stop()
        async with self._cycle:  # the cycle in flight ends after its current studies
            pass
        if self._scheduler is not None:
            # Only now: APScheduler's shutdown cancels the jobs still running.
            self._scheduler.shutdown(wait=False)
        logger.info("scheduler stopped")
