"""The operator page on the real stack: a study parked for an unmapped issuer, seen and retried in chromium.

Orthanc holds a study whose Issuer of Patient ID the first sync does not know: it is parked, naming
BRIDGE_PATIENT_ISSUER_SYSTEMS. The operator adds the issuer, opens /operator in Debian's chromium
(tests/browser/page.mjs, the API key sent as a header), sees the reason and clicks "Retry": the study
is published, leaves the list, and the retry is an AuditEvent on the FHIR server.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from PIL import Image

from bridge.api.app import create_app
from bridge.config import load_settings
from tests.integration.conftest import ISSUERS, Stack
from tests.stack.process import free_loopback_port
from tests.stack.samples import StudySpec, build_study, stow
from tests.stack.viewer import ThreadedServer, ensure_chromium, ensure_installed, run_page

pytestmark = pytest.mark.integration

KEY = "op-key-5d1c"
HOSP_X = "urn:oid:1.2.826.0.1.3680043.10.1009"


@pytest.fixture
def parked(stack: Stack) -> str:
    """A study parked by the sync for its unmapped issuer; its Study Instance UID."""
    datasets = build_study(StudySpec(patient_id="X-1", issuer="HOSP-X", description="Parked CT"))
    stow(stack.orthanc.dicomweb_url, datasets)
    report = stack.sync()
    assert report.counts.parked == 1
    return str(datasets[0].StudyInstanceUID)


@pytest.fixture
def parked_more(stack: Stack, parked: str) -> tuple[list[str], str]:
    """Beside ``parked``: one more study parked for the same reason, and one parked for another.

    The UIDs parked for the unmapped issuer (the reason the operator fixes), and the one parked for
    a TimezoneOffsetFromUTC that is no offset.
    """
    same = build_study(StudySpec(patient_id="X-2", issuer="HOSP-X", description="Parked MR"))
    other = build_study(StudySpec(patient_id="Y-1", issuer="HOSP-A", tz_offset="+1500"))
    for datasets in (same, other):
        stow(stack.orthanc.dicomweb_url, datasets)
    stack.sync()
    return sorted([parked, str(same[0].StudyInstanceUID)]), str(other[0].StudyInstanceUID)


@pytest.fixture
def operator_api(stack: Stack, parked: str, monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    """The bridge with the issuer added, API keys on and the audit to the FHIR server; its URL."""
    env = stack.settings_env(
        patient_issuer_systems=json.dumps({**ISSUERS, "HOSP-X": HOSP_X}),
        api_keys=KEY,
        audit="fhir",
        audit_flush_interval="0.2",
    )
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    with ThreadedServer(create_app(load_settings()), port=free_loopback_port(), name="bridge API") as server:
        yield server.base_url


def _not_blank(png: Path) -> float:
    """The share of the screenshot's pixels that are not the page's white."""
    with Image.open(png) as image:
        histogram = image.convert("L").histogram()  # pixels per grey level, 0 (black) to 255
    return sum(histogram[:200]) / sum(histogram)


def _audit(stack: Stack, expected: int) -> list[dict[str, Any]]:
    deadline = time.monotonic() + 20
    while True:
        events = [e for e in stack.fhir_search("AuditEvent") if e["subtype"][1]["code"] == "operator-retry"]
        if len(events) >= expected or time.monotonic() > deadline:
            return events
        time.sleep(0.3)


def test_an_operator_sees_why_a_study_is_parked_and_retries_it_in_the_browser(
    stack: Stack, parked: str, operator_api: str, tmp_path: Path
) -> None:
    chromium = ensure_chromium()
    ensure_installed()  # playwright-core
    shot = tmp_path / "operator.png"
    seen = run_page(
        {
            "url": f"{operator_api}/operator",
            "headers": {"X-API-Key": KEY},
            "waitFor": f'tr.parked-study[data-study-uid="{parked}"] button.retry-study',
            "click": f'tr.parked-study[data-study-uid="{parked}"] button.retry-study',
            "afterClick": "p.done",
            "screenshot": str(shot),
            "chromium": chromium,
        },
        tmp_path,
        timeout=120,
    )
    # Before the click: the reason names the setting to fix, with the study's UID and the counts.
    assert seen["status"] == 200
    assert "BRIDGE_PATIENT_ISSUER_SYSTEMS" in seen["text"] and parked in seen["text"]
    assert "1 parked" in seen["text"] and "Retry all 1" in seen["text"]
    # After it: back on the page (POST, then 303), the study published and gone from the list.
    assert seen["after_url"].startswith(f"{operator_api}/operator?retried=1")
    assert "Retried 1 study: 1 published, 0 still parked." in seen["after_text"]
    assert "0 parked" in seen["after_text"] and parked not in seen["after_text"]
    assert "\tretry\tok\t" in seen["after_text"]  # the recent runs list the retry's run
    assert not [e for e in seen["console_errors"] if e.startswith("page error")]  # (a favicon 404 is fine)
    assert shot.stat().st_size > 10_000 and _not_blank(shot) > 0.01  # a rendered page, not a white one

    studies = stack.fhir_search("ImagingStudy")
    assert [s["identifier"][0]["value"] for s in studies] == [f"urn:oid:{parked}"]
    events = _audit(stack, 1)
    assert len(events) == 1 and events[0]["outcome"] == "0"
    assert events[0]["entity"][0]["what"]["identifier"]["value"] == f"urn:oid:{parked}"
    assert events[0]["agent"][0]["who"]["display"] == "api-key caller"


def test_a_retry_by_reason_from_another_site_is_refused_and_the_page_needs_an_operator(
    stack: Stack, parked: str, operator_api: str
) -> None:
    form = {"source": "test-orthanc", "reason": "anything"}
    page = httpx.get(f"{operator_api}/operator", headers={"Accept": "text/html"}, timeout=30)
    program = httpx.post(f"{operator_api}/operator/retry", data=form, timeout=30)
    keyed = httpx.post(f"{operator_api}/operator/retry", data=form, headers={"X-API-Key": KEY}, timeout=30)
    assert page.status_code == 401 and "Sign-in needed" in page.text  # keys only: words, not JSON
    assert program.status_code == 401
    # A reason no study is parked for retries nothing; the parked study stays.
    assert keyed.status_code == 303 and keyed.headers["location"].endswith("retried=0&passed=0&still=0")
    listed = httpx.get(f"{operator_api}/failures", headers={"X-API-Key": KEY}, timeout=30).json()
    assert [f["study_uid"] for f in listed["failures"]] == [parked]


def test_a_retry_by_reason_publishes_every_study_parked_for_it_and_only_those(
    stack: Stack, parked_more: tuple[list[str], str], operator_api: str
) -> None:
    for_x, for_y = parked_more
    key = {"X-API-Key": KEY}
    listed = httpx.get(f"{operator_api}/failures", headers=key, timeout=30).json()["failures"]
    reasons = {f["study_uid"]: f["reason"] for f in listed}
    assert sorted(reasons) == sorted([*for_x, for_y])
    reason = reasons[for_x[0]]
    assert reasons[for_x[1]] == reason != reasons[for_y] and "IssuerOfPatientID" in reason
    # As the page's "Retry all 2" button posts it (an API key needs no same-origin check).
    page = httpx.get(f"{operator_api}/operator", headers=key, timeout=30)
    assert "Retry all 2" in page.text
    answer = httpx.post(
        f"{operator_api}/operator/retry",
        data={"source": "test-orthanc", "reason": reason},
        headers=key,
        timeout=120,
    )
    assert answer.status_code == 303, answer.text
    assert answer.headers["location"].endswith("/operator?retried=2&passed=2&still=0")
    published = sorted(s["identifier"][0]["value"] for s in stack.fhir_search("ImagingStudy"))
    assert published == [f"urn:oid:{uid}" for uid in for_x]
    left = httpx.get(f"{operator_api}/failures", headers=key, timeout=30).json()["failures"]
    assert [f["study_uid"] for f in left] == [for_y]  # parked for another reason: untouched
    events = _audit(stack, 2)
    assert sorted(e["entity"][0]["what"]["identifier"]["value"] for e in events) == published
    assert all(e["outcome"] == "0" for e in events)
