"""Freshness: how long a change took from the archive to the FHIR record, measured per path.

The clock starts at the archive's own time for the change, where one exists: the change feed's
timestamp (Orthanc's ``StableStudy`` date) or the push's arrival; it stops when the study's
ImagingStudy was written, as the store records it (``last_synced_at`` with a new FHIR version).
A study the run did not write (unchanged, parked) is not measured. Each run's slowest study is kept
in the state store (checkpoint ``lag-<path>``) for ``bridge status``; every study is observed in
the ``bridge_sync_lag_seconds`` histogram. The QIDO poll's lag is the age of its last successful
run (``POLL_KINDS``).
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Awaitable, Callable, Mapping

from bridge.sync import metrics
from bridge.sync.protocols import StateStore
from bridge.sync.report import RunReport

PATHS = ("push", "feed")
# The runs that poll the archive for what is new (the QIDO path): the poll has no archive time for a
# change, so its lag is not measured; it is bounded by the time since the last of these succeeded
# (a study stored since waits for the next poll, unless a push or the change feed brings it sooner).
POLL_KINDS = ("full", "incremental", "reconcile", "feed-gap")


def checkpoint_name(path: str) -> str:
    """The checkpoint that keeps the path's last measured lag."""
    return f"lag-{path}"


async def measured(
    store: StateStore,
    source: str,
    path: str,
    changed_at: Mapping[str, float],
    run: Callable[[], Awaitable[RunReport]],
    clock: Callable[[], float] = time.time,
) -> RunReport:
    """Run ``run`` and observe the lag of each study of ``changed_at`` (UID -> epoch s) it wrote."""
    uids = list(changed_at)
    before = await asyncio.to_thread(store.sync_marks, source, uids) if uids else {}
    report = await run()
    if not uids:
        return report
    after = await asyncio.to_thread(store.sync_marks, source, uids)
    lags = []
    for uid, (version, written_at) in after.items():
        previous = before.get(uid)
        if previous is not None and previous[0] == version and previous[1] == written_at:
            continue  # not written by this run
        if previous is not None and previous[0] == version and version is not None:
            continue  # recorded again, but the FHIR resource did not change: no write
        lag = max(0.0, written_at - changed_at[uid])
        metrics.observe_lag(path, lag)
        lags.append(lag)
    if lags:
        value = json.dumps({"seconds": round(max(lags), 3), "studies": len(lags), "at": round(clock(), 3)})
        await asyncio.to_thread(store.save_checkpoint, source, checkpoint_name(path), value)
    return report


def last_lag(raw: str | None) -> dict[str, float] | None:
    """A kept lag (see :func:`measured`) as data, or None."""
    try:
        value = json.loads(raw) if raw else None
    except ValueError:
        return None
    if not isinstance(value, dict) or not all(
        isinstance(value.get(k), int | float) for k in ("seconds", "at")
    ):
        return None
    return {k: float(value[k]) for k in ("seconds", "at", "studies") if isinstance(value.get(k), int | float)}
