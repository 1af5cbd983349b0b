"""Bounds on what one upstream answer may cost: a deadline for the whole exchange and a size cap on the body.

httpx's timeout is per read, so a server that sends one byte every few seconds never trips it,
and ``response.aread()`` keeps whatever a server sends. Here the body is streamed under one
monotonic deadline (connect, headers and every byte) and counted as it arrives (after decoding,
so a gzip bomb is caught too); crossing either bound is an ``UpstreamLimitError`` naming the
setting to raise. Such an answer is not retried: the same request would break the same bound.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING

import httpx

from bridge.errors import UpstreamLimitError

if TYPE_CHECKING:
    from bridge.config import ArchiveSettings, Settings

_DROPPED_HEADERS = ("content-encoding", "content-length", "transfer-encoding")


@dataclass(frozen=True, slots=True)
class CallLimit:
    """The bounds of one kind of call, with the settings that set them (named in errors)."""

    kind: str  # e.g. "study page", "series list": what the caller asked for
    max_bytes: int
    max_bytes_setting: str
    deadline: float  # seconds, connect to last byte
    deadline_setting: str = "BRIDGE_HTTP_DEADLINE"


def _where(request: httpx.Request) -> str:
    # Method and path only: the query string may carry a PatientID.
    return f"{request.method} {request.url.scheme}://{request.url.netloc.decode()}{request.url.path}"


def _too_large(request: httpx.Request, limit: CallLimit, service: str, status: int) -> UpstreamLimitError:
    return UpstreamLimitError(
        f"{service} {_where(request)}: the {limit.kind} answer is larger than {limit.max_bytes} bytes "
        f"({limit.max_bytes_setting}); raise it if the upstream is right to send that much",
        service=service,
        status=status,
        setting=limit.max_bytes_setting,
    )


async def send_bounded(
    client: httpx.AsyncClient, request: httpx.Request, limit: CallLimit, service: str
) -> httpx.Response:
    """Send ``request`` and read its whole body within ``limit``; the answer comes back fully read.

    Transport errors propagate unchanged (the caller maps them); a broken bound raises
    UpstreamLimitError and closes the connection, so nothing keeps reading after it.
    """
    started = time.monotonic()
    response: httpx.Response | None = None
    try:
        async with asyncio.timeout(limit.deadline):
            response = await client.send(request, stream=True)
            declared = response.headers.get("content-length", "")
            body = bytearray()
            if declared.isdigit() and int(declared) > limit.max_bytes:
                raise _too_large(request, limit, service, response.status_code)
            async for chunk in response.aiter_bytes():
                body += chunk
                if len(body) > limit.max_bytes:
                    raise _too_large(request, limit, service, response.status_code)
    except TimeoutError:
        raise UpstreamLimitError(
            f"{service} {_where(request)}: the {limit.kind} answer did not complete within "
            f"{limit.deadline:g} s ({limit.deadline_setting}; {time.monotonic() - started:.1f} s spent)",
            service=service,
            status=response.status_code if response is not None else None,
            setting=limit.deadline_setting,
        ) from None
    finally:
        if response is not None:
            await response.aclose()
    headers = [(k, v) for k, v in response.headers.multi_items() if k.lower() not in _DROPPED_HEADERS]
    return httpx.Response(
        response.status_code,
        headers=headers,
        content=bytes(body),
        request=request,
        extensions={"http_version": response.extensions.get("http_version", b"HTTP/1.1")},
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

    @classmethod
    def from_settings(cls, archive: ArchiveSettings, deadline: float) -> DicomwebLimits:
        """The bounds one archive's settings choose, under the upstream deadline."""
        return cls(
            deadline=deadline,
            page_bytes=archive.max_page_bytes,
            series_bytes=archive.max_series_bytes,
            metadata_bytes=archive.max_metadata_bytes,
            thumbnail_bytes=archive.max_thumbnail_bytes,
            max_pages=archive.max_pages,
            max_series=archive.max_series,
        )

    def page(self) -> CallLimit:
        """One QIDO-RS page of studies or instances."""
        return CallLimit("study page", self.page_bytes, "BRIDGE_DICOMWEB_MAX_PAGE_BYTES", self.deadline)

    def series(self) -> CallLimit:
        """One page of a study's series."""
        return CallLimit("series list", self.series_bytes, "BRIDGE_DICOMWEB_MAX_SERIES_BYTES", self.deadline)

    def metadata(self) -> CallLimit:
        """One instance's WADO-RS metadata."""
        return CallLimit("metadata", self.metadata_bytes, "BRIDGE_DICOMWEB_MAX_METADATA_BYTES", self.deadline)

    def thumbnail(self, deadline: float | None = None) -> CallLimit:
        """One rendered picture (``deadline``: a tighter one for an interactive caller)."""
        return CallLimit(
            "thumbnail",
            self.thumbnail_bytes,
            "BRIDGE_DICOMWEB_MAX_THUMBNAIL_BYTES",
            min(self.deadline, deadline) if deadline else self.deadline,
        )


def fhir_limit(settings: Settings) -> CallLimit:
    """The bound of every FHIR answer."""
    return CallLimit(
        "FHIR", settings.fhir.max_response_bytes, "BRIDGE_FHIR_MAX_RESPONSE_BYTES", settings.http_deadline
    )
