"""The access audit trail: accesses recorded on the request path in memory, written off it.

``record`` only appends to a list (a request never waits for the audit); one background task, run
in the app's lifespan, moves what was recorded into the state store and from there writes it to
the FHIR server in batches, deleting each AuditEvent from the store only once the server has it.
While the FHIR server is down the events wait in the store, across restarts; each has a fixed id
and is written with PUT, so a batch whose answer was lost is written again without a duplicate.
One caller's repeated accesses to one study within the window are one event (an image viewer
fetches hundreds of frames a minute).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections import OrderedDict
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any

import anyio.to_thread

from bridge.audit.events import Access, WindowKey, audit_event, log_line
from bridge.config import AuditMode
from bridge.errors import BridgeError, FatalUpstreamError, StoreError
from bridge.fhir.client import FhirClient
from bridge.state.store import SqlStore

logger = logging.getLogger(__name__)
audit_logger = logging.getLogger("bridge.audit.access")

MAX_IN_MEMORY = 100_000  # recorded but not yet stored: beyond this (store down for long) the oldest go
_WINDOW_KEYS = 100_000
_MAX_BACKOFF = 300.0


class AuditTrail:
    """Records accesses and writes them as AuditEvents (``mode`` fhir), log lines (log) or not at all."""

    def __init__(
        self,
        mode: AuditMode,
        *,
        fhir: FhirClient | None = None,
        store: SqlStore | None = None,
        batch_size: int = 100,
        window: float = 60.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.mode = mode
        self.fhir = fhir
        self.store = store
        self.batch_size = batch_size
        self.window = window
        self._clock = clock
        self._seen: OrderedDict[tuple[str | None, ...], float] = OrderedDict()
        self._recorded: list[tuple[str, str, Any]] = []  # (id, JSON, when) not yet in the store
        self._wake = asyncio.Event()
        self._retry_at = 0.0
        self._failures = 0
        self.written = 0  # AuditEvents the FHIR server has accepted (for tests and metrics)
        self.dropped = 0

    def repeats(self, key: WindowKey | None) -> bool:
        """Whether an access of this window key would be noted in vain now: audit off, or within the window.

        A caller that asks first spares making the Access of a repeat (most of a cached lookup's audit).
        """
        if self.mode is AuditMode.OFF:
            return True
        last = self._seen.get(key) if key is not None else None
        return last is not None and self._clock() - last < self.window

    def record(self, access: Access) -> bool:
        """Note one access; False when it repeats one already noted in the window (or audit is off)."""
        key = access.window_key()
        if self.repeats(key):
            return False
        if key is not None:
            self._seen[key] = self._clock()
            self._seen.move_to_end(key)
            while len(self._seen) > _WINDOW_KEYS:
                self._seen.popitem(last=False)
        if self.mode is AuditMode.LOG:
            audit_logger.info("access %s", log_line(access))
            return True
        event = audit_event(access)
        self._recorded.append((event["id"], json.dumps(event, separators=(",", ":")), access.recorded))
        if len(self._recorded) > MAX_IN_MEMORY:
            del self._recorded[0]
            self.dropped += 1
        if len(self._recorded) >= self.batch_size:
            self._wake.set()
        return True

    async def flush(self) -> None:
        """Move what was recorded into the store, then write what the store holds, a batch at a time."""
        await self._persist()
        if self.fhir is None or self._clock() < self._retry_at:
            return
        while True:
            batch = await self._pending()
            if not batch:
                return
            try:
                await self._write(batch)
            except BridgeError as exc:
                self._failures += 1
                wait = min(_MAX_BACKOFF, 2.0 ** min(self._failures, 10))
                self._retry_at = self._clock() + wait
                logger.warning(
                    "audit: %d AuditEvents wait for the FHIR server (%s); next try in %.0f s",
                    len(batch),
                    type(exc).__name__,
                    wait,
                )
                return
            self._failures = 0
            if len(batch) < self.batch_size:
                return

    async def _persist(self) -> None:
        if not self._recorded or self.store is None:
            return
        taken, self._recorded = self._recorded, []
        try:
            await anyio.to_thread.run_sync(self.store.queue_audit, taken)
        except StoreError as exc:
            self._recorded = taken + self._recorded  # kept in memory until the store is back
            logger.warning("audit: cannot store %d AuditEvents (%s)", len(taken), type(exc).__name__)

    async def _pending(self) -> list[tuple[int | None, str]]:
        if self.store is not None:
            try:
                rows = await anyio.to_thread.run_sync(self.store.pending_audit, self.batch_size)
            except StoreError as exc:
                logger.warning("audit: cannot read the backlog (%s)", type(exc).__name__)
                return []
            return [(row_id, body) for row_id, body in rows]
        # no store: write straight from memory
        return [(None, body) for _, body, _ in self._recorded[: self.batch_size]]

    async def _write(self, batch: list[tuple[int | None, str]]) -> None:
        assert self.fhir is not None
        events = [json.loads(body) for _, body in batch]
        try:
            await self.fhir.transaction(
                [
                    {"resource": e, "request": {"method": "PUT", "url": f"AuditEvent/{e['id']}"}}
                    for e in events
                ]
            )
        except FatalUpstreamError:
            # One event the server refuses must not hold back the others: write them one by one,
            # and give up only on those refused (a bug to report, not a reason to stop auditing).
            for event in events:
                try:
                    await self.fhir.update(event)
                except FatalUpstreamError as exc:
                    self.dropped += 1
                    logger.error("audit: the FHIR server refused an AuditEvent (%s)", exc)
        self.written += len(events)
        if self.store is not None:
            await anyio.to_thread.run_sync(self.store.written_audit, [i for i, _ in batch if i is not None])
        else:
            del self._recorded[: len(batch)]

    async def run(self, interval: float) -> None:
        """Flush every ``interval`` seconds, or sooner when a batch is full; until cancelled."""
        while True:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), interval)
            self._wake.clear()
            try:
                await self.flush()
            except Exception:  # the audit task must outlive any one failure
                logger.exception("audit: flush failed")


@asynccontextmanager
async def running(trail: AuditTrail, interval: float) -> AsyncIterator[AuditTrail]:
    """Run the trail's background writer for the app's lifetime; a last flush on the way out."""
    if trail.mode is not AuditMode.FHIR:
        yield trail
        return
    task = asyncio.create_task(trail.run(interval), name="audit-writer")
    try:
        yield trail
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        try:
            await asyncio.wait_for(trail.flush(), 10.0)
        except (TimeoutError, BridgeError) as exc:
            logger.warning("audit: not every AuditEvent was written at shut-down (%s)", type(exc).__name__)
