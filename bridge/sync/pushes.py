"""The push queue's drain: studies an archive pushed are synced soon after, once, by one replica.

The API records each accepted push in the state store before it answers (``SqlStore.queue_push``),
so the queue outlives crashes and is the same for every replica. A drainer runs next to the
scheduler (``bridge worker``, ``bridge run``): it takes the pushes that are due, oldest first,
claims each study (PostgreSQL advisory locks; every claim succeeds on SQLite, one process), checks
under the claim that the push still waits (another replica may have done it), syncs it, and then
forgets it, unless it was pushed again meanwhile. A sync that fails (an upstream down) leaves the
push waiting, tried again after a back-off that grows to ``MAX_BACKOFF``: a push during an outage is
done after the outage.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Protocol

from bridge.errors import BridgeError

logger = logging.getLogger(__name__)

# The claim namespace of pushes, apart from each source's per-study claims taken by the sync.
PUSH_CLAIMS = "\x00push"
MAX_BACKOFF = 60.0


class PushStore(Protocol):
    """What the drainer needs of the state store (SqlStore implements it)."""

    def due_pushes(self, now: float, limit: int) -> list[tuple[str, float, float]]:
        """Waiting pushes that may be tried now, oldest first: (study UID, received, requested)."""
        ...

    def push(self, study_uid: str) -> tuple[float, float, int] | None:
        """A waiting push's received and requested times and failed tries, or None once it is done."""
        ...

    def finish_push(self, study_uid: str, requested_at: float) -> bool:
        """Forget a synced push unless it was pushed again after ``requested_at``."""
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


# Syncs one study in every source; True when done (synced, parked or not in any archive), False
# when it should be tried again later (an upstream failed). ``received`` is when it was pushed.
SyncStudy = Callable[[str, float], Awaitable[bool]]


class PushDrainer:
    """Drains the push queue: every ``poll`` seconds, and at once when :meth:`wake` is called."""

    def __init__(
        self,
        store: PushStore,
        sync: SyncStudy,
        *,
        poll: float = 1.0,
        concurrency: int = 4,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._store = store
        self._sync = sync
        self._poll = poll
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
        """Finish the syncs in flight, then stop."""
        self._stopping = True
        self._wake.set()
        if self._task is not None:
            await self._task
            self._task = None

    async def _loop(self) -> None:
        while not self._stopping:
            try:
                await self.drain()
            except BridgeError as exc:  # the store itself failed: logged, tried again next poll
                logger.error("push queue: %s", exc)
            self._wake.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), self._poll)

    async def drain(self) -> int:
        """Sync every push that is due now; returns how many were done."""
        done = 0
        limit = asyncio.Semaphore(self._concurrency)

        async def one(uid: str) -> str:
            async with limit:
                return await self._one(uid)

        while not self._stopping:
            due = await asyncio.to_thread(self._store.due_pushes, self._clock(), self._concurrency * 4)
            if not due:
                break
            results = await asyncio.gather(*(one(uid) for uid, _, _ in due))
            done += results.count("done")
            if "done" not in results and "again" not in results:
                break  # all deferred or held by other replicas: wait for the next poll
        self.done += done
        return done

    async def _one(self, study_uid: str) -> str:
        """Sync one pushed study under its claim.

        Returns ``done`` (synced and forgotten), ``again`` (synced, but pushed again meanwhile),
        ``deferred`` (its sync failed) or ``held`` (another replica has it, or had it done).
        """
        if not await asyncio.to_thread(self._store.claim_study, PUSH_CLAIMS, study_uid):
            return "held"
        try:
            # Read again under the claim: another replica may have done it since the list was read.
            waiting = await asyncio.to_thread(self._store.push, study_uid)
            if waiting is None:
                return "held"
            received, requested, tries = waiting
            try:
                ok = await self._sync(study_uid, received)
                error = "" if ok else "a source's sync failed"
            except BridgeError as exc:
                ok, error = False, str(exc)
            if not ok:
                wait = min(MAX_BACKOFF, 2.0 ** min(tries + 1, 10))
                await asyncio.to_thread(self._store.defer_push, study_uid, self._clock() + wait, error)
                logger.warning("pushed study %s not synced (%s); again in %.0f s", study_uid, error, wait)
                return "deferred"
            forgotten = await asyncio.to_thread(self._store.finish_push, study_uid, requested)
            return "done" if forgotten else "again"
        finally:
            await asyncio.to_thread(self._store.release_study, PUSH_CLAIMS, study_uid)
