"""Radiation dose SRs to Observations (HL7 Radiation Dose Summary): values equal to the report's."""

from __future__ import annotations

from typing import Any

from bridge.mapping.dose import dose_observation_id, dose_values, is_dose_report, map_dose_observation
from bridge.mapping.validate import validate
from tests.builders import context
from tests.stack.samples import StudySpec, build_dose_report

DCM = "http://dicom.nema.org/resources/ontology/DCM"
UCUM = "http://unitsofmeasure.org"
STUDY = {"resourceType": "ImagingStudy", "id": "study-1", "started": "2024-01-02T10:15:00+01:00"}
SUBJECT = {"reference": "Patient/p1"}


def report(kind: str, **values: str) -> dict[str, Any]:
    spec = StudySpec(uid="1.2.826.0.1.3680043.8.498.1", patient_name="Doe^Jane")
    return build_dose_report(spec, kind, values).to_json_dict()


def components(observation: dict[str, Any]) -> dict[str, Any]:
    return {
        c["code"]["coding"][0]["code"]: c.get("valueQuantity") or c.get("valueCodeableConcept")
        for c in observation["component"]
    }


def test_a_ct_dose_report_gives_dlp_total_and_ctdivol_with_ucum_units() -> None:
    observation = map_dose_observation(
        report("ct", dlp_total="523.4", ctdivol="12.75", dlp="523.4"), context(), subject=SUBJECT, study=STUDY
    )
    assert observation is not None
    validate(observation)
    found = components(observation)
    assert found["113813"] == {"value": 523.4, "unit": "mGy.cm", "system": UCUM, "code": "mGy.cm"}
    assert found["113830"] == {"value": 12.75, "unit": "mGy", "system": UCUM, "code": "mGy"}
    assert found["121058"]["coding"][0] == {
        "system": "http://snomed.info/sct",
        "code": "77477000",
        "display": "Computed Tomography X-Ray",
    }
    assert "113838" not in found, "the per-event DLP is not a summary value"


def test_a_projection_xray_report_gives_dap_total_and_dose_at_the_reference_point() -> None:
    observation = map_dose_observation(
        report("xray", dap_total="0.00012", rp_total="0.0031"), context(), subject=SUBJECT, study=STUDY
    )
    assert observation is not None
    validate(observation)
    found = components(observation)
    assert found["113722"] == {"value": 0.00012, "unit": "Gy.m2", "system": UCUM, "code": "Gy.m2"}
    assert found["113725"] == {"value": 0.0031, "unit": "Gy", "system": UCUM, "code": "Gy"}
    assert found["121058"]["coding"][0]["code"] == "113704"


def test_the_observation_is_part_of_the_study_keyed_by_the_report_and_about_its_patient() -> None:
    data = report("ct", dlp_total="100", ctdivol="5", dlp="100")
    observation = map_dose_observation(data, context(), subject=SUBJECT, study=STUDY)
    assert observation is not None
    sop_uid = data["00080018"]["Value"][0]
    assert observation["id"] == dose_observation_id(context(), sop_uid)
    assert observation["identifier"] == [{"system": "urn:dicom:uid", "value": f"urn:oid:{sop_uid}"}]
    assert observation["partOf"] == [{"reference": "ImagingStudy/study-1"}]
    assert observation["subject"] == SUBJECT
    assert observation["status"] == "final"
    # The canonical of HL7's Radiation Dose Summary IG's profile, as published (1.0.0 and the ballot).
    assert observation["meta"]["profile"] == [
        "http://hl7.org/fhir/uv/radiation-dose-summary/StructureDefinition/radiation-dose-summary"
    ]
    assert observation["effectiveDateTime"] == STUDY["started"]
    assert observation["code"]["coding"][0]["code"] == "73569-6"
    assert {"system": DCM, "code": "113701", "display": "X-Ray Radiation Dose Report"} in observation["code"][
        "coding"
    ]
    assert "CT Dose Length Product Total: 100 mGy.cm" in observation["text"]["div"]
    assert "Doe" not in observation["text"]["div"]


def test_the_highest_mean_ctdivol_of_several_events_is_the_summary() -> None:
    data = report("ct", dlp_total="300", ctdivol="8.5", dlp="150")
    acquisition = data["0040A730"]["Value"][2]
    acquisition["0040A730"]["Value"].append(
        {
            **acquisition["0040A730"]["Value"][0],
            "0040A730": {
                "vr": "SQ",
                "Value": [
                    {
                        **acquisition["0040A730"]["Value"][0]["0040A730"]["Value"][0],
                        "0040A300": {
                            "vr": "SQ",
                            "Value": [
                                {
                                    **acquisition["0040A730"]["Value"][0]["0040A730"]["Value"][0]["0040A300"][
                                        "Value"
                                    ][0],
                                    "0040A30A": {"vr": "DS", "Value": [11.25]},
                                }
                            ],
                        },
                    }
                ],
            },
        }
    )
    assert dose_values(data)["113830"] == (11.25, "mGy")


def test_other_reports_and_reports_without_values_give_no_observation() -> None:
    data = report("xray", dap_total="1", rp_total="1")
    assert is_dose_report(data)
    assert not is_dose_report({**data, "00080016": {"vr": "UI", "Value": ["1.2.840.10008.5.1.4.1.1.88.22"]}})
    data["0040A730"]["Value"] = data["0040A730"]["Value"][:1]  # the procedure only
    assert map_dose_observation(data, context(), subject=SUBJECT, study=STUDY) is None
