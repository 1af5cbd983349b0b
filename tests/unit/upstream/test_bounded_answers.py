"""Bounded answers: one deadline for the whole exchange, a size cap on the decoded body, no retry."""

from __future__ import annotations

import asyncio
import gzip
import json
import time
import tracemalloc
from collections.abc import AsyncIterator

import httpx
import pytest

from bridge.errors import FatalUpstreamError, UpstreamLimitError
from bridge.upstream.bounds import CallLimit, Pace, send_bounded
from bridge.upstream.errors import body_is_empty, json_body
from bridge.upstream.jsonstream import MAX_DEPTH, PARSE_AT_ONCE, PARSE_STEP, ParsedResponse, _Depth
from bridge.upstream.retry import RetryPolicy, send

pytestmark = pytest.mark.anyio

URL = "http://archive.test/dicom-web/studies?PatientID=SECRET-PID"


def limit(max_bytes: int = 10_000, deadline: float = 5.0) -> CallLimit:
    return CallLimit("study page", max_bytes, "BRIDGE_DICOMWEB_MAX_PAGE_BYTES", deadline)


class Body:
    """An answer body that goes on as long as it is read, recording how far it got."""

    def __init__(self, chunk: bytes, pause: float = 0.0) -> None:
        self.chunk = chunk
        self.pause = pause
        self.sent = 0

    async def __aiter__(self) -> AsyncIterator[bytes]:
        while True:
            if self.pause:
                await asyncio.sleep(self.pause)
            self.sent += len(self.chunk)
            yield self.chunk


def client(body: Body | bytes, headers: dict[str, str] | None = None) -> tuple[httpx.AsyncClient, list[int]]:
    calls: list[int] = []

    async def handler(request: httpx.Request) -> httpx.Response:
        calls.append(1)
        return httpx.Response(200, headers=headers or {}, content=body)

    return httpx.AsyncClient(transport=httpx.MockTransport(handler)), calls


async def test_a_body_that_drips_fails_at_the_deadline_naming_the_setting() -> None:
    body = Body(b"[", pause=0.05)  # one byte every 50 ms, forever: no single read ever times out
    http, _ = client(body)
    started = time.monotonic()
    with pytest.raises(UpstreamLimitError) as caught:
        await send_bounded(http, http.build_request("GET", URL), limit(deadline=0.5), "dicomweb")
    elapsed = time.monotonic() - started
    print(f"drip ended after {elapsed:.2f} s")
    assert 0.4 < elapsed < 2.0
    assert caught.value.setting == "BRIDGE_HTTP_DEADLINE"
    assert "did not complete within 0.5 s" in str(caught.value)
    assert "SECRET-PID" not in str(caught.value)


def paced(stall: float, min_rate: int = 0, deadline: float = 30.0) -> CallLimit:
    return CallLimit(
        "study page", 1_000_000, "BRIDGE_DICOMWEB_MAX_PAGE_BYTES", deadline, pace=Pace(stall, min_rate)
    )


class Finite:
    """A body of ``count`` chunks, one every ``pause`` seconds."""

    def __init__(self, chunk: bytes, count: int, pause: float) -> None:
        self.chunk, self.count, self.pause = chunk, count, pause

    async def __aiter__(self) -> AsyncIterator[bytes]:
        for _ in range(self.count):
            await asyncio.sleep(self.pause)
            yield self.chunk


async def test_a_body_that_stops_sending_is_cut_at_the_stall_bound_long_before_the_deadline() -> None:
    body = Body(b"[", pause=60.0)  # the first byte after the headers never comes
    http, _ = client(body)
    started = time.monotonic()
    with pytest.raises(UpstreamLimitError) as caught:
        await send_bounded(http, http.build_request("GET", URL), paced(0.3), "dicomweb")
    elapsed = time.monotonic() - started
    assert 0.25 < elapsed < 2.0
    assert caught.value.setting == "BRIDGE_HTTP_STALL"
    assert "no byte for 0.3 s" in str(caught.value)
    assert "SECRET-PID" not in str(caught.value)


async def test_headers_that_never_come_are_cut_at_the_stall_bound() -> None:
    async def handler(request: httpx.Request) -> httpx.Response:
        await asyncio.sleep(60)
        return httpx.Response(200, content=b"[]")

    http = httpx.AsyncClient(transport=httpx.MockTransport(handler))
    started = time.monotonic()
    with pytest.raises(UpstreamLimitError) as caught:
        await send_bounded(http, http.build_request("GET", URL), paced(0.3), "dicomweb")
    assert time.monotonic() - started < 2.0
    assert caught.value.setting == "BRIDGE_HTTP_STALL"


async def test_a_trickle_below_the_minimum_rate_is_cut_after_one_stretch() -> None:
    body = Body(b" ", pause=0.02)  # 50 bytes/s: never quiet long enough to stall
    http, _ = client(body)
    started = time.monotonic()
    with pytest.raises(UpstreamLimitError) as caught:
        await send_bounded(http, http.build_request("GET", URL), paced(0.3, min_rate=1000), "dicomweb")
    elapsed = time.monotonic() - started
    assert 0.25 < elapsed < 2.0
    assert caught.value.setting == "BRIDGE_HTTP_MIN_RATE"
    assert "below 1000 bytes/s" in str(caught.value)


async def test_a_slow_steady_answer_above_the_minimum_rate_completes() -> None:
    # 200 bytes every 20 ms (about 10 kB/s) for 0.8 s: several stretches of 0.2 s, each fast enough.
    body = Finite(b" " * 200, count=40, pause=0.02)
    http, _ = client(body)
    response = await send_bounded(http, http.build_request("GET", URL), paced(0.2, min_rate=2000), "dicomweb")
    assert len(response.content) == 8000


async def test_an_endless_body_stops_at_the_size_cap() -> None:
    body = Body(b"x" * 4096)
    http, _ = client(body)
    with pytest.raises(UpstreamLimitError) as caught:
        await send_bounded(http, http.build_request("GET", URL), limit(max_bytes=100_000), "dicomweb")
    assert caught.value.setting == "BRIDGE_DICOMWEB_MAX_PAGE_BYTES"
    assert "larger than 100000 bytes" in str(caught.value)
    assert body.sent <= 100_000 + 4096


async def test_the_cap_counts_decoded_bytes_so_a_gzip_bomb_is_caught() -> None:
    bomb = gzip.compress(b"0" * 5_000_000)
    assert len(bomb) < 10_000
    http, _ = client(bomb, {"Content-Encoding": "gzip"})
    with pytest.raises(UpstreamLimitError):
        await send_bounded(http, http.build_request("GET", URL), limit(max_bytes=1_000_000), "dicomweb")


async def test_a_declared_length_over_the_cap_is_refused_before_reading() -> None:
    body = Body(b"x" * 1024)
    http, _ = client(body, {"Content-Length": "99999999"})
    with pytest.raises(UpstreamLimitError):
        await send_bounded(http, http.build_request("GET", URL), limit(), "dicomweb")
    assert body.sent == 0


async def test_an_answer_within_bounds_comes_back_decoded_and_read() -> None:
    http, _ = client(gzip.compress(b'[{"a": 1}]'), {"Content-Encoding": "gzip", "Warning": "299 x"})
    response = await send_bounded(http, http.build_request("GET", URL), limit(), "dicomweb")
    assert response.json() == [{"a": 1}]
    assert response.headers["warning"] == "299 x"
    assert "content-encoding" not in response.headers


async def test_send_does_not_retry_an_answer_that_broke_a_bound() -> None:
    http, calls = client(Body(b"x" * 4096))
    policy = RetryPolicy(retries=3, base=0.001)
    with pytest.raises(UpstreamLimitError):
        await send(http, http.build_request("GET", URL), service="dicomweb", policy=policy, limit=limit())
    assert len(calls) == 1


class Chunks:
    """A JSON body made as it is sent, ``count`` chunks of ``size`` bytes, counting what was read."""

    def __init__(self, count: int, size: int) -> None:
        self.count = count
        self.size = size
        self.sent = 0

    async def __aiter__(self) -> AsyncIterator[bytes]:
        for i in range(self.count):
            text = ("[" if i == 0 else ",") + '"' + "a" * (self.size - 3) + '"'
            if i == self.count - 1:
                text += "]"
            self.sent += len(text)
            yield text.encode()


async def test_a_json_answer_is_parsed_as_it_arrives_and_its_bytes_are_not_kept() -> None:
    http, _ = client(gzip.compress(b'\xef\xbb\xbf[{"a": 1, "b": 2.5}, null]'), {"Content-Encoding": "gzip"})
    response = await send_bounded(http, http.build_request("GET", URL), limit(), "dicomweb", parse_json=True)
    assert isinstance(response, ParsedResponse)
    assert response.json() == [{"a": 1, "b": 2.5}, None]
    assert isinstance(response.json()[0]["b"], float)  # as json.loads gives it, not a Decimal
    assert response.content == b"" and not response.empty


async def test_peak_memory_holds_the_parsed_answer_not_its_bytes_too() -> None:
    # 80 strings of 64 kB: the parsed list is about as large as the body, so holding both at once
    # (the body read whole, then decoded) would double the peak.
    body = Chunks(80, 64 * 1024)
    size = 80 * 64 * 1024
    http, _ = client(body)  # type: ignore[arg-type]
    request = http.build_request("GET", URL)
    tracemalloc.start()
    try:
        response = await send_bounded(http, request, limit(max_bytes=2 * size), "dicomweb", parse_json=True)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert len(response.json()) == 80
    print(f"body {size / 1e6:.1f} MB, peak traced {peak / 1e6:.1f} MB")
    assert peak < 1.5 * size


async def test_a_large_answer_is_parsed_in_steps_that_give_the_event_loop_turns() -> None:
    document = [{"uid": f"1.2.3.{i}", "number": i, "modality": {"code": "CT"}} for i in range(40_000)]
    raw = json.dumps(document).encode()  # about 2.4 MB, sent in one piece
    http, _ = client(raw)
    turns = 0

    async def other_requests() -> None:
        nonlocal turns
        while True:
            turns += 1
            await asyncio.sleep(0)

    ticker = asyncio.create_task(other_requests())
    try:
        response = await send_bounded(
            http, http.build_request("GET", URL), limit(max_bytes=len(raw)), "fhir", parse_json=True
        )
    finally:
        ticker.cancel()
    assert response.json() == document
    # One turn at least per slice: no step parses more than PARSE_STEP bytes without a break.
    assert turns >= len(raw) // PARSE_STEP


async def test_a_body_that_is_not_json_stops_the_reading_and_quotes_nothing() -> None:
    body = Body(b"<html><body>Doe^Jane</body></html>" * 100)
    http, _ = client(body)
    response = await send_bounded(
        http, http.build_request("GET", URL), limit(max_bytes=10_000_000), "dicomweb", parse_json=True
    )
    assert body.sent < 100_000  # the endless page was dropped at its first chunk, not read to the cap
    with pytest.raises(ValueError) as caught:
        response.json()
    assert "Doe" not in str(caught.value)
    with pytest.raises(FatalUpstreamError, match="not JSON"):
        json_body(response, "dicomweb")


async def test_an_answer_cut_short_or_empty_is_not_json() -> None:
    http, _ = client(b'[{"a": 1}, {"b"')
    cut = await send_bounded(http, http.build_request("GET", URL), limit(), "dicomweb", parse_json=True)
    with pytest.raises(ValueError, match="not JSON"):
        cut.json()
    http, _ = client(b"  \r\n")
    empty = await send_bounded(http, http.build_request("GET", URL), limit(), "dicomweb", parse_json=True)
    assert body_is_empty(empty)
    with pytest.raises(ValueError):
        empty.json()


async def test_an_error_answer_keeps_its_bytes_for_the_error_message() -> None:
    async def handler(request: httpx.Request) -> httpx.Response:
        return httpx.Response(422, json={"resourceType": "OperationOutcome", "issue": []})

    http = httpx.AsyncClient(transport=httpx.MockTransport(handler))
    response = await send_bounded(http, http.build_request("GET", URL), limit(), "fhir", parse_json=True)
    assert not isinstance(response, ParsedResponse)
    assert response.json()["resourceType"] == "OperationOutcome"


async def test_the_size_cap_holds_while_parsing() -> None:
    body = Chunks(1000, 4096)
    http, _ = client(body)  # type: ignore[arg-type]
    with pytest.raises(UpstreamLimitError):
        await send_bounded(
            http, http.build_request("GET", URL), limit(max_bytes=100_000), "dicomweb", parse_json=True
        )
    assert body.sent <= 100_000 + 4096


async def test_an_answer_over_the_cap_costs_its_bytes_only_nothing_is_built_from_it() -> None:
    # Rows of tiny objects: parsed, each 8-byte row would become some 200 bytes of dict. Nothing
    # is parsed before the whole body is in, so an endless page stops at the cap in bytes.
    row = b'{"a":0},'

    async def rows() -> AsyncIterator[bytes]:
        yield b"["
        while True:
            yield row * 8192

    http = httpx.AsyncClient(transport=httpx.MockTransport(lambda r: httpx.Response(200, content=rows())))
    cap = 4 * 1024 * 1024
    tracemalloc.start()
    try:
        with pytest.raises(UpstreamLimitError):
            await send_bounded(
                http, http.build_request("GET", URL), limit(max_bytes=cap), "dicomweb", parse_json=True
            )
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    print(f"cap {cap / 1e6:.1f} MB, peak traced {peak / 1e6:.1f} MB")
    assert peak < 1.5 * cap


async def test_rows_of_a_large_array_share_their_keys_as_json_loads_does() -> None:
    rows = [{"0020000E": {"vr": "UI", "Value": [f"1.2.{i}"]}} for i in range(20_000)]
    raw = json.dumps(rows).encode()
    assert len(raw) > PARSE_AT_ONCE  # the stepwise parse, not json.loads
    http, _ = client(raw)
    response = await send_bounded(
        http, http.build_request("GET", URL), limit(max_bytes=len(raw)), "dicomweb", parse_json=True
    )
    parsed = response.json()
    assert parsed == rows
    first, last = parsed[0], parsed[-1]
    assert next(iter(first)) is next(iter(last))  # one "0020000E" string for every row
    assert next(iter(first["0020000E"])) is next(iter(last["0020000E"]))


async def test_a_body_nested_too_deep_is_not_json_and_raises_nothing_else() -> None:
    raw = b"[" * 200_000 + b"]" * 200_000
    http, _ = client(raw)
    response = await send_bounded(
        http, http.build_request("GET", URL), limit(max_bytes=len(raw)), "dicomweb", parse_json=True
    )
    with pytest.raises(FatalUpstreamError, match="not JSON"):
        json_body(response, "dicomweb")


def test_nesting_is_followed_across_pieces_and_brackets_in_strings_do_not_count() -> None:
    text = rb'[{"a": "]]]]\"[[\\", "b": [[1, {"c": "}"}]], "d\"]": 2}]'

    def nesting(value: object) -> int:
        if isinstance(value, dict):
            return 1 + max((nesting(v) for v in value.values()), default=0)
        if isinstance(value, list):
            return 1 + max((nesting(v) for v in value), default=0)
        return 0

    levels = nesting(json.loads(text))
    assert levels == 5
    for cut in range(len(text) + 1):
        for second in range(cut, len(text) + 1):
            depth = _Depth()
            for piece in (text[:cut], text[cut:second], text[second:]):
                depth.see(piece)
            assert (depth.deepest, depth.depth) == (levels, 0), (cut, second)


async def test_a_large_body_nested_past_the_limit_is_refused_before_it_is_parsed() -> None:
    padding = b'"' + b"x" * (PARSE_AT_ONCE + 1) + b'"'
    for levels, accepted in ((100, True), (MAX_DEPTH + 1, False)):
        raw = b"[" * levels + padding + b"]" * levels
        http, _ = client(raw)
        response = await send_bounded(
            http, http.build_request("GET", URL), limit(max_bytes=len(raw)), "dicomweb", parse_json=True
        )
        if accepted:
            assert json_body(response, "dicomweb")
        else:
            with pytest.raises(FatalUpstreamError, match="not JSON"):
                json_body(response, "dicomweb")
