"""`bridge sync --dry-run` takes the run's own way on the real servers: it foretells what the run does."""

from __future__ import annotations

import json

import pytest
from pydicom.uid import generate_uid

from bridge.state.store import SqlStore
from tests.integration.conftest import Stack
from tests.stack.samples import SeriesSpec, StudySpec, build_study, stow

pytestmark = pytest.mark.integration


def _parked(stack: Stack) -> dict[str, str]:
    store = SqlStore(stack.settings().state_url)
    try:
        return {p.study_uid: p.reason for p in store.parked("test-orthanc")}
    finally:
        store.close()


@pytest.mark.interop
def test_the_dry_run_parks_and_creates_what_the_run_then_parks_and_creates(stack: Stack) -> None:
    reused = generate_uid()  # one Study Instance UID under two patients: a conflict
    for patient_id in ("DRY-ANN", "DRY-BOB"):
        spec = StudySpec(
            patient_id=patient_id, uid=reused, series=[SeriesSpec(instances=1, uid=generate_uid())]
        )
        stow(stack.orthanc.dicomweb_url, build_study(spec))
    unmapped = StudySpec(patient_id="DRY-X", issuer="HOSP-X")  # an issuer with no configured system
    good = StudySpec(patient_id="DRY-1", issuer="HOSP-A")
    for spec in (unmapped, good):
        stow(stack.orthanc.dicomweb_url, build_study(spec))
    stack.fhir.reset_stats()

    dry = stack.cli("sync", "--dry-run", "--json")

    assert dry.returncode == 0, dry.stderr
    rows = {r["study_uid"]: r for r in json.loads(dry.stdout)["studies"]}
    assert {u: r["action"] for u, r in rows.items()} == {
        reused: "park",
        unmapped.uid: "park",
        good.uid: "create",
    }
    assert stack.fhir.stats()["writes"] == 0
    assert stack.fhir_search("Patient") == [] and stack.fhir_search("ImagingStudy") == []
    assert _parked(stack) == {}  # nothing recorded in the store either
    assert "DRY-" not in dry.stdout + dry.stderr

    run = stack.cli("sync", "--json")

    assert run.returncode == 1, run.stderr  # parked, as foretold
    assert _parked(stack) == {reused: rows[reused]["reason"], unmapped.uid: rows[unmapped.uid]["reason"]}
    published = {s["identifier"][0]["value"] for s in stack.fhir_search("ImagingStudy")}
    assert published == {f"urn:oid:{good.uid}"}
