"""Child process of the benchmarks: one bridge sync pass, as ``bridge sync`` runs it, metered.

Settings come from the ``BRIDGE_*`` environment like the real command. The only difference from
``bridge sync`` is that the HTTP clients built by ``bridge.runtime.http_client`` get counting
event hooks (see ``benchmarks._common.Meter``). Prints one JSON line with the figures.

Run:  BRIDGE_DICOMWEB_URL=... BRIDGE_FHIR_URL=... python -m benchmarks._bridge_run
"""

# ruff: noqa: T201 - benchmark scripts print their figures
from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import sys
import time
from typing import Any

import httpx

from benchmarks._meter import Meter, max_rss_mb
from bridge import runtime
from bridge.config import load_settings
from bridge.upstream.client import Service


def main() -> int:
    settings = load_settings()
    logging.basicConfig(
        level=settings.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr
    )
    logging.getLogger("httpx").setLevel(logging.WARNING)
    logging.getLogger("httpcore").setLevel(logging.WARNING)
    meter = Meter()
    build = runtime.http_client

    def metered_client(
        settings_: Any, upstream: Any = None, service: Service | None = None, **options: Any
    ) -> httpx.AsyncClient:
        client = build(settings_, upstream, service, **options)
        client.event_hooks = meter.hooks(str(service or "other"))
        return client

    runtime.http_client = metered_client  # the seam open_runtime builds its clients through

    async def run() -> dict[str, Any]:
        opened = time.perf_counter()
        async with runtime.open_runtime(settings) as rt:
            started = time.perf_counter()
            report = await rt.worker.run()
            wall = time.perf_counter() - started
        return {
            "wall": wall,  # the run itself, as the worker's run record measures it
            "wall_with_setup": time.perf_counter() - opened,  # plus opening/closing store and clients
            "status": report.status,
            "counts": dataclasses.asdict(report.counts),
        }

    result = asyncio.run(run())
    result["http"] = meter.figures()
    result["max_rss_mb"] = round(max_rss_mb(), 1)
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
