"""A large study (2,000 instances in 10 series) synced with instance detail on: one FHIR write.

Stores one study of ``--series`` series of ``--per-series`` instances (built with
``tests/stack/samples.py``, STOW-RS in batches; kept in a cache folder for later runs), then
syncs it into an empty FHIR test server with ``BRIDGE_INCLUDE_INSTANCES=true`` and, for
comparison, without. Reports per run: wall time, FHIR requests and writes (the server's own
counters, by kind), QIDO requests and bytes, the size of the ImagingStudy written and how many
instances it lists, and peak RSS. The target: the study is one ImagingStudy write, not one per
instance (the other writes are the Endpoint and the Patient, once each).

Run:  python -m benchmarks.large_study [--series 10] [--per-series 200]
"""

# ruff: noqa: T201 - benchmark scripts print their figures
from __future__ import annotations

import argparse
import contextlib
import json
import shutil
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx

from benchmarks._common import DEFAULT_CACHE, machine, print_block, run_child, study_spec
from benchmarks.sync import bridge_env
from tests.stack.fhir import FhirTestServer
from tests.stack.orthanc import OrthancServer, ensure_installed
from tests.stack.samples import build_study, stow

BATCH = 200
LARGE_INDEX = 10_000_000  # a study index the N-study archives never use


@contextlib.contextmanager
def large_archive(series: int, per_series: int, cache: Path) -> Iterator[tuple[OrthancServer, str]]:
    """A running Orthanc holding the one large study; yields the server and the study UID."""
    ensure_installed()
    spec = study_spec(LARGE_INDEX, series=series, instances=per_series)
    folder = cache / f"orthanc-large-{series}x{per_series}"
    folder.mkdir(parents=True, exist_ok=True)
    server = OrthancServer(name="bench-large", storage_dir=folder)
    server.start()
    try:
        stored = server.client.get("/statistics").json()["CountInstances"]
        if stored < series * per_series:
            started = time.monotonic()
            datasets = build_study(spec)
            with httpx.Client(timeout=300.0) as client:
                for first in range(0, len(datasets), BATCH):
                    stow(server.dicomweb_url, datasets[first : first + BATCH], client=client)
            print(f"  stored {len(datasets)} instances in {time.monotonic() - started:.0f} s", flush=True)
        assert spec.uid is not None
        yield server, spec.uid
    finally:
        server.stop()


def written_study(fhir: FhirTestServer) -> dict[str, Any]:
    """The one ImagingStudy on the server."""
    bundle = httpx.get(f"{fhir.base_url}/ImagingStudy", params={"_count": "10"}, timeout=60).json()
    entries = bundle.get("entry", [])
    if len(entries) != 1:
        raise RuntimeError(f"expected one ImagingStudy, found {len(entries)}")
    resource: dict[str, Any] = entries[0]["resource"]
    return resource


def one_run(
    orthanc: OrthancServer, fhir: FhirTestServer, instances: bool, args: argparse.Namespace, work: Path
) -> dict[str, Any]:
    """One sync of the large study into an emptied FHIR server."""
    fhir.clear()
    fhir.reset_stats()
    state = work / f"state-{instances}.db"
    env = bridge_env(orthanc.dicomweb_url, fhir.base_url, state, args)
    env["BRIDGE_INCLUDE_INSTANCES"] = "true" if instances else "false"
    result = run_child(["benchmarks._bridge_run"], env, work / f"large-{instances}.log")
    stats = fhir.stats()
    study = written_study(fhir)
    listed = sum(len(s.get("instance", [])) for s in study.get("series", []))
    qido = result["http"].get("dicomweb", {})
    return {
        "instance detail": "on" if instances else "off",
        "wall s": round(result["wall"], 2),
        "QIDO requests": qido.get("requests", 0),
        "QIDO bytes received": qido.get("bytes_received", 0),
        "FHIR requests (server)": stats.get("requests"),
        "FHIR writes by kind (server)": stats.get("writes_by_kind"),
        "FHIR requests by method": stats.get("by_method"),
        "ImagingStudy writes": result["counts"]["created"] + result["counts"]["updated"],
        "ImagingStudy JSON bytes": len(json.dumps(study, separators=(",", ":"))),
        "instances listed": listed,
        "CPU s (child, start-up included)": result["cpu_s"],
        "peak RSS MiB": result["max_rss_mb"],
    }


def main(argv: list[str] | None = None) -> int:
    """Run with instance detail on, then off."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--series", type=int, default=10)
    parser.add_argument("--per-series", type=int, default=200)
    parser.add_argument("--concurrency", type=int, default=4, help="BRIDGE_SYNC_CONCURRENCY")
    parser.add_argument("--page-size", type=int, default=100, help="BRIDGE_QIDO_PAGE_SIZE")
    parser.add_argument("--patient-policy", choices=("match-or-create", "logical"), default="match-or-create")
    parser.add_argument("--log-level", default="INFO")
    parser.add_argument("--cache", type=Path, default=DEFAULT_CACHE, help="where prepared archives are kept")
    args = parser.parse_args(argv)
    print_block("machine", machine())
    print_block(
        "settings",
        {
            "study": f"{args.series} series x {args.per_series} instances",
            "QIDO page size": args.page_size,
            "BRIDGE_MAX_INSTANCES": "2000 (default)",
            "patient policy": args.patient_policy,
        },
    )
    work = args.cache / "large-runs"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    ok = True
    with large_archive(args.series, args.per_series, args.cache) as (orthanc, _uid), FhirTestServer() as fhir:
        for instances in (True, False):
            row = one_run(orthanc, fhir, instances, args, work)
            print_block(f"large study, instance detail {row['instance detail']}", row)
            ok &= row["ImagingStudy writes"] == 1
            if instances:
                ok &= row["instances listed"] == args.series * args.per_series
    print(f"\none ImagingStudy write for the study{'' if ok else ' -- NOT MET'}; instances listed when on")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
