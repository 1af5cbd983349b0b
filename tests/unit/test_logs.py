"""Log lines: in batches (at most the delay late, a WARNING at once, the order kept, nothing lost), and
``info_line``'s direct way in writing the very text logging would, only when nothing else listens."""

from __future__ import annotations

import io
import logging
import time
from collections.abc import Iterator

import pytest

from bridge.logs import BatchedLines, StampedFormatter, info_line


class CountingStream(io.StringIO):
    """A stream that counts its writes (each one a system call on a real stream)."""

    def __init__(self) -> None:
        super().__init__()
        self.writes = 0

    def write(self, text: str) -> int:
        self.writes += 1
        return super().write(text)


@pytest.fixture
def logged() -> Iterator[tuple[logging.Logger, BatchedLines, CountingStream]]:
    """A logger of its own whose only handler is a BatchedLines (batches of 5, 0.2 s)."""
    stream = CountingStream()
    handler = BatchedLines(stream, delay=0.2, most=5)
    logger = logging.getLogger(f"test-batched-{id(stream)}")
    logger.propagate = False
    logger.setLevel(logging.INFO)
    logger.addHandler(handler)
    yield logger, handler, stream
    logger.removeHandler(handler)
    handler.close()


def _text(stream: io.StringIO) -> list[str]:
    """The lines written, each without its time stamp (the first two words)."""
    return [line.split(" ", 2)[2] for line in stream.getvalue().splitlines()]


def test_lines_wait_for_the_delay_then_go_out_in_one_write(
    logged: tuple[logging.Logger, BatchedLines, CountingStream],
) -> None:
    logger, _, stream = logged
    for number in range(3):
        logger.info("request %d", number)
    assert stream.getvalue() == ""  # not yet: within the delay
    deadline = time.monotonic() + 5
    while stream.getvalue() == "" and time.monotonic() < deadline:
        time.sleep(0.02)
    name = logger.name
    assert _text(stream) == [f"INFO {name}: request 0", f"INFO {name}: request 1", f"INFO {name}: request 2"]
    assert stream.writes == 1


def test_a_full_batch_goes_out_at_once(logged: tuple[logging.Logger, BatchedLines, CountingStream]) -> None:
    logger, _, stream = logged
    for number in range(5):
        info_line(logger, f"request {number}")
    assert len(_text(stream)) == 5
    assert stream.writes == 1


def test_a_warning_goes_out_at_once_after_the_lines_before_it(
    logged: tuple[logging.Logger, BatchedLines, CountingStream],
) -> None:
    logger, _, stream = logged
    info_line(logger, "before")
    logger.warning("problem")
    assert _text(stream) == [f"INFO {logger.name}: before", f"WARNING {logger.name}: problem"]


def test_closing_writes_what_waits(logged: tuple[logging.Logger, BatchedLines, CountingStream]) -> None:
    logger, handler, stream = logged
    info_line(logger, "last words")
    handler.close()
    assert _text(stream) == [f"INFO {logger.name}: last words"]


def test_a_closed_stream_loses_the_batch_without_raising() -> None:
    stream = io.StringIO()
    handler = BatchedLines(stream, delay=60)
    handler.handle(logging.makeLogRecord({"msg": "late", "levelno": logging.INFO}))
    stream.close()
    handler.close()  # no ValueError from the closed stream


def test_the_direct_line_is_the_text_logging_writes(
    logged: tuple[logging.Logger, BatchedLines, CountingStream], monkeypatch: pytest.MonkeyPatch
) -> None:
    logger, handler, stream = logged
    now = 1_765_000_000.0415
    monkeypatch.setattr(time, "time", lambda: now)
    monkeypatch.setattr(time, "time_ns", lambda: int(now * 1e9))
    info_line(logger, "GET /studies/{study_uid}/links 200 0.4 ms")  # the direct way
    logger.info("%s", "GET /studies/{study_uid}/links 200 0.4 ms")  # logging's own
    handler.flush()
    direct, through_logging = stream.getvalue().splitlines()
    assert direct == through_logging
    assert direct.endswith(",041 INFO " + logger.name + ": GET /studies/{study_uid}/links 200 0.4 ms")


def test_another_handler_or_a_filter_on_the_way_gets_the_line_through_logging(
    logged: tuple[logging.Logger, BatchedLines, CountingStream],
) -> None:
    logger, _, _ = logged
    child = logger.getChild("access")
    seen: list[logging.LogRecord] = []

    class Keep(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            seen.append(record)

    keep = Keep()
    child.addHandler(keep)  # as pytest's caplog or an embedding program's handler would
    try:
        info_line(child, "one")
    finally:
        child.removeHandler(keep)
    dropped: list[str] = []
    child.addFilter(lambda record: dropped.append(record.getMessage()) is not None)  # keeps none
    try:
        info_line(child, "two")
    finally:
        child.filters.clear()
    assert [r.getMessage() for r in seen] == ["one"]
    assert dropped == ["two"]


def test_nothing_is_made_when_info_is_off(
    logged: tuple[logging.Logger, BatchedLines, CountingStream],
) -> None:
    logger, handler, stream = logged
    logger.setLevel(logging.WARNING)
    info_line(logger, "quiet")
    handler.flush()
    assert stream.getvalue() == ""


def test_the_stamped_time_reads_as_loggings_own() -> None:
    plain = logging.Formatter("%(asctime)s %(message)s")
    stamped = StampedFormatter()
    for created in (1_765_000_000.123, 1_765_000_000.999, 1_765_000_001.005, 1_765_000_000.5):
        record = logging.makeLogRecord({"msg": "x", "created": created, "msecs": (created % 1) * 1000 // 1})
        assert stamped.formatTime(record) == plain.formatTime(record)
