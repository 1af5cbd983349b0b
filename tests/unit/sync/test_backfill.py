"""A backfill's plan: slices that cover the range exactly once, and a resume after the checkpoint."""

from __future__ import annotations

from datetime import date

from bridge.sync import backfill


def test_slices_cover_the_range_once_and_end_on_its_last_day() -> None:
    assert backfill.slices(date(2024, 1, 30), date(2024, 2, 3), 2) == [
        (date(2024, 1, 30), date(2024, 1, 31)),
        (date(2024, 2, 1), date(2024, 2, 2)),
        (date(2024, 2, 3), date(2024, 2, 3)),
    ]
    assert backfill.slices(date(2024, 1, 2), date(2024, 1, 1), 1) == []


def test_a_resumed_backfill_starts_the_day_after_its_checkpoint() -> None:
    first = date(2024, 1, 1)
    assert backfill.resume_from(first, None) == first
    saved = backfill.checkpoint_value(date(2024, 2, 29))
    assert backfill.resume_from(first, saved) == date(2024, 3, 1)
    assert backfill.study_dates(date(2024, 3, 1), date(2024, 3, 2)) == {"StudyDate": "20240301-20240302"}
