"""What ``bridge sync`` says against the real stack when a setting or a UID is wrong."""

from __future__ import annotations

import httpx
import pytest

from tests.integration.conftest import Stack
from tests.stack.samples import StudySpec, build_study, stow

pytestmark = pytest.mark.integration


def flat(text: str) -> str:
    return " ".join(text.split())


def _store_one(stack: Stack) -> StudySpec:
    spec = StudySpec(patient_id="MSG1", issuer="HOSP-A")
    with httpx.Client(timeout=60) as client:
        stow(stack.orthanc.dicomweb_url, build_study(spec), client)
    return spec


def test_sync_with_the_fhir_url_at_the_archive_says_it_is_not_a_fhir_server(stack: Stack) -> None:
    _store_one(stack)
    result = stack.cli("sync", fhir_url=stack.orthanc.dicomweb_url)
    assert result.returncode == 2, result.stdout + result.stderr
    message = flat(result.stderr)
    assert "BRIDGE_FHIR_URL" in message and "is not a FHIR server" in message
    assert "BRIDGE_WRITE_STRATEGY" not in message


def test_sync_of_a_study_not_in_the_archive_says_so_and_exits_1(stack: Stack) -> None:
    spec = _store_one(stack)
    absent = "1.2.826.0.1.3680043.10.999.1"
    result = stack.cli("sync", "--study", absent, "--study", str(spec.uid))
    assert result.returncode == 1, result.stdout + result.stderr
    message = flat(result.stderr)
    assert f"study {absent} is in no archive of test-orthanc" in message
    assert f"study {spec.uid} is in no archive" not in message  # the one the archive holds was synced
    assert len(stack.fhir_search("ImagingStudy")) == 1
