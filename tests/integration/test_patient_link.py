"""The Patient link against real Orthanc and both FHIR engines (issue 22, part B).

Distinct identities get distinct Patients (case-only and ``|`` ``,`` ``$`` PatientIDs, on Medplum,
whose token search folds case, and on HAPI); a study whose demographics disagree with its Patient
is parked, warned about or let through per BRIDGE_DEMOGRAPHICS_CHECK, and published once the
integrator accepts the link; a Patient the EHR merges has its studies re-linked to the survivor.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

import httpx
import pytest

from bridge.metrics import REGISTRY
from bridge.runtime import open_runtime
from bridge.state.store import SqlStore
from bridge.sync.report import RunReport
from tests.integration.conftest import DEFAULT_PATIENT_SYSTEM, Stack
from tests.stack.samples import StudySpec, build_study, stow

pytestmark = [pytest.mark.integration, pytest.mark.interop]

SOURCE = "test-orthanc"


def store_study(stack: Stack, spec: StudySpec) -> str:
    datasets = build_study(spec)
    stow(stack.orthanc.dicomweb_url, datasets)
    return str(datasets[0].StudyInstanceUID)


def reconcile(stack: Stack, **overrides: str) -> RunReport:
    """One reconciling pass (``bridge sync --reconcile``), in process."""
    settings = stack.settings(**overrides)

    async def run() -> RunReport:
        async with open_runtime(settings) as runtime:
            return await runtime.worker.run(reconcile=True)

    return asyncio.run(run())


def subject_of(stack: Stack, study_uid: str) -> str:
    [study] = stack.fhir_search("ImagingStudy", identifier=f"urn:dicom:uid|urn:oid:{study_uid}")
    return str(study["subject"]["reference"]).removeprefix("Patient/")


def parked(stack: Stack) -> dict[str, Any]:
    store = SqlStore(stack.settings().state_url)
    try:
        return {p.study_uid: p for p in store.parked(SOURCE)}
    finally:
        store.close()


def create_patient(stack: Stack, value: str, **elements: Any) -> str:
    body = {
        "resourceType": "Patient",
        "identifier": [{"system": DEFAULT_PATIENT_SYSTEM, "value": value}],
        **elements,
    }
    response = httpx.post(f"{stack.fhir.base_url}/Patient", json=body, timeout=30)
    response.raise_for_status()
    return str(response.json()["id"])


def test_case_only_and_reserved_character_patient_ids_are_published_as_separate_patients(
    stack: Stack,
) -> None:
    ids = ["ab-1", "AB-1", "PID|7", "pid|7", "PID,7", "PID$7"]
    uids = {
        store_study(stack, StudySpec(patient_id=pid, patient_name=f"Person{n}^A")): pid
        for n, pid in enumerate(ids)
    }
    report = stack.sync()
    assert (report.counts.created, report.counts.parked) == (len(ids), 0), report.parked
    subjects = {}
    for study_uid, pid in uids.items():
        patient = stack.fhir_read(f"Patient/{subject_of(stack, study_uid)}")
        assert patient["identifier"] == [{"system": DEFAULT_PATIENT_SYSTEM, "value": pid}]
        subjects[study_uid] = patient["id"]
    assert len(set(subjects.values())) == len(ids)
    assert len(stack.fhir_search("Patient")) == len(ids)
    again = stack.sync()  # nothing changed: nothing written, nobody re-linked
    assert (again.counts.unchanged, again.counts.fhir_writes) == (len(ids), 0)


def existing_patient_other_birth_date(stack: Stack) -> tuple[str, str]:
    """An EHR Patient and a study with its PatientID whose birth date and sex differ."""
    patient = create_patient(
        stack, "MRN-22", name=[{"family": "Doe", "given": ["Jane"]}], birthDate="1970-01-01", gender="female"
    )
    study_uid = store_study(
        stack, StudySpec(patient_id="MRN-22", patient_name="DOE^JANE", birth_date="19800101", sex="M")
    )
    return patient, study_uid


def test_a_study_whose_demographics_disagree_is_parked_then_published_once_accepted(stack: Stack) -> None:
    patient, study_uid = existing_patient_other_birth_date(stack)
    report = stack.sync()
    [entry] = report.parked
    assert (entry.study_uid, entry.kind, entry.attribute) == (
        study_uid,
        "patient",
        "PatientBirthDate,PatientSex",
    )
    assert "1980" not in entry.reason and "MRN-22" not in entry.reason
    assert stack.fhir_search("ImagingStudy") == []

    retried = stack.cli("retry", "--study", study_uid, "--accept-demographics")
    assert retried.returncode == 0, retried.stdout + retried.stderr
    assert subject_of(stack, study_uid) == patient
    assert "accepted" in retried.stdout
    assert study_uid not in parked(stack)
    store = SqlStore(stack.settings().state_url)
    try:
        [run, *_] = store.runs(1)
        assert run.kind == "retry"
        assert run.patient_events == [
            {
                "study_uid": study_uid,
                "attributes": "PatientBirthDate,PatientSex",
                "patient": f"Patient/{patient}",
                "event": "demographics-accepted",
            }
        ]
    finally:
        store.close()
    # The EHR's Patient is never written.
    assert stack.fhir_read(f"Patient/{patient}")["birthDate"] == "1970-01-01"


def test_an_override_for_a_study_never_parked_is_refused_naming_the_study(stack: Stack) -> None:
    study_uid = store_study(stack, StudySpec(patient_id="MRN-23"))
    stack.sync()
    refused = stack.cli("retry", "--study", study_uid, "--accept-demographics")
    assert refused.returncode == 2
    assert study_uid in refused.stderr + refused.stdout and "demographics" in refused.stderr + refused.stdout


def warnings_counted() -> float:
    """bridge_sync_demographics_disagreements{action="warn"} in this process (where stack.sync runs)."""
    labels = {"action": "warn"}
    return REGISTRY.get_sample_value("bridge_sync_demographics_disagreements_total", labels) or 0.0


def test_warn_publishes_and_counts_the_disagreement_and_off_does_not_compare(stack: Stack) -> None:
    patient, study_uid = existing_patient_other_birth_date(stack)
    before = warnings_counted()
    report = stack.sync(demographics_check="warn")
    assert (report.counts.created, report.counts.parked, report.demographics_warnings) == (1, 0, 1)
    assert warnings_counted() - before == 1  # in the metrics too, for an operator's alert
    assert subject_of(stack, study_uid) == patient
    [event] = report.patient_events
    assert event["event"] == "demographics-warning" and event["attributes"] == "PatientBirthDate,PatientSex"

    other = store_study(
        stack, StudySpec(patient_id="MRN-22", patient_name="Roe^Rick", birth_date="19900101", sex="M")
    )
    quiet = stack.sync(demographics_check="off")
    assert (quiet.counts.created, quiet.counts.parked, quiet.patient_events) == (1, 0, [])
    assert warnings_counted() - before == 1
    assert subject_of(stack, other) == patient


def test_one_patient_id_for_two_people_never_links_the_second_silently(stack: Stack) -> None:
    first = store_study(
        stack, StudySpec(patient_id="SHARED-1", patient_name="Doe^Jane", birth_date="19700101")
    )
    stack.sync()
    second = store_study(
        stack, StudySpec(patient_id="SHARED-1", patient_name="Roe^Richard", birth_date="19851231", sex="M")
    )
    report = stack.sync()
    patient = stack.fhir_read(f"Patient/{subject_of(stack, first)}")
    assert patient["name"][0]["family"] == "Doe"
    [entry] = report.parked  # Orthanc lists each study with its own PatientName and birth date
    assert (entry.study_uid, entry.kind) == (second, "patient")
    assert entry.attribute == "PatientBirthDate,PatientSex,PatientName"
    assert "Roe" not in entry.reason and "SHARED-1" not in entry.reason


def test_two_people_with_one_patient_id_in_one_run_publish_one_and_park_the_other(stack: Stack) -> None:
    people = {
        store_study(stack, StudySpec(patient_id="SHARED-2", patient_name=name, birth_date=born)): name
        for name, born in (("Doe^Jane", "19700101"), ("Roe^Richard", "19851231"))
    }
    report = stack.sync()
    assert (report.counts.created, report.counts.parked) == (1, 1)
    [published] = [uid for uid in people if uid not in parked(stack)]
    patient = stack.fhir_read(f"Patient/{subject_of(stack, published)}")
    assert (
        patient["name"][0]["family"] == people[published].split("^")[0]
    )  # the Patient is the published one's


def merge_on_the_fhir_server(stack: Stack, old: str, survivor: str) -> None:
    """What an EHR publishes for an ADT merge: the old record inactive, replaced by the survivor."""
    current = stack.fhir_read(f"Patient/{old}")
    current["active"] = False
    current["link"] = [{"other": {"reference": f"Patient/{survivor}"}, "type": "replaced-by"}]
    current.pop("meta", None)
    httpx.put(f"{stack.fhir.base_url}/Patient/{old}", json=current, timeout=30).raise_for_status()


def test_a_patient_merged_on_the_fhir_server_has_its_studies_relinked_to_the_survivor(stack: Stack) -> None:
    study_uid = store_study(stack, StudySpec(patient_id="MRN-40", patient_name="Doe^Jane"))
    stack.sync()
    old = subject_of(stack, study_uid)
    survivor = create_patient(stack, "MRN-40", name=[{"family": "Doe"}], gender="female", active=True)
    merge_on_the_fhir_server(stack, old, survivor)

    incremental = stack.sync()  # a run with no merge check due does not look: no write, no change
    assert (incremental.counts.unchanged, incremental.counts.fhir_writes) == (1, 0)
    assert subject_of(stack, study_uid) == old

    report = reconcile(stack)
    assert report.counts.updated == 1 and not report.parked
    assert subject_of(stack, study_uid) == survivor
    assert report.patient_events == [
        {"study_uid": study_uid, "event": "relinked", "from": f"Patient/{old}", "to": f"Patient/{survivor}"}
    ]
    assert (
        stack.fhir_read(f"Patient/{old}")["active"] is False
    )  # the merged record is left as the EHR left it
    # A new study of that PatientID goes to the survivor at once, never to the replaced Patient.
    newer = store_study(stack, StudySpec(patient_id="MRN-40", patient_name="Doe^Jane"))
    stack.sync()
    assert subject_of(stack, newer) == survivor


def test_a_cycle_follows_a_merge_within_the_merge_check_interval_and_records_the_relink(stack: Stack) -> None:
    """`bridge sync` as a cron job runs it: a merge check due, one search, the studies re-linked."""
    every = {"sync_merge_check_interval": "1"}
    study_uid = store_study(stack, StudySpec(patient_id="MRN-41", patient_name="Roe^Ann"))
    first = stack.cli("sync", **every)  # publishes, and marks the first merge check's time
    assert first.returncode == 0, first.stderr[-2000:]
    old = subject_of(stack, study_uid)
    survivor = create_patient(stack, "MRN-41", name=[{"family": "Roe"}], gender="female", active=True)
    merge_on_the_fhir_server(stack, old, survivor)
    time.sleep(1.5)  # the check is due again

    second = stack.cli("sync", **every)
    assert second.returncode == 0, second.stderr[-2000:]
    assert subject_of(stack, study_uid) == survivor
    store = SqlStore(stack.settings().state_url)
    try:
        [relink] = [run for run in store.runs(20, source=SOURCE) if run.kind == "relink"]
    finally:
        store.close()
    assert relink.status == "ok" and relink.updated == 1
    assert relink.patient_events == [
        {"study_uid": study_uid, "event": "relinked", "from": f"Patient/{old}", "to": f"Patient/{survivor}"}
    ]
