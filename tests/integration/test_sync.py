"""End-to-end sync against the real Orthanc (DICOMweb) and FHIR servers (Medplum; HAPI for interop tests)."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
from pydicom.uid import generate_uid

from bridge.mapping.context import resource_id
from bridge.mapping.values import safe_key
from tests.integration.conftest import ISSUERS, Stack
from tests.stack.faultproxy import Fault, FaultProxy
from tests.stack.samples import SeriesSpec, StudySpec, build_study, demo_studies, load_demo, stow

pytestmark = pytest.mark.integration

DCM = "http://dicom.nema.org/resources/ontology/DCM"


def _by_uid(stack: Stack) -> dict[str, dict]:
    studies = stack.fhir_search("ImagingStudy")
    out = {}
    for study in studies:
        uids = [i["value"] for i in study["identifier"] if i.get("system") == "urn:dicom:uid"]
        assert len(uids) == 1
        assert uids[0].startswith("urn:oid:")
        assert uids[0].removeprefix("urn:oid:") not in out, "two ImagingStudies for one study"
        out[uids[0].removeprefix("urn:oid:")] = study
    return out


@pytest.mark.interop
def test_every_study_becomes_exactly_one_correct_imaging_study(stack: Stack) -> None:
    specs = load_demo(stack.orthanc.dicomweb_url)

    report = stack.sync()

    assert (report.counts.seen, report.counts.created, report.counts.parked) == (6, 6, 0)
    published = _by_uid(stack)
    assert set(published) == {s.uid for s in specs}

    endpoints = stack.fhir_search("Endpoint")
    assert len(endpoints) == 1
    endpoint = endpoints[0]
    assert endpoint["address"] == stack.orthanc.dicomweb_url
    assert endpoint["connectionType"]["code"] == "dicom-wado-rs"
    assert endpoint["payloadMimeType"] == ["application/dicom"]

    patients = stack.fhir_search("Patient")
    keys = [(p["identifier"][0]["system"], p["identifier"][0]["value"]) for p in patients]
    assert sorted(keys) == sorted(
        {(ISSUERS[s.issuer], s.patient_id) for s in specs if s.issuer and s.patient_id}
    ), "one Patient per (system, PatientID); PAT001 under two issuers is two patients"
    patient_by_ref = {f"Patient/{p['id']}": p for p in patients}

    for spec in specs:
        study = published[spec.uid]
        assert study["status"] == "available"
        assert study["endpoint"] == [{"reference": f"Endpoint/{endpoint['id']}"}]
        subject = patient_by_ref[study["subject"]["reference"]]
        assert subject["identifier"][0] == {"system": ISSUERS[spec.issuer], "value": spec.patient_id}
        accession = [i for i in study["identifier"] if i.get("type")]
        assert accession[0]["value"] == spec.accession
        assert accession[0]["type"]["coding"][0]["code"] == "ACSN"
        assert study["numberOfSeries"] == len(spec.series)
        assert study["numberOfInstances"] == sum(s.instances for s in spec.series)
        assert {c["code"] for c in study["modality"]} == {s.modality for s in spec.series}
        assert all(c["system"] == DCM for c in study["modality"])
        assert study["started"].startswith(
            f"{spec.study_date[:4]}-{spec.study_date[4:6]}-{spec.study_date[6:]}T"
        )
        if spec.tz_offset:
            assert study["started"].endswith(f"{spec.tz_offset[:3]}:{spec.tz_offset[3:]}")
        assert study["description"] == spec.description
        assert [s["uid"] for s in study["series"]] == [s.uid for s in spec.series]
        for mapped, series in zip(study["series"], spec.series, strict=True):
            assert mapped["modality"]["code"] == series.modality
            assert mapped["numberOfInstances"] == series.instances
            assert mapped["description"] == series.description
            assert mapped["bodySite"]["system"] == "http://snomed.info/sct"
            if series.laterality:
                assert mapped["laterality"]["code"] in {"7771000", "24028007"}


def test_non_latin_names_reach_the_created_patient_intact(stack: Stack) -> None:
    load_demo(stack.orthanc.dicomweb_url)
    stack.sync()

    patients = stack.fhir_search("Patient", identifier=f"{ISSUERS['HOSP-B']}|12345")
    assert len(patients) == 1
    names = patients[0]["name"]
    assert [representation(n) for n in names] == ["ABC", "IDE", "SYL"][: len(names)]
    plain = [{k: v for k, v in n.items() if k != "extension"} for n in names]
    assert {"family": "Yamada", "given": ["Tarou"]} in plain
    assert {"family": "山田", "given": ["太郎"]} in plain
    muller = stack.fhir_search("Patient", identifier=f"{ISSUERS['HOSP-A']}|PAT002")[0]
    assert {k: v for k, v in muller["name"][0].items() if k != "extension"} == {
        "family": "Müller",
        "given": ["Jürgen"],
    }


def representation(name: dict) -> str:
    [extension] = name["extension"]
    assert extension["url"] == "http://hl7.org/fhir/StructureDefinition/iso21090-EN-representation"
    return str(extension["valueCode"])


@pytest.mark.interop
def test_a_second_run_with_no_change_writes_nothing(stack: Stack) -> None:
    load_demo(stack.orthanc.dicomweb_url)
    stack.sync()
    stack.fhir.reset_stats()

    again = stack.sync()

    assert (again.counts.unchanged, again.counts.created, again.counts.updated) == (6, 0, 0)
    assert again.counts.fhir_writes == 0
    assert stack.fhir.stats()["writes"] == 0
    assert len(stack.fhir_search("ImagingStudy")) == 6


@pytest.mark.interop
def test_a_new_study_and_a_new_series_in_an_old_study_are_picked_up(stack: Stack) -> None:
    specs = load_demo(stack.orthanc.dicomweb_url)
    stack.sync()
    old = specs[2]
    added = SeriesSpec("CR", "Nachaufnahme", "CHEST", instances=1, number=9, uid=generate_uid())
    extra_series = StudySpec(**{**old.__dict__, "series": [added]})
    stow(stack.orthanc.dicomweb_url, build_study(extra_series))
    new = StudySpec(
        patient_id="NEW1", issuer="HOSP-A", accession="A9999", series=[SeriesSpec("DX", instances=1)]
    )
    stow(stack.orthanc.dicomweb_url, build_study(new))

    report = stack.sync()

    assert (report.counts.created, report.counts.updated, report.counts.unchanged) == (1, 1, 5)
    published = _by_uid(stack)
    assert len(published) == 7
    assert published[old.uid]["numberOfSeries"] == 2
    assert published[old.uid]["meta"]["versionId"] != "1"
    assert new.uid in published


@pytest.mark.interop
def test_a_study_changed_on_the_server_since_is_written_over_its_current_version(stack: Stack) -> None:
    """If-Match with the remembered version fails (HAPI: 409, Medplum: 412); one re-read, one write."""
    import httpx

    specs = load_demo(stack.orthanc.dicomweb_url)
    stack.sync()
    old = specs[2]
    study = _by_uid(stack)[old.uid]
    study["note"] = [{"text": "checked by a radiographer"}]
    edited = httpx.put(f"{stack.fhir.base_url}/ImagingStudy/{study['id']}", json=study, timeout=30)
    assert edited.status_code == 200, edited.text
    added = SeriesSpec("CR", "Nachaufnahme", "CHEST", instances=1, number=9, uid=generate_uid())
    stow(stack.orthanc.dicomweb_url, build_study(StudySpec(**{**old.__dict__, "series": [added]})))
    stack.fhir.reset_stats()

    report = stack.sync()

    assert (report.counts.updated, report.counts.unchanged, report.counts.parked) == (1, 5, 0)
    stats = stack.fhir.stats()
    assert stats["by_status"].get("409", 0) + stats["by_status"].get("412", 0) == 1
    published = _by_uid(stack)[old.uid]
    assert published["numberOfSeries"] == 2
    assert published["meta"]["versionId"] == "3"


def test_bad_studies_are_parked_with_the_attribute_while_the_rest_sync(stack: Stack) -> None:
    good = demo_studies()[:2]
    for spec in good:
        stow(stack.orthanc.dicomweb_url, build_study(spec))
    bad = {
        "PatientID": StudySpec(patient_id=None, issuer="HOSP-A"),
        "StudyInstanceUID": StudySpec(uid="1.2.abc", patient_id="BAD2", issuer="HOSP-A"),
        "StudyDate": StudySpec(study_date="20241399", patient_id="BAD3", issuer="HOSP-A"),
    }
    for spec in bad.values():
        stow(stack.orthanc.dicomweb_url, build_study(spec))

    result = stack.cli("sync", "--json")

    assert result.returncode == 1, result.stderr
    summary = json.loads(result.stdout)
    assert (summary["created"], summary["parked"]) == (2, 3)
    parked = {p["study_uid"]: p for p in summary["parked_studies"]}
    for attribute, spec in bad.items():
        # An invalid Study Instance UID is never shown as such (it could hold anything): a digest.
        key = safe_key(str(spec.uid)) if attribute == "StudyInstanceUID" else spec.uid
        assert parked[key]["attribute"] == attribute
        assert attribute in parked[key]["reason"]
    assert "1.2.abc" not in result.stdout + result.stderr
    assert set(_by_uid(stack)) == {s.uid for s in good}
    status = json.loads(stack.cli("status", "--json").stdout)
    assert status["parked"] == 3 and status["published"] == 2
    assert {p["attribute"] for p in status["parked_studies"]} == set(bad)
    # Parked studies are retried: still parked (the data did not change), attempts grow.
    stack.cli("sync")
    status = json.loads(stack.cli("status", "--json").stdout)
    assert all(p["attempts"] == 2 for p in status["parked_studies"])


def test_no_patient_data_in_the_output_or_the_logs(stack: Stack) -> None:
    specs = load_demo(stack.orthanc.dicomweb_url)
    stow(
        stack.orthanc.dicomweb_url,
        build_study(
            StudySpec(study_date="20241399", patient_id="SECRET-ID-77", patient_name="Hidden^Person")
        ),
    )

    result = stack.cli("sync", log_level="DEBUG")

    text = result.stdout + result.stderr
    for spec in [*specs]:
        assert spec.patient_name.split("^")[0] not in text
        assert spec.birth_date not in text
    assert "SECRET-ID-77" not in text and "Hidden" not in text
    assert "PAT00" not in text


def test_match_only_parks_until_the_patient_exists(stack: Stack) -> None:
    spec = demo_studies()[0]
    stow(stack.orthanc.dicomweb_url, build_study(spec))

    first = stack.sync(patient_policy="match-only")
    assert first.counts.parked == 1 and first.parked[0].kind == "patient"
    assert stack.fhir_search("Patient") == []

    import httpx

    httpx.post(
        f"{stack.fhir.base_url}/Patient",
        json={
            "resourceType": "Patient",
            "identifier": [{"system": ISSUERS["HOSP-A"], "value": "PAT001"}],
            # Another spelling of the family name and another given name (the demographics check
            # takes them for the same person; the EHR's version must survive untouched).
            "name": [{"family": "DOE", "given": ["EHR-Owned"]}],
            "birthDate": "1970-01-01",
        },
        timeout=30,
    ).raise_for_status()
    second = stack.sync(patient_policy="match-only")

    assert second.counts.created == 1
    patient = stack.fhir_search("Patient")
    assert len(patient) == 1 and patient[0]["name"] == [{"family": "DOE", "given": ["EHR-Owned"]}]
    study = next(iter(_by_uid(stack).values()))
    assert study["subject"]["reference"] == f"Patient/{patient[0]['id']}"


@pytest.mark.interop
def test_existing_patient_is_linked_and_never_modified(stack: Stack) -> None:
    import httpx

    created = httpx.post(
        f"{stack.fhir.base_url}/Patient",
        json={
            "resourceType": "Patient",
            "identifier": [{"system": ISSUERS["HOSP-A"], "value": "PAT001"}],
            # The EHR's own form of the person the studies name (Doe^Jane, 19700101, F): a married
            # name with the former one kept, a birth year only; nothing of it may be overwritten.
            "name": [{"family": "Official", "given": ["Name"]}, {"use": "old", "family": "Doe"}],
            "gender": "female",
            "birthDate": "1970",
        },
        timeout=30,
    ).json()
    load_demo(stack.orthanc.dicomweb_url)

    stack.sync()

    after = stack.fhir_read(f"Patient/{created['id']}")
    assert after["meta"]["versionId"] == created["meta"]["versionId"]
    assert after["name"] == [{"family": "Official", "given": ["Name"]}, {"use": "old", "family": "Doe"}]
    assert after["birthDate"] == "1970"
    linked = [s for s in _by_uid(stack).values() if s["subject"]["reference"] == f"Patient/{created['id']}"]
    assert len(linked) == 2  # Doe^Jane's CT and mammography


def test_logical_policy_never_touches_patients(stack: Stack) -> None:
    load_demo(stack.orthanc.dicomweb_url)

    stack.sync(patient_policy="logical")

    stats = stack.fhir.stats()
    assert stack.fhir_search("Patient") == []
    assert stats["searches"] == 0
    # One CapabilityStatement read (create by PUT? batch?), the Endpoint, six studies in one batch.
    assert stats["by_interaction"] == {"capabilities": 1, "update": 1, "batch": 1}
    assert stats["requests"] == 3
    assert stats["writes_by_kind"]["create"] + stats["writes_by_kind"]["update"] == 7
    for study in _by_uid(stack).values():
        assert study["subject"]["type"] == "Patient"
        assert study["subject"]["identifier"]["system"] in ISSUERS.values()


@pytest.mark.interop
def test_conditional_write_strategy_is_just_as_idempotent(stack: Stack) -> None:
    load_demo(stack.orthanc.dicomweb_url)

    stack.sync(write_strategy="conditional")
    stack.state_path.unlink()  # forget everything: a replay after losing the store
    stack.sync(write_strategy="conditional")

    assert len(_by_uid(stack)) == 6
    assert len(stack.fhir_search("Endpoint")) == 1
    assert len(stack.fhir_search("Patient")) == 4


@pytest.mark.interop
def test_replay_after_losing_the_store_duplicates_nothing(stack: Stack) -> None:
    load_demo(stack.orthanc.dicomweb_url)
    stack.sync()
    stack.state_path.unlink()

    report = stack.sync()

    assert report.counts.parked == 0
    assert len(_by_uid(stack)) == 6
    assert len(stack.fhir_search("Endpoint")) == 1
    assert len(stack.fhir_search("Patient")) == 4


@pytest.mark.interop
def test_request_counts_grow_with_changes_not_with_the_archive(stack: Stack) -> None:
    n, page = 23, 10
    for i in range(n):
        stow(
            stack.orthanc.dicomweb_url,
            build_study(
                StudySpec(patient_id=f"P{i % 5}", issuer="HOSP-A", series=[SeriesSpec("CT", instances=1)])
            ),
        )

    # Study by study (an archive without UID lists, a server without batch): the per-study floor.
    per_study = {"qido_page_size": str(page), "dicomweb_series_query": "per-study", "fhir_batch_size": "0"}
    first = stack.sync(**per_study)
    stats = stack.fhir.stats()

    study_queries = [q for q in _run_queries(stack, first.run_id) if q.startswith("/studies?")]
    series_queries = [q for q in _run_queries(stack, first.run_id) if "/series" in q]
    assert len(study_queries) == -(-n // page)  # ceil: the last page is short
    assert len(series_queries) == n
    assert first.series_query == "per-study"
    assert _run_record(stack, first.run_id).series_query == "per-study"  # the way is kept with the run
    # One write per study, one Endpoint, and one conditional create per patient.
    assert first.counts.fhir_writes == n + 1 + 5
    assert stats["writes"] == n + 1 + 5

    stack.fhir.reset_stats()
    second = stack.sync(qido_page_size=str(page))
    queries = _run_queries(stack, second.run_id)
    assert len([q for q in queries if q.startswith("/studies?")]) == -(-n // page)
    assert [q for q in queries if "/series" in q] == []
    assert _run_record(stack, second.run_id).series_query is None  # no series asked at all
    assert stack.fhir.stats()["requests"] == 0


def _run_queries(stack: Stack, run_id: int) -> list[str]:
    return _run_record(stack, run_id).qido_queries


def _run_record(stack: Stack, run_id: int) -> Any:
    from bridge.state.store import SqlStore

    store = SqlStore(f"sqlite:///{stack.state_path}")
    try:
        return next(r for r in store.runs(100) if r.id == run_id)
    finally:
        store.close()


def test_a_resource_the_server_rejects_parks_that_study_with_its_outcome(stack: Stack) -> None:
    good = demo_studies()[0]
    stow(stack.orthanc.dicomweb_url, build_study(good))
    rejected = StudySpec(patient_id="R1", issuer="HOSP-A", uid=generate_uid())
    stow(stack.orthanc.dicomweb_url, build_study(rejected))
    # Every value the bridge sends is checked first, so a refusal is provoked: the server answers
    # 422 to this one study's write.
    target = resource_id("ImagingStudy", "test-orthanc", str(rejected.uid))
    with FaultProxy(stack.fhir.root_url, seed=3) as fhir:
        fhir.add(Fault(status=422, method="PUT", path=f"/ImagingStudy/{target}"))
        # Study by study: a refused entry of a batch is tests/integration/test_throughput.py's.
        report = stack.sync(fhir_url=fhir.proxied(stack.fhir.base_url), fhir_batch_size="0")

    assert report.counts.created == 1
    assert [p.study_uid for p in report.parked] == [rejected.uid]
    assert report.parked[0].kind == "rejected"
    assert "422" in report.parked[0].reason


def test_a_study_whose_write_breaks_the_connection_every_time_is_parked_and_the_run_goes_on(
    stack: Stack,
) -> None:
    good = demo_studies()[0]
    stow(stack.orthanc.dicomweb_url, build_study(good))
    broken = StudySpec(patient_id="R2", issuer="HOSP-A", uid=generate_uid())
    stow(stack.orthanc.dicomweb_url, build_study(broken))
    target = resource_id("ImagingStudy", "test-orthanc", str(broken.uid))
    with FaultProxy(stack.fhir.root_url, seed=4) as fhir:
        fhir.add(Fault(kind="reset", when="before", method="PUT", path=f"/ImagingStudy/{target}"))
        # Study by study: the batch path falls back to these per-study writes when a batch breaks.
        result = stack.cli("sync", "--json", fhir_url=fhir.proxied(stack.fhir.base_url), fhir_batch_size="0")

    assert result.returncode == 1, result.stderr  # parked (1), not "upstream unavailable" (3)
    summary = json.loads(result.stdout)
    assert (summary["created"], summary["parked"]) == (1, 1)
    [parked] = summary["parked_studies"]
    assert parked["study_uid"] == broken.uid and parked["kind"] == "upstream"


def test_unreachable_fhir_server_exits_3_with_a_clear_message(stack: Stack) -> None:
    load_demo(stack.orthanc.dicomweb_url)

    result = stack.cli("sync", fhir_url="http://127.0.0.1:9/fhir/R4", http_retries="0")

    assert result.returncode == 3
    assert "fhir" in result.stderr.lower() and "127.0.0.1:9" in result.stderr
    assert "Traceback" not in result.stderr


def test_unreachable_archive_exits_3(stack: Stack) -> None:
    result = stack.cli("sync", dicomweb_url="http://127.0.0.1:9/dicom-web", http_retries="0")

    assert result.returncode == 3
    assert "DICOMweb archive" in result.stderr


def test_a_bad_setting_exits_2_naming_it(stack: Stack) -> None:
    result = stack.cli("sync", patient_policy="sometimes")

    assert result.returncode == 2
    assert "BRIDGE_PATIENT_POLICY" in result.stderr
    assert Counter(result.stderr.split())["Traceback"] == 0


def test_a_server_without_update_as_create_stops_with_advice_and_conditional_writes_work(
    stack: Stack, tmp_path: Path
) -> None:
    from tests.stack.fhir import FhirTestServer

    load_demo(stack.orthanc.dicomweb_url)
    with FhirTestServer(env={"FHIR_UPDATE_CREATE": "0"}, log_path=tmp_path / "fhir.log") as strict:
        refused = stack.cli("sync", fhir_url=strict.base_url)
        assert refused.returncode == 2, refused.stderr
        assert "BRIDGE_WRITE_STRATEGY" in refused.stderr and "conditional" in refused.stderr
        assert strict.stats()["writes"] == 0

        accepted = stack.cli("sync", "--json", fhir_url=strict.base_url, write_strategy="conditional")
        assert accepted.returncode == 0, accepted.stderr
        assert json.loads(accepted.stdout)["created"] == 6


def test_a_series_without_modality_is_published_as_ot_and_counted(stack: Stack) -> None:
    spec = StudySpec(patient_id="M0", issuer="HOSP-A", uid=generate_uid(), series=[SeriesSpec("OT")])
    datasets = build_study(spec)
    for ds in datasets:
        del ds.Modality  # Type 1, yet missing in several real files
    stow(stack.orthanc.dicomweb_url, datasets)

    result = stack.cli("sync", "--json")

    assert result.returncode == 0, result.stderr
    summary = json.loads(result.stdout)
    assert (summary["created"], summary["parked"], summary["fallbacks"]) == (1, 0, 1)
    [study] = stack.fhir_search("ImagingStudy")
    assert [s["modality"]["code"] for s in study["series"]] == ["OT"]
    parked = stack.cli("sync", "--json", missing_modality="park", state_url=f"sqlite:///{stack.state_path}.2")
    assert json.loads(parked.stdout)["parked_studies"][0]["attribute"] == "Modality"


@pytest.mark.hapi
@pytest.mark.parametrize("fhir_server", ["hapi"], indirect=True)
def test_hapi_without_client_ids_stops_with_advice_and_conditional_writes_work(stack: Stack) -> None:
    """HAPI with client ids off answers 404 to a PUT create and says nothing of updateCreate."""
    load_demo(stack.orthanc.dicomweb_url)
    stack.fhir.client_ids("NOT_ALLOWED")
    try:
        refused = stack.cli("sync")
        assert refused.returncode == 2, refused.stderr
        assert "BRIDGE_WRITE_STRATEGY" in refused.stderr and "conditional" in refused.stderr
        assert stack.fhir_search("Endpoint") == [] and stack.fhir_search("ImagingStudy") == []

        accepted = stack.cli("sync", "--json", write_strategy="conditional")
        assert accepted.returncode == 0, accepted.stderr
        assert json.loads(accepted.stdout)["created"] == 6
        assert len(_by_uid(stack)) == 6
        assert all(not s["id"].count("-") == 4 for s in stack.fhir_search("ImagingStudy"))  # server ids
    finally:
        stack.fhir.client_ids("ALPHANUMERIC")
