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

Where an answer can be large (QIDO-RS pages, series lists, metadata, FHIR reads and searches), its
JSON is parsed once the body is in, by ijson's incremental C parser, a slice of ``PARSE_STEP``
bytes at a time with the event loop given a turn between slices, and each chunk of bytes is let go
as it is parsed. So no single step holds the interpreter for long (``json.loads`` of a 3 MB
ImagingStudy is one C call of 30-120 ms, which stalls every other request, /healthz included, even
from a worker thread); the bytes and the objects made from them never add up (the bytes shrink as
the objects grow); and an answer that breaks a bound costs only its bytes, as nothing is built
before the whole body is in. A body that does not begin like JSON (an HTML error page) stops the
reading at its first byte. Bodies up to ``PARSE_AT_ONCE`` take ``json.loads``: a few
milliseconds. Rows of a larger top-level array share their keys, as json.loads's do.
"""

from __future__ import annotations

import asyncio
import json
import re
import time
from collections import deque
from dataclasses import dataclass
from itertools import accumulate
from typing import TYPE_CHECKING, Any

import httpx
import ijson

from bridge.errors import UpstreamLimitError

if TYPE_CHECKING:
    from bridge.config import ArchiveSettings, Settings

_DROPPED_HEADERS = ("content-encoding", "content-length", "transfer-encoding")
# Bytes of JSON parsed in one step: about 1-3 ms of C on this machine's cores.
PARSE_STEP = 64 * 1024
PARSE_AT_ONCE = 256 * 1024  # smaller bodies: one json.loads, 1-3 ms
_BOM = b"\xef\xbb\xbf"
_JSON_STARTS = frozenset(b'[{"-0123456789tfn')
# Deepest nesting accepted (json.loads stops near 1,000 too). DICOM JSON with nested sequences and
# FHIR resources stay under 30; ijson's memory grows with the square of the depth (every level's
# event carries its whole path): 40 kB of nested brackets took about a gigabyte.
MAX_DEPTH = 512
# A whole string, and the rest of one begun in an earlier piece; possessive, so a long string is
# one step for the regex engine, never a backtracking stack as long as the string.
_STRING = re.compile(rb'"[^"\\]*+(?:\\.[^"\\]*+)*+"', re.DOTALL)
_STRING_END = re.compile(rb'[^"\\]*+(?:\\.[^"\\]*+)*+"', re.DOTALL)
_NOT_BRACKETS = bytes(b for b in range(256) if b not in b"[]{}")
_STEP_OF = {ord("["): 1, ord("{"): 1, ord("]"): -1, ord("}"): -1}


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


def _where(request: httpx.Request) -> str:
    # Method and path only: the query string may carry a PatientID.
    return f"{request.method} {request.url.scheme}://{request.url.netloc.decode()}{request.url.path}"


def too_large(request: httpx.Request, limit: CallLimit, service: str, status: int) -> UpstreamLimitError:
    """The error of an answer to ``request`` larger than ``limit`` allows."""
    return UpstreamLimitError(
        f"{service} {_where(request)}: the {limit.kind} answer is larger than {limit.max_bytes} bytes "
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
        f"{service} {_where(request)}: the {limit.kind} answer trickled at {rate:.0f} bytes/s over "
        f"{pace.stall:g} s, below {pace.min_rate} bytes/s ({pace.min_rate_setting}, measured over "
        f"{pace.stall_setting} seconds); lower it if the upstream is right to be that slow",
        service=service,
        status=status,
        setting=pace.min_rate_setting,
    )


class ParsedResponse(httpx.Response):
    """An answer whose JSON body was parsed as it was read: ``json()`` gives it, ``content`` is empty.

    ``empty`` says the body had nothing but white space. ``json()`` raises ValueError, as httpx's
    does, for an empty body or one that is not JSON.
    """

    def __init__(
        self, *args: Any, document: Any, error: ValueError | None, empty: bool, **kwargs: Any
    ) -> None:
        super().__init__(*args, **kwargs)
        self._document = document
        self._error = error
        self.empty = empty

    def json(self, **kwargs: Any) -> Any:
        """The parsed body (ValueError if it was empty or not JSON)."""
        if self._error is not None:
            raise self._error
        return self._document


def _not_json(first: bytes) -> bool:
    """Whether a body that begins with ``first`` cannot be JSON (past a BOM and white space)."""
    head = first[:4096].removeprefix(_BOM).lstrip()
    return bool(head) and head[0] not in _JSON_STARTS


class _Depth:
    """How deep a JSON text nests, followed piece by piece (brackets inside strings do not count)."""

    def __init__(self) -> None:
        self.depth = 0
        self.deepest = 0
        self._in_string = False
        self._escaped = False  # the piece before ended in a string, on an escaping backslash

    def see(self, piece: bytes) -> None:
        """Follow ``piece``, the text after the pieces seen before."""
        if not piece:
            return
        if self._in_string:
            if self._escaped:
                piece, self._escaped = piece[1:], False
            end = _STRING_END.match(piece)
            if end is None:  # the string goes on into the next piece
                self._escaped = _odd_backslashes(piece)
                return
            piece, self._in_string = piece[end.end() :], False
        outside = _STRING.sub(b"", piece)
        opened = outside.find(b'"')
        if opened >= 0:  # a string that goes on into the next piece
            self._in_string = True
            self._escaped = _odd_backslashes(piece)
            outside = outside[:opened]
        brackets = outside.translate(None, _NOT_BRACKETS)
        if brackets:
            levels = list(accumulate(map(_STEP_OF.__getitem__, brackets), initial=self.depth))
            self.deepest = max(self.deepest, max(levels))
            self.depth = levels[-1]


def _odd_backslashes(piece: bytes) -> bool:
    return (len(piece) - len(piece.rstrip(b"\\"))) % 2 == 1


def _shared(value: Any, keys: dict[str, str]) -> Any:
    """``value`` with every object key replaced by one shared copy (as json.loads shares them)."""
    if isinstance(value, dict):
        return {keys.setdefault(k, k): _shared(v, keys) for k, v in value.items()}
    if isinstance(value, list):
        return [_shared(v, keys) for v in value]
    return value


async def _parse(chunks: list[bytes], size: int) -> tuple[Any, ValueError | None]:
    """The JSON document in ``chunks`` (``size`` bytes), parsed in steps; each chunk is let go once parsed.

    A top-level array (QIDO-RS rows) is taken row by row, each row's keys shared with the rows
    before it: ijson makes a new string for every key, a third more memory than json.loads for
    DICOM JSON. ijson's messages quote the text around a fault, which may be patient data: they
    are dropped.
    """
    not_json = ValueError("the body is not JSON")
    if size <= PARSE_AT_ONCE:
        try:
            return json.loads(b"".join(chunks)), None
        except (ValueError, RecursionError):  # JSONDecodeError, UnicodeDecodeError, too deep
            return None, not_json
    if chunks:
        chunks[0] = chunks[0].removeprefix(_BOM)
    rows = next((c.lstrip()[:1] for c in chunks if c.strip()), b"") == b"["
    found: list[Any] = ijson.sendable_list()
    # use_float: numbers as json.loads gives them (ijson's default makes Decimals)
    parser = ijson.items_coro(found, "item" if rows else "", use_float=True)
    kept: list[Any] = []
    keys: dict[str, str] = {}
    depth = _Depth()
    queue = deque(chunks)
    chunks.clear()
    try:
        while queue:
            chunk = queue.popleft()
            for start in range(0, len(chunk), PARSE_STEP):
                piece = chunk[start : start + PARSE_STEP]
                depth.see(piece)
                if depth.deepest > MAX_DEPTH:
                    return None, ValueError(f"the body nests deeper than {MAX_DEPTH} levels")
                parser.send(piece)
                if rows:
                    kept.extend(_shared(row, keys) for row in found)
                    del found[:]
                await asyncio.sleep(0)
            del chunk
        parser.close()
    except (ijson.JSONError, RecursionError):
        return None, not_json
    if rows:
        return kept, None
    return (found[0], None) if found else (None, not_json)


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
                if parse and not chunks and _not_json(chunk):
                    not_json = True
                    break  # an HTML page, say: reading on would only cost time
                chunks.append(chunk)
    except TimeoutError:
        status = response.status_code if response is not None else None
        if not whole.expired():
            raise UpstreamLimitError(
                f"{service} {_where(request)}: the {limit.kind} answer stalled: no byte for "
                f"{pace.stall:g} s ({pace.stall_setting}; {time.monotonic() - started:.1f} s spent)",
                service=service,
                status=status,
                setting=pace.stall_setting,
            ) from None
        raise UpstreamLimitError(
            f"{service} {_where(request)}: the {limit.kind} answer did not complete within "
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
            document, error = await _parse(chunks, size)
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


MIB = 1024 * 1024


@dataclass(frozen=True, slots=True)
class DicomwebLimits:
    """The archive-side bounds (settings ``BRIDGE_HTTP_DEADLINE`` and ``BRIDGE_DICOMWEB_MAX_*``)."""

    deadline: float = 300.0
    page_bytes: int = 16 * MIB
    series_bytes: int = 16 * MIB
    metadata_bytes: int = 16 * MIB
    thumbnail_bytes: int = 8 * MIB
    max_pages: int = 100_000
    max_series: int = 10_000
    pace: Pace = Pace()

    @classmethod
    def from_settings(cls, archive: ArchiveSettings, settings: Settings) -> DicomwebLimits:
        """The bounds one archive's settings choose, under the upstream deadline and pace."""
        return cls(
            deadline=settings.http.deadline,
            pace=Pace.from_settings(settings),
            page_bytes=archive.max_page_bytes,
            series_bytes=archive.max_series_bytes,
            metadata_bytes=archive.max_metadata_bytes,
            thumbnail_bytes=archive.max_thumbnail_bytes,
            max_pages=archive.max_pages,
            max_series=archive.max_series,
        )

    def page(self) -> CallLimit:
        """One QIDO-RS page of studies or instances."""
        return CallLimit(
            "study page", self.page_bytes, "BRIDGE_DICOMWEB_MAX_PAGE_BYTES", self.deadline, pace=self.pace
        )

    def series(self) -> CallLimit:
        """One page of a study's series."""
        return CallLimit(
            "series list",
            self.series_bytes,
            "BRIDGE_DICOMWEB_MAX_SERIES_BYTES",
            self.deadline,
            pace=self.pace,
        )

    def metadata(self) -> CallLimit:
        """One instance's WADO-RS metadata."""
        return CallLimit(
            "metadata",
            self.metadata_bytes,
            "BRIDGE_DICOMWEB_MAX_METADATA_BYTES",
            self.deadline,
            pace=self.pace,
        )

    def thumbnail(self, deadline: float | None = None) -> CallLimit:
        """One rendered picture (``deadline``: a tighter one for an interactive caller)."""
        return CallLimit(
            "thumbnail",
            self.thumbnail_bytes,
            "BRIDGE_DICOMWEB_MAX_THUMBNAIL_BYTES",
            min(self.deadline, deadline) if deadline else self.deadline,
            pace=self.pace,
        )


def fhir_limit(settings: Settings) -> CallLimit:
    """The bound of every FHIR answer."""
    return CallLimit(
        "FHIR",
        settings.fhir.max_response_bytes,
        "BRIDGE_FHIR_MAX_RESPONSE_BYTES",
        settings.http.deadline,
        pace=Pace.from_settings(settings),
    )
