"""The demo without a terminal (a CI job, `&`, nohup): it stays up, its links answer, SIGTERM stops it."""

from __future__ import annotations

import queue
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest

from tests.conftest import ARTIFACTS

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]
# The first run installs the OHIF viewer from the npm registry (npm ci): give it time.
STARTUP_SECONDS = 900


def _lines(stream: object, into: queue.Queue[str]) -> None:
    for line in stream:  # type: ignore[attr-defined]
        into.put(line)


def test_the_demo_without_a_terminal_stays_up_until_sigterm_and_then_stops_every_server(
    tmp_path: Path,
) -> None:
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    process = subprocess.Popen(
        [sys.executable, "-m", "tests.stack", "demo", "--workdir", str(tmp_path)],
        cwd=REPO,
        stdin=subprocess.DEVNULL,  # no terminal: stdin is not a tty, nor is stdout
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    printed: queue.Queue[str] = queue.Queue()
    reader = threading.Thread(target=_lines, args=(process.stdout, printed), daemon=True)
    reader.start()
    output: list[str] = []
    try:
        deadline = time.monotonic() + STARTUP_SECONDS
        while not any("The servers keep running" in line for line in output):
            assert process.poll() is None, "the demo ended:\n" + "".join(output)
            assert time.monotonic() < deadline, "the demo did not come up:\n" + "".join(output)
            try:
                output.append(printed.get(timeout=5))
            except queue.Empty:
                continue
        text = "".join(output)
        record = re.search(r"(http://127\.0\.0\.1:\d+/record/patients/\S+)", text)
        studies = re.findall(r"(http://127\.0\.0\.1:\d+/\S+/ImagingStudy/\S+)", text)
        assert record is not None and studies, text
        time.sleep(3)  # a demo that ends on its own would have done so by now
        assert process.poll() is None, "the demo ended without being stopped:\n" + text
        page = httpx.get(record[1], timeout=30)
        assert page.status_code == 200 and "Open images" in page.text
        assert httpx.get(studies[0], timeout=30).status_code == 200

        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=60) == 0
        with pytest.raises(httpx.TransportError):
            httpx.get(record[1], timeout=5)
        with pytest.raises(httpx.TransportError):
            httpx.get(studies[0], timeout=5)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait(timeout=30)
        reader.join(timeout=30)
        assert process.stdout is not None
        process.stdout.close()
        (ARTIFACTS / "demo-output.log").write_text("".join(output), encoding="utf-8")
