"""One study, one patient (bridge/sync/identity.py and the worker's use of it), over the fakes."""

from __future__ import annotations

from typing import Any

import pytest

from bridge.errors import VersionConflictError
from bridge.mapping.context import WITHDRAWN_EXTENSION
from bridge.mapping.records import PatientIdentity
from bridge.metrics import REGISTRY
from bridge.sync import metrics
from bridge.sync.identity import conflicting
from bridge.sync.report import RunReport
from tests.builders import element, series_row, study_row, uid
from tests.unit.sync.world import World, parked

pytestmark = pytest.mark.anyio

A = PatientIdentity("MRN-A")
B = PatientIdentity("MRN-B")


# The rule
def test_two_patient_ids_conflict_and_one_alone_does_not() -> None:
    assert conflicting([A, B])
    assert not conflicting([A, A, None])
    assert not conflicting([])


def test_an_issuer_left_out_is_no_disagreement_but_two_issuers_are() -> None:
    assert not conflicting([PatientIdentity("MRN-A", "HOSP"), PatientIdentity("MRN-A")])
    assert conflicting([PatientIdentity("MRN-A", "HOSP"), PatientIdentity("MRN-A", "CLINIC")])
    assert conflicting([PatientIdentity("MRN-A", "HOSP"), A, PatientIdentity("MRN-A", "CLINIC")])


def test_an_empty_patient_id_is_another_patient_but_a_row_that_says_nothing_is_not() -> None:
    assert conflicting([PatientIdentity(""), A])
    assert not conflicting([None, A])


# The worker
def _row_of(world: World, n: int, patient_id: str) -> dict[str, Any]:
    """Another study row of study ``n``, under ``patient_id``."""
    return study_row(study_uid=uid(n), patient_id=patient_id)


def _assert_parked_for_identity(world: World, study_uid: str) -> None:
    found = parked(world)[study_uid]
    assert found.kind == "identity"
    assert found.attribute == "PatientID"
    assert found.reason.startswith("conflicting patient identity")
    assert "MRN" not in found.reason  # attribute names, never values


async def _run_and_read_withdrawn_metric(world: World) -> tuple[RunReport, float | None]:
    """One run, and the withdrawn-studies gauge it leaves (set to -1 first: a run that skips it shows)."""
    metrics.WITHDRAWN.set(-1)
    report = await world.run()
    return report, REGISTRY.get_sample_value("bridge_sync_withdrawn_studies")


def _labels(resource: dict[str, Any]) -> list[str]:
    return [e["valueCode"] for e in resource.get("extension", []) if e["url"] == WITHDRAWN_EXTENSION]


async def test_one_uid_listed_twice_on_a_page_under_two_patients_is_parked_and_never_published(
    world: World,
) -> None:
    study_uid = world.add(1, patient_id="MRN-A")
    world.add(2)
    world.source.add_row(_row_of(world, 1, "MRN-B"), at=1)  # the same page (two rows a page)
    report = await world.run()
    _assert_parked_for_identity(world, study_uid)
    assert report.counts.parked == 1
    assert report.counts.created == 1  # study 2 goes on
    assert world.fhir.of_type("ImagingStudy") == [world.study(uid(2))]
    assert not any(p["identifier"][0]["value"] == "MRN-B" for p in world.fhir.of_type("Patient"))


async def test_series_rows_naming_another_patient_park_a_new_study(world: World) -> None:
    own = {"00100020": element("LO", "MRN-A")}
    other = {"00100020": element("LO", "MRN-B")}
    study_uid = world.add(
        1,
        patient_id="MRN-A",
        series_count=2,
        series=[series_row(series_uid=uid(1, 1), extra=own), series_row(series_uid=uid(1, 2), extra=other)],
    )
    await world.run()
    _assert_parked_for_identity(world, study_uid)
    assert world.fhir.of_type("ImagingStudy") == []


async def test_a_row_on_the_next_page_under_another_patient_withdraws_the_study_just_published(
    world: World,
) -> None:
    world.add(1)
    study_uid = world.add(2, patient_id="MRN-A")
    world.add(3)
    world.source.add_row(_row_of(world, 2, "MRN-B"), at=2)  # first on page two, study 2 last on page one
    await world.run()
    _assert_parked_for_identity(world, study_uid)
    resource = world.study(study_uid)
    assert _labels(resource) == ["conflicting-patient-identity"]
    [patient_a] = [p for p in world.fhir.of_type("Patient") if p["identifier"][0]["value"] == "MRN-A"]
    assert resource["subject"] == {"reference": f"Patient/{patient_a['id']}"}  # never moved
    assert world.store.counts(world.ctx.source_name)["withdrawn"] == 1


async def test_a_row_pages_away_under_another_patient_withdraws_the_study(world: World) -> None:
    study_uid = world.add(1, patient_id="MRN-A")
    for n in range(2, 7):
        world.add(n)
    world.source.add_row(_row_of(world, 1, "MRN-B"), at=5)  # page three
    await world.run()
    _assert_parked_for_identity(world, study_uid)
    assert _labels(world.study(study_uid)) == ["conflicting-patient-identity"]


async def test_a_newcomer_withdraws_a_published_study_until_the_archive_is_corrected(world: World) -> None:
    study_uid = world.add(1, patient_id="MRN-A")
    _, gauge = await _run_and_read_withdrawn_metric(world)
    assert gauge == 0
    published = world.study(study_uid)

    world.source.add_row(_row_of(world, 1, "MRN-B"), at=1)
    report, gauge = await _run_and_read_withdrawn_metric(world)
    assert report.status == "parked"
    assert gauge == 1  # operators see the withdrawal in the metrics, not only in bridge status
    _assert_parked_for_identity(world, study_uid)
    withdrawn = world.study(study_uid)
    assert withdrawn["subject"] == published["subject"]
    assert withdrawn["series"] == published["series"]
    assert _labels(withdrawn) == ["conflicting-patient-identity"]
    assert world.store.withdrawn(world.ctx.source_name) == [
        (world.ctx.source_name, study_uid, "conflicting patient identity")
    ]

    again, gauge = await _run_and_read_withdrawn_metric(world)  # still in conflict: parked, not written
    assert again.counts.parked == 1
    assert again.counts.fhir_writes == 0
    assert gauge == 1

    world.source.extra_rows.clear()  # the integrator deleted the newcomer's instances
    fixed, gauge = await _run_and_read_withdrawn_metric(world)
    assert (fixed.status, fixed.counts.updated) == ("ok", 1)
    assert gauge == 0
    republished = world.study(study_uid)
    assert _labels(republished) == []
    assert republished["subject"] == published["subject"]
    assert world.store.counts(world.ctx.source_name)["withdrawn"] == 0
    assert study_uid not in parked(world)


async def test_a_study_whose_rows_all_move_is_relinked_and_the_run_says_so(world: World) -> None:
    study_uid = world.add(1, patient_id="MRN-A")
    await world.run()
    world.add(1, patient_id="MRN-B")  # the archive corrected the PatientID of every instance
    report = await world.run()
    assert (report.status, report.counts.updated) == ("ok", 1)
    [patient_b] = [p for p in world.fhir.of_type("Patient") if p["identifier"][0]["value"] == "MRN-B"]
    assert world.study(study_uid)["subject"] == {"reference": f"Patient/{patient_b['id']}"}
    assert [r["study_uid"] for r in report.relinked] == [study_uid]
    [run] = world.store.runs(1)
    assert [r["study_uid"] for r in run.relinked or []] == [study_uid]


async def test_a_withdrawal_written_meanwhile_by_another_replica_is_tried_once_more(world: World) -> None:
    study_uid = world.add(1, patient_id="MRN-A")
    await world.run()
    world.source.add_row(_row_of(world, 1, "MRN-B"), at=1)
    world.fhir.fail["update"] = [VersionConflictError("412", service="fhir", status=412)]
    report = await world.run()
    assert report.status == "parked"
    assert _labels(world.study(study_uid)) == ["conflicting-patient-identity"]
    assert world.store.counts(world.ctx.source_name)["withdrawn"] == 1


async def test_an_instance_header_naming_another_patient_parks_the_study(world: World) -> None:
    study_uid = world.add(1, patient_id="MRN-A")
    clean = world.add(2, patient_id="MRN-C")
    world.source.headers[study_uid] = {"00100020": element("LO", "MRN-B")}
    world.source.headers[clean] = {"00100020": element("LO", "MRN-C"), "00100021": element("LO", "HOSP-A")}
    report = await world.worker(concurrency=3, read_instance_header=True).run()
    _assert_parked_for_identity(world, study_uid)
    assert report.counts.created == 1  # an issuer the study row leaves out is no disagreement
    assert world.fhir.of_type("ImagingStudy") == [world.study(clean)]
