"""The archive hop alone: one WADO-RS GET to Orthanc from Python, by HTTP client, sequentially.

Starts the test Orthanc, stores the demo studies, then times 3,000 GETs (after 200 to warm up) of
one study's metadata and of one instance with: an httpx AsyncClient (what the gateway uses), httpx's
transport without the client (no auth flow, cookie jar or hooks), httpcore's pool directly, and
aiohttp's client when it is installed (it is not a dependency: `pip install aiohttp` to compare).
Run:  python -m benchmarks.archive_hop [--requests 3000]
"""

# ruff: noqa: T201 - a script: printing the figures is its job
from __future__ import annotations

import argparse
import importlib.util
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import httpcore
import httpx
import uvloop

from tests.stack.orthanc import OrthancServer, ensure_installed
from tests.stack.samples import load_demo

INSTANCE = 'multipart/related; type="application/dicom"'


async def _timed(name: str, one: Callable[[], Awaitable[None]], count: int) -> None:
    for _ in range(200):
        await one()
    times = []
    for _ in range(count):
        started = time.perf_counter()
        await one()
        times.append(time.perf_counter() - started)
    times.sort()
    p50, mean = times[len(times) // 2] * 1e6, statistics.mean(times) * 1e6
    print(f"  {name:16} p50 {p50:7.0f} us   mean {mean:7.0f} us")


async def _compare(url: str, accept: str, count: int) -> None:
    headers = {"accept": accept, "accept-encoding": "identity"}
    async with httpx.AsyncClient() as client:

        async def via_client() -> None:
            answer = await client.send(client.build_request("GET", url, headers=headers), stream=True)
            async for _ in answer.aiter_raw():
                pass
            await answer.aclose()

        await _timed("httpx client", via_client, count)
    async with httpx.AsyncHTTPTransport() as transport:

        async def via_transport() -> None:
            answer = await transport.handle_async_request(httpx.Request("GET", url, headers=headers))
            async for _ in answer.aiter_raw():
                pass
            await answer.aclose()

        await _timed("httpx transport", via_transport, count)
    async with httpcore.AsyncConnectionPool() as pool:
        raw_headers = [(k.encode(), v.encode()) for k, v in headers.items()]

        async def via_httpcore() -> None:
            async with pool.stream("GET", url, headers=raw_headers) as answer:
                async for _ in answer.aiter_stream():
                    pass

        await _timed("httpcore pool", via_httpcore, count)
    if importlib.util.find_spec("aiohttp") is None:
        print("  aiohttp          (not installed)")
        return
    import aiohttp  # type: ignore[import-not-found, unused-ignore]

    session: Any
    async with aiohttp.ClientSession(auto_decompress=False) as session:

        async def via_aiohttp() -> None:
            async with session.get(url, headers=headers) as answer:
                async for _ in answer.content.iter_any():
                    pass

        await _timed("aiohttp", via_aiohttp, count)


def main() -> int:
    """Run the comparison; 0 on success."""
    parser = argparse.ArgumentParser(prog="python -m benchmarks.archive_hop")
    parser.add_argument("--requests", type=int, default=3000)
    args = parser.parse_args()
    workdir = Path(tempfile.mkdtemp(prefix="bridge-bench-hop-"))
    ensure_installed()
    orthanc = OrthancServer(name="bridge-bench-hop", log_path=workdir / "orthanc.log")
    try:
        orthanc.start()
        base = orthanc.dicomweb_url
        uid = load_demo(base)[0].uid
        rows = httpx.get(
            f"{base}/studies/{uid}/instances", headers={"Accept": "application/dicom+json"}, timeout=30
        ).json()
        series, sop = rows[0]["0020000E"]["Value"][0], rows[0]["00080018"]["Value"][0]
        for name, url, accept in (
            ("study metadata", f"{base}/studies/{uid}/metadata", "application/dicom+json"),
            ("one instance", f"{base}/studies/{uid}/series/{series}/instances/{sop}", INSTANCE),
        ):
            size = len(httpx.get(url, headers={"Accept": accept}, timeout=30).content)
            print(f"{name} ({size} bytes), {args.requests} sequential GETs, uvloop:")
            uvloop.run(_compare(url, accept, args.requests))
        return 0
    finally:
        orthanc.stop()
        shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
