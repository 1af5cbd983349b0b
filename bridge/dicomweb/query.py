"""How the series of a page of studies are asked of the archive (BRIDGE_DICOMWEB_SERIES_QUERY)."""

from __future__ import annotations

from enum import StrEnum


class SeriesQuery(StrEnum):
    """UID lists per page, one query per study, a sweep of the archive, or what the archive shows it does."""

    AUTO = "auto"  # UID-list matching if the archive answers the first list query right, else per study
    LIST = "list"  # one query per page: StudyInstanceUID=uid1,uid2,... (PS3.18 UID list matching)
    PER_STUDY = "per-study"  # one /studies/{uid}/series query per study
    # A whole-archive run sweeps /series at the root first (paged, kept on disk by study); other
    # runs, and studies the sweep cannot vouch for, are asked per study. For archives without lists.
    PAGED = "paged"
