"""Prometheus metrics of the sync worker, in the bridge's registry (served by the API's /metrics)."""

from __future__ import annotations

from datetime import UTC, datetime

from prometheus_client import Counter, Gauge, Histogram

from bridge.metrics import REGISTRY
from bridge.state.records import RunCounts

STUDIES = Counter(
    "bridge_sync_studies", "Studies handled by sync runs, by outcome", ["outcome"], registry=REGISTRY
)
RUNS = Counter(
    "bridge_sync_runs", "Sync runs, by kind and final status", ["kind", "status"], registry=REGISTRY
)
CYCLE_SECONDS = Histogram(
    "bridge_sync_cycle_seconds",
    "Duration of sync runs",
    ["kind"],
    buckets=(0.1, 0.5, 1, 2, 5, 10, 30, 60, 120, 300, 600, 1800, 3600),
    registry=REGISTRY,
)
PARKED = Gauge(
    "bridge_sync_parked_studies", "Studies parked in the store, waiting for a retry", registry=REGISTRY
)
WITHDRAWN = Gauge(
    "bridge_sync_withdrawn_studies",
    "Published studies withdrawn from clinicians until the archive is corrected (patient identity)",
    registry=REGISTRY,
)
FALLBACKS = Counter(
    "bridge_sync_fallbacks",
    "Documented fallbacks used for missing Type 1 data (a series without Modality published as OT)",
    registry=REGISTRY,
)
DEMOGRAPHICS = Counter(
    "bridge_sync_demographics_disagreements",
    "Studies whose birth date, sex or family name disagreed with their Patient, by action "
    "(park, warn, accepted: an integrator's override)",
    ["action"],
    registry=REGISTRY,
)
LAG = Histogram(
    "bridge_sync_lag_seconds",
    "From the archive's time for a change (the feed's timestamp, the push's arrival) to its FHIR write",
    ["path"],  # push | feed
    buckets=(0.25, 0.5, 1, 2, 3, 5, 10, 20, 30, 60, 120, 300, 900, 3600, 4 * 3600, 86400),
    registry=REGISTRY,
)
BEHIND = Gauge(
    "bridge_sync_behind_seconds",
    "Start of the newest study seen in the archive minus that of the newest published one",
    registry=REGISTRY,
)
LAST_SUCCESS = Gauge(
    "bridge_sync_last_success_timestamp_seconds",
    "When a sync run last ended without failing",
    registry=REGISTRY,
)


def observe_run(kind: str, status: str, counts: RunCounts, seconds: float) -> None:
    """Count a finished run and its studies."""
    RUNS.labels(kind, status).inc()
    CYCLE_SECONDS.labels(kind).observe(seconds)
    # Every outcome a study can end a run in, so the metric accounts for each one seen.
    for outcome in ("created", "updated", "unchanged", "parked", "deleted", "claimed"):
        value = getattr(counts, outcome)
        if value:
            STUDIES.labels(outcome).inc(value)
    if counts.fallbacks:
        FALLBACKS.inc(counts.fallbacks)
    if status in ("ok", "parked"):
        LAST_SUCCESS.set_to_current_time()


def _instant(value: str | None) -> datetime | None:
    if not value:
        return None
    try:
        parsed = datetime.fromisoformat(value)
    except ValueError:
        return None
    return parsed if parsed.tzinfo else parsed.replace(tzinfo=UTC)


def set_lag(newest_seen: str | None, newest_published: str | None) -> None:
    """Set the how-far-behind gauge from two FHIR dateTimes (0 when everything seen is published)."""
    seen, published = _instant(newest_seen), _instant(newest_published)
    if seen is None:
        return
    if published is None:
        BEHIND.set(max(0.0, (datetime.now(UTC) - seen).total_seconds()))
        return
    BEHIND.set(max(0.0, (seen - published).total_seconds()))


def observe_lag(path: str, seconds: float) -> None:
    """One study's way from the archive's change to its FHIR write, by the path that carried it."""
    LAG.labels(path).observe(max(0.0, seconds))
