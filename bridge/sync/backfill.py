"""A backfill's plan: StudyDate slices over a date range, and where an interrupted one resumes."""

from __future__ import annotations

from datetime import date, datetime, timedelta

from bridge.errors import StoreError


def checkpoint_name(first: date, last: date) -> str:
    """The checkpoint that remembers how far the backfill of ``first``..``last`` got."""
    return f"backfill:{first:%Y%m%d}-{last:%Y%m%d}"


def checkpoint_value(done: date) -> str:
    """The checkpoint's value once every study up to ``done`` is synced."""
    return f"{done:%Y%m%d}"


def resume_from(first: date, checkpoint: str | None) -> date:
    """The first day still to sync: ``first``, or the day after the checkpoint."""
    if checkpoint is None:
        return first
    try:
        return datetime.strptime(checkpoint, "%Y%m%d").date() + timedelta(days=1)
    except ValueError:
        raise StoreError(f"the backfill checkpoint {checkpoint!r} is not a date (YYYYMMDD)") from None


def study_dates(low: date, high: date) -> dict[str, str]:
    """The QIDO-RS filter for the studies of ``low``..``high``."""
    return {"StudyDate": f"{low:%Y%m%d}-{high:%Y%m%d}"}


def slices(first: date, last: date, days: int) -> list[tuple[date, date]]:
    """Closed date ranges of ``days`` days covering ``first``..``last``."""
    slices = []
    low = first
    while low <= last:
        high = min(last, low + timedelta(days=days - 1))
        slices.append((low, high))
        low = high + timedelta(days=1)
    return slices
