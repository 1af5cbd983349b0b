"""The bridge's log lines on standard error: written in batches, and a cheap way in for a line a request.

A server logs a line per request (the access log, at INFO). Two costs came with it, both measured
on `bridge serve` under wrk (docs/performance.md): a system call per line, and logging's record
machinery (a LogRecord, the logger chain, the Formatter), about a fifth of a cached lookup.

- ``BatchedLines`` writes lines in batches, as nginx's ``access_log ... buffer= flush=`` does:
  a line waits at most ``delay`` seconds, or until ``most`` lines wait. A WARNING or worse goes out
  at once, with every line before it, so the order is kept and a problem is never late. Closing
  the handler (logging's shutdown, at exit) writes what waits.
- ``info_line`` logs one line at INFO. When the bridge's own handler is the only place the record
  would go (no other handler or filter on the way, the bridge's format), the line is made and
  queued at once, the very text logging would have written; otherwise, as when a test or an
  embedding program has added a handler, it goes through logging as any record does.
"""

from __future__ import annotations

import logging
import signal
import threading
import time
from types import FrameType
from typing import TextIO

FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


class StampedFormatter(logging.Formatter):
    """The bridge's line format, whose ``asctime`` is worked out once a second, not once a line."""

    def __init__(self) -> None:
        super().__init__(FORMAT)
        self._second = -1
        self._stamp = ""

    def formatTime(self, record: logging.LogRecord, datefmt: str | None = None) -> str:  # noqa: N802 - logging's name
        """``2026-12-07 15:42:20,123``: the same text as logging's default, local time."""
        return self._time(record.created, record.msecs)

    def line(self, created: float, level: str, name: str, message: str) -> str:
        """The text ``format`` gives a record of these, with no exception or stack attached."""
        return f"{self._time(created, (created - int(created)) * 1000)} {level} {name}: {message}"

    def _time(self, created: float, msecs: float) -> str:
        second = int(created)
        if second != self._second:
            self._stamp = time.strftime("%Y-%m-%d %H:%M:%S", self.converter(created))
            self._second = second
        return f"{self._stamp},{int(msecs):03d}"


class BatchedLines(logging.StreamHandler):  # type: ignore[type-arg]  # generic only in typeshed
    """A StreamHandler that writes its lines in batches: at most ``delay`` seconds late."""

    def __init__(self, stream: TextIO, *, delay: float = 0.2, most: int = 256) -> None:
        super().__init__(stream)
        self.setFormatter(StampedFormatter())
        self.delay = delay
        self.most = most
        self._lines: list[str] = []
        self._timer: threading.Timer | None = None

    def emit(self, record: logging.LogRecord) -> None:
        """Keep the record's line; write the batch when it is full, or at once for a WARNING or worse."""
        try:
            line = self.format(record)
        except Exception:  # noqa: BLE001 - logging's own contract: a bad record is reported, not raised
            self.handleError(record)
            return
        self._keep(line, urgent=record.levelno >= logging.WARNING)  # Handler.handle holds the lock

    def add_info(self, name: str, message: str) -> None:
        """Keep an INFO line of logger ``name`` (see ``info_line``)."""
        formatter = self.formatter
        assert isinstance(formatter, StampedFormatter)
        self.acquire()
        try:
            self._keep(formatter.line(time.time(), "INFO", name, message), urgent=False)
        finally:
            self.release()

    def flush(self) -> None:
        """Write every waiting line now."""
        self.acquire()
        try:
            self._write()
        finally:
            self.release()

    def close(self) -> None:
        """Write what waits, then close as a StreamHandler does (the stream itself stays open)."""
        self.flush()
        super().close()

    def _keep(self, line: str, *, urgent: bool) -> None:
        self._lines.append(line + self.terminator)
        if urgent or len(self._lines) >= self.most:
            self._write()
        elif self._timer is None:
            self._timer = threading.Timer(self.delay, self.flush)
            self._timer.daemon = True
            self._timer.start()

    def _write(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        batch = "".join(self._lines)
        self._lines.clear()
        try:
            if batch:
                self.stream.write(batch)
            self.stream.flush()
        except (OSError, ValueError):  # the stream is gone (closed at exit): nothing to write to
            pass


def _sole_handler(logger: logging.Logger) -> BatchedLines | None:
    """The bridge's handler when an INFO record of ``logger`` would reach it and nothing else."""
    if logging.getLogRecordFactory() is not logging.LogRecord:
        return None
    found: BatchedLines | None = None
    each: logging.Logger | None = logger
    while each is not None:
        if each.filters or each.disabled:
            return None  # logging heeds only the first logger's; the others' send a line the long way
        if each.handlers:
            handler = each.handlers[0]
            if (
                found is not None
                or len(each.handlers) > 1
                or type(handler) is not BatchedLines
                or handler.filters
                or handler.level > logging.INFO
                or type(handler.formatter) is not StampedFormatter
            ):
                return None
            found = handler
        if not each.propagate:
            break
        each = each.parent
    return found


def info_line(logger: logging.Logger, message: str) -> None:
    """Log ``message`` (already formatted, no ``%`` arguments) at INFO, if INFO is on for ``logger``.

    Straight to the bridge's batched handler when that is where the record would go alone; through
    logging otherwise. The line is the same either way. No caller's frame is looked up: the
    format shows none.
    """
    if not logger.isEnabledFor(logging.INFO):
        return
    handler = _sole_handler(logger)
    if handler is not None:
        handler.add_info(logger.name, message)
    else:
        logger.handle(logger.makeRecord(logger.name, logging.INFO, "", 0, message, (), None))


def write_then_end(signum: int, frame: FrameType | None) -> None:
    """A signal handler: write the lines that wait, then take the signal's default action.

    uvicorn stops gracefully on SIGTERM, then raises the signal again once it has put back the
    handler it found; with Python's default there (end the process at once), no exit handler
    runs and the batched lines would be lost. Set for SIGTERM before uvicorn starts.
    """
    logging.shutdown()  # flushes and closes every handler
    signal.signal(signum, signal.SIG_DFL)
    signal.raise_signal(signum)
