"""What a clinician finds with the images, end to end on Orthanc and both FHIR engines.

The study's modality list (acquisition modalities only), the generated narrative of every
resource the bridge writes, and rejected images (IHE IOCM rejection notes) left out.
"""

from __future__ import annotations

import asyncio
import xml.etree.ElementTree as ET
from typing import Any

import httpx
import pytest
from pydicom.uid import generate_uid

from bridge.api.app import create_app
from bridge.mapping.dose import RADIATION_DOSE_SUMMARY
from tests.integration.conftest import Stack
from tests.stack.samples import (
    SeriesSpec,
    StudySpec,
    build_dose_report,
    build_rejection_note,
    build_study,
    stow,
)

pytestmark = pytest.mark.integration

XHTML = "{http://www.w3.org/1999/xhtml}"
UCUM = "http://unitsofmeasure.org"


def _shown(resource: dict[str, Any]) -> str:
    """The narrative's text, after checking it is generated, well-formed XHTML without attributes."""
    assert resource["text"]["status"] == "generated"
    root = ET.fromstring(resource["text"]["div"])
    assert root.tag == f"{XHTML}div"
    assert all(e.attrib == {} for e in root.iter())
    return " ".join(t.strip() for t in root.itertext() if t.strip())


def _ct_with_report_and_segmentation(stack: Stack) -> StudySpec:
    spec = StudySpec(
        patient_id="MOD1",
        patient_name="Nakamura^Emi",
        issuer="HOSP-A",
        uid=generate_uid(),
        description="CT Thorax <native> & contrast",
        study_date="20240305",
        study_time="081500",
        tz_offset="+0100",
        series=[
            SeriesSpec("CT", "Thorax 1.0", "CHEST", instances=3),
            SeriesSpec("SR", "Radiologist report", instances=1),
            SeriesSpec("SEG", "Nodule segmentation", instances=1),
        ],
    )
    stow(stack.orthanc.dicomweb_url, build_study(spec))
    return spec


@pytest.mark.interop
def test_the_study_lists_acquisition_modalities_and_each_series_keeps_its_own(stack: Stack) -> None:
    spec = _ct_with_report_and_segmentation(stack)

    stack.sync()

    [study] = stack.fhir_search("ImagingStudy")
    assert [c["code"] for c in study["modality"]] == ["CT"], "SR and SEG are no acquisition modalities"
    assert [s["modality"]["code"] for s in study["series"]] == ["CT", "SR", "SEG"]
    assert [s["uid"] for s in study["series"]] == [s.uid for s in spec.series]


@pytest.mark.interop
def test_every_written_resource_has_a_narrative_that_stays_put_across_runs(stack: Stack) -> None:
    _ct_with_report_and_segmentation(stack)
    stack.sync()
    [study] = stack.fhir_search("ImagingStudy")
    [endpoint] = stack.fhir_search("Endpoint")
    [patient] = stack.fhir_search("Patient")

    shown = _shown(study)
    assert "2024-03-05 08:15 +01:00" in shown
    assert "CT Thorax <native> & contrast" in shown, "the description, escaped and read back intact"
    assert "Modalities: CT" in shown
    assert "3 series, 5 instances" in shown
    assert "Nakamura" not in study["text"]["div"] and "Emi" not in study["text"]["div"]
    assert stack.orthanc.dicomweb_url in _shown(endpoint)
    assert "Emi Nakamura" in _shown(patient), "the Patient's own narrative shows its FHIR name"

    stack.fhir.reset_stats()
    again = stack.sync()

    assert (again.counts.unchanged, again.counts.fhir_writes) == (1, 0)
    assert stack.fhir.stats()["writes"] == 0
    assert stack.fhir_search("ImagingStudy")[0]["text"] == study["text"]


def _two_ct_series(stack: Stack) -> tuple[StudySpec, list[Any]]:
    spec = StudySpec(
        patient_id="REJ1",
        issuer="HOSP-A",
        uid=generate_uid(),
        series=[
            SeriesSpec("CT", "Thorax", "CHEST", instances=3),
            SeriesSpec("CT", "Scout", "CHEST", instances=1),
        ],
    )
    images = build_study(spec)
    stow(stack.orthanc.dicomweb_url, images)
    return spec, images


@pytest.mark.interop
def test_images_rejected_before_publication_never_show(stack: Stack) -> None:
    spec, images = _two_ct_series(stack)
    thorax, scout = spec.series[0].uid, spec.series[1].uid
    rejected = [images[1], images[3]]  # the second thorax image and the only scout image
    assert [ds.SeriesInstanceUID for ds in rejected] == [thorax, scout]
    stow(stack.orthanc.dicomweb_url, [build_rejection_note(spec, rejected)])

    stack.sync()

    [study] = stack.fhir_search("ImagingStudy")
    assert [(s["uid"], s["numberOfInstances"]) for s in study["series"]] == [(thorax, 2)]
    assert (study["numberOfSeries"], study["numberOfInstances"]) == (1, 2)
    assert "KO" not in {s["modality"]["code"] for s in study["series"]}, "the note is not shown"
    assert "1 series, 2 instances" in _shown(study)


@pytest.mark.interop
def test_rejections_after_publication_update_the_study_and_retire_it_when_nothing_is_left(
    stack: Stack,
) -> None:
    spec, images = _two_ct_series(stack)
    stack.sync()
    assert stack.fhir_search("ImagingStudy")[0]["numberOfInstances"] == 4

    stow(
        stack.orthanc.dicomweb_url,
        [build_rejection_note(spec, images[:1], reason=("113037", "Rejected for Patient Safety Reasons"))],
    )
    stack.sync()
    [study] = stack.fhir_search("ImagingStudy")
    assert study["status"] == "available"
    assert [s["numberOfInstances"] for s in study["series"]] == [2, 1]
    assert study["numberOfInstances"] == 3

    stow(stack.orthanc.dicomweb_url, [build_rejection_note(spec, images[1:], series_number=998)])
    report = stack.sync()
    assert report.deletions == [{"study_uid": spec.uid, "action": "marked"}]
    [study] = stack.fhir_search("ImagingStudy")
    assert study["status"] == "entered-in-error"


def _components(observation: dict[str, Any]) -> dict[str, Any]:
    return {c["code"]["coding"][0]["code"]: c.get("valueQuantity") for c in observation["component"]}


@pytest.mark.interop
def test_ct_and_projection_xray_dose_reports_become_observations_with_the_reports_values(
    stack: Stack,
) -> None:
    ct = StudySpec(
        patient_id="DOSE1", issuer="HOSP-A", uid=generate_uid(), series=[SeriesSpec("CT", instances=1)]
    )
    xray = StudySpec(
        patient_id="DOSE1", issuer="HOSP-A", uid=generate_uid(), series=[SeriesSpec("DX", instances=1)]
    )
    ct_report = build_dose_report(ct, "ct", {"dlp_total": "523.4", "ctdivol": "12.75", "dlp": "523.4"})
    xray_report = build_dose_report(xray, "xray", {"dap_total": "0.00012", "rp_total": "0.0031"})
    stow(stack.orthanc.dicomweb_url, [*build_study(ct), ct_report, *build_study(xray), xray_report])

    stack.fhir.reset_stats()
    first = stack.sync(dose="observation")

    # Each Observation in the same batch as its study: no request of its own. Three write
    # requests: the Endpoint's PUT, the batch with the one new Patient's PUT, then one batch of
    # both studies each followed by its Observation (six resources written in all).
    stats = stack.fhir.stats()
    assert (stats["by_method"].get("PUT", 0), stats["writes"]) == (1, 6), stats
    assert stats["by_interaction"].get("batch") == 3, stats["by_interaction"]  # Patient look-up, Patient, studies
    assert (first.counts.created, first.fhir_write_requests) == (2, 3)

    studies = {
        s["identifier"][0]["value"].removeprefix("urn:oid:"): s for s in stack.fhir_search("ImagingStudy")
    }
    observations = {
        o["identifier"][0]["value"].removeprefix("urn:oid:"): o for o in stack.fhir_search("Observation")
    }
    assert set(observations) == {ct_report.SOPInstanceUID, xray_report.SOPInstanceUID}
    ct_dose, xray_dose = observations[ct_report.SOPInstanceUID], observations[xray_report.SOPInstanceUID]
    assert ct_dose["partOf"] == [{"reference": f"ImagingStudy/{studies[ct.uid]['id']}"}]
    assert ct_dose["meta"]["profile"] == xray_dose["meta"]["profile"] == [RADIATION_DOSE_SUMMARY]
    assert xray_dose["partOf"] == [{"reference": f"ImagingStudy/{studies[xray.uid]['id']}"}]
    assert ct_dose["subject"] == studies[ct.uid]["subject"]
    assert _components(ct_dose)["113813"] == {
        "value": 523.4,
        "unit": "mGy.cm",
        "system": UCUM,
        "code": "mGy.cm",
    }
    assert _components(ct_dose)["113830"]["value"] == 12.75
    assert _components(xray_dose)["113722"] == {
        "value": 0.00012,
        "unit": "Gy.m2",
        "system": UCUM,
        "code": "Gy.m2",
    }
    assert _components(xray_dose)["113725"]["value"] == 0.0031

    stack.fhir.reset_stats()
    again = stack.sync(dose="observation")
    assert (again.counts.unchanged, stack.fhir.stats()["writes"]) == (2, 0)


@pytest.mark.interop
def test_the_gateway_does_not_serve_the_series_rejections_left_out(stack: Stack) -> None:
    spec, images = _two_ct_series(stack)
    thorax, scout = spec.series[0].uid, spec.series[1].uid
    note = build_rejection_note(spec, [images[3]])  # the only scout image
    stow(stack.orthanc.dicomweb_url, [note])
    stack.sync()
    settings = stack.settings(api_keys="gateway-key-1")

    async def ask(series_uid: str) -> int:
        app = create_app(settings)
        async with app.router.lifespan_context(app):
            transport = httpx.ASGITransport(app=app)
            async with httpx.AsyncClient(
                transport=transport, base_url="http://bridge.test", timeout=30
            ) as api:
                answer = await api.get(
                    f"/dicom-web/studies/{spec.uid}/series/{series_uid}/metadata",
                    headers={"X-API-Key": "gateway-key-1"},
                )
                return answer.status_code

    assert asyncio.run(ask(thorax)) == 200
    assert asyncio.run(ask(scout)) == 404, "every image of the series was rejected"
    assert asyncio.run(ask(str(note.SeriesInstanceUID))) == 404, "the rejection note is not shown"
