"""The push queue's drain: studies an archive pushed are synced soon after, once, by one replica.

The API records each accepted push in the state store before it answers (``SqlStore.queue_push``),
so the queue outlives crashes and is the same for every replica. A drainer runs next to the
scheduler (``bridge worker``, ``bridge run``): it takes up to a page of the pushes that are due,
oldest first, claims each study (PostgreSQL advisory locks; every claim succeeds on SQLite, one
process), checks under the claim that the push still waits (another replica may have done it),
syncs the claimed studies together, as one page (one series query, one FHIR batch: a burst drains
at the rate of a full sync), and then forgets each, unless it was pushed again meanwhile. A push is
forgotten only once its sync returned, that is once its study is recorded: a crash before then
leaves it waiting. A sync that fails (an upstream down) leaves the push waiting, tried again after
a back-off that grows to ``MAX_BACKOFF``: a push during an outage is done after the outage. When a
page fails while both upstreams answer, one study is to blame (say, its archive query stalls): the
page is synced again study by study, so that only the bad study waits.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Protocol

from bridge.errors import BridgeError

logger = logging.getLogger(__name__)

# The claim namespace of pushes, apart from each source's per-study claims taken by the sync.
PUSH_CLAIMS = "\x00push"
MAX_BACKOFF = 60.0
_CLAIMS_A_TURN = 10  # claims per store turn: replicas draining at once interleave, hops stay few


class PushStore(Protocol):
    """What the drainer needs of the state store (SqlStore implements it)."""

    def due_pushes(self, now: float, limit: int) -> list[tuple[str, float, float]]:
        """Waiting pushes that may be tried now, oldest first: (study UID, received, requested)."""
        ...

    def pushes(self, study_uids: Sequence[str]) -> dict[str, tuple[float, float, int]]:
        """Waiting pushes' received and requested times and failed tries; those done are left out."""
        ...

    def finish_pushes(self, synced: Sequence[tuple[str, float]]) -> set[str]:
        """Forget synced pushes (study UID, requested at) unless pushed again since; the forgotten."""
        ...

    def defer_push(self, study_uid: str, not_before: float, error: str) -> int:
        """Let a failed push wait until ``not_before``; how many tries have failed."""
        ...

    def claim_study(self, source: str, study_uid: str) -> bool:
        """Claim a study for this process; False if another replica holds it."""
        ...

    def release_study(self, source: str, study_uid: str) -> None:
        """Release a claim taken with claim_study."""
        ...


# Syncs pushed studies (UID -> when it was pushed) together in every source; True when done
# (each synced, parked or in no archive), False when they should be tried again later (an upstream
# failed; a BridgeError raised says the same with its reason).
SyncStudies = Callable[[Mapping[str, float]], Awaitable[bool]]
# Whether every upstream answers at all: asked after a page of pushes failed, to tell an outage
# (every push waits) from one bad study (the page is tried again study by study).
Reachable = Callable[[], Awaitable[bool]]


async def _always() -> bool:
    return True


@dataclass(frozen=True, slots=True)
class _Claimed:
    """A push this drainer holds: its study, when it was first and last pushed, its failed tries."""

    uid: str
    received: float
    requested: float
    tries: int


class PushDrainer:
    """Drains the push queue: every ``poll`` seconds, and at once when :meth:`wake` is called.

    ``page``: how many pushes are claimed and synced together, in one run (its studies are synced
    in pages of the QIDO page size: see ``bridge.runtime.push_drainer``);
    ``concurrency``: how many studies are synced at once when a page is tried study by study.
    """

    def __init__(
        self,
        store: PushStore,
        sync: SyncStudies,
        *,
        reachable: Reachable = _always,
        poll: float = 1.0,
        page: int = 100,
        concurrency: int = 4,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._store = store
        self._sync = sync
        self._reachable = reachable
        self._poll = poll
        self._page = page
        self._concurrency = concurrency
        self._clock = clock
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._stopping = False
        self.done = 0  # pushes synced and forgotten by this drainer

    def wake(self) -> None:
        """Look at the queue now (a push was just accepted in this process)."""
        self._wake.set()

    def start(self) -> None:
        """Drain in the background until :meth:`stop`."""
        self._task = asyncio.create_task(self._loop(), name="push-drainer")

    async def stop(self) -> None:
        """Finish the page in flight, then stop."""
        self._stopping = True
        self._wake.set()
        if self._task is not None:
            await self._task
            self._task = None

    async def _loop(self) -> None:
        while not self._stopping:
            # Cleared before the drain, not after: a wake during the drain (a push it did not
            # list, or stop()) must not be lost while it runs.
            self._wake.clear()
            try:
                await self.drain()
            except BridgeError as exc:  # the store itself failed: logged, tried again next poll
                logger.error("push queue: %s", exc)
            if self._stopping:
                break
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), self._poll)

    async def drain(self) -> int:
        """Sync every push that is due now, a page at a time; returns how many were done."""
        done = 0
        while not self._stopping:
            due = await asyncio.to_thread(self._store.due_pushes, self._clock(), self._page)
            if not due:
                break
            claimed = await self._claim([uid for uid, _, _ in due])
            if not claimed:
                break  # every one held by other replicas: wait for the next poll
            try:
                failed = await self._sync_page(claimed)
                forgotten, again = await self._settle(claimed, failed)
            finally:
                await asyncio.to_thread(self._release_now, [push.uid for push in claimed])
            done += forgotten
            if not forgotten and not again:
                break  # all deferred: wait for the next poll
        self.done += done
        return done

    async def _claim(self, uids: list[str]) -> list[_Claimed]:
        """The pushes of ``uids`` this drainer now holds, read again under their claims.

        Claimed one at a time, each in its own store call, a few calls a turn and in an order of
        this drainer's own, so that replicas draining at the same moment share the page instead of
        one taking it all; then read again in one go (another replica may have done some since
        the list was read). The pushes held come back in the list's order (oldest first).
        """

        def claim_each(chunk: Sequence[str]) -> list[str]:
            return [uid for uid in chunk if self._store.claim_study(PUSH_CLAIMS, uid)]

        order = random.sample(uids, len(uids))  # noqa: S311 - spreading replicas, not a secret
        held: list[str] = []
        try:
            for start in range(0, len(order), _CLAIMS_A_TURN):
                held += await asyncio.to_thread(claim_each, order[start : start + _CLAIMS_A_TURN])
            position = {uid: n for n, uid in enumerate(uids)}
            held.sort(key=position.__getitem__)
            waiting = await asyncio.to_thread(self._store.pushes, held)
        except BaseException:
            await asyncio.to_thread(self._release_now, held)  # the store failed: no claim outlives this
            raise
        if gone := [uid for uid in held if uid not in waiting]:
            await asyncio.to_thread(self._release_now, gone)
        return [_Claimed(uid, *waiting[uid]) for uid in held if uid in waiting]

    def _release_now(self, uids: Sequence[str]) -> None:
        for uid in uids:
            with contextlib.suppress(BridgeError):
                self._store.release_study(PUSH_CLAIMS, uid)

    async def _sync_page(self, claimed: list[_Claimed]) -> dict[str, str]:
        """Sync the claimed studies together; returns the studies whose sync failed, with why."""
        error = await self._attempt({p.uid: p.received for p in claimed})
        if error is None:
            return {}
        if len(claimed) == 1 or not await self._reachable():
            return {p.uid: error for p in claimed}
        logger.warning(
            "a page of %d pushed studies failed while the upstreams answer (%s); syncing them one by one",
            len(claimed),
            error,
        )
        limit = asyncio.Semaphore(self._concurrency)

        async def alone(push: _Claimed) -> str | None:
            async with limit:
                return await self._attempt({push.uid: push.received})

        errors = await asyncio.gather(*(alone(p) for p in claimed))
        return {p.uid: e for p, e in zip(claimed, errors, strict=True) if e is not None}

    async def _attempt(self, pushes: Mapping[str, float]) -> str | None:
        """One sync of ``pushes``: None when done, else why it failed."""
        try:
            return None if await self._sync(pushes) else "a source's sync failed"
        except BridgeError as exc:
            return str(exc)

    async def _settle(self, claimed: list[_Claimed], failed: Mapping[str, str]) -> tuple[int, int]:
        """Forget the synced pushes and defer the failed ones.

        Returns how many were forgotten, and how many were synced but pushed again meanwhile (they
        wait, due at once).
        """
        for push in claimed:
            error = failed.get(push.uid)
            if error is not None:
                wait = min(MAX_BACKOFF, 2.0 ** min(push.tries + 1, 10))
                await asyncio.to_thread(self._store.defer_push, push.uid, self._clock() + wait, error)
                logger.warning("pushed study %s not synced (%s); again in %.0f s", push.uid, error, wait)
        synced = [(push.uid, push.requested) for push in claimed if push.uid not in failed]
        forgotten = await asyncio.to_thread(self._store.finish_pushes, synced)  # one transaction
        return len(forgotten), len(synced) - len(forgotten)
