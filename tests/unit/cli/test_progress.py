"""Progress of sync and backfill: lines every few seconds without a terminal, one live display on one."""

from __future__ import annotations

import io
import logging
import re

import pytest
from rich.console import Console
from rich.logging import RichHandler

from bridge.cli.progress import RunProgress
from bridge.state.records import RunCounts


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def plain_console() -> Console:
    return Console(file=io.StringIO(), force_terminal=False, width=200)


def progress_lines(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == "bridge.progress"]


def test_without_a_terminal_a_line_every_few_seconds_with_totals_and_rate(
    caplog: pytest.LogCaptureFixture,
) -> None:
    clock = Clock()
    caplog.set_level(logging.INFO, logger="bridge.progress")
    with RunProgress("pacs", plain_console(), every=5, clock=clock) as progress:
        for second in range(12):
            clock.now = 100.0 + second
            progress.update(RunCounts(seen=12, created=second + 1))
    lines = progress_lines(caplog)
    # At 0 s, 5 s and 10 s while it moves, and the last word when it ends: not one line per study.
    assert len(lines) == 4
    assert lines[0].startswith("source pacs: 1 of 12 studies listed so far done (")
    assert lines[-1].startswith("source pacs: 12 of 12 studies listed so far done (1.1/s; created 12")
    assert lines[-1].endswith("11 s elapsed")


def test_without_a_terminal_a_backfill_line_counts_slices_across_runs_with_an_eta(
    caplog: pytest.LogCaptureFixture,
) -> None:
    clock = Clock()
    caplog.set_level(logging.INFO, logger="bridge.progress")
    with RunProgress("pacs", plain_console(), every=5, slices=4, clock=clock) as progress:
        progress.update(RunCounts(seen=3, created=3))  # the first slice's run
        clock.now += 10
        progress.slice_done("to 2015-01-07")
        progress.update(RunCounts(seen=2, created=1, parked=1))  # the second's: counts start again
    last = progress_lines(caplog)[-1]
    assert "5 of 5 studies listed so far done" in last
    assert "created 4, updated 0, unchanged 0, parked 1" in last
    assert "slice 1 of 4, ETA 30 s" in last


def test_on_a_terminal_one_live_display_with_the_logs_above_it() -> None:
    buffer = io.StringIO()
    console = Console(file=buffer, force_terminal=True, width=160, color_system=None)
    log = logging.getLogger("tests.progress.live")
    log.propagate = False
    handler = RichHandler(console=console, show_path=False)
    log.addHandler(handler)
    try:
        with RunProgress("pacs", console, every=5) as progress:
            assert progress.live
            progress.update(RunCounts(seen=6, created=3))
            log.warning("the archive answered slowly")
            progress.update(RunCounts(seen=6, created=5, parked=1))
    finally:
        log.removeHandler(handler)
    text = re.sub(r"\x1b\[[0-9;?]*[A-Za-z]", "", buffer.getvalue())
    final = [line for line in text.splitlines() if "pacs studies" in line][-1]
    assert "6/6" in final and "created 5" in final and "parked 1" in final and "/s" in final
    # The log line is whole, on a line of its own, not cut by the display's redraws.
    logged = [line for line in text.splitlines() if "the archive answered slowly" in line]
    assert logged and "pacs studies" not in logged[0]


def test_on_a_terminal_the_lines_the_display_shows_are_left_out_and_warnings_stay() -> None:
    from bridge.sync.report import SHOWN_AS_PROGRESS

    buffer = io.StringIO()
    console = Console(file=buffer, force_terminal=True, width=160, color_system=None)
    root = logging.getLogger()
    handler = RichHandler(console=console, show_path=False)
    root.addHandler(handler)
    level = root.level
    root.setLevel(logging.INFO)
    log = logging.getLogger("tests.progress.quiet")
    try:
        log.info("study 1.2.3 created as ImagingStudy/x", extra=SHOWN_AS_PROGRESS)
        with RunProgress("pacs", console, every=5) as progress:
            log.info("study 1.2.4 created as ImagingStudy/y", extra=SHOWN_AS_PROGRESS)
            log.info("the FHIR server refused a batch Bundle")
            log.warning("a warning about study 1.2.5", extra=SHOWN_AS_PROGRESS)
            progress.update(RunCounts(seen=2, created=2))
        log.info("study 1.2.6 created as ImagingStudy/z", extra=SHOWN_AS_PROGRESS)
    finally:
        root.removeHandler(handler)
        root.setLevel(level)
    text = buffer.getvalue()
    assert "1.2.4" not in text  # the display counts it
    assert "1.2.3" in text and "1.2.6" in text  # before and after the display: logged as ever
    assert "refused a batch Bundle" in text and "1.2.5" in text
    assert not handler.filters  # the display leaves the handler as it found it


def test_without_a_terminal_every_line_is_logged(caplog: pytest.LogCaptureFixture) -> None:
    from bridge.sync.report import SHOWN_AS_PROGRESS

    caplog.set_level(logging.INFO)
    with RunProgress("pacs", plain_console(), every=5):
        logging.getLogger("tests.progress.file").info("study 1.2.7 created", extra=SHOWN_AS_PROGRESS)
    assert any("1.2.7" in r.getMessage() for r in caplog.records)
