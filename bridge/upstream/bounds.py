"""Bounds on what one upstream answer may cost: a deadline for the whole exchange, a pace, a size cap.

httpx's timeout is per read, so a server that sends one byte every few seconds never trips it,
and ``response.aread()`` keeps whatever a server sends. Here the body is streamed under one
monotonic deadline (connect, headers and every byte) and counted as it arrives (after decoding,
so a gzip bomb is caught too); crossing either bound is an ``UpstreamLimitError`` naming the
setting to raise. Such an answer is not retried: the same request would break the same bound.

The deadline is only the outer bound: a peer that stalls (no byte for ``Pace.stall`` seconds) or
trickles (fewer than ``Pace.min_rate`` bytes a second over any stretch of ``Pace.stall`` seconds
once the headers are in) is cut long before it, so one stuck answer never holds a run for the
whole deadline. An answer that completes within one stretch is never measured for its rate.

A large JSON answer is parsed once its body is in, in steps (bridge/upstream/jsonstream.py).
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass

import httpx

from bridge.config import Settings
from bridge.errors import UpstreamLimitError
from bridge.upstream.errors import where
from bridge.upstream.jsonstream import ParsedResponse, cannot_be_json, parse_chunks

_DROPPED_HEADERS = ("content-encoding", "content-length", "transfer-encoding")


@dataclass(frozen=True, slots=True)
class Pace:
    """How slow an answer may be before it is cut, with the settings that set it (named in errors)."""

    stall: float = 15.0  # seconds without a byte (headers included)
    min_rate: int = 1024  # bytes per second over each stretch of ``stall`` seconds; 0: not checked
    stall_setting: str = "BRIDGE_HTTP_STALL"
    min_rate_setting: str = "BRIDGE_HTTP_MIN_RATE"

    @classmethod
    def from_settings(cls, settings: Settings) -> Pace:
        """The pace the settings choose."""
        return cls(settings.http.stall, settings.http.min_rate)


# The pace of the small fixed-bound calls (tokens, OIDC discovery, JWKS), which no setting changes.
FIXED_PACE = Pace(stall_setting="a fixed 15 s stall bound", min_rate_setting="a fixed 1024 bytes/s floor")


@dataclass(frozen=True, slots=True)
class CallLimit:
    """The bounds of one kind of call, with the settings that set them (named in errors)."""

    kind: str  # e.g. "study page", "series list": what the caller asked for
    max_bytes: int
    max_bytes_setting: str
    deadline: float  # seconds, connect to last byte
    deadline_setting: str = "BRIDGE_HTTP_DEADLINE"
    pace: Pace = Pace()


def too_large(request: httpx.Request, limit: CallLimit, service: str, status: int) -> UpstreamLimitError:
    """The error of an answer to ``request`` larger than ``limit`` allows."""
    return UpstreamLimitError(
        f"{service} {where(request)}: the {limit.kind} answer is larger than {limit.max_bytes} bytes "
        f"({limit.max_bytes_setting}); raise it if the upstream is right to send that much",
        service=service,
        status=status,
        setting=limit.max_bytes_setting,
    )


def _too_slow(
    request: httpx.Request, limit: CallLimit, service: str, status: int, rate: float
) -> UpstreamLimitError:
    """The error of an answer to ``request`` that arrived slower than its pace allows."""
    pace = limit.pace
    return UpstreamLimitError(
        f"{service} {where(request)}: the {limit.kind} answer trickled at {rate:.0f} bytes/s over "
        f"{pace.stall:g} s, below {pace.min_rate} bytes/s ({pace.min_rate_setting}, measured over "
        f"{pace.stall_setting} seconds); lower it if the upstream is right to be that slow",
        service=service,
        status=status,
        setting=pace.min_rate_setting,
    )



async def send_bounded(
    client: httpx.AsyncClient,
    request: httpx.Request,
    limit: CallLimit,
    service: str,
    *,
    parse_json: bool = False,
) -> httpx.Response:
    """Send ``request`` and read its whole body within ``limit``; the answer comes back fully read.

    With ``parse_json``, a successful (2xx) answer's body is parsed in steps once it is in, and comes
    back as a ParsedResponse; other answers, and every answer without it, keep their bytes.
    Transport errors propagate unchanged (the caller maps them); a broken bound raises
    UpstreamLimitError and closes the connection, so nothing keeps reading after it.
    """
    started = time.monotonic()
    pace = limit.pace
    response: httpx.Response | None = None
    parse = False
    not_json = False
    slow: UpstreamLimitError | None = None
    loop = asyncio.get_running_loop()
    whole, quiet = asyncio.timeout(limit.deadline), asyncio.timeout(pace.stall)
    try:
        async with whole, quiet:
            response = await client.send(request, stream=True)
            quiet.reschedule(loop.time() + pace.stall)
            declared = response.headers.get("content-length", "")
            chunks: list[bytes] = []  # a list, not one buffer: parsing lets each go in turn
            size = 0
            if declared.isdigit() and int(declared) > limit.max_bytes:
                raise too_large(request, limit, service, response.status_code)
            parse = parse_json and response.is_success
            # The stretch the rate is measured over: it restarts every ``stall`` seconds.
            stretch_start, stretch_bytes = loop.time(), 0
            async for chunk in response.aiter_bytes():
                size += len(chunk)
                if size > limit.max_bytes:
                    raise too_large(request, limit, service, response.status_code)
                now = loop.time()
                quiet.reschedule(now + pace.stall)
                stretch_bytes += len(chunk)
                if now - stretch_start >= pace.stall:
                    rate = stretch_bytes / (now - stretch_start)
                    if rate < pace.min_rate:
                        slow = _too_slow(request, limit, service, response.status_code, rate)
                        break
                    stretch_start, stretch_bytes = now, 0
                if parse and not chunks and cannot_be_json(chunk):
                    not_json = True
                    break  # an HTML page, say: reading on would only cost time
                chunks.append(chunk)
    except TimeoutError:
        status = response.status_code if response is not None else None
        if not whole.expired():
            raise UpstreamLimitError(
                f"{service} {where(request)}: the {limit.kind} answer stalled: no byte for "
                f"{pace.stall:g} s ({pace.stall_setting}; {time.monotonic() - started:.1f} s spent)",
                service=service,
                status=status,
                setting=pace.stall_setting,
            ) from None
        raise UpstreamLimitError(
            f"{service} {where(request)}: the {limit.kind} answer did not complete within "
            f"{limit.deadline:g} s ({limit.deadline_setting}; {time.monotonic() - started:.1f} s spent)",
            service=service,
            status=status,
            setting=limit.deadline_setting,
        ) from None
    finally:
        if response is not None:
            await response.aclose()
    if slow is not None:
        raise slow
    headers = [(k, v) for k, v in response.headers.multi_items() if k.lower() not in _DROPPED_HEADERS]
    extensions = {"http_version": response.extensions.get("http_version", b"HTTP/1.1")}
    if parse:
        empty = not not_json and not any(chunk.strip() for chunk in chunks)
        error: ValueError | None
        if not_json or empty:
            document, error = None, ValueError("the body is empty" if empty else "the body is not JSON")
        else:
            document, error = await parse_chunks(chunks, size)
        return ParsedResponse(
            response.status_code,
            headers=headers,
            request=request,
            extensions=extensions,
            document=document,
            error=error,
            empty=empty,
        )
    content = b"".join(chunks)
    return httpx.Response(
        response.status_code, headers=headers, content=content, request=request, extensions=extensions
    )

