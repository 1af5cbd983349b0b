"""A clinician's click-through in headless chromium: record page -> "Open images" -> resolver 302 -> OHIF.

The whole path is real: studies stored in Orthanc, synced by the bridge into the FHIR server, the
record page served by the bridge's API from the FHIR server, the redirect made by the resolver,
and OHIF's published build (tests/stack/ohif) fetching the study over DICOMweb and drawing it.
Screenshots land in test-artifacts/clickthrough/.
"""

from __future__ import annotations

import json
import re
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from html.parser import HTMLParser

import httpx
import pytest

from bridge.api.app import create_app
from bridge.config import load_settings
from tests.conftest import ARTIFACTS
from tests.integration.conftest import Stack
from tests.stack.samples import StudySpec, load_demo
from tests.stack.viewer import ThreadedServer, ViewerServer, ensure_chromium, run_clickthrough

pytestmark = pytest.mark.integration

BROWSER_TIMEOUT_S = 150


@contextmanager
def bridge_api(stack: Stack, monkeypatch: pytest.MonkeyPatch, viewer_url: str) -> Iterator[str]:
    """The bridge's API (create_app, uvicorn) on a free loopback port; its OHIF template at ``viewer_url``."""
    env = stack.settings_env(viewer_urls=json.dumps({"ohif": viewer_url}), default_viewer="ohif")
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    settings = load_settings()
    with ThreadedServer(create_app(settings), name="bridge API") as server:
        yield server.base_url


def _patient_id(stack: Stack, family: str, issuer_system: str) -> str:
    for patient in stack.fhir_search("Patient"):
        names = [n.get("family") for n in patient.get("name", [])]
        systems = [i.get("system") for i in patient.get("identifier", [])]
        if family in names and issuer_system in systems:
            return str(patient["id"])
    raise AssertionError(f"no Patient {family} under {issuer_system}")


class _Rows(HTMLParser):
    """The study rows of the record page: description, modalities and link of each."""

    def __init__(self) -> None:
        super().__init__()
        self.rows: list[dict[str, str]] = []
        self._cell: str | None = None

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        values = dict(attrs)
        if tag == "tr" and values.get("class") == "study":
            self.rows.append({})
        elif tag == "td" and self.rows:
            self._cell = values.get("class")
        elif tag == "a" and values.get("class") == "open-images" and self.rows:
            self.rows[-1]["href"] = values.get("href") or ""
        elif tag == "img" and self.rows:
            self.rows[-1]["thumbnail"] = values.get("src") or ""

    def handle_endtag(self, tag: str) -> None:
        if tag == "td":
            self._cell = None

    def handle_data(self, data: str) -> None:
        if self._cell and self.rows:
            self.rows[-1][self._cell] = self.rows[-1].get(self._cell, "") + data


def _spec(specs: list[StudySpec], description: str) -> StudySpec:
    return next(s for s in specs if s.description == description)


def test_record_page_lists_the_patients_studies(stack: Stack, monkeypatch: pytest.MonkeyPatch) -> None:
    load_demo(stack.orthanc.dicomweb_url)
    assert stack.sync().counts.parked == 0
    jane = _patient_id(stack, "Doe", "urn:oid:1.2.826.0.1.3680043.10.1001")
    with bridge_api(stack, monkeypatch, "http://viewer.invalid") as api:
        index = httpx.get(f"{api}/record", timeout=30)
        page = httpx.get(f"{api}/record/patients/{jane}", timeout=30)
        missing = httpx.get(f"{api}/record/patients/no-such-patient", timeout=30)
        parser = _Rows()
        parser.feed(page.text)
        thumbnail = httpx.get(f"{api}{parser.rows[0]['thumbnail']}", timeout=30)

    assert index.status_code == 200
    assert f'href="/record/patients/{jane}"' in index.text
    # Names are escaped, not dropped: the Japanese patient's name arrives intact.
    assert "山田" in index.text or "Yamada" in index.text

    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert page.headers["cache-control"] == "no-store"
    # Doe^Jane has two studies at HOSP-A; Smith^John shares her Patient ID at HOSP-B and must not appear.
    assert [r["description"] for r in parser.rows] == [
        "Screening mammography bilateral",
        "CT Chest Abdomen with contrast",
    ]
    # Each time with its zone (the studies' TimezoneOffsetFromUTC), as recorded at the hospital.
    assert [r["date"] for r in parser.rows] == ["2024-03-15 08:30 UTC+01:00", "2024-01-02 10:15 UTC+01:00"]
    assert [r["modalities"] for r in parser.rows] == ["MG", "CT"]
    assert "CT Head" not in page.text
    for row in parser.rows:
        assert re.fullmatch(r"/imaging-studies/[A-Za-z0-9\-.]+/viewer", row["href"])

    assert missing.status_code == 404 and "No such patient" in missing.text

    # The thumbnail: the bridge resolves the study and fetches a rendering from its archive.
    assert thumbnail.status_code == 200 and thumbnail.headers["content-type"] == "image/jpeg"
    assert thumbnail.content[:2] == b"\xff\xd8"


def test_clickthrough_from_record_to_ohif_draws_the_study(
    stack: Stack, monkeypatch: pytest.MonkeyPatch
) -> None:
    chromium = ensure_chromium()
    specs = load_demo(stack.orthanc.dicomweb_url)
    assert stack.sync().counts.parked == 0
    ct = _spec(specs, "CT Chest Abdomen with contrast")
    jane = _patient_id(stack, "Doe", "urn:oid:1.2.826.0.1.3680043.10.1001")
    shots = ARTIFACTS / "clickthrough"
    shutil.rmtree(shots, ignore_errors=True)
    shots.mkdir(parents=True)

    with (
        ViewerServer(stack.orthanc.dicomweb_url) as viewer,
        bridge_api(stack, monkeypatch, viewer.base_url) as api,
    ):
        options = {
            "recordUrl": f"{api}/record/patients/{jane}",
            "study": ct.description,
            "series": [s.description for s in ct.series],
            "screenshotDir": str(shots),
            "chromium": chromium,
            "timeoutMs": 60_000,
        }
        seen = run_clickthrough(options, shots, BROWSER_TIMEOUT_S)

    # The record page showed both of the patient's studies, with their thumbnails.
    assert seen["record_rows"] == 2 and seen["thumbnails_loaded"] == 2
    # One click: the resolver answered 302 to OHIF for exactly this study, and the browser followed it.
    expected = f"{viewer.base_url}/viewer?StudyInstanceUIDs={ct.uid}"
    assert seen["redirect"] == {"status": 302, "location": expected}
    assert seen["viewer_url"] == expected
    # OHIF listed the study's three series...
    listed = [s["description"] for s in seen["series_listed"]]
    assert sorted(listed) == sorted(s.description for s in ct.series)
    assert {s["modality"] for s in seen["series_listed"]} == {"CT"}
    # ...and drew an image: a lit, many-levelled picture in the viewport, not a blank canvas.
    canvas = seen["canvas"]
    assert canvas["width"] > 100 and canvas["height"] > 100
    assert canvas["lit_fraction"] > 0.05 and canvas["grey_levels"] > 16
    # The viewer searched for the patient's other studies and got this study only: never the
    # "CT Head" of Smith^John, who has the same Patient ID under another issuer.
    searches = seen["qido_study_searches"]
    assert any(q["by_patient_id"] for q in searches), searches
    assert {uid for q in searches for uid in q["study_uids"]} == {ct.uid}
    for name in ("record.png", "viewer.png"):
        assert (shots / name).stat().st_size > 10_000
