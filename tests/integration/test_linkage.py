"""Patients, orders and several archives (issue 5) against two real Orthancs and the FHIR server."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence

from bridge.mapping.validate import validate
from tests.integration.conftest import DEFAULT_PATIENT_SYSTEM, ISSUERS, Stack
from tests.stack.orthanc import OrthancServer
from tests.stack.samples import SeriesSpec, StudySpec, build_study, stow

pytestmark = pytest.mark.integration

RIS_SYSTEM = "urn:oid:1.2.826.0.1.3680043.10.2001"
HEADER = {"read_instance_header": "true"}


@pytest.fixture
def second(orthanc_b: OrthancServer) -> Iterator[OrthancServer]:
    orthanc_b.clear()
    yield orthanc_b


def _code(value: str, scheme: str, meaning: str) -> Dataset:
    item = Dataset()
    item.CodeValue, item.CodingSchemeDesignator, item.CodeMeaning = value, scheme, meaning
    return item


def _store_rich(stack: Stack, spec: StudySpec, **extra: Any) -> list[Dataset]:
    """A study whose headers carry the sequences QIDO-RS (in Orthanc) leaves out."""
    datasets = build_study(spec)
    for ds in datasets:
        ds.ProcedureCodeSequence = Sequence([_code("24627-2", "LN", "CT Chest")])
        ds.ReasonForRequestedProcedureCodeSequence = Sequence([_code("233604007", "SCT", "Pneumonia")])
        ds.PerformingPhysicianName = "Tech^Terry"
        for keyword, value in extra.items():
            setattr(ds, keyword, value)
    stow(stack.orthanc.dicomweb_url, datasets)
    return datasets


def _studies(stack: Stack) -> list[dict[str, Any]]:
    return stack.fhir_search("ImagingStudy")


def _one(stack: Stack) -> dict[str, Any]:
    studies = _studies(stack)
    assert len(studies) == 1
    return studies[0]


@pytest.mark.interop
def test_mapping_is_complete_and_valid_on_both_sides(stack: Stack) -> None:
    spec = StudySpec(
        patient_id="L1",
        issuer="HOSP-A",
        accession="R1001",
        referring_physician="Smith^Anna^^Dr",
        series=[
            SeriesSpec("CT", "Thorax", "CHEST", instances=3),
            SeriesSpec("MR", "Knee", "KNEE", "R", instances=2),
        ],
    )
    _store_rich(stack, spec)

    report = stack.sync(include_instances="true", **HEADER)

    assert report.counts.created == 1, report.parked
    study = _one(stack)
    assert study["referrer"] == {"display": "Dr Anna Smith"}
    assert study["procedureCode"][0]["coding"][0] == {
        "system": "http://loinc.org",
        "code": "24627-2",
        "display": "CT Chest",
    }
    assert study["reasonCode"][0]["coding"][0]["system"] == "http://snomed.info/sct"
    ct, mr = study["series"]
    assert ct["performer"] == [{"actor": {"display": "Terry Tech"}}]
    assert [i["number"] for i in ct["instance"]] == [1, 2, 3]
    assert ct["instance"][0]["sopClass"] == {
        "system": "urn:ietf:rfc:3986",
        "code": "urn:oid:1.2.840.10008.5.1.4.1.1.2",
    }
    assert mr["laterality"]["code"] == "24028007"
    assert mr["bodySite"]["display"]
    # Every produced resource: the FHIR server validated it on write; fhir.resources agrees.
    for kind in ("ImagingStudy", "Patient", "Endpoint"):
        for resource in stack.fhir_search(kind):
            validate(resource)


def test_instance_detail_is_left_out_past_the_guard(stack: Stack) -> None:
    stow(
        stack.orthanc.dicomweb_url,
        build_study(StudySpec(patient_id="L2", issuer="HOSP-A", series=[SeriesSpec(instances=3)])),
    )

    stack.sync(include_instances="true", max_instances="2")

    assert "instance" not in _one(stack)["series"][0]
    assert _one(stack)["numberOfInstances"] == 3


def test_patient_issuer_maps_qualifiers_and_other_ids(stack: Stack) -> None:
    qualifier = Dataset()
    qualifier.UniversalEntityID, qualifier.UniversalEntityIDType = "1.2.3.4.5", "ISO"
    other = Dataset()
    other.PatientID, other.IssuerOfPatientID, other.TypeOfPatientID = "B-77", "HOSP-B", "TEXT"
    unmapped = Dataset()
    unmapped.PatientID, unmapped.IssuerOfPatientID, unmapped.TypeOfPatientID = "Z-1", "NOWHERE", "TEXT"
    _store_rich(
        stack,
        StudySpec(patient_id="Q1", issuer=None),
        IssuerOfPatientIDQualifiersSequence=Sequence([qualifier]),
        OtherPatientIDsSequence=Sequence([other, unmapped]),
    )
    stow(stack.orthanc.dicomweb_url, build_study(StudySpec(patient_id="U1", issuer="UNKNOWN-ISSUER")))

    stack.sync(**HEADER)

    by_value = {p["identifier"][0]["value"]: p for p in stack.fhir_search("Patient")}
    assert by_value["Q1"]["identifier"] == [
        {"system": "urn:oid:1.2.3.4.5", "value": "Q1"},  # the ISO qualifier, not in the map
        {"system": ISSUERS["HOSP-B"], "value": "B-77"},  # another id whose issuer is mapped
    ]
    assert "U1" not in by_value  # an issuer without a system parks its study (BRIDGE_UNMAPPED_ISSUER)
    stack.sync(**HEADER, unmapped_issuer="default")  # the single-issuer archive's choice
    by_value = {p["identifier"][0]["value"]: p for p in stack.fhir_search("Patient")}
    assert by_value["U1"]["identifier"] == [{"system": DEFAULT_PATIENT_SYSTEM, "value": "U1"}]

    issuers = {**ISSUERS, "1.2.3.4.5": "urn:oid:1.2.999.9"}
    mapped = stack.settings_env(patient_issuer_systems=json.dumps(issuers))
    stack.fhir.clear()
    stack.state_path.unlink()
    stack.sync(**HEADER, patient_issuer_systems=mapped["BRIDGE_PATIENT_ISSUER_SYSTEMS"])
    systems = {p["identifier"][0]["system"] for p in stack.fhir_search("Patient")}
    assert "urn:oid:1.2.999.9" in systems  # the map wins over the ISO fallback


def test_accession_system_from_the_issuer_sequence(stack: Stack) -> None:
    stow(
        stack.orthanc.dicomweb_url,
        build_study(
            StudySpec(patient_id="A1", issuer="HOSP-A", accession="X-1", accession_issuer="HOSP-A-RIS")
        ),
    )

    stack.sync(**HEADER, accession_issuer_systems=json.dumps({"HOSP-A-RIS": RIS_SYSTEM}))

    accession = [i for i in _one(stack)["identifier"] if i.get("type")][0]
    assert accession["system"] == RIS_SYSTEM and accession["value"] == "X-1"


def _service_request(stack: Stack, accession: str) -> str:
    response = httpx.post(
        f"{stack.fhir.base_url}/ServiceRequest",
        json={
            "resourceType": "ServiceRequest",
            "status": "active",
            "intent": "order",
            "subject": {"display": "order's patient"},
            "identifier": [
                {
                    "type": {
                        "coding": [
                            {"system": "http://terminology.hl7.org/CodeSystem/v2-0203", "code": "ACSN"}
                        ]
                    },
                    "system": RIS_SYSTEM,
                    "value": accession,
                }
            ],
        },
        timeout=30,
    )
    response.raise_for_status()
    return str(response.json()["id"])


@pytest.mark.interop
def test_order_linkage_by_accession(stack: Stack) -> None:
    ordered = StudySpec(patient_id="O1", issuer="HOSP-A", accession="ORD-1")
    unordered = StudySpec(patient_id="O2", issuer="HOSP-A", accession="ORD-2")
    doubled = StudySpec(patient_id="O3", issuer="HOSP-A", accession="ORD-3")
    for spec in (ordered, unordered, doubled):
        stow(stack.orthanc.dicomweb_url, build_study(spec))
    order_id = _service_request(stack, "ORD-1")
    _service_request(stack, "ORD-3")
    _service_request(stack, "ORD-3")
    settings = {"accession_identifier_system": RIS_SYSTEM}

    report = stack.sync(order_policy="match-or-logical", **settings)

    by_accession = {next(i["value"] for i in s["identifier"] if i.get("type")): s for s in _studies(stack)}
    assert by_accession["ORD-1"]["basedOn"] == [{"reference": f"ServiceRequest/{order_id}"}]
    assert by_accession["ORD-2"]["basedOn"] == [
        {
            "type": "ServiceRequest",
            "identifier": {
                "type": {
                    "coding": [{"system": "http://terminology.hl7.org/CodeSystem/v2-0203", "code": "ACSN"}]
                },
                "system": RIS_SYSTEM,
                "value": "ORD-2",
            },
        }
    ]
    assert [(p.study_uid, p.attribute) for p in report.parked] == [(doubled.uid, "AccessionNumber")]

    stack.fhir.clear()
    stack.state_path.unlink()
    stack.sync(order_policy="none", **settings)
    assert all("basedOn" not in s for s in _studies(stack))


def test_two_archives_one_fhir_server_never_merge_the_same_study(stack: Stack, second: OrthancServer) -> None:
    shared = StudySpec(patient_id="S1", issuer="HOSP-A", description="Copy in A")
    stow(stack.orthanc.dicomweb_url, build_study(shared))
    copy = StudySpec(**{**shared.__dict__, "description": "Copy in B"})
    stow(second.dicomweb_url, build_study(copy))
    only_b = StudySpec(patient_id="S2", issuer="HOSP-B")
    stow(second.dicomweb_url, build_study(only_b))
    sources = json.dumps(
        [
            {"name": "archive-a", "dicomweb_url": stack.orthanc.dicomweb_url},
            {
                "name": "archive-b",
                "dicomweb_url": second.dicomweb_url,
                "dicomweb_public_url": second.dicomweb_url + "/",
                "patient_issuer_systems": {"HOSP-A": "urn:oid:1.2.999.7", "HOSP-B": "urn:oid:1.2.999.8"},
            },
        ]
    )

    result = stack.cli("sync", "--json", sources=sources)

    assert result.returncode == 0, result.stderr
    endpoints = {e["identifier"][0]["value"]: e for e in stack.fhir_search("Endpoint")}
    assert set(endpoints) == {"archive-a", "archive-b"}
    copies = [s for s in _studies(stack) if s["identifier"][0]["value"] == f"urn:oid:{shared.uid}"]
    assert sorted(s["description"] for s in copies) == ["Copy in A", "Copy in B"]
    assert {s["endpoint"][0]["reference"] for s in copies} == {
        f"Endpoint/{e['id']}" for e in endpoints.values()
    }
    # Each source's own patient map: B's copy links a Patient under B's system.
    b_copy = next(s for s in copies if s["description"] == "Copy in B")
    assert stack.fhir_read(b_copy["subject"]["reference"])["identifier"][0]["system"] == "urn:oid:1.2.999.7"

    versions = {s["id"]: s["meta"]["versionId"] for s in _studies(stack)}
    again = stack.cli("sync", "--source", "archive-b", "--json", sources=sources)
    assert again.returncode == 0
    assert {s["id"]: s["meta"]["versionId"] for s in _studies(stack)} == versions
    assert stack.cli("sync", "--source", "nope", sources=sources).returncode == 2


@pytest.mark.interop
def test_dry_run_shows_the_changes_and_writes_nothing(stack: Stack) -> None:
    first = StudySpec(patient_id="D1", issuer="HOSP-A", description="Before")
    stow(stack.orthanc.dicomweb_url, build_study(first))
    stack.sync()
    stack.orthanc.delete_study(first.uid)
    stow(stack.orthanc.dicomweb_url, build_study(StudySpec(**{**first.__dict__, "description": "After"})))
    fresh = StudySpec(patient_id="D2", issuer="HOSP-A")
    stow(stack.orthanc.dicomweb_url, build_study(fresh))
    stack.fhir.reset_stats()

    result = stack.cli("sync", "--dry-run", "--json")

    assert result.returncode == 0, result.stderr
    rows = {r["study_uid"]: r for r in json.loads(result.stdout)["studies"]}
    assert rows[first.uid]["action"] == "update" and rows[first.uid]["changes"] == ["~description"]
    assert rows[fresh.uid]["action"] == "create"
    assert stack.fhir.stats()["writes"] == 0
    assert "After" not in result.stdout  # paths only, never values
    assert _one_description(stack, first.uid) == "Before"


def _one_description(stack: Stack, uid: str) -> str:
    return next(s["description"] for s in _studies(stack) if s["identifier"][0]["value"] == f"urn:oid:{uid}")
