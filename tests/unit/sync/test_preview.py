"""The dry run takes the run's own pipeline: same studies parked for the same reasons, same resources."""

from __future__ import annotations

from typing import Any

import pytest

from bridge.sync.policy import PatientPolicy
from bridge.sync.preview import Preview
from tests.builders import PATIENT_SYSTEM, element, series_row, study_row, uid
from tests.unit.sync.world import World, parked

pytestmark = pytest.mark.anyio


def _archive_with_trouble(world: World) -> None:
    """Good studies beside one of each way a study is parked before it is written (all on one page)."""
    world.source.page_size = 10
    world.add(1)
    world.add(2, series_count=-2)  # maps, but is not valid FHIR
    world.add(3, series=[series_row(series_uid="1.2.3.not-a-uid")])  # a bad series UID
    world.add(4, patient_id="MRN-A")
    world.source.add_row(study_row(study_uid=uid(4), patient_id="MRN-B"), at=4)  # same page, other patient
    world.fhir._store(  # the EHR's Patient, whose birth date the study does not share
        {
            "resourceType": "Patient",
            "identifier": [{"system": PATIENT_SYSTEM, "value": "MRN-5"}],
            "birthDate": "1970-01-01",
        },
        "ehr-5",
    )
    world.add(5, patient_id="MRN-5", birth_date="19700102")
    world.add(6)
    world.add(7, series=[series_row(series_uid=uid(7, 1), extra={"00100020": element("LO", "MRN-X")})])


def _by_uid(previews: list[Preview]) -> dict[str, Preview]:
    found = {p.study_uid: p for p in previews}
    assert len(found) == len(previews), "one preview per study"
    return found


@pytest.mark.parametrize("batching", [False, True])
async def test_the_dry_run_parks_the_studies_the_run_parks_for_the_same_reasons(
    world: World, batching: bool
) -> None:
    world.fhir.batches = batching
    _archive_with_trouble(world)

    previews = _by_uid(await world.worker(concurrency=3).preview())

    assert world.fhir.writes() == [] and world.fhir.batch_sizes == []  # nothing written to FHIR
    assert world.store.counts(world.ctx.source_name) == {
        "published": 0,
        "gone": 0,
        "parked": 0,
        "withdrawn": 0,
    }
    would_park = {u: p.reason for u, p in previews.items() if p.action == "park"}
    assert set(would_park) == {uid(2), uid(3), uid(4), uid(5), uid(7)}
    assert {u: p.action for u, p in previews.items() if u not in would_park} == {
        uid(1): "create",
        uid(6): "create",
    }

    report = await world.run()

    assert {p.study_uid: p.reason for p in report.parked} == would_park
    assert {u: p.reason for u, p in parked(world).items()} == would_park
    assert report.counts.created == 2


async def test_the_dry_run_shows_the_very_resources_the_run_then_writes(world: World) -> None:
    for n in range(1, 5):
        world.add(n)
    await world.run()
    # The archive changes: a series added, a description changed, a new study of a known patient.
    world.add(2, series_count=2, series=[series_row(series_uid=uid(2, 1)), series_row(series_uid=uid(2, 2))])
    world.add(3, description="Corrected")
    world.add(5, patient_id="PID1")
    before = {u: world.study(u)["meta"]["versionId"] for u in (uid(1), uid(4))}

    previews = _by_uid(await world.worker(concurrency=3).preview())

    assert {u: p.action for u, p in previews.items()} == {
        uid(1): "unchanged",
        uid(2): "update",
        uid(3): "update",
        uid(4): "unchanged",
        uid(5): "create",
    }
    assert "series[1]" in " ".join(previews[uid(2)].changes)
    assert any("description" in path for path in previews[uid(3)].changes)

    report = await world.run()

    assert (report.counts.updated, report.counts.created, report.counts.unchanged) == (2, 1, 2)
    for study_uid in (uid(2), uid(3), uid(5)):
        assert previews[study_uid].resource == _as_sent(world.study(study_uid))
    assert {u: world.study(u)["meta"]["versionId"] for u in (uid(1), uid(4))} == before


async def test_a_dry_run_of_named_studies_takes_the_one_study_way(world: World) -> None:
    world.policy = PatientPolicy.MATCH_ONLY
    world.add(1)
    world.add(2)
    world.fhir._store(
        {"resourceType": "Patient", "identifier": [{"system": PATIENT_SYSTEM, "value": "PID2"}]}, "ehr-2"
    )

    [no_patient, linked] = await world.worker().preview(study_uids=[uid(1), uid(2)])

    assert (no_patient.study_uid, no_patient.action) == (uid(1), "park")
    assert "match-only" in (no_patient.reason or "")
    assert (linked.study_uid, linked.action) == (uid(2), "create")
    assert linked.resource is not None and linked.resource["subject"] == {"reference": "Patient/ehr-2"}

    report = await world.worker().run_studies([uid(1), uid(2)])

    assert [(p.study_uid, p.reason) for p in report.parked] == [(uid(1), no_patient.reason)]
    assert _as_sent(world.study(uid(2))) == linked.resource


def _as_sent(stored: dict[str, Any]) -> dict[str, Any]:
    """A stored resource as it was sent: without the version the server gave it."""
    meta = {k: v for k, v in stored["meta"].items() if k != "versionId"}
    return {**stored, "meta": meta}
