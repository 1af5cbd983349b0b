"""A PatientName read from an instance's Part 10 file (WADO-RS), only as far as the header goes.

For a study whose name the archive's JSON garbled: the file is streamed, looked at after its first
``_FIRST_HEAD_BYTES`` and then at each doubling, and the connection is closed once the name is
read, so the pixels that follow are never fetched.
"""

from __future__ import annotations

import asyncio

import httpx

from bridge.dicomweb.paging import NOT_OFFERED, SERVICE
from bridge.errors import UpstreamLimitError
from bridge.mapping.records import part10_patient_name
from bridge.upstream.bounds import CallLimit
from bridge.upstream.errors import (
    TRANSPORT_ERRORS,
    auth_error,
    error_for_exception,
    error_for_response,
    where,
)
from bridge.upstream.retry import RetryPolicy

_FIRST_HEAD_BYTES = 16 * 1024  # a first look at a Part 10 file: most headers fit, pixels follow


def _boundary(content_type: str) -> bytes | None:
    """The multipart boundary of a Content-Type, or None for a single part."""
    if not content_type.lower().startswith("multipart/"):
        return None
    for param in content_type.split(";")[1:]:
        key, _, value = param.strip().partition("=")
        if key.lower() == "boundary" and value:
            return value.strip('"').encode("latin-1")
    return None


def _first_part(data: bytes, boundary: bytes | None) -> bytes:
    """The body of the first part of a multipart answer (the answer itself when not multipart)."""
    if boundary is None:
        return data
    start = data.find(b"--" + boundary)
    head_end = data.find(b"\r\n\r\n", start) if start >= 0 else -1
    if head_end < 0:
        return b""
    body = data[head_end + 4 :]
    end = body.find(b"\r\n--" + boundary)
    return body[:end] if end >= 0 else body



async def read_patient_name(
    client: httpx.AsyncClient, request: httpx.Request, max_bytes: int
) -> tuple[httpx.Response, tuple[str | None, str | None]]:
    """The answer, and the name read from its body only as far as the header goes."""
    response = await client.send(request, stream=True)
    try:
        if response.status_code in NOT_OFFERED:
            return response, (None, f"the archive answered {response.status_code} to a Part 10 retrieve")
        if not response.is_success:
            await response.aread()  # an error answer is small; its text goes into the error
            if response.status_code in (401, 403):  # credentials: no study can pass
                raise auth_error(response, SERVICE)
            raise error_for_response(response, SERVICE)
        boundary = _boundary(response.headers.get("content-type", ""))
        data = bytearray()
        next_try = _FIRST_HEAD_BYTES
        async for chunk in response.aiter_bytes():
            data.extend(chunk)
            if len(data) > max_bytes:
                too_big = "the Part 10 header is larger than BRIDGE_DICOMWEB_MAX_METADATA_BYTES"
                return response, (None, too_big)
            if len(data) >= next_try:
                next_try = len(data) * 2
                name = part10_patient_name(_first_part(bytes(data), boundary), complete=False)
                if name is not None:
                    return response, name  # the rest of the file (pixels) is never read
        name = part10_patient_name(_first_part(bytes(data), boundary), complete=True)
        return response, name or (None, "the Part 10 header cannot be read")
    finally:
        await response.aclose()


async def fetch_patient_name(
    client: httpx.AsyncClient, request: httpx.Request, limit: CallLimit, policy: RetryPolicy
) -> tuple[str | None, str | None]:
    """PatientName from the Part 10 file ``request`` asks for: (name, None), or (None, why).

    Each try is bounded by ``limit``'s deadline and size cap and reads only as far as the header
    (``read_patient_name``); ``policy`` retries transport errors and 5xx, and gives up with
    UpstreamUnavailableError as for every other archive call.
    """
    found: list[tuple[str | None, str | None]] = []

    async def attempt() -> httpx.Response:
        try:
            async with asyncio.timeout(limit.deadline):
                response, name = await read_patient_name(client, request, limit.max_bytes)
        except TimeoutError:
            raise UpstreamLimitError(
                f"{SERVICE} {where(request)}: the instance file's header did not arrive within "
                f"{limit.deadline:g} s ({limit.deadline_setting})",
                service=SERVICE,
                setting=limit.deadline_setting,
            ) from None
        except TRANSPORT_ERRORS as exc:
            raise error_for_exception(exc, request, SERVICE) from exc
        found[:] = [name]
        return response

    await policy.run(attempt)
    return found[0]
