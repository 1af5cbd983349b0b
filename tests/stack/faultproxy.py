"""A fault-injecting HTTP/1.1 reverse proxy on loopback, for the fault-tolerance tests.

It forwards every request to one upstream (Orthanc or the FHIR test server) and, by rule,
answers instead with 429/503 and a Retry-After, delays the answer, resets the connection (before
or after the upstream saw the request), truncates the body, or rewrites it. A rule fires on a
schedule (the first N matching requests, or the listed match numbers) or with a probability
drawn from a seeded generator, so a failing run can be replayed exactly.

Every request is logged with its arrival time and what was done to it, so a test can check, for
example, that a retry came no earlier than the Retry-After it was sent.

The proxy runs its own asyncio loop in a daemon thread, so tests can use it around synchronous
code, ``asyncio.run`` and subprocesses alike::

    with FaultProxy(upstream="http://127.0.0.1:8042", seed=7) as proxy:
        proxy.add(Fault(status=503, retry_after=1, times=2, path=r"/studies$"))
        ... point the bridge at proxy.url ...
        proxy.log  # [Event(...), ...]

It speaks HTTP/1.1 with Content-Length or chunked request bodies; the upstream is asked for
identity encoding so bodies can be cut or rewritten byte-exactly.
"""

from __future__ import annotations

import asyncio
import random
import re
import socket
import ssl
import struct
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from urllib.parse import urlsplit

import httpx

from tests.stack.process import Launcher

HOP_BY_HOP = frozenset(
    {
        "connection",
        "keep-alive",
        "proxy-authenticate",
        "proxy-authorization",
        "te",
        "trailer",
        "transfer-encoding",
        "upgrade",
        "content-length",
        "content-encoding",
        "host",
        "accept-encoding",
    }
)
REASONS = {
    429: "Too Many Requests",
    502: "Bad Gateway",
    503: "Service Unavailable",
    500: "Internal Server Error",
}


@dataclass
class Fault:
    """One rule. ``kind``: ``status``, ``delay``, ``reset``, ``truncate`` or ``corrupt``.

    Matching: ``method`` (exact, or None for any) and ``path`` (a regex searched in the path with
    its query string). Firing: on the first ``times`` matches, or on the match numbers in ``on``
    (counted from 1), or with ``probability`` (seeded); with none of these, on every match.
    """

    kind: str = "status"
    path: str = ""
    method: str | None = None
    times: int | None = None
    on: tuple[int, ...] | None = None
    probability: float | None = None
    status: int = 503
    retry_after: float | None = None  # seconds, sent as Retry-After
    delay: float = 0.0  # seconds, for kind=delay
    when: str = "before"  # reset: "before" the upstream sees the request, or "after" it answered
    keep: float = 0.5  # truncate: share of the body sent before the connection is cut
    rewrite: Callable[[bytes], bytes] | None = None  # corrupt: new body from the upstream's
    matched: int = 0
    fired: int = 0

    def __post_init__(self) -> None:
        if self.kind not in {"status", "delay", "reset", "truncate", "corrupt"}:
            raise ValueError(f"unknown fault kind {self.kind!r}")
        if self.kind == "corrupt" and self.rewrite is None:
            raise ValueError("a corrupt fault needs rewrite=")
        self._pattern = re.compile(self.path)

    def matches(self, method: str, target: str) -> bool:
        return (self.method is None or self.method == method) and bool(self._pattern.search(target))

    def decide(self, rng: random.Random) -> bool:
        """Count a match and say whether the rule fires on it."""
        self.matched += 1
        if self.on is not None:
            fire = self.matched in self.on
        elif self.times is not None:
            fire = self.matched <= self.times
        elif self.probability is not None:
            fire = rng.random() < self.probability
        else:
            fire = True
        if fire:
            self.fired += 1
        return fire


@dataclass(frozen=True)
class Event:
    """What happened to one request."""

    arrived: float  # time.monotonic() when its head was read
    finished: float  # when the proxy sent the last byte, or cut the connection
    method: str
    target: str  # path and query
    action: str  # "forwarded" or the fault kind that fired
    status: int | None  # status sent to the client, if any
    retry_after: float | None = None


@dataclass
class _Request:
    method: str
    target: str
    version: str
    headers: list[tuple[str, str]]
    body: bytes = b""
    keep_alive: bool = True


class FaultProxy(Launcher):
    """The proxy: ``url`` replaces the upstream's scheme and authority, paths are kept."""

    def __init__(
        self,
        upstream: str,
        *,
        seed: int = 0,
        faults: list[Fault] | None = None,
        tls: ssl.SSLContext | None = None,
    ) -> None:
        """``tls``, a server-side SSLContext, makes the proxy terminate HTTPS (HTTP/1.1 only)."""
        parts = urlsplit(upstream)
        self.tls = tls
        self.upstream = f"{parts.scheme}://{parts.netloc}"
        self.faults: list[Fault] = list(faults or [])
        self.log: list[Event] = []
        self.port = 0
        self._rng = random.Random(seed)
        self._lock = threading.Lock()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._server: asyncio.AbstractServer | None = None
        self._client: httpx.AsyncClient | None = None
        self._ready = threading.Event()
        self._stopped: asyncio.Event | None = None
        self._writers: set[asyncio.StreamWriter] = set()
        # Called with (method, target, headers) before any rule, in the proxy's thread.
        self.on_request: Callable[[str, str, dict[str, str]], None] | None = None

    @property
    def url(self) -> str:
        """``http(s)://127.0.0.1:PORT``: swap it for the upstream's origin in a URL."""
        return f"{'https' if self.tls else 'http'}://127.0.0.1:{self.port}"

    def proxied(self, url: str) -> str:
        """``url`` (on the upstream) as reached through the proxy."""
        parts = urlsplit(url)
        return f"{self.url}{parts.path}" + (f"?{parts.query}" if parts.query else "")

    def add(self, fault: Fault) -> Fault:
        with self._lock:
            self.faults.append(fault)
        return fault

    def clear(self) -> None:
        """Drop every rule and the log."""
        with self._lock:
            self.faults.clear()
            self.log.clear()

    def events(self, action: str | None = None) -> list[Event]:
        with self._lock:
            return [e for e in self.log if action is None or e.action == action]

    # ------------------------------------------------------------ lifecycle
    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="fault-proxy", daemon=True)
        self._thread.start()
        if not self._ready.wait(10):
            raise RuntimeError("the fault proxy did not start")

    def stop(self) -> None:
        loop, thread = self._loop, self._thread
        if loop is None or thread is None:
            return
        stopped = self._stopped
        if stopped is not None:
            loop.call_soon_threadsafe(stopped.set)
        thread.join(10)
        self._loop = self._thread = None

    def _run(self) -> None:
        asyncio.run(self._main())

    async def _main(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._stopped = asyncio.Event()
        self._client = httpx.AsyncClient(timeout=60.0, follow_redirects=False)
        self._server = await asyncio.start_server(self._connection, "127.0.0.1", 0, ssl=self.tls)
        self.port = self._server.sockets[0].getsockname()[1]
        self._ready.set()
        try:
            await self._stopped.wait()
        finally:
            self._server.close()
            for writer in list(self._writers):
                writer.transport.abort()
            await self._server.wait_closed()
            await self._client.aclose()

    # --------------------------------------------------------------- serving
    async def _connection(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._writers.add(writer)
        try:
            while True:
                request = await _read_request(reader)
                if request is None:
                    return
                if not await self._handle(request, writer):
                    return
                if not request.keep_alive:
                    return
        except (ConnectionError, asyncio.IncompleteReadError, ValueError):
            return
        finally:
            self._writers.discard(writer)
            if not writer.transport.is_closing():
                writer.close()

    def _pick(self, request: _Request) -> list[Fault]:
        with self._lock:
            return [
                f for f in self.faults if f.matches(request.method, request.target) and f.decide(self._rng)
            ]

    def _record(
        self, arrived: float, request: _Request, action: str, status: int | None, retry: float | None
    ) -> None:
        with self._lock:
            self.log.append(
                Event(arrived, time.monotonic(), request.method, request.target, action, status, retry)
            )

    async def _handle(self, request: _Request, writer: asyncio.StreamWriter) -> bool:
        """Serve one request; False when the connection was closed on purpose."""
        arrived = time.monotonic()
        if self.on_request is not None:
            self.on_request(request.method, request.target, {k.lower(): v for k, v in request.headers})
        fired = self._pick(request)
        for fault in fired:
            if fault.kind == "delay":
                await asyncio.sleep(fault.delay)
        for fault in fired:
            if fault.kind == "status":
                headers = [("Content-Type", "application/json")]
                if fault.retry_after is not None:
                    headers.append(("Retry-After", f"{fault.retry_after:g}"))
                body = b'{"error": "injected by the fault proxy"}'
                await _respond(writer, fault.status, headers, body)
                self._record(arrived, request, "status", fault.status, fault.retry_after)
                return True
            if fault.kind == "reset" and fault.when == "before":
                self._record(arrived, request, "reset", None, None)
                _reset(writer)
                return False
        try:
            status, headers, body = await self._forward(request)
        except httpx.HTTPError:
            # The upstream is gone: look like it to the client, as if it were reached directly.
            self._record(arrived, request, "upstream-down", None, None)
            _reset(writer)
            return False
        for fault in fired:
            if fault.kind == "reset":
                self._record(arrived, request, "reset-after", None, None)
                _reset(writer)
                return False
            if fault.kind == "corrupt":
                assert fault.rewrite is not None
                body = fault.rewrite(body)
            if fault.kind == "truncate":
                cut = int(len(body) * fault.keep)
                head = _head(status, headers, len(body))
                writer.write(head + body[:cut])
                await writer.drain()
                self._record(arrived, request, "truncate", status, None)
                _reset(writer)
                return False
        await _respond(writer, status, headers, body)
        action = "corrupt" if any(f.kind == "corrupt" for f in fired) else "forwarded"
        self._record(arrived, request, action, status, None)
        return True

    async def _forward(self, request: _Request) -> tuple[int, list[tuple[str, str]], bytes]:
        assert self._client is not None
        headers = [(k, v) for k, v in request.headers if k.lower() not in HOP_BY_HOP]
        headers.append(("Accept-Encoding", "identity"))
        response = await self._client.request(
            request.method, self.upstream + request.target, headers=headers, content=request.body
        )
        out = [(k, v) for k, v in response.headers.multi_items() if k.lower() not in HOP_BY_HOP]
        return response.status_code, out, response.content


async def _read_request(reader: asyncio.StreamReader) -> _Request | None:
    line = await reader.readline()
    if not line:
        return None
    method, target, version = line.decode("latin-1").rstrip("\r\n").split(" ", 2)
    headers: list[tuple[str, str]] = []
    while True:
        raw = await reader.readline()
        if raw in (b"\r\n", b"\n", b""):
            break
        name, _, value = raw.decode("latin-1").partition(":")
        headers.append((name.strip(), value.strip()))
    lookup = {k.lower(): v for k, v in headers}
    if "chunked" in lookup.get("transfer-encoding", "").lower():
        chunks = []
        while True:
            size = int((await reader.readline()).split(b";")[0].strip(), 16)
            if size == 0:
                await reader.readline()
                break
            chunks.append(await reader.readexactly(size))
            await reader.readline()
        body = b"".join(chunks)
    else:
        body = await reader.readexactly(int(lookup.get("content-length", "0")))
    keep_alive = lookup.get("connection", "").lower() != "close" and version == "HTTP/1.1"
    return _Request(method, target, version, headers, body, keep_alive)


def _head(status: int, headers: list[tuple[str, str]], length: int) -> bytes:
    reason = REASONS.get(status, "OK" if status < 400 else "Error")
    lines = [f"HTTP/1.1 {status} {reason}", *(f"{k}: {v}" for k, v in headers), f"Content-Length: {length}"]
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")


async def _respond(
    writer: asyncio.StreamWriter, status: int, headers: list[tuple[str, str]], body: bytes
) -> None:
    writer.write(_head(status, headers, len(body)) + body)
    await writer.drain()


def _reset(writer: asyncio.StreamWriter) -> None:
    """Close with a TCP RST rather than a FIN: what a crashed peer or a middlebox does."""
    sock = writer.get_extra_info("socket")
    if sock is not None:
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        except OSError:
            pass
    writer.transport.abort()


@dataclass
class Retries:
    """For one request target: each injected answer and the time until the next try."""

    target: str
    gaps: list[tuple[float, float]] = field(default_factory=list)  # (asked Retry-After, waited)


def retry_gaps(log: list[Event]) -> list[Retries]:
    """Per target, the wait between each injected Retry-After answer and the next request for it."""
    by_target: dict[tuple[str, str], list[Event]] = {}
    for event in sorted(log, key=lambda e: e.arrived):
        by_target.setdefault((event.method, event.target), []).append(event)
    out = []
    for (_, target), events in by_target.items():
        record = Retries(target)
        for first, second in zip(events, events[1:], strict=False):
            if first.retry_after is not None:
                record.gaps.append((first.retry_after, second.arrived - first.finished))
        if record.gaps:
            out.append(record)
    return out
