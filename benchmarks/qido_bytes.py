"""QIDO transfer of the study-level enumeration: bytes per study, with includefield and gzip.

Walks every study of the benchmark archive (``benchmarks/_common.py``) at study level the way the
bridge does: its own ``DicomwebClient.iter_studies`` (includefield for the attributes the mapping
reads, limit/offset paging, ``Accept-Encoding: gzip``) through an httpx client with counting
hooks, at several page sizes; and, for comparison, the same queries asking for no compression.
Bytes are as on the wire (HTTP/1.1 headers plus the body as transferred). Target: under 100
bytes per study.

Run:  python -m benchmarks.qido_bytes [--size 5000] [--page-sizes 100 1000 5000]
"""

# ruff: noqa: T201 - benchmark scripts print their figures
from __future__ import annotations

import argparse
import asyncio
import sys
from pathlib import Path
from typing import Any

import httpx

from benchmarks._common import DEFAULT_CACHE, archive, machine, print_block
from benchmarks._meter import Meter
from bridge.dicomweb.client import DicomwebClient
from bridge.mapping.records import STUDY_FIELDS


async def walk(url: str, page_size: int, gzip: bool) -> dict[str, Any]:
    """One full study-level walk; bytes and requests."""
    meter = Meter()
    # Without gzip the client still says what it accepts: only the identity encoding.
    headers = {} if gzip else {"Accept-Encoding": "identity"}
    async with httpx.AsyncClient(timeout=300.0, event_hooks=meter.hooks("dicomweb")) as client:
        if gzip:
            source = DicomwebClient(client, url, page_size=page_size)
            studies = decoded = 0
            async for page in source.iter_studies():
                studies += len(page)
            decoded = -1  # the bridge's client does not expose the decoded size
        else:
            studies = decoded = offset = 0
            while True:
                params = [("includefield", f) for f in STUDY_FIELDS]
                params += [("limit", str(page_size)), ("offset", str(offset))]
                response = await client.get(
                    f"{url}/studies", params=params, headers={"Accept": "application/dicom+json", **headers}
                )
                rows = response.json() if response.content.strip() else []
                studies += len(rows)
                decoded += len(response.content)
                if len(rows) < page_size:
                    break
                offset += len(rows)
    counts = meter.figures()["dicomweb"]
    total = counts["bytes_sent"] + counts["bytes_received"]
    return {
        "page size": page_size,
        "encoding": "gzip (the bridge's client)" if gzip else "identity",
        "studies": studies,
        "requests": counts["requests"],
        "bytes received per study": round(counts["bytes_received"] / studies, 1),
        "bytes sent + received per study": round(total / studies, 1),
        "decoded JSON bytes per study": round(decoded / studies, 1) if decoded >= 0 else "",
    }


def main(argv: list[str] | None = None) -> int:
    """Walk at each page size, with and without gzip."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=1000, help="archive size N (prepared if missing)")
    parser.add_argument("--page-sizes", type=int, nargs="+", default=[100, 1000, 5000])
    parser.add_argument("--cache", type=Path, default=DEFAULT_CACHE, help="where prepared archives are kept")
    args = parser.parse_args(argv)
    print_block("machine", machine())
    print_block(
        "settings",
        {
            "archive studies": args.size,
            "includefield": " ".join(STUDY_FIELDS),
            "page sizes": args.page_sizes,
        },
    )
    rows = []
    with archive(args.size, args.cache) as orthanc:
        for page_size in args.page_sizes:
            for gzip in (True, False):
                rows.append(asyncio.run(walk(orthanc.dicomweb_url, page_size, gzip)))
    print("\n== study-level enumeration")
    keys = list(rows[0])
    print("  " + " | ".join(keys))
    for row in rows:
        print("  " + " | ".join(str(row[k]) for k in keys))
    best = min(r["bytes sent + received per study"] for r in rows if r["encoding"].startswith("gzip"))
    default = (
        next(
            r["bytes sent + received per study"]
            for r in rows
            if r["encoding"].startswith("gzip") and r["page size"] == 100
        )
        if 100 in args.page_sizes
        else best
    )
    print(f"\ngzip, page size 100 (the default): {default} bytes/study; best: {best} (target < 100)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
