"""A no-change cycle: a second full pass over an archive already synced makes no FHIR request.

Prepares (or reuses) the benchmark archive of N studies (``benchmarks/_common.py``), runs one
full ``bridge sync`` pass into an empty FHIR test server, then a second pass with the same state
store and nothing changed, and reports for the second pass: wall time, FHIR requests (client
count and the server's own counter: both must be 0), QIDO requests against what paging needs
(one study-level page per ``page_size`` studies, plus the empty page that ends a walk whose last
page was full; no series query), bytes, and peak RSS.

Run:  python -m benchmarks.nochange [--sizes 1000 5000] [--page-size 100]
"""

# ruff: noqa: T201 - benchmark scripts print their figures
from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path
from typing import Any

from benchmarks._common import (
    DEFAULT_CACHE,
    FHIR_ENGINES,
    archive,
    fhir_server,
    machine,
    print_block,
    run_child,
    warm_qido,
)
from benchmarks.sync import bridge_env


def paging_needs(n: int, page_size: int) -> int:
    """Study-level QIDO requests a limit/offset walk over ``n`` studies needs."""
    return n // page_size + 1


def one_size(n: int, args: argparse.Namespace, work: Path) -> dict[str, Any]:
    """A first pass, then the measured no-change pass, over ``n`` studies."""
    with archive(n, args.cache) as orthanc, fhir_server(args.fhir_engine) as fhir:
        warm_qido(orthanc.dicomweb_url)
        state = work / f"state-{n}.db"
        env = bridge_env(orthanc.dicomweb_url, fhir.base_url, state, args)
        first = run_child(["benchmarks._bridge_run"], env, work / f"first-{n}.log")
        if first["counts"]["created"] != n:
            raise RuntimeError(f"the first pass created {first['counts']}, expected {n}")
        fhir.reset_stats()
        second = run_child(["benchmarks._bridge_run"], env, work / f"second-{n}.log")
        server = fhir.stats()
    http = second["http"]
    qido = http.get("dicomweb", {})
    fhir_client = http.get("fhir", {})
    needed = paging_needs(n, args.page_size)
    row = {
        "N": n,
        "first pass wall s": round(first["wall"], 2),
        "no-change wall s": round(second["wall"], 2),
        "no-change studies/s": round(n / second["wall"], 1),
        "unchanged": second["counts"]["unchanged"],
        "FHIR requests (client)": fhir_client.get("requests", 0),
        "FHIR requests (server)": server.get("requests", 0),
        "QIDO requests": qido.get("requests", 0),
        "QIDO requests paging needs": needed,
        "QIDO bytes per study": round((qido.get("bytes_sent", 0) + qido.get("bytes_received", 0)) / n),
        "CPU s (child, start-up included)": second["cpu_s"],
        "peak RSS MiB": second["max_rss_mb"],
    }
    ok = (
        row["FHIR requests (client)"] == 0
        and row["FHIR requests (server)"] == 0
        and row["QIDO requests"] <= needed
        and row["unchanged"] == n
    )
    row["target met"] = "yes" if ok else "NO"
    return row


def main(argv: list[str] | None = None) -> int:
    """Run each size; exit 1 if a target is missed."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[1000], help="archive sizes N")
    parser.add_argument("--concurrency", type=int, default=4, help="BRIDGE_SYNC_CONCURRENCY")
    parser.add_argument("--page-size", type=int, default=100, help="BRIDGE_QIDO_PAGE_SIZE")
    parser.add_argument("--patient-policy", choices=("match-or-create", "logical"), default="match-or-create")
    parser.add_argument("--log-level", default="INFO", help="BRIDGE_LOG_LEVEL of the bridge runs")
    parser.add_argument(
        "--fhir-engine", choices=FHIR_ENGINES, default="medplum", help="the FHIR server to sync into"
    )
    parser.add_argument("--cache", type=Path, default=DEFAULT_CACHE, help="where prepared archives are kept")
    args = parser.parse_args(argv)
    print_block("machine", machine())
    print_block(
        "settings",
        {
            "sizes": args.sizes,
            "sync concurrency": args.concurrency,
            "QIDO page size": args.page_size,
            "patient policy": args.patient_policy,
            "state store": "SQLite file, kept from the first pass",
        },
    )
    work = args.cache / "nochange-runs"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    failed = False
    for n in args.sizes:
        row = one_size(n, args, work)
        print_block(f"no-change cycle, N = {n}", row)
        failed |= row["target met"] != "yes"
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
