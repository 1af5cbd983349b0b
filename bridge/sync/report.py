"""What a run did: its counts, the studies it parked, and what it retired."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime

from bridge.state.records import RunCounts

# ``extra`` of the log lines a progress display shows in its place (a study's outcome, a run's
# start and end): ``bridge sync`` on a terminal leaves them out while its live display runs.
SHOWN_AS_PROGRESS = {"shown_as_progress": True}

@dataclass(frozen=True, slots=True)
class ParkedReport:
    """A study parked in this run, and why."""

    study_uid: str
    kind: str
    attribute: str | None
    reason: str


@dataclass
class RunReport:
    """What a run did."""

    run_id: int
    counts: RunCounts = field(default_factory=RunCounts)
    parked: list[ParkedReport] = field(default_factory=list)
    status: str = "running"
    error: str | None = None
    deletions: list[dict[str, str]] = field(default_factory=list)
    # Studies whose archive rows all moved to another patient identity, re-linked: {"study_uid", "action"}.
    relinked: list[dict[str, str]] = field(default_factory=list)
    newest_seen: str | None = None
    fhir_write_requests: int = 0  # FHIR requests that wrote (a batch is one; fhir_writes counts resources)
    series_query: str = "undecided"  # how series were asked: list or per-study
    not_found: list[str] = field(default_factory=list)  # UIDs named to sync that the archive never held
    # Told the counts after each change (a progress display); must not block or raise.
    listener: Callable[[RunCounts], None] | None = field(default=None, repr=False, compare=False)
    # What the run did to Patient links: demographics warnings and accepted overrides, re-links
    # after a merge on the FHIR server ({"study_uid", "event", ...}: FHIR ids and attribute names).
    patient_events: list[dict[str, str]] = field(default_factory=list)

    @property
    def demographics_warnings(self) -> int:
        """Studies published although their demographics disagree (BRIDGE_DEMOGRAPHICS_CHECK=warn)."""
        return sum(1 for e in self.patient_events if e.get("event") == "demographics-warning")

    @property
    def merge_relinks(self) -> int:
        """Studies linked to the surviving Patient of a merge on the FHIR server."""
        return sum(1 for e in self.patient_events if e.get("event") in ("relinked", "linked-to-survivor"))

    def saw(self, started: str | None) -> None:
        """Keep the latest study start seen in the archive (for the lag metric)."""
        if started and (self.newest_seen is None or _later(started, self.newest_seen)):
            self.newest_seen = started

    def add(self, **deltas: int) -> None:
        """Add to the counts."""
        self.counts = replace(self.counts, **{k: getattr(self.counts, k) + v for k, v in deltas.items()})
        if self.listener is not None:
            self.listener(self.counts)


def _later(a: str, b: str) -> bool:
    def instant(text: str) -> datetime:
        value = datetime.fromisoformat(text)
        return value if value.tzinfo else value.replace(tzinfo=UTC)

    return instant(a) > instant(b)
