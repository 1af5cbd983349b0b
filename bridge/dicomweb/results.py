"""What the archive client answers the sync with, as plain values.

A study's series from a page-wide query, and a change feed's batch.

They are the archive client's values; the sync's protocols (bridge/sync/protocols.py, changes.py) pass
them. No HTTP here, so importing them loads no httpx.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from bridge.errors import MappingError, UpstreamLimitError
from bridge.mapping.records import SeriesRecord

# A study's series from a page-wide query, or the error that parks the study.
SeriesOutcome = list[SeriesRecord] | MappingError | UpstreamLimitError


@dataclass(frozen=True, slots=True)
class ChangeBatch:
    """Study UIDs that changed, the position after them, and whether more changes wait.

    ``gap``: why the feed cannot be followed from the checkpoint (it restarted below it, skipped
    past it, or is another archive database's); ``checkpoint`` is then the feed's current end, and
    what changed before it must be found by a sweep.
    """

    study_uids: list[str]
    checkpoint: str
    more: bool
    gap: str | None = None
    # The archive's time for each study's change (epoch s), where the feed gives one: the lag's start.
    changed_at: dict[str, float] = field(default_factory=dict)
