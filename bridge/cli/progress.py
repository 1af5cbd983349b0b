"""How far ``bridge sync`` and ``bridge backfill`` are: a live display, or a line every few seconds.

A terminal gets the live display; anything else (a log file, a CI job, ``kubectl logs``) a line.
On a terminal the display is rich's ``Progress`` on the console the log handler writes to, so log
lines are printed above it instead of through it (``commands._configure_logging``).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import replace
from types import TracebackType

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TaskID,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

from bridge.cli.render import duration
from bridge.state.records import RunCounts

logger = logging.getLogger("bridge.progress")

# Outcomes that finish a study in a run (the rest of ``seen`` is in flight).
FINISHED = ("created", "updated", "unchanged", "parked", "claimed")


def finished(counts: RunCounts) -> int:
    """Studies of a run that have an outcome."""
    return sum(getattr(counts, name) for name in FINISHED)


class _ShownAsProgress(logging.Filter):
    """Leaves out the log lines the live display shows in their place, unless the level is DEBUG.

    Those are a study's outcome, a run's start and end, a Patient created (marked with
    ``bridge.sync.report.SHOWN_AS_PROGRESS``); warnings and errors always pass.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno > logging.INFO or not getattr(record, "shown_as_progress", False):
            return True
        return logging.getLogger().getEffectiveLevel() <= logging.DEBUG


def _add(a: RunCounts, b: RunCounts) -> RunCounts:
    return replace(a, **{name: getattr(a, name) + getattr(b, name) for name in (*FINISHED, "seen")})


class RunProgress:
    """The counts of one source's runs (one sync, or a backfill's runs slice by slice), shown as they move.

    ``update`` is the worker's listener (``SyncWorker.on_progress``); ``slice_done`` closes one
    backfill slice. Studies have no known total (QIDO-RS does not say how many match), so the
    total is what the archive has listed so far; a backfill's slices do have one, and its ETA.
    """

    def __init__(
        self,
        source: str,
        console: Console,
        *,
        every: float = 5.0,
        slices: int | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.source = source
        self.live = console.is_terminal
        self.every = every
        self.slices = slices
        self.slices_done = 0
        self._clock = clock
        self._started = clock()
        self._last_line: float | None = None
        self._before = RunCounts()  # the runs (slices) already finished
        self._current = RunCounts()
        self._slice_label = ""
        self._progress = Progress(
            TextColumn("[bold]{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("{task.fields[detail]}"),
            TimeElapsedColumn(),
            TextColumn("ETA"),
            TimeRemainingColumn(),
            console=console,
            transient=False,
        )
        self._studies: TaskID | None = None
        self._slices: TaskID | None = None
        self._quiet = _ShownAsProgress()

    def __enter__(self) -> RunProgress:
        if self.live:
            for handler in logging.getLogger().handlers:  # the display says it: one line per study is noise
                handler.addFilter(self._quiet)
            self._progress.start()
            if self.slices is not None:
                self._slices = self._progress.add_task(f"{self.source} slices", total=self.slices, detail="")
            self._studies = self._progress.add_task(f"{self.source} studies", total=None, detail="")
        return self

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if self.live:
            self._progress.stop()
            for handler in logging.getLogger().handlers:
                handler.removeFilter(self._quiet)
        elif kind is None:
            self._line()  # the last word, whatever the interval

    @property
    def totals(self) -> RunCounts:
        """Every run's counts so far, the current one included."""
        return _add(self._before, self._current)

    def rate(self) -> float:
        """Studies finished per second since the start."""
        elapsed = self._clock() - self._started
        return finished(self.totals) / elapsed if elapsed > 0 else 0.0

    def update(self, counts: RunCounts) -> None:
        """The current run's counts changed."""
        self._current = counts
        self._show()

    def slice_done(self, label: str) -> None:
        """A backfill slice is finished (its run's counts are final); ``label`` names the next one."""
        self._before, self._current = self.totals, RunCounts()
        self.slices_done += 1
        self._slice_label = label
        self._show()

    def _detail(self) -> str:
        t = self.totals
        return (
            f"{self.rate():.1f}/s; created {t.created}, updated {t.updated}, unchanged {t.unchanged}, "
            f"parked {t.parked}"
        )

    def _show(self) -> None:
        if self.live:
            t = self.totals
            assert self._studies is not None
            self._progress.update(self._studies, completed=finished(t), total=t.seen, detail=self._detail())
            if self._slices is not None:
                self._progress.update(
                    self._slices, completed=self.slices_done, detail=self._slice_label, refresh=False
                )
            return
        now = self._clock()
        if self._last_line is None or now - self._last_line >= self.every:
            self._line()

    def _line(self) -> None:
        self._last_line = now = self._clock()
        t = self.totals
        elapsed = now - self._started
        text = (
            f"source {self.source}: {finished(t)} of {t.seen} studies listed so far done ({self._detail()})"
        )
        if self.slices is not None:
            text += f"; slice {self.slices_done} of {self.slices}"
            if self.slices_done:
                left = elapsed / self.slices_done * (self.slices - self.slices_done)
                text += f", ETA {duration(left)}"
        logger.info("%s; %s elapsed", text, duration(elapsed))
