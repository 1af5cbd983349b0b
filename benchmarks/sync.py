"""Full sync of N studies from Orthanc into the FHIR test server: the bridge against the floor.

For each N (default 1,000 and 5,000; three series per study, one small instance per series, two
studies per patient) the archive is prepared once (``benchmarks/_common.py``: built with
``tests/stack/samples.py``, stored over STOW-RS in batches, kept in a cache folder and reused by
later runs). Then, against an emptied FHIR test server each time and after one warm-up walk of
the study-level QIDO, it runs in child processes, alternating the order per repetition:

- the per-study floor (``benchmarks/floor.py``): one series query and one ImagingStudy PUT per
  study, no mapping, validation or state;
- the page-batched floor (``benchmarks/floor.py --mode page-batched``): per page, one UID-list
  series query, one FHIR batch of Patients and one of ImagingStudies, nothing else;
- the bridge: one ``bridge sync`` pass (``benchmarks/_bridge_run.py``) with a fresh SQLite store.

Reported per run: wall time, studies/s, HTTP requests and bytes (sent + received, wire framing
as HTTP/1.1) per study on each side counted by httpx event hooks, the time each side had a
request in flight ("busy": the FHIR server's time is reported apart because the in-memory
Medplum server scans every stored resource of a type on each search), the FHIR server's own
counters (/__admin/stats), and the child's peak RSS. Then the ratios the issue sets targets for:
bridge wall / floor wall (target <= 1.25) and bridge peak RSS at the largest N / the smallest
(target <= 1.2). The bridge runs with its defaults (UID-list series queries, FHIR batches of 100)
and is compared with the page-batched floor (target <= 1.25); the per-study floor is shown beside.

Run:  python -m benchmarks.sync [--sizes 1000 5000] [--repeat 2] [--concurrency 4]
          [--patient-policy match-or-create] [--json results.json]
The first run for a size stores its archive (about 1 minute per 1,000 studies on 2 cores).
"""

# ruff: noqa: T201 - benchmark scripts print their figures
from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
import time
from pathlib import Path
from typing import Any

from benchmarks._common import (
    DEFAULT_CACHE,
    FHIR_ENGINES,
    PATIENT_SYSTEM,
    STUDIES_PER_PATIENT,
    archive,
    fhir_server,
    machine,
    print_block,
    run_child,
    warm_qido,
)

# floor: the per-study floor; batched: the page-batched floor; bridge: `bridge sync`.
KINDS = ("floor", "batched", "bridge")


def bridge_env(dicomweb: str, fhir: str, state: Path, args: argparse.Namespace) -> dict[str, str]:
    """The bridge's settings for a benchmark run."""
    return {
        "BRIDGE_DICOMWEB_URL": dicomweb,
        "BRIDGE_FHIR_URL": fhir,
        "BRIDGE_STATE_URL": f"sqlite:///{state}",
        "BRIDGE_SYNC_CONCURRENCY": str(args.concurrency),
        "BRIDGE_QIDO_PAGE_SIZE": str(args.page_size),
        "BRIDGE_PATIENT_POLICY": args.patient_policy,
        "BRIDGE_PATIENT_IDENTIFIER_SYSTEM": PATIENT_SYSTEM,
        "BRIDGE_DICOM_TIMEZONE": "UTC",
        "BRIDGE_LOG_LEVEL": args.log_level,
        # benchmarks.nochange and others share these settings without the option: the default
        "BRIDGE_DICOMWEB_SERIES_QUERY": getattr(args, "series_query", "auto"),
    }


def floor_args(dicomweb: str, fhir: str, args: argparse.Namespace, mode: str = "per-study") -> list[str]:
    """The floor script's command line for the same settings."""
    return [
        "benchmarks.floor",
        "--mode", mode,
        "--json",
        "--dicomweb", dicomweb,
        "--fhir", fhir,
        "--concurrency", str(args.concurrency),
        "--page-size", str(args.page_size),
        "--patient-policy", args.patient_policy,
        "--patient-system", PATIENT_SYSTEM,
    ]  # fmt: skip


def summarize(kind: str, n: int, result: dict[str, Any], fhir_stats: dict[str, Any]) -> dict[str, Any]:
    """Per-study figures of one run."""
    http = result["http"]
    row: dict[str, Any] = {
        "kind": kind,
        "n": n,
        "wall_s": round(result["wall"], 2),
        "studies_per_s": round(n / result["wall"], 1),
        "cpu_s": result["cpu_s"],  # the child's user + system CPU time, start-up included
        "max_rss_mb": result["max_rss_mb"],
        "child_max_rss_mb": result["child_max_rss_mb"],
        "fhir_server_requests": fhir_stats.get("requests"),
        "fhir_server_searches": fhir_stats.get("searches"),
        "fhir_server_writes": fhir_stats.get("writes"),
    }
    for side in ("dicomweb", "fhir"):
        counts = http.get(side, {})
        row[f"{side}_requests_per_study"] = round(counts.get("requests", 0) / n, 3)
        row[f"{side}_bytes_sent_per_study"] = round(counts.get("bytes_sent", 0) / n)
        row[f"{side}_bytes_received_per_study"] = round(counts.get("bytes_received", 0) / n)
        row[f"{side}_busy_s"] = round(counts.get("busy", 0.0), 2)
    if "counts" in result:
        row["bridge_counts"] = result["counts"]
        row["wall_with_setup_s"] = round(result["wall_with_setup"], 2)
    return row


def one_size(n: int, args: argparse.Namespace, work: Path) -> list[dict[str, Any]]:
    """Floor and bridge runs for an archive of ``n`` studies."""
    rows: list[dict[str, Any]] = []
    with archive(n, args.cache) as orthanc, fhir_server(args.fhir_engine) as fhir:
        seen = warm_qido(orthanc.dicomweb_url)
        if seen != n:
            raise RuntimeError(f"the archive answers {seen} studies, expected {n}")
        for rep in range(args.repeat):
            kinds = tuple(k for k in KINDS if k in args.kinds)
            order = kinds if rep % 2 == 0 else tuple(reversed(kinds))
            for kind in order:
                fhir.clear()
                fhir.reset_stats()
                log = work / f"{kind}-{n}-{rep}.log"
                if kind == "floor":
                    result = run_child(floor_args(orthanc.dicomweb_url, fhir.base_url, args), {}, log)
                elif kind == "batched":
                    command = floor_args(orthanc.dicomweb_url, fhir.base_url, args, "page-batched")
                    result = run_child(command, {}, log)
                else:
                    state = work / f"state-{n}-{rep}.db"
                    env = bridge_env(orthanc.dicomweb_url, fhir.base_url, state, args)
                    prefix = None
                    if args.profile:
                        prefix = [
                            args.py_spy, "record", "--rate", "200", "--format", "raw",
                            "-o", str(work / f"bridge-{n}-{rep}.pyspy.txt"), "--",
                        ]  # fmt: skip
                    result = run_child(["benchmarks._bridge_run"], env, log, prefix)
                    if result["counts"]["created"] != n:
                        raise RuntimeError(f"the bridge created {result['counts']} (expected {n}); see {log}")
                row = summarize(kind, n, result, fhir.stats())
                row["rep"] = rep
                rows.append(row)
                print(
                    f"  N={n} rep {rep} {kind:<7} {row['wall_s']:7.2f} s  "
                    f"{row['studies_per_s']:7.1f} studies/s  "
                    f"FHIR busy {row['fhir_busy_s']:6.2f} s  QIDO busy {row['dicomweb_busy_s']:6.2f} s  "
                    f"CPU {row['cpu_s']:5.1f} s  peak RSS {row['max_rss_mb']:.0f} MiB",
                    flush=True,
                )
    return rows


def report(rows: list[dict[str, Any]], sizes: list[int]) -> dict[str, Any]:
    """Medians per (kind, N) and the target ratios."""
    table: dict[str, Any] = {}
    print("\n== results (median of the repetitions)")
    header = (
        f"{'N':>6} {'side':<7} {'wall s':>7} {'st/s':>7} {'QIDO req/st':>11} {'QIDO B/st':>9} "
        f"{'FHIR req/st':>11} {'FHIR B/st':>9} {'FHIR busy s':>11} {'QIDO busy s':>11} "
        f"{'CPU s':>6} {'RSS MiB':>8}"
    )
    print(header)
    for n in sizes:
        for kind in KINDS:
            runs = [r for r in rows if r["n"] == n and r["kind"] == kind]
            if not runs:
                continue
            med = {
                key: statistics.median(r[key] for r in runs)
                for key in runs[0]
                if isinstance(runs[0][key], int | float) and key not in ("n", "rep")
            }
            table[f"{kind}-{n}"] = med
            print(
                f"{n:>6} {kind:<7} {med['wall_s']:>7.2f} {med['studies_per_s']:>7.1f} "
                f"{med['dicomweb_requests_per_study']:>11.3f} "
                f"{med['dicomweb_bytes_sent_per_study'] + med['dicomweb_bytes_received_per_study']:>9.0f} "
                f"{med['fhir_requests_per_study']:>11.3f} "
                f"{med['fhir_bytes_sent_per_study'] + med['fhir_bytes_received_per_study']:>9.0f} "
                f"{med['fhir_busy_s']:>11.2f} {med['dicomweb_busy_s']:>11.2f} "
                f"{med['cpu_s']:>6.1f} {med['max_rss_mb']:>8.0f}"
            )
    ratios: dict[str, Any] = {}
    for n in sizes:
        if f"bridge-{n}" not in table or f"batched-{n}" not in table:
            continue
        ratios[f"bridge/page-batched floor wall, N={n}"] = round(
            table[f"bridge-{n}"]["wall_s"] / table[f"batched-{n}"]["wall_s"], 3
        )
        if f"floor-{n}" in table:
            ratios[f"per-study floor/page-batched floor wall, N={n}"] = round(
                table[f"floor-{n}"]["wall_s"] / table[f"batched-{n}"]["wall_s"], 3
            )
        ratios[f"bridge FHIR requests per study, N={n}"] = table[f"bridge-{n}"]["fhir_requests_per_study"]
        ratios[f"bridge QIDO requests per study, N={n}"] = table[f"bridge-{n}"]["dicomweb_requests_per_study"]
    if len(sizes) > 1 and all(f"bridge-{n}" in table for n in sizes):
        small, large = min(sizes), max(sizes)
        ratios[f"bridge peak RSS N={large} / N={small}"] = round(
            table[f"bridge-{large}"]["max_rss_mb"] / table[f"bridge-{small}"]["max_rss_mb"], 3
        )
    print_block(
        "targets: wall <= 1.25x the page-batched floor; FHIR and QIDO requests per study <= 0.1; "
        "peak RSS at the largest N <= 1.2x the smallest",
        ratios,
    )
    return {"medians": table, "ratios": ratios}


def main(argv: list[str] | None = None) -> int:
    """Run every size and print the table and the ratios."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[1000, 5000], help="archive sizes N")
    parser.add_argument("--repeat", type=int, default=2, help="runs of each side per size")
    parser.add_argument(
        "--concurrency", type=int, default=4, help="BRIDGE_SYNC_CONCURRENCY (and the floor's)"
    )
    parser.add_argument("--page-size", type=int, default=100, help="BRIDGE_QIDO_PAGE_SIZE (and the floor's)")
    parser.add_argument("--patient-policy", choices=("match-or-create", "logical"), default="match-or-create")
    parser.add_argument("--log-level", default="INFO", help="BRIDGE_LOG_LEVEL of the bridge run")
    parser.add_argument(
        "--series-query",
        choices=("auto", "list", "per-study", "paged"),
        default="auto",
        help="BRIDGE_DICOMWEB_SERIES_QUERY of the bridge run (paged: the sweep, for archives without lists)",
    )
    parser.add_argument(
        "--fhir-engine", choices=FHIR_ENGINES, default="medplum", help="the FHIR server to sync into"
    )
    parser.add_argument("--cache", type=Path, default=DEFAULT_CACHE, help="where prepared archives are kept")
    parser.add_argument(
        "--profile",
        action="store_true",
        help="run the bridge under py-spy (collapsed stacks in CACHE/sync-runs/); slows it down",
    )
    parser.add_argument(
        "--py-spy", default=str(Path(sys.executable).with_name("py-spy")), help="py-spy binary"
    )
    parser.add_argument(
        "--kinds", nargs="+", choices=KINDS, default=list(KINDS), help="which sides to run (default: all)"
    )
    parser.add_argument("--json", type=Path, default=None, help="also write every figure to this file")
    args = parser.parse_args(argv)

    print_block("machine", machine())
    settings = {
        "sizes": args.sizes,
        "series per study / instances per series": "3 / 1",
        "studies per patient": STUDIES_PER_PATIENT,
        "repetitions per side": args.repeat,
        "sync concurrency": args.concurrency,
        "QIDO page size": args.page_size,
        "patient policy": args.patient_policy,
        "write strategy": "client-id",
        "FHIR engine": args.fhir_engine,
        "state store": "SQLite file (fresh per run)",
        "bridge log level": args.log_level,
        "bridge series query": args.series_query,
    }
    print_block("settings", settings)
    started = time.monotonic()
    rows: list[dict[str, Any]] = []
    work = args.cache / "sync-runs"  # child logs and state stores of the last run
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    for n in args.sizes:
        print(f"\n== N = {n}", flush=True)
        rows.extend(one_size(n, args, work))
    summary = report(rows, args.sizes)
    print(f"\n(total {time.monotonic() - started:.0f} s)")
    if args.json:
        args.json.write_text(
            json.dumps({"machine": machine(), "settings": settings, "runs": rows, **summary}, indent=2)
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
