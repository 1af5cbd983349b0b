"""The real ``bridge sync`` against a hostile archive: every scenario ends in time, in memory, cleanly.

Each test runs the command as a subprocess against one scenario of tests/stack/hostile.py and the
real test FHIR server, and measures the child's wall time and peak RSS (``VmHWM`` in its
/proc status, polled: it starts afresh at exec, where ``wait4``'s figure would carry this test
process's own peak over from the fork). The
deadlines are made small through the settings so the file stays quick; the one scenario that
runs with the default size caps shows they hold memory down on their own.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest

from bridge.state.store import SqlStore
from tests.integration.conftest import DEFAULT_PATIENT_SYSTEM, ISSUERS
from tests.stack.fhir import FhirTestServer
from tests.stack.hostile import BAD, GOOD, HUGE_PATIENT_ID, HostileArchive

pytestmark = pytest.mark.integration

DEADLINE = 3.0  # BRIDGE_HTTP_DEADLINE in these tests
MAX_SECONDS = 60.0  # what a run may take here; the issue's bound is 2 minutes
MAX_RSS_MB = 300.0


@dataclass
class Outcome:
    code: int
    seconds: float
    rss_mb: float
    stdout: str
    stderr: str
    parked: dict[str, Any]


@pytest.fixture(scope="module")
def archive() -> Iterator[HostileArchive]:
    with HostileArchive(drip=0.5) as server:
        yield server


@pytest.fixture
def fhir(fhir_server: FhirTestServer) -> FhirTestServer:
    fhir_server.clear()
    return fhir_server


def run_sync(
    archive: HostileArchive, fhir: FhirTestServer, tmp_path: Path, scenario: str, **settings: str
) -> Outcome:
    """``bridge sync --json`` against one scenario; its exit code, time, peak RSS, output, parked studies."""
    state = tmp_path / "state.db"
    env = {k: v for k, v in os.environ.items() if not k.startswith("BRIDGE_")}
    env.update(
        {
            "BRIDGE_DICOMWEB_URL": archive.base_url(scenario),
            "BRIDGE_FHIR_URL": fhir.base_url,
            "BRIDGE_STATE_URL": f"sqlite:///{state}",
            "BRIDGE_SOURCE_NAME": "hostile",
            "BRIDGE_PATIENT_IDENTIFIER_SYSTEM": DEFAULT_PATIENT_SYSTEM,
            "BRIDGE_PATIENT_ISSUER_SYSTEMS": json.dumps(ISSUERS),
            "BRIDGE_HTTP_DEADLINE": str(DEADLINE),
            "BRIDGE_HTTP_TIMEOUT": "2",
            "BRIDGE_HTTP_RETRIES": "1",
            "BRIDGE_HTTP_RETRY_MAX_WAIT": "0.2",
            "BRIDGE_HTTP_RETRY_TOTAL": "10",
        }
    )
    env.update({f"BRIDGE_{k.upper()}": v for k, v in settings.items()})
    out, err = tmp_path / "stdout", tmp_path / "stderr"
    started = time.monotonic()
    peak_kb = 0
    with out.open("w") as stdout, err.open("w") as stderr:
        child = subprocess.Popen(
            [sys.executable, "-m", "bridge", "sync", "--json"], env=env, stdout=stdout, stderr=stderr
        )
        while child.poll() is None:
            peak_kb = max(peak_kb, _peak_rss_kb(child.pid))
            if time.monotonic() - started > 150:
                child.kill()
                child.wait()
                pytest.fail(f"bridge sync against {scenario} still running after 150 s")
            time.sleep(0.02)
    seconds = time.monotonic() - started
    store = SqlStore(f"sqlite:///{state}")
    try:
        parked = {p.study_uid: p for p in store.parked("hostile")}
    finally:
        store.close()
    # The console wraps long lines: join them back so messages can be matched.
    stderr_text = " ".join(err.read_text().split())
    outcome = Outcome(child.returncode, seconds, peak_kb / 1024, out.read_text(), stderr_text, parked)
    print(
        f"\n{scenario}: exit {outcome.code}, {outcome.seconds:.1f} s, peak RSS {outcome.rss_mb:.0f} MB, "
        f"parked {len(parked)}"
    )
    assert outcome.seconds < MAX_SECONDS, outcome.stderr[-2000:]
    assert outcome.rss_mb < MAX_RSS_MB
    assert "Traceback" not in outcome.stderr, outcome.stderr[-4000:]
    return outcome


def _peak_rss_kb(pid: int) -> int:
    """The process's peak resident set so far (0 once it has exited)."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return 0
    for line in status.splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1])
    return 0


def published(fhir: FhirTestServer) -> set[str]:
    """Study Instance UIDs of the ImagingStudies on the FHIR server."""
    response = httpx.get(f"{fhir.base_url}/ImagingStudy", params={"_count": "1000"}, timeout=30)
    response.raise_for_status()
    uids = set()
    for entry in response.json().get("entry", []):
        for identifier in entry["resource"].get("identifier", []):
            if identifier.get("system") == "urn:dicom:uid":
                uids.add(identifier["value"].removeprefix("urn:oid:"))
    return uids


def test_an_endless_study_page_ends_the_run_at_the_default_size_cap(
    archive: HostileArchive, fhir: FhirTestServer, tmp_path: Path
) -> None:
    outcome = run_sync(archive, fhir, tmp_path, "endless-page", http_deadline="60")
    assert outcome.code == 3
    assert "BRIDGE_DICOMWEB_MAX_PAGE_BYTES" in outcome.stderr
    assert published(fhir) == set()


def test_a_dripping_study_page_ends_the_run_at_its_deadline(
    archive: HostileArchive, fhir: FhirTestServer, tmp_path: Path
) -> None:
    outcome = run_sync(archive, fhir, tmp_path, "drip-studies")
    assert outcome.code == 3
    assert "BRIDGE_HTTP_DEADLINE" in outcome.stderr
    assert "DICOMweb archive" in outcome.stderr
    assert outcome.seconds < DEADLINE + 20  # one attempt, not one per retry


def test_a_dripping_series_query_parks_that_study_and_publishes_the_others(
    archive: HostileArchive, fhir: FhirTestServer, tmp_path: Path
) -> None:
    outcome = run_sync(archive, fhir, tmp_path, "drip-series")
    assert outcome.code == 1
    assert published(fhir) == set(GOOD)
    assert set(outcome.parked) == {BAD}
    assert "BRIDGE_HTTP_DEADLINE" in outcome.parked[BAD].reason


def test_a_dripping_study_page_is_cut_at_the_stall_bound_long_before_the_deadline(
    archive: HostileArchive, fhir: FhirTestServer, tmp_path: Path
) -> None:
    outcome = run_sync(archive, fhir, tmp_path, "drip-studies", http_deadline="120", http_stall="2")
    assert outcome.code == 3
    assert "BRIDGE_HTTP_MIN_RATE" in outcome.stderr  # one byte every 0.5 s: never quiet, too slow
    assert outcome.seconds < 50  # start-up (slow on a busy machine), one 2 s stretch: not the 120 s deadline


def test_a_dripping_series_query_is_cut_at_the_stall_bound_and_the_other_studies_of_the_page_published(
    archive: HostileArchive, fhir: FhirTestServer, tmp_path: Path
) -> None:
    before = archive.requests.count("drip-series /series")
    outcome = run_sync(archive, fhir, tmp_path, "drip-series", http_deadline="120", http_stall="2")
    # The page's list query (all four studies) was asked and cut; then each study alone.
    assert archive.requests.count("drip-series /series") - before == 1
    assert outcome.code == 1
    assert published(fhir) == set(GOOD)
    assert set(outcome.parked) == {BAD}
    assert "BRIDGE_HTTP_MIN_RATE" in outcome.parked[BAD].reason
    assert outcome.seconds < 50  # two cut queries of about 2 s each, not two 120 s deadlines


def test_a_warning_header_on_every_page_ends_at_the_page_cap(
    archive: HostileArchive, fhir: FhirTestServer, tmp_path: Path
) -> None:
    before = archive.requests.count("warning-loop /studies")
    outcome = run_sync(archive, fhir, tmp_path, "warning-loop", qido_page_size="3", dicomweb_max_pages="4")
    assert outcome.code == 3
    assert "BRIDGE_DICOMWEB_MAX_PAGES" in outcome.stderr
    assert archive.requests.count("warning-loop /studies") - before == 4
    assert len(published(fhir)) == 12  # the four pages it took were published


def test_100000_series_in_one_answer_park_the_study_at_the_default_caps(
    archive: HostileArchive, fhir: FhirTestServer, tmp_path: Path
) -> None:
    outcome = run_sync(archive, fhir, tmp_path, "series-unpaged", http_deadline="60")
    assert outcome.code == 1
    assert published(fhir) == set(GOOD)
    assert set(outcome.parked) == {BAD}
    assert "BRIDGE_DICOMWEB_MAX_SERIES_BYTES" in outcome.parked[BAD].reason


def test_100000_series_paged_park_the_study_at_the_series_cap(
    archive: HostileArchive, fhir: FhirTestServer, tmp_path: Path
) -> None:
    outcome = run_sync(archive, fhir, tmp_path, "series-paged", qido_page_size="1000", http_deadline="60")
    assert outcome.code == 1
    assert published(fhir) == set(GOOD)
    assert set(outcome.parked) == {BAD}
    assert "BRIDGE_DICOMWEB_MAX_SERIES" in outcome.parked[BAD].reason
    assert "more than 10000 series" in outcome.parked[BAD].reason


def test_malformed_rows_are_parked_and_the_good_studies_published(
    archive: HostileArchive, fhir: FhirTestServer, tmp_path: Path
) -> None:
    outcome = run_sync(archive, fhir, tmp_path, "malformed-rows")
    assert outcome.code == 1
    assert published(fhir) == set(GOOD)
    assert len(outcome.parked) == 7
    assert all(p.kind == "mapping" for p in outcome.parked.values())


def test_html_for_the_study_page_ends_the_run_naming_the_archive(
    archive: HostileArchive, fhir: FhirTestServer, tmp_path: Path
) -> None:
    outcome = run_sync(archive, fhir, tmp_path, "html-studies")
    assert outcome.code == 3
    assert "not JSON" in outcome.stderr
    assert "DICOMweb archive" in outcome.stderr


def test_html_for_one_series_query_parks_that_study(
    archive: HostileArchive, fhir: FhirTestServer, tmp_path: Path
) -> None:
    outcome = run_sync(archive, fhir, tmp_path, "html-series")
    assert outcome.code == 1
    assert published(fhir) == set(GOOD)
    assert set(outcome.parked) == {BAD}


def test_a_huge_patient_id_parks_the_study_and_never_reaches_logs_or_reasons(
    archive: HostileArchive, fhir: FhirTestServer, tmp_path: Path
) -> None:
    outcome = run_sync(archive, fhir, tmp_path, "huge-patientid")
    assert outcome.code == 1
    assert published(fhir) == set(GOOD)
    assert set(outcome.parked) == {BAD}
    assert outcome.parked[BAD].attribute == "PatientID"
    fragment = HUGE_PATIENT_ID[:40]
    assert fragment not in outcome.stderr
    assert fragment not in outcome.stdout
    assert fragment not in outcome.parked[BAD].reason
