"""HTTP metering for the benchmarks: requests, bytes on the wire and busy time per upstream.

Kept free of heavy imports (only httpx) so the floor script can use it without growing its RSS.
"""

from __future__ import annotations

import resource
import time
from dataclasses import asdict, dataclass, field
from typing import Any

import httpx


@dataclass
class SideCounts:
    """HTTP traffic to one upstream, measured at the client."""

    requests: int = 0
    bytes_sent: int = 0
    bytes_received: int = 0
    latency_sum: float = 0.0  # seconds, summed over requests
    busy: float = 0.0  # seconds with at least one request in flight (union of the intervals)
    _in_flight: int = field(default=0, repr=False)
    _busy_since: float = field(default=0.0, repr=False)

    def figures(self) -> dict[str, Any]:
        """The public counters."""
        return {k: v for k, v in asdict(self).items() if not k.startswith("_")}


def _header_bytes(start_line: str, headers: httpx.Headers) -> int:
    return len(start_line) + 2 + sum(len(k) + len(v) + 4 for k, v in headers.raw) + 2


class Meter:
    """httpx event hooks counting requests, bytes on the wire (HTTP/1.1 framing) and busy time.

    Body bytes received are as transferred (``num_bytes_downloaded``: compressed when gzip was
    used); header bytes are those of the message as httpx saw it.
    """

    def __init__(self) -> None:
        self.sides: dict[str, SideCounts] = {}
        self._started: dict[int, float] = {}

    def hooks(self, side: str) -> dict[str, list[Any]]:
        """Event hooks for an ``httpx.AsyncClient`` talking to ``side``."""
        counts = self.sides.setdefault(side, SideCounts())

        async def on_request(request: httpx.Request) -> None:
            now = time.perf_counter()
            self._started[id(request)] = now
            if counts._in_flight == 0:
                counts._busy_since = now
            counts._in_flight += 1
            counts.requests += 1
            target = request.url.raw_path.decode("ascii")
            counts.bytes_sent += _header_bytes(f"{request.method} {target} HTTP/1.1", request.headers)
            counts.bytes_sent += len(request.content)

        async def on_response(response: httpx.Response) -> None:
            await response.aread()
            now = time.perf_counter()
            counts._in_flight -= 1
            if counts._in_flight == 0:
                counts.busy += now - counts._busy_since
            counts.latency_sum += now - self._started.pop(id(response.request), now)
            counts.bytes_received += _header_bytes(
                f"HTTP/1.1 {response.status_code} {response.reason_phrase}", response.headers
            )
            counts.bytes_received += response.num_bytes_downloaded

        return {"request": [on_request], "response": [on_response]}

    def figures(self) -> dict[str, dict[str, Any]]:
        """Counters per side."""
        return {side: counts.figures() for side, counts in self.sides.items()}


def max_rss_mb() -> float:
    """This process's peak resident set size, in MiB."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
