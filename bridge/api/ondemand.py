"""On-demand sync guard: one run per study at a time, shared by every caller, and a rate per client."""

from __future__ import annotations

import asyncio
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from typing import Generic, TypeVar

from bridge.api.errors import RateLimitedError

T = TypeVar("T")

MAX_CLIENTS = 10_000  # buckets kept; the least recently seen client is forgotten first


class OnDemandGate(Generic[T]):
    """Coalesces concurrent syncs of the same study and limits how many syncs each client starts.

    A client has a bucket of ``per_minute`` tokens refilled continuously; a sync joined (another
    caller's run of the same study) costs nothing, since it starts no work.
    """

    def __init__(self, per_minute: int, clock: Callable[[], float] = time.monotonic) -> None:
        self.per_minute = per_minute
        self._clock = clock
        self._running: dict[str, asyncio.Future[T]] = {}
        self._buckets: OrderedDict[str, tuple[float, float]] = OrderedDict()
        self.started = 0  # runs started, for tests and metrics

    def _take(self, client: str) -> None:
        now = self._clock()
        rate = self.per_minute / 60.0
        tokens, last = self._buckets.pop(client, (float(self.per_minute), now))
        tokens = min(float(self.per_minute), tokens + (now - last) * rate)
        if tokens < 1.0:
            self._buckets[client] = (tokens, now)
            raise RateLimitedError(
                f"too many on-demand syncs from this client (BRIDGE_API_SYNC_RATE is {self.per_minute} "
                "a minute)",
                retry_after=(1.0 - tokens) / rate,
            )
        self._buckets[client] = (tokens - 1.0, now)
        while len(self._buckets) > MAX_CLIENTS:
            self._buckets.popitem(last=False)

    async def run(self, study_uid: str, client: str, start: Callable[[], Awaitable[T]]) -> T:
        """The result of the study's sync: the one running now, or a new one if the client may start it."""
        running = self._running.get(study_uid)
        if running is None:
            self._take(client)
            self.started += 1
            running = asyncio.ensure_future(start())
            self._running[study_uid] = running
            running.add_done_callback(lambda _: self._running.pop(study_uid, None))
        # shielded: a caller that goes away does not cancel the run the others wait for
        return await asyncio.shield(running)
