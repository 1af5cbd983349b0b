"""The push queue: recorded before it is answered, coalesced per study, bounded, drained once."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from bridge.errors import UpstreamUnavailableError
from bridge.state.store import SqlStore
from bridge.sync.pushes import PushDrainer

pytestmark = pytest.mark.anyio

A, B, C = "1.2.826.0.1.3680043.8.498.1", "1.2.826.0.1.3680043.8.498.2", "1.2.826.0.1.3680043.8.498.3"


class Clock:
    def __init__(self) -> None:
        self.now = 1_000_000.0

    def __call__(self) -> float:
        return self.now


class Syncs:
    """A fake sync of every source: records each study, fails while ``down``."""

    def __init__(self) -> None:
        self.synced: list[str] = []
        self.down = False
        self.during: list[str] = []  # studies pushed again while their sync runs (by the test)
        self.store: SqlStore | None = None
        self.clock: Clock | None = None

    async def __call__(self, study_uid: str, received: float) -> bool:
        if self.down:
            raise UpstreamUnavailableError("fhir POST / failed after 3 tries", service="fhir")
        self.synced.append(study_uid)
        if study_uid in self.during and self.store is not None and self.clock is not None:
            self.during.remove(study_uid)
            self.store.queue_push(study_uid, self.clock.now + 0.5, 100)
        return True


def test_pushes_of_a_waiting_study_coalesce_and_a_full_queue_refuses(store: SqlStore) -> None:
    assert store.queue_push(A, 1.0, max_queued=2) == "queued"
    assert store.queue_push(A, 2.0, max_queued=2) == "coalesced"
    assert store.queue_push(B, 3.0, max_queued=2) == "queued"
    assert store.queue_push(C, 4.0, max_queued=2) is None  # full: 429 for the caller
    assert store.queue_push(A, 5.0, max_queued=2) == "coalesced"  # a waiting study still joins
    assert store.push_queue() == (2, 1.0)


async def test_the_drain_syncs_each_waiting_study_once_and_forgets_it(store: SqlStore) -> None:
    clock, syncs = Clock(), Syncs()
    for uid in (A, A, B, A):
        store.queue_push(uid, clock.now, 100)
    drainer = PushDrainer(store, syncs, clock=clock)
    assert await drainer.drain() == 2
    assert sorted(syncs.synced) == [A, B]
    assert store.push_queue() == (0, None)


async def test_a_push_recorded_before_a_crash_is_done_by_the_next_process(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'state.db'}"
    first = SqlStore(url)
    first.queue_push(A, 1.0, 100)  # accepted (202), then the process dies before any sync
    first.close()
    second, syncs = SqlStore(url), Syncs()
    try:
        assert await PushDrainer(second, syncs, clock=Clock()).drain() == 1
        assert syncs.synced == [A]
        assert second.push_queue() == (0, None)
    finally:
        second.close()


async def test_a_push_during_an_outage_waits_and_is_done_after_it(store: SqlStore) -> None:
    clock, syncs = Clock(), Syncs()
    store.queue_push(A, clock.now, 100)
    drainer = PushDrainer(store, syncs, clock=clock)
    syncs.down = True
    assert await drainer.drain() == 0
    assert store.push(A) == (clock.now, clock.now, 1)  # kept, one failed try
    assert await drainer.drain() == 0  # backing off: not tried again at once
    clock.now += 1.0
    assert await drainer.drain() == 0
    syncs.down = False
    clock.now += 60.0
    assert await drainer.drain() == 1
    assert syncs.synced == [A]
    assert store.push_queue() == (0, None)


async def test_a_study_pushed_again_while_it_syncs_is_synced_again(store: SqlStore) -> None:
    clock, syncs = Clock(), Syncs()
    syncs.store, syncs.clock = store, clock
    syncs.during = [A]
    store.queue_push(A, clock.now, 100)
    drainer = PushDrainer(store, syncs, clock=clock)
    await drainer.drain()
    assert syncs.synced == [A, A]  # the push that came during the first sync got its own
    assert store.push_queue() == (0, None)


async def test_the_drainer_takes_a_push_at_once_when_woken(store: SqlStore) -> None:
    clock, syncs = Clock(), Syncs()
    drainer = PushDrainer(store, syncs, poll=3600, clock=clock)
    drainer.start()
    try:
        await asyncio.sleep(0.05)
        store.queue_push(A, clock.now, 100)
        drainer.wake()
        for _ in range(100):
            if syncs.synced:
                break
            await asyncio.sleep(0.02)
        assert syncs.synced == [A]
    finally:
        await drainer.stop()
