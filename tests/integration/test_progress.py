"""Progress of the real `bridge sync` and `bridge backfill` without a terminal: a few lines with totals."""

from __future__ import annotations

import httpx
import pytest

from tests.integration.conftest import Stack
from tests.stack.samples import StudySpec, build_study, stow

pytestmark = pytest.mark.integration


def _store(stack: Stack, *dates: str) -> None:
    with httpx.Client(timeout=60) as client:
        for i, day in enumerate(dates):
            spec = StudySpec(patient_id=f"PRG{i}", issuer="HOSP-A", study_date=day)
            stow(stack.orthanc.dicomweb_url, build_study(spec), client)


def _progress(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if "bridge.progress:" in line]


def test_sync_without_a_terminal_prints_progress_lines_with_totals_not_a_bar(stack: Stack) -> None:
    _store(stack, "20240101", "20240102", "20240103", "20240104")
    result = stack.cli("sync")
    assert result.returncode == 0, result.stderr
    lines = _progress(result.stderr)
    # A first line and the last word within the default 5 s: a few lines, not one per study.
    assert 1 <= len(lines) <= 3, lines
    assert "source test-orthanc: 4 of 4 studies listed so far done (" in lines[-1]
    assert "created 4, updated 0, unchanged 0, parked 0" in lines[-1]
    assert "\r" not in result.stderr and "━" not in result.stderr  # no bar drawn into a log


def test_backfill_without_a_terminal_counts_slices_and_studies_across_its_runs(stack: Stack) -> None:
    _store(stack, "20230101", "20230102", "20230105")
    result = stack.cli(
        "backfill",
        "--from",
        "2023-01-01",
        "--to",
        "2023-01-05",
        "--slice-days",
        "2",
        "--progress-every",
        "0.1",
    )
    assert result.returncode == 0, result.stderr
    last = _progress(result.stderr)[-1]
    assert "3 of 3 studies listed so far done" in last
    assert "slice 3 of 3, ETA 0 s" in last
