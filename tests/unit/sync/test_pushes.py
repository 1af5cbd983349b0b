"""The push queue: recorded before it is answered, coalesced per study, bounded, drained once."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Mapping
from pathlib import Path

import pytest

from bridge.errors import UpstreamUnavailableError
from bridge.state.store import SqlStore
from bridge.sync.pushes import PushDrainer
from tests.unit.sync.world import World

pytestmark = pytest.mark.anyio

A, B, C = "1.2.826.0.1.3680043.8.498.1", "1.2.826.0.1.3680043.8.498.2", "1.2.826.0.1.3680043.8.498.3"


class Clock:
    def __init__(self) -> None:
        self.now = 1_000_000.0

    def __call__(self) -> float:
        return self.now


class Syncs:
    """A fake sync of every source: records each page it syncs, fails while ``down``.

    A page holding one of ``bad`` fails as a whole (that study's archive query fails), as the
    real worker's run does; ``during``: studies pushed again while their sync runs (by the test).
    """

    def __init__(self) -> None:
        self.pages: list[list[str]] = []
        self.down = False
        self.bad: set[str] = set()
        self.during: list[str] = []
        self.store: SqlStore | None = None
        self.clock: Clock | None = None
        self.waiting_while_synced: list[bool] = []  # whether each study's push was still kept

    @property
    def synced(self) -> list[str]:
        return [uid for page in self.pages for uid in page]

    async def __call__(self, pushed: Mapping[str, float]) -> bool:
        if self.down:
            raise UpstreamUnavailableError("fhir POST / failed after 3 tries", service="fhir")
        if self.bad & set(pushed):
            raise UpstreamUnavailableError("dicomweb GET /studies stalled", service="dicomweb")
        self.pages.append(list(pushed))
        if self.store is not None:
            self.waiting_while_synced += [self.store.push(uid) is not None for uid in pushed]
        for uid in pushed:
            if uid in self.during and self.store is not None and self.clock is not None:
                self.during.remove(uid)
                self.store.queue_push(uid, self.clock.now + 0.5, 100)
        return True


class Reachable:
    """Whether the fake upstreams answer; counts the questions."""

    def __init__(self, answer: bool = True) -> None:
        self.answer = answer
        self.asked = 0

    async def __call__(self) -> bool:
        self.asked += 1
        return self.answer


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


def _uids(n: int) -> list[str]:
    return [f"1.2.826.0.1.3680043.8.498.{1000 + i}" for i in range(n)]


async def test_a_burst_is_drained_a_page_at_a_time_oldest_first(store: SqlStore) -> None:
    clock, syncs = Clock(), Syncs()
    burst = _uids(250)
    for i, uid in enumerate(burst):
        store.queue_push(uid, clock.now + i, 1000)
    drainer = PushDrainer(store, syncs, page=100, clock=lambda: clock.now + 1000)
    assert await drainer.drain() == 250
    assert [len(p) for p in syncs.pages] == [100, 100, 50]  # three syncs, not 250
    assert syncs.synced == burst  # oldest first
    assert store.push_queue() == (0, None)


async def test_a_push_is_forgotten_only_after_its_sync_returned_and_a_crash_midway_keeps_the_page(
    store: SqlStore,
) -> None:
    clock, syncs = Clock(), Syncs()
    syncs.store = store
    for uid in (A, B, C):
        store.queue_push(uid, clock.now, 100)
    assert await PushDrainer(store, syncs, clock=clock).drain() == 3
    assert syncs.waiting_while_synced == [True, True, True]  # kept until the sync had recorded them

    for uid in (A, B):
        store.queue_push(uid, clock.now, 100)

    async def crash(pushed: Mapping[str, float]) -> bool:
        raise RuntimeError("the process dies mid-page")

    with pytest.raises(RuntimeError):
        await PushDrainer(store, crash, clock=clock).drain()
    assert store.push_queue()[0] == 2  # nothing of the page was forgotten
    assert store.push(A) == (clock.now, clock.now, 0)  # and it was not counted as a failed try


async def test_one_bad_study_of_a_page_waits_alone_and_the_others_are_done(store: SqlStore) -> None:
    clock, syncs, reachable = Clock(), Syncs(), Reachable(True)
    burst = _uids(10)
    for uid in burst:
        store.queue_push(uid, clock.now, 100)
    syncs.bad = {burst[3]}
    drainer = PushDrainer(store, syncs, reachable=reachable, clock=clock)
    assert await drainer.drain() == 9
    assert reachable.asked == 1  # the page failed with both upstreams answering: study by study
    assert sorted(syncs.synced) == sorted(burst[:3] + burst[4:])
    assert store.push_queue()[0] == 1
    received, _, tries = store.push(burst[3]) or (0.0, 0.0, 0)
    assert (received, tries) == (clock.now, 1)
    assert await drainer.drain() == 0  # backing off: the bad study is not tried again at once
    syncs.bad = set()
    clock.now += 60.0
    assert await drainer.drain() == 1
    assert store.push_queue() == (0, None)


async def test_a_page_failing_in_an_outage_waits_whole_without_a_try_per_study(store: SqlStore) -> None:
    clock, syncs, reachable = Clock(), Syncs(), Reachable(False)
    for uid in _uids(10):
        store.queue_push(uid, clock.now, 100)
    syncs.bad = {_uids(10)[0]}  # the page fails, and the archive does not answer at all
    calls = 0

    async def counted(pushed: Mapping[str, float]) -> bool:
        nonlocal calls
        calls += 1
        return await syncs(pushed)

    assert await PushDrainer(store, counted, reachable=reachable, clock=clock).drain() == 0
    assert (calls, reachable.asked) == (1, 1)
    assert store.push_queue()[0] == 10
    assert {(store.push(u) or (0, 0, 0))[2] for u in _uids(10)} == {1}  # each one failed try


class SharedClaims:
    """The store as a replica sees it: claims held in a set shared by the replicas (as PostgreSQL's)."""

    def __init__(self, store: SqlStore, held: set[str]) -> None:
        self._store = store
        self._held = held

    def __getattr__(self, name: str) -> object:
        return getattr(self._store, name)

    def claim_study(self, source: str, study_uid: str) -> bool:
        time.sleep(0.002)  # a claim is a round trip to PostgreSQL: the other replica moves meanwhile
        if study_uid in self._held:
            return False
        self._held.add(study_uid)
        return True

    def release_study(self, source: str, study_uid: str) -> None:
        self._held.discard(study_uid)


async def test_two_replicas_draining_at_once_share_the_page_and_sync_each_study_once(
    store: SqlStore,
) -> None:
    clock, one, two = Clock(), Syncs(), Syncs()
    burst = _uids(40)
    for uid in burst:
        store.queue_push(uid, clock.now, 100)
    held: set[str] = set()
    first = PushDrainer(SharedClaims(store, held), one, clock=clock)  # type: ignore[arg-type]
    second = PushDrainer(SharedClaims(store, held), two, clock=clock)  # type: ignore[arg-type]
    done = await asyncio.gather(first.drain(), second.drain())
    assert sum(done) == 40 and all(done)
    assert sorted(one.synced + two.synced) == sorted(burst)  # each study once, by one of them
    assert store.push_queue() == (0, None)
    assert held == set()  # every claim released


async def test_a_burst_of_pushes_costs_page_batched_requests_through_the_real_worker(
    world: World, store: SqlStore
) -> None:
    world.source.page_size = 100
    world.source.list_matching = True
    world.fhir.batches = True
    uids = [world.add(n) for n in range(1, 41)]
    clock = Clock()
    for uid in uids:
        store.queue_push(uid, clock.now, 100)

    async def sync(pushed: Mapping[str, float]) -> bool:
        report = await world.worker(concurrency=3).run_studies(list(pushed), kind="push", per_page=100)
        return report.status != "failed"

    assert await PushDrainer(store, sync, page=100, clock=clock).drain() == 40
    assert len(world.fhir.of_type("ImagingStudy")) == 40
    assert world.source.series_calls == []  # the page's series in one list query
    assert len(world.source.list_calls) == 1
    batches = [c for c in world.fhir.calls if c[0] == "batch"]
    assert len(batches) == 3  # the Patients looked up, the Patients written, the studies written
    assert world.fhir.batch_sizes == [80, 40, 40]
    assert store.push_queue() == (0, None)


async def test_a_stop_while_a_page_syncs_ends_the_drainer_once_the_page_is_done(store: SqlStore) -> None:
    clock, entered, release = Clock(), asyncio.Event(), asyncio.Event()
    synced: list[str] = []

    async def slow(pushed: Mapping[str, float]) -> bool:
        entered.set()
        await release.wait()
        synced.extend(pushed)
        return True

    store.queue_push(A, clock.now, 100)
    drainer = PushDrainer(store, slow, poll=3600, clock=clock)
    drainer.start()
    await asyncio.wait_for(entered.wait(), 10)
    stopping = asyncio.ensure_future(drainer.stop())
    await asyncio.sleep(0.05)
    release.set()
    await asyncio.wait_for(stopping, 10)  # not left waiting for the next poll, an hour away
    assert synced == [A]
    assert store.push_queue() == (0, None)  # the page in flight was finished and forgotten
