"""A hostile DICOMweb archive: a small stdlib HTTP server whose scenarios misbehave on purpose.

Each scenario has its own base URL, ``http://127.0.0.1:<port>/<scenario>/dicom-web``. Every
scenario but the study-page ones serves three good studies (``GOOD``) with one series each, and
one bad study (``BAD``) whose series query (or row) misbehaves:

==================  ==========================================================================
endless-page        the study page streams rows forever, fast
drip-studies        the study page sends one byte every ``drip`` seconds, forever
drip-series         BAD's series query drips, alone or in a list query (``/series?StudyInstanceUID=a,b``)
warning-loop        every study page is full of new studies and carries a truncation Warning
series-unpaged      BAD has 100,000 series, all in one answer whatever limit/offset say
series-paged        BAD has 100,000 series, paged as asked
malformed-rows      the study page also holds rows that are not DICOM JSON studies
html-studies        the study page is an HTML error page with status 200
html-series         BAD's series query answers HTML with status 200
huge-patientid      BAD's PatientID is 300,000 characters long
==================  ==========================================================================

In every scenario a study's ``thumbnail`` and ``rendered`` resources drip.

It runs its own event loop in a thread, so a test process can start it next to the real
``bridge`` command it runs as a subprocess. Loopback only.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import threading
from collections.abc import AsyncIterator, Iterator
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit

from tests.builders import series_row, study_row, study_series_row, uid

GOOD = [uid(9000, n) for n in (1, 2, 3)]
BAD = uid(9000, 99)
MANY_SERIES = 100_000
HUGE_PATIENT_ID = "HUGEPID" * 43_000  # about 300,000 characters
SCENARIOS = (
    "endless-page",
    "drip-studies",
    "drip-series",
    "warning-loop",
    "series-unpaged",
    "series-paged",
    "malformed-rows",
    "html-studies",
    "html-series",
    "huge-patientid",
)
_HTML = b"<!DOCTYPE html><html><body><h1>Service temporarily redirected</h1></body></html>"


def _study(study_uid: str, index: int, **extra: Any) -> dict[str, Any]:
    return study_row(
        study_uid=study_uid,
        accession=f"HOST-{index}",
        patient_id=extra.pop("patient_id", f"HOSTPID{index % 3}"),
        patient_issuer="HOSP-A",
        **extra,
    )


def _series(study_uid: str, number: int) -> dict[str, Any]:
    return series_row(series_uid=f"{study_uid}.{number}", number=number)


class HostileArchive:
    """The server; ``with HostileArchive() as archive: archive.base_url("drip-series")``."""

    def __init__(self, drip: float = 0.5) -> None:
        self.drip = drip
        self.port = 0
        self.requests: list[str] = []  # scenario and path of every request, for assertions
        self.open_connections = 0  # connections a client has not closed yet (it may have gone away)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop: asyncio.Event | None = None
        self._thread: threading.Thread | None = None
        self._ready = threading.Event()

    def base_url(self, scenario: str) -> str:
        """The DICOMweb base URL of one scenario."""
        assert scenario in SCENARIOS, scenario
        return f"http://127.0.0.1:{self.port}/{scenario}/dicom-web"

    def __enter__(self) -> HostileArchive:
        self._thread = threading.Thread(target=lambda: asyncio.run(self._main()), daemon=True)
        self._thread.start()
        if not self._ready.wait(10):
            raise RuntimeError("the hostile archive did not start")
        return self

    def __exit__(self, *exc: object) -> None:
        if self._loop is not None and self._stop is not None:
            self._loop.call_soon_threadsafe(self._stop.set)
        if self._thread is not None:
            self._thread.join(10)

    async def _main(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._stop = asyncio.Event()
        server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        self.port = server.sockets[0].getsockname()[1]
        self._ready.set()
        async with server:
            await self._stop.wait()
            server.close()
            for task in asyncio.all_tasks():
                if task is not asyncio.current_task():
                    task.cancel()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.open_connections += 1
        try:
            head = await reader.readuntil(b"\r\n\r\n")
            request_line = head.split(b"\r\n", 1)[0].decode("latin-1")
            _method, target, _version = request_line.split(" ", 2)
            await self._route(target, writer)
        except (asyncio.IncompleteReadError, asyncio.LimitOverrunError, ConnectionError, ValueError):
            pass
        except asyncio.CancelledError:
            pass
        finally:
            self.open_connections -= 1
            with contextlib.suppress(Exception):
                writer.close()

    async def _route(self, target: str, writer: asyncio.StreamWriter) -> None:
        url = urlsplit(target)
        parts = [unquote(p) for p in url.path.strip("/").split("/")]
        query = {k: v[-1] for k, v in parse_qs(url.query).items()}
        if len(parts) < 3 or parts[0] not in SCENARIOS or parts[1] != "dicom-web":
            await _answer(writer, 404, b"", "text/plain")
            return
        scenario, rest = parts[0], parts[2:]
        self.requests.append(f"{scenario} /{'/'.join(rest)}")
        limit = int(query.get("limit", "100"))
        offset = int(query.get("offset", "0"))
        if rest == ["studies"]:
            await self._studies(scenario, writer, limit, offset, query)
        elif len(rest) == 3 and rest[0] == "studies" and rest[2] == "series":
            await self._series_of(scenario, rest[1], writer, limit, offset)
        elif rest == ["series"] and scenario == "drip-series":
            await self._series_list(query.get("StudyInstanceUID", ""), writer, limit, offset)
        elif len(rest) == 3 and rest[0] == "studies" and rest[2] in ("thumbnail", "rendered"):
            await _stream(writer, _drip(self.drip))  # every scenario: a picture that never arrives
        else:
            await _answer(writer, 404, b"", "text/plain")

    async def _studies(
        self, scenario: str, writer: asyncio.StreamWriter, limit: int, offset: int, query: dict[str, str]
    ) -> None:
        if scenario == "endless-page":
            await _stream(writer, _endless_rows())
            return
        if scenario == "drip-studies":
            await _stream(writer, _drip(self.drip))
            return
        if scenario == "html-studies":
            await _answer(writer, 200, _HTML, "text/html")
            return
        if scenario == "warning-loop":
            rows = [_study(uid(9100, offset + i), offset + i) for i in range(limit)]
            warning = {"Warning": '299 hostile "truncated"'}
            await _answer(writer, 200, json.dumps(rows).encode(), headers=warning)
            return
        rows: list[Any] = [_study(u, i) for i, u in enumerate(GOOD)]
        if scenario == "huge-patientid":
            rows.append(_study(BAD, 99, patient_id=HUGE_PATIENT_ID))
        elif scenario == "malformed-rows":
            rows += [
                "not an object",
                17,
                None,
                {"0020000D": {"vr": "UI", "Value": [12345]}},
                {"0020000D": {"vr": "UI", "Value": "1.2.3"}},
                {"0020000D": "1.2.3"},
                {"00080020": {"vr": "DA", "Value": ["20240101"]}},
            ]
        else:
            rows.append(_study(BAD, 99))
        wanted = query.get("StudyInstanceUID")
        if wanted is not None:
            rows = [r for r in rows if isinstance(r, dict) and r.get("0020000D", {}).get("Value") == [wanted]]
        await _answer(writer, 200, json.dumps(rows[offset : offset + limit]).encode())

    async def _series_of(
        self, scenario: str, study_uid: str, writer: asyncio.StreamWriter, limit: int, offset: int
    ) -> None:
        if study_uid != BAD:
            await _answer(writer, 200, json.dumps([_series(study_uid, 1)]).encode())
            return
        if scenario == "drip-series":
            await _stream(writer, _drip(self.drip))
        elif scenario == "html-series":
            await _answer(writer, 200, _HTML, "text/html")
        elif scenario == "series-unpaged":
            await _stream(writer, _all_series())
        elif scenario == "series-paged":
            numbers = range(offset + 1, min(offset + limit, MANY_SERIES) + 1)
            await _answer(writer, 200, json.dumps([_series(BAD, n) for n in numbers]).encode())
        else:
            await _answer(writer, 200, json.dumps([_series(BAD, 1)]).encode())

    async def _series_list(self, studies: str, writer: asyncio.StreamWriter, limit: int, offset: int) -> None:
        """A series search across the listed studies: it drips whenever BAD is among them."""
        asked = [u for u in studies.split(",") if u]
        if BAD in asked:
            await _stream(writer, _drip(self.drip))
            return
        rows = [study_series_row(u, f"{u}.1", number=1) for u in asked if u in GOOD]
        await _answer(writer, 200, json.dumps(rows[offset : offset + limit]).encode())


async def _answer(
    writer: asyncio.StreamWriter,
    status: int,
    body: bytes,
    content_type: str = "application/dicom+json",
    headers: dict[str, str] | None = None,
) -> None:
    if status == 200 and body == b"[]":
        status, body = 204, b""
    lines = [
        f"HTTP/1.1 {status} {'OK' if status < 300 else 'Not Found'}",
        f"Content-Type: {content_type}",
        f"Content-Length: {len(body)}",
        "Connection: close",
        *(f"{k}: {v}" for k, v in (headers or {}).items()),
    ]
    writer.write(("\r\n".join(lines) + "\r\n\r\n").encode() + body)
    await writer.drain()


async def _stream(writer: asyncio.StreamWriter, chunks: AsyncIterator[bytes]) -> None:
    """An answer without a length: chunks until the client goes away."""
    writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: application/dicom+json\r\nConnection: close\r\n\r\n")
    async for chunk in chunks:
        writer.write(chunk)
        await writer.drain()
        if writer.is_closing():
            return


async def _endless_rows() -> AsyncIterator[bytes]:
    yield b"["
    n = 0
    while True:
        rows = [json.dumps(_study(uid(9200, n + i), n + i)).encode() for i in range(200)]
        n += 200
        yield b",".join(rows) + b","
        await asyncio.sleep(0)


async def _all_series() -> AsyncIterator[bytes]:
    """All of BAD's series in one answer, made as it is sent."""
    for start in range(1, MANY_SERIES + 1, 1000):
        rows = [json.dumps(_series(BAD, n)) for n in range(start, min(start + 1000, MANY_SERIES + 1))]
        yield (b"[" if start == 1 else b",") + ",".join(rows).encode()
        await asyncio.sleep(0)
    yield b"]"


async def _drip(every: float) -> AsyncIterator[bytes]:
    yield b"["
    while True:
        await asyncio.sleep(every)
        yield b" "


@contextlib.contextmanager
def hostile_archive(drip: float = 0.5) -> Iterator[HostileArchive]:
    """The server, started and stopped."""
    with HostileArchive(drip) as archive:
        yield archive
