"""The push drain's own rate against a full sync's: a backlog of N pushes, drained, beside a sync of N.

``benchmarks/freshness.py`` measures a burst as Orthanc makes it: there the archive's pace (studies
declared stable one by one) bounds the drain. This isolates the bridge: the archive already holds
the N studies (``benchmarks/_common.py``'s cached archive), and per repetition, alternating the
order, into an emptied FHIR server with a fresh state store each time,

- **full**: one ``bridge sync`` pass over the archive (``SyncWorker.run``), in this process;
- **drain**: N pushes queued in the store (as ``POST /studies/{uid}/sync`` queues them), then one
  drain of the queue (``bridge.runtime.push_drainer``, as ``bridge run`` drains it), in this process.

Printed: each run's wall time and rate, and the median drain rate / full-sync rate (the issue's
target: 1.0, "a burst drains at the full-sync rate").

Run:  python -m benchmarks.drain [--size 1000] [--repeat 3]
"""

# ruff: noqa: T201 - benchmark scripts print their figures
from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from benchmarks._common import (
    DEFAULT_CACHE,
    PATIENT_SYSTEM,
    archive,
    fhir_server,
    machine,
    print_block,
    study_uid,
)
from bridge.config import Settings, load_settings
from bridge.runtime import open_runtime, push_drainer


@contextmanager
def _environment(values: dict[str, str]) -> Iterator[None]:
    saved = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def _settings(dicomweb: str, fhir: str, state: Path) -> Settings:
    with _environment(
        {
            "BRIDGE_DICOMWEB_URL": dicomweb,
            "BRIDGE_FHIR_URL": fhir,
            "BRIDGE_STATE_URL": f"sqlite:///{state}",
            "BRIDGE_PATIENT_IDENTIFIER_SYSTEM": PATIENT_SYSTEM,
            "BRIDGE_DICOM_TIMEZONE": "UTC",
            "BRIDGE_LOG_LEVEL": "WARNING",
        }
    ):
        return load_settings()


async def _full(settings: Settings, n: int) -> float:
    async with open_runtime(settings) as runtime:
        started = time.perf_counter()
        report = await runtime.worker.run()
        wall = time.perf_counter() - started
    if report.counts.created != n:
        raise SystemExit(f"the full sync created {report.counts.created} of {n}")
    return wall


async def _drain(settings: Settings, n: int) -> float:
    async with open_runtime(settings) as runtime:
        now = time.time()
        for index in range(n):
            if runtime.store.queue_push(study_uid(index), now, n) is None:
                raise SystemExit("the push queue refused a push")
        drainer = push_drainer([runtime])
        started = time.perf_counter()
        done = await drainer.drain()
        wall = time.perf_counter() - started
    if done != n:
        raise SystemExit(f"the drain did {done} of {n} pushes")
    return wall


def main() -> None:
    """Measure, alternating, and print the rates and their ratio."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=1000)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--cache", type=Path, default=DEFAULT_CACHE)
    args = parser.parse_args()
    print_block("machine", machine())
    walls: dict[str, list[float]] = {"full": [], "drain": []}
    with (
        archive(args.size, args.cache) as orthanc,
        fhir_server() as fhir,
        tempfile.TemporaryDirectory() as work,
    ):
        for rep in range(args.repeat):
            order = ("full", "drain") if rep % 2 == 0 else ("drain", "full")
            for kind in order:
                fhir.clear()
                settings = _settings(orthanc.dicomweb_url, fhir.base_url, Path(work) / f"{kind}-{rep}.db")
                measure = _full if kind == "full" else _drain
                wall = asyncio.run(measure(settings, args.size))
                walls[kind].append(wall)
                print(f"  rep {rep} {kind:<5} {wall:6.2f} s  {args.size / wall:7.1f} studies/s", flush=True)
    full, drain = statistics.median(walls["full"]), statistics.median(walls["drain"])
    print_block(
        f"{args.size} studies, median of {args.repeat}",
        {
            "full sync studies/s": f"{args.size / full:.1f}",
            "push drain studies/s": f"{args.size / drain:.1f}",
            "drain rate / full-sync rate": f"{full / drain:.2f}",
        },
    )


if __name__ == "__main__":
    main()
