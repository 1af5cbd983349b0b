"""How long the event loop is held while a large upstream answer is parsed, and what it costs.

For a FHIR ImagingStudy of N series and for N QIDO-RS series rows, both as bytes in 64 kB chunks
as the network gives them: ``json.loads`` (one C call) against the bridge's stepwise parse
(``bridge.upstream.jsonstream``: ijson, ``PARSE_STEP`` bytes a step, a loop turn between steps).
Prints the total time, the longest time the loop was held (a task that only yields measures it), and the
peak traced memory of each. Start-up objects are frozen out of the cyclic GC, as ``bridge serve``
does; no servers are needed.

    python -m benchmarks.json_steps [--series 20000] [--repeat 3]
"""

# ruff: noqa: T201 - benchmark scripts print their figures
from __future__ import annotations

import argparse
import asyncio
import gc
import json
import os
import time
import tracemalloc
from collections.abc import Awaitable, Callable
from typing import Any

from benchmarks._common import machine, print_block
from bridge.upstream.jsonstream import PARSE_STEP, parse_chunks
from tests.stack.hostile import BAD, _series

CHUNK = 64 * 1024


def imaging_study(series: int) -> dict[str, Any]:
    """An ImagingStudy as the bridge writes one, with ``series`` series."""
    return {
        "resourceType": "ImagingStudy",
        "id": "huge",
        "status": "available",
        "identifier": [{"system": "urn:dicom:uid", "value": "urn:oid:1.2.3.4.5"}],
        "subject": {"reference": "Patient/p"},
        "endpoint": [{"reference": "Endpoint/e"}],
        "series": [
            {
                "uid": f"1.2.3.4.5.{i}",
                "number": i,
                "modality": {"system": "http://dicom.nema.org/resources/ontology/DCM", "code": "CT"},
            }
            for i in range(1, series + 1)
        ],
    }


def series_rows(count: int) -> list[dict[str, Any]]:
    """``count`` QIDO-RS series rows, as the hostile archive's BAD study answers them."""
    return [_series(BAD, n) for n in range(1, count + 1)]


async def held(work: Callable[[], Awaitable[Any]]) -> tuple[float, float]:
    """Seconds ``work`` took and the longest the event loop went without a turn meanwhile."""
    longest = 0.0

    async def turns() -> None:
        nonlocal longest
        while True:
            mark = time.perf_counter()
            await asyncio.sleep(0)
            longest = max(longest, time.perf_counter() - mark)

    ticker = asyncio.create_task(turns())
    await asyncio.sleep(0)
    started = time.perf_counter()
    await work()
    total = time.perf_counter() - started
    await asyncio.sleep(0)  # the ticker's turn: it measures a hold when it gets one
    ticker.cancel()
    return total, longest


async def peak(work: Callable[[], Awaitable[Any]]) -> float:
    """Peak traced memory of ``work`` in MB (tracemalloc slows it: timed apart)."""
    tracemalloc.start()
    try:
        await work()
        return tracemalloc.get_traced_memory()[1] / 1e6
    finally:
        tracemalloc.stop()


class GcPauses:
    """The longest cyclic-GC collection while counting (they stop the event loop like any C call)."""

    def __init__(self) -> None:
        self.longest = 0.0
        self._began = 0.0
        gc.callbacks.append(self._seen)

    def _seen(self, phase: str, info: dict[str, Any]) -> None:
        if phase == "start":
            self._began = time.perf_counter()
        else:
            self.longest = max(self.longest, time.perf_counter() - self._began)


async def main() -> None:
    """Parse each shape both ways and print the figures."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--series", type=int, default=20_000)
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    print_block("machine", {**machine(), "load average": " ".join(f"{x:.2f}" for x in os.getloadavg())})
    print_block("settings", {"series": args.series, "repeat": args.repeat, "PARSE_STEP": PARSE_STEP})
    gc.freeze()
    shapes: list[tuple[str, Callable[[], Any]]] = [
        (f"FHIR ImagingStudy, {args.series:,} series", lambda: imaging_study(args.series)),
        (f"QIDO-RS series rows, {args.series:,}", lambda: series_rows(args.series)),
    ]
    for name, make in shapes:
        raw = json.dumps(make()).encode()  # the document itself is gone before the parsing starts

        async def whole(raw: bytes = raw) -> Any:
            return json.loads(b"".join(raw[i : i + CHUNK] for i in range(0, len(raw), CHUNK)))

        async def stepwise(raw: bytes = raw) -> Any:
            chunks = [raw[i : i + CHUNK] for i in range(0, len(raw), CHUNK)]
            found, error = await parse_chunks(chunks, len(raw))
            assert error is None
            return found

        figures: dict[str, Any] = {"bytes": f"{len(raw):,}"}
        for label, work in (("json.loads", whole), ("stepwise", stepwise)):
            pauses = GcPauses()
            runs = [await held(work) for _ in range(args.repeat)]
            gc.callbacks.remove(pauses._seen)
            figures[f"{label}: longest GC collection ms"] = f"{pauses.longest * 1000:.1f}"
            best_total = min(total for total, _ in runs)
            worst_hold = max(longest for _, longest in runs)
            figures[f"{label}: total ms (best)"] = f"{best_total * 1000:.0f}"
            figures[f"{label}: loop held ms (worst)"] = f"{worst_hold * 1000:.1f}"
            figures[f"{label}: peak traced MB"] = f"{await peak(work):.0f}"
        print_block(name, figures)


if __name__ == "__main__":
    asyncio.run(main())
