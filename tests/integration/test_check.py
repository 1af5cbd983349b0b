"""`bridge check` against the real stack: every peer right, then each one wrong in turn (and sync's word)."""

from __future__ import annotations

import json
from pathlib import Path

import httpx
import pytest

from tests.integration.conftest import Stack
from tests.stack.process import free_loopback_port
from tests.stack.samples import StudySpec, build_study, stow

pytestmark = pytest.mark.integration


def flat(text: str) -> str:
    return " ".join(text.split())


def _store(stack: Stack, *issuers: str | None) -> None:
    with httpx.Client(timeout=60) as client:
        for i, issuer in enumerate(issuers):
            stow(
                stack.orthanc.dicomweb_url,
                build_study(StudySpec(patient_id=f"CHK{i}", issuer=issuer)),
                client,
            )


def _viewer(stack: Stack) -> dict[str, str]:
    # Orthanc's own address stands in for a viewer that answers.
    return {
        "viewer_urls": json.dumps({"stone": stack.orthanc.base_url}),
        "viewers": "stone",
        "default_viewer": "stone",
    }


@pytest.mark.interop
def test_check_passes_against_the_real_stack_and_lists_the_issuers(stack: Stack) -> None:
    _store(stack, "HOSP-A", "HOSP-A", "HOSP-B")
    result = stack.cli("check", **_viewer(stack))
    assert result.returncode == 0, result.stdout + result.stderr
    text = flat(result.stdout)
    assert "QIDO-RS answers" in text
    assert "HOSP-A (2), HOSP-B (1)" in text
    assert "matches StudyInstanceUID lists" in text or "does not match StudyInstanceUID lists" in text
    assert "takes the writes of BRIDGE_WRITE_STRATEGY=client-id" in text
    assert "opens and takes a write" in text
    assert "all checks passed" in text
    # The one write: the source's Endpoint, so the sync that follows finds it.
    assert len(stack.fhir_search("Endpoint")) == 1
    assert stack.cli("sync").returncode == 0


def test_an_unmapped_issuer_exits_1_with_the_map_to_fill_in(stack: Stack) -> None:
    _store(stack, "HOSP-A", "HOSP-Z", "HOSP-Z", None)
    result = stack.cli("check", "--json", **_viewer(stack))
    assert result.returncode == 1, result.stdout + result.stderr
    data = json.loads(result.stdout)
    assert data["patient_issuers"]["test-orthanc"] == {"HOSP-Z": 2, "HOSP-A": 1, "(no issuer)": 1}
    wanted = data["patient_issuer_systems_to_set"]["test-orthanc"]
    assert wanted["HOSP-Z"] == "<system of HOSP-Z>"
    assert wanted["HOSP-A"].startswith("urn:oid:")  # the existing map is kept
    parks = [f for f in data["findings"] if f["severity"] == "parks"]
    assert parks and "HOSP-Z" in parks[0]["text"] and "BRIDGE_PATIENT_ISSUER_SYSTEMS" in parks[0]["text"]
    # The text form prints the setting ready to paste.
    text = stack.cli("check", **_viewer(stack)).stdout
    assert "BRIDGE_PATIENT_ISSUER_SYSTEMS='{" in text and "<system of HOSP-Z>" in text


def test_an_archive_that_does_not_answer_exits_3_naming_its_url(stack: Stack) -> None:
    result = stack.cli("check", dicomweb_url=f"http://127.0.0.1:{free_loopback_port()}/dicom-web")
    assert result.returncode == 3, result.stdout + result.stderr
    text = flat(result.stdout)
    assert "does not answer" in text and "BRIDGE_DICOMWEB_URL" in text


def test_an_archive_url_that_is_not_dicomweb_exits_2_naming_it(stack: Stack) -> None:
    result = stack.cli("check", dicomweb_url=stack.fhir.base_url)
    assert result.returncode == 2, result.stdout + result.stderr
    text = flat(result.stdout)
    assert "BRIDGE_DICOMWEB_URL" in text and "the URL before /studies" in text


@pytest.mark.parametrize("strategy", ["client-id", "conditional"])
@pytest.mark.parametrize("command", ["check", "sync"])
def test_a_fhir_url_pointing_at_the_archive_says_it_is_not_a_fhir_server(
    stack: Stack, command: str, strategy: str
) -> None:
    # Not advice to change BRIDGE_WRITE_STRATEGY (which leads to another 404), nor the bare 404
    # of the conditional PUT: under either strategy, the URL is what to fix.
    _store(stack, "HOSP-A")
    result = stack.cli(command, fhir_url=stack.orthanc.dicomweb_url, write_strategy=strategy)
    assert result.returncode == 2, result.stdout + result.stderr
    text = flat(result.stdout + result.stderr)
    assert "BRIDGE_FHIR_URL" in text and "is not a FHIR server" in text
    assert "BRIDGE_WRITE_STRATEGY" not in text


def test_a_fhir_server_that_does_not_answer_exits_3(stack: Stack) -> None:
    result = stack.cli("check", fhir_url=f"http://127.0.0.1:{free_loopback_port()}/fhir")
    assert result.returncode == 3, result.stdout + result.stderr
    assert "BRIDGE_FHIR_URL" in flat(result.stdout)


def test_a_store_that_cannot_open_exits_4_naming_the_folder_and_setting(stack: Stack, tmp_path: Path) -> None:
    missing = tmp_path / "no-such-folder" / "state.db"
    result = stack.cli("check", state_url=f"sqlite:///{missing}")
    assert result.returncode == 4, result.stdout + result.stderr
    text = flat(result.stdout)
    assert str(missing.parent) in text and "BRIDGE_STATE_URL" in text


def test_a_viewer_that_does_not_answer_exits_3_naming_the_setting(stack: Stack) -> None:
    dead = f"http://127.0.0.1:{free_loopback_port()}"
    result = stack.cli("check", viewer_urls=json.dumps({"ohif": dead}))
    assert result.returncode == 3, result.stdout + result.stderr
    text = flat(result.stdout)
    assert dead in text and "BRIDGE_VIEWER_URLS" in text
