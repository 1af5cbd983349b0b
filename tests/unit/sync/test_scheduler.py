"""The scheduler's incremental cycle: the changes first, then the Patient merges to follow."""

from __future__ import annotations

from typing import Any

import pytest

from bridge.errors import UpstreamUnavailableError
from bridge.sync.scheduler import SyncScheduler

pytestmark = pytest.mark.anyio


class Worker:
    stopping = False

    def __init__(self) -> None:
        self.calls: list[str] = []

    async def follow_merges(self) -> None:
        self.calls.append("follow_merges")


class Changes:
    def __init__(self, worker: Worker, fail: bool = False) -> None:
        self.worker, self.fail = worker, fail

    async def poll(self, worker: Any) -> None:
        assert worker is self.worker
        worker.calls.append("poll")
        if self.fail:
            raise UpstreamUnavailableError("the archive is down", service="dicomweb")


def scheduler(worker: Worker, changes: Changes) -> SyncScheduler:
    return SyncScheduler(
        worker,  # type: ignore[arg-type]
        changes,  # type: ignore[arg-type]
        store=None,  # type: ignore[arg-type]
        source="s",
        incremental=None,
        reconcile=None,
    )


async def test_an_incremental_cycle_polls_the_changes_then_follows_merges() -> None:
    worker = Worker()
    cycles = scheduler(worker, Changes(worker))
    await cycles.incremental()
    assert worker.calls == ["poll", "follow_merges"] and cycles.cycles == 1


async def test_a_failed_poll_leaves_the_merges_to_the_next_cycle() -> None:
    worker = Worker()
    cycles = scheduler(worker, Changes(worker, fail=True))
    await cycles.incremental()  # logged, not raised: the next cycle tries again
    assert worker.calls == ["poll"] and cycles.cycles == 1
