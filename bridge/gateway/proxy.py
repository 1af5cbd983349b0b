"""Forwarding one DICOMweb request to an archive and streaming its answer back, bounded.

A large body is never held whole: it is passed on chunk by chunk as the archive sends it, still
encoded (gzip stays gzip, so the caller's ``Accept-Encoding`` decides), under the same bounds as
every other upstream answer (bridge/upstream/bounds.py): one deadline from connect to the last byte and a
size cap counted as bytes arrive. Crossing a bound mid-stream ends the answer early, which the
caller sees as a truncated transfer rather than as complete images. An answer that declares at
most ONE_BODY bytes (a study's metadata, a slice) is read whole within the same bounds and sent
as one body: streaming it would cost more than the bytes (a task and a disconnect listener per
answer), and a bound crossed while reading it is then a clean 502/504 instead of a cut.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import httpx

from bridge.errors import UpstreamLimitError
from bridge.upstream.bounds import CallLimit, send_bounded, too_large
from bridge.upstream.errors import error_for_exception, error_for_response, json_body, where

logger = logging.getLogger(__name__)

SERVICE = "dicomweb"
# Request headers a caller may send on to the archive; its credentials and cookies never pass.
FORWARDED_REQUEST = ("accept", "range", "if-range", "if-none-match", "if-modified-since", "accept-charset")
# Answer headers passed back; the archive's own addresses (Location, Content-Location) stay behind.
PASSED_RESPONSE = (
    "content-type",
    "content-length",
    "content-encoding",
    "content-range",
    "accept-ranges",
    "etag",
    "last-modified",
    "warning",
)
# The archive refusing the bridge's own credentials is the bridge's problem, not the caller's.
_BRIDGE_FAULT = frozenset({401, 403, 407})
# Answers declaring at most this many bytes are read whole and sent as one body (see above).
ONE_BODY = 1024 * 1024


def request_headers(given: Mapping[str, str]) -> dict[str, str]:
    """The headers to send the archive for a caller's request headers."""
    headers = {name: given[name] for name in FORWARDED_REQUEST if name in given}
    # Without this httpx would ask for gzip on its own, and the raw bytes passed on would be gzip
    # that the caller never asked for.
    headers["accept-encoding"] = given.get("accept-encoding") or "identity"
    return headers


def response_headers(answer: httpx.Response) -> dict[str, str]:
    """The archive's answer headers the caller gets, plus the bridge's own."""
    headers = {name: answer.headers[name] for name in PASSED_RESPONSE if name in answer.headers}
    headers["cache-control"] = "no-store"  # patient data: never kept by a shared cache
    return headers


@dataclass
class Forwarded:
    """An archive's answer, headers read; its body whole (a small answer) or still to stream."""

    status: int
    headers: dict[str, str]
    body: bytes | AsyncIterator[bytes]


async def forward(
    client: httpx.AsyncClient,
    url: str,
    *,
    method: str,
    params: list[tuple[str, str]],
    headers: Mapping[str, str],
    limit: CallLimit,
) -> Forwarded:
    """Send one request to the archive; the answer's headers are read, its body streams on.

    Errors the caller cannot fix (the archive down, refusing the bridge, too slow or too large
    before the first byte) raise UpstreamError for the app's error mapping.
    """
    request = client.build_request(
        method, url, params=httpx.QueryParams(tuple(params)), headers=dict(headers)
    )
    started = time.monotonic()
    deadline = asyncio.get_running_loop().time() + limit.deadline
    try:
        async with asyncio.timeout_at(deadline):
            answer = await client.send(request, stream=True)
    except TimeoutError:
        raise UpstreamLimitError(
            f"{SERVICE} {where(request)}: no answer within {limit.deadline:g} s ({limit.deadline_setting})",
            service=SERVICE,
            setting=limit.deadline_setting,
        ) from None
    except httpx.HTTPError as exc:
        raise error_for_exception(exc, request, SERVICE) from exc
    if answer.status_code in _BRIDGE_FAULT or answer.status_code >= 500:
        await answer.aclose()
        raise error_for_response(answer, SERVICE)
    if answer.status_code >= 400:
        # The archive's own error body is never passed on: its wording can confirm that another
        # patient's UID exists ("instance X is not in study Y"). The caller gets the bridge's reason.
        await answer.aclose()
        return Forwarded(answer.status_code, {"cache-control": "no-store"}, b"")
    declared = answer.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit.max_bytes:
        await answer.aclose()
        raise too_large(request, limit, SERVICE, answer.status_code)
    if declared.isdigit() and int(declared) <= ONE_BODY:
        return Forwarded(answer.status_code, response_headers(answer), await _whole(answer, limit, deadline))
    return Forwarded(answer.status_code, response_headers(answer), _stream(answer, limit, deadline, started))


async def _whole(answer: httpx.Response, limit: CallLimit, deadline: float) -> bytes:
    """The raw body of a small answer, read within the call's deadline and size bound."""
    request = answer.request
    chunks: list[bytes] = []
    size = 0
    try:
        async with asyncio.timeout_at(deadline):
            async for chunk in answer.aiter_raw():
                chunks.append(chunk)
                size += len(chunk)
                if size > limit.max_bytes:  # more than declared: HTTP/1.1 framing forbids it
                    raise too_large(request, limit, SERVICE, answer.status_code)
    except TimeoutError:
        raise UpstreamLimitError(
            f"{SERVICE} {where(request)}: the answer did not complete within {limit.deadline:g} s "
            f"({limit.deadline_setting})",
            service=SERVICE,
            status=answer.status_code,
            setting=limit.deadline_setting,
        ) from None
    except httpx.HTTPError as exc:
        raise error_for_exception(exc, request, SERVICE) from exc
    finally:
        await answer.aclose()
    return chunks[0] if len(chunks) == 1 else b"".join(chunks)  # one copy at most


class StreamCut(Exception):  # noqa: N818 - a signal, not an error the app maps
    """An answer cut mid-stream; raised so the server aborts the connection rather than end it cleanly."""


async def _stream(
    answer: httpx.Response, limit: CallLimit, deadline: float, started: float
) -> AsyncIterator[bytes]:
    sent = 0
    chunks = answer.aiter_raw().__aiter__()
    why = ""
    try:
        while True:
            try:
                async with asyncio.timeout_at(deadline):
                    chunk = await chunks.__anext__()
            except StopAsyncIteration:
                return
            except TimeoutError:
                why = f"after {time.monotonic() - started:.1f} s ({limit.deadline_setting})"
                break
            except httpx.HTTPError as exc:
                why = f"the archive broke off ({type(exc).__name__})"
                break
            sent += len(chunk)
            if sent > limit.max_bytes:
                why = f"at {limit.max_bytes} bytes ({limit.max_bytes_setting})"
                break
            yield chunk
    finally:
        await answer.aclose()
    # Ending quietly would tell a chunked caller the answer was complete.
    logger.warning("gateway: %s cut %s", where(answer.request), why)
    raise StreamCut(why)


async def search_json(
    client: httpx.AsyncClient, base: str, path: str, params: Sequence[tuple[str, str]], limit: CallLimit
) -> list[Any]:
    """One QIDO-RS answer of an archive as DICOM JSON rows, read whole within ``limit``."""
    request = client.build_request(
        "GET",
        f"{base.rstrip('/')}/{path}",
        params=httpx.QueryParams(tuple(params)),
        headers={"Accept": "application/dicom+json"},
    )
    try:
        answer = await send_bounded(client, request, limit, SERVICE)
    except httpx.HTTPError as exc:
        raise error_for_exception(exc, request, SERVICE) from exc
    if answer.status_code == 204:
        return []
    if not answer.is_success:
        raise error_for_response(answer, SERVICE)
    body = json_body(answer, SERVICE)
    return body if isinstance(body, list) else []
