"""Names from the best source: a garbled PatientName in the archive's JSON, and the Part 10 header."""

from __future__ import annotations

import base64
from collections.abc import AsyncIterator

import httpx
import pydicom
import pytest
from pydicom.data import get_charset_files

from bridge.dicomweb.client import DicomwebClient
from bridge.dicomweb.limits import DicomwebLimits
from bridge.errors import UpstreamUnavailableError
from bridge.mapping.records import InstanceRecord, parse_study, part10_patient_name
from bridge.mapping.values import name_problem
from bridge.upstream.retry import RetryPolicy
from tests.builders import element, study_row, uid

pytestmark = pytest.mark.anyio

BASE = "http://archive.test/dicom-web"
JAPANESE = "やまだ^たろう"


def japanese_file() -> bytes:
    """pydicom's chrJapMulti.dcm: ISO 2022 IR 87, its JIS bytes hold 0x5E ('^'), with pixels after."""
    [path] = get_charset_files("chrJapMulti.dcm")
    with open(path, "rb") as handle:
        return handle.read()


@pytest.mark.parametrize(
    ("name", "charset", "why"),
    [
        ("Doe^Jane", [], None),
        ("Yamada^Tarou=山田^太郎=やまだ^たろう", ["", "ISO 2022 IR 87"], None),
        ("Buc^Jérôme", ["ISO_IR 100"], None),
        ("Buc^J\ufffdr\ufffdme", ["ISO_IR 100"], "replacement characters (U+FFFD)"),
        ("$B$d$^$^$@$B$?$m$&", ["", "ISO 2022 IR 87"], "ISO 2022 escape remnants"),
        ("\x1b$B;3ED", [], "ISO 2022 escape remnants"),
        ("^", ["ISO_IR 100"], "component separators only"),
        ("Yamada^Tarou=??^??", [], "'?' placeholders"),
        ("山田^太郎", ["ISO_IR 100"], "characters the declared Specific Character Set cannot hold"),
    ],
)
def test_a_garbled_name_is_told_from_a_name(name: str, charset: list[str], why: str | None) -> None:
    assert name_problem(name, charset) == why


def test_a_garbled_name_in_the_archive_answer_is_left_out_with_its_reason() -> None:
    row = study_row(patient_name={"Alphabetic": "$B$d$", "Ideographic": "^$@"})
    record = parse_study(row)
    assert record.patient_name is None
    assert record.patient_name_problem == "ISO 2022 escape remnants"
    latin1 = study_row(patient_name="^", extra={"00080005": element("CS", "ISO_IR 100")})
    assert parse_study(latin1).patient_name_problem == "component separators only"


def test_a_good_name_keeps_the_study_fingerprint_it_had() -> None:
    record = parse_study(study_row())
    assert record.patient_name == "Doe^Jane" and record.patient_name_problem is None
    assert "patient_name_problem" not in repr(record.fingerprint())  # a digest, unchanged by the field
    assert record.fingerprint() == parse_study(study_row()).fingerprint()


def test_the_part10_header_gives_the_name_in_its_own_character_set() -> None:
    data = japanese_file()
    assert part10_patient_name(data, complete=True) == (JAPANESE, None)
    # Cut before the name: not yet; cut after it (in the pixels): the name already.
    assert part10_patient_name(data[:200], complete=False) is None
    ds = pydicom.dcmread(get_charset_files("chrJapMulti.dcm")[0])
    assert ds.PatientName is not None
    assert part10_patient_name(data[: len(data) - 10], complete=False) == (JAPANESE, None)


def test_a_part10_header_without_a_good_name_says_why() -> None:
    assert part10_patient_name(b"not dicom at all" * 10, complete=True) == (
        None,
        "the Part 10 header cannot be read",
    )


class FileArchive:
    """WADO-RS answering one instance as multipart/related, streamed in small chunks."""

    def __init__(self, data: bytes, status: int = 200) -> None:
        self.data, self.status = data, status
        self.sent = 0

    def __call__(self, request: httpx.Request) -> httpx.Response:
        assert request.headers["Accept"] == 'multipart/related; type="application/dicom"'
        boundary = "b0undary"
        body = (
            f"--{boundary}\r\nContent-Type: application/dicom\r\n\r\n".encode()
            + self.data
            + f"\r\n--{boundary}--\r\n".encode()
        )

        async def chunks() -> AsyncIterator[bytes]:
            for start in range(0, len(body), 4096):
                self.sent += 1
                yield body[start : start + 4096]

        content_type = f'multipart/related; type="application/dicom"; boundary={boundary}'
        if self.status != 200:
            return httpx.Response(self.status, text="no")
        return httpx.Response(200, headers={"Content-Type": content_type}, content=chunks())


def client(archive: FileArchive, max_bytes: int = 16 * 1024 * 1024) -> DicomwebClient:
    http = httpx.AsyncClient(transport=httpx.MockTransport(archive))
    limits = DicomwebLimits(metadata_bytes=max_bytes)
    return DicomwebClient(http, BASE, policy=RetryPolicy(retries=0), limits=limits)


INSTANCE = InstanceRecord(uid(1, 1, 1), uid(1, 1), None, None)


async def test_the_client_reads_the_name_from_a_part10_retrieve_and_stops_after_the_header() -> None:
    data = japanese_file() + b"\x00" * 4_000_000  # a large file: its pixels are never read
    archive = FileArchive(data)
    assert await client(archive).patient_name_from_file(uid(1), INSTANCE) == (JAPANESE, None)
    assert archive.sent < 20  # chunks of 4 KiB: the first few only


async def test_a_refused_or_oversized_retrieve_is_no_good_source() -> None:
    refused = await client(FileArchive(japanese_file(), status=406)).patient_name_from_file(uid(1), INSTANCE)
    assert refused == (None, "the archive answered 406 to a Part 10 retrieve")
    endless_header = b"\x00" * 128 + b"DICM" + b"\x00" * 100_000
    big = await client(FileArchive(endless_header), max_bytes=50_000).patient_name_from_file(uid(1), INSTANCE)
    assert big == (None, "the Part 10 header is larger than BRIDGE_DICOMWEB_MAX_METADATA_BYTES")


async def test_a_failing_archive_is_retried_then_raises_so_the_study_is_not_published_nameless() -> None:
    archive = FileArchive(japanese_file(), status=503)
    http = httpx.AsyncClient(transport=httpx.MockTransport(archive))
    policy = RetryPolicy(retries=1, base=0.001, max_wait=0.001)
    with pytest.raises(UpstreamUnavailableError):
        await DicomwebClient(http, BASE, policy=policy).patient_name_from_file(uid(1), INSTANCE)


def test_a_name_sent_as_bytes_its_character_set_cannot_decode_is_garbled_not_absent() -> None:
    raw = base64.b64encode(b"\xff\xfeDoe^Jane").decode()
    row = study_row(patient_name=None, extra={"00080005": element("CS", "ISO_IR 192")})
    row["00100010"] = {"vr": "PN", "InlineBinary": raw}
    record = parse_study(row)
    assert record.patient_name is None and record.patient_name_problem == "replacement characters (U+FFFD)"
    referrer = study_row(extra={"00080005": element("CS", "ISO_IR 192")})
    referrer["00080090"] = {"vr": "PN", "InlineBinary": raw}
    assert parse_study(referrer).referring_physician is None  # other names: left out, as before
