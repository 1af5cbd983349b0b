"""A study's way to its ImagingStudy: fetch, link, map, then validate the very resource that is written."""

from __future__ import annotations

import pytest

from bridge.sync.policy import OrderPolicy, PatientPolicy
from tests.builders import series_row, uid
from tests.unit.sync.world import World, parked

pytestmark = pytest.mark.anyio


async def test_a_study_that_maps_but_is_not_valid_fhir_is_parked_and_never_written(world: World) -> None:
    # The archive's count is negative: nothing before validation objects, validation does.
    world.policy = PatientPolicy.LOGICAL
    world.add(1, series_count=-2)
    world.add(2)
    report = await world.run()
    [entry] = report.parked
    assert (entry.study_uid, entry.kind) == (uid(1), "mapping")
    assert "numberOfSeries" in entry.reason
    assert [s["identifier"][0]["value"] for s in world.fhir.of_type("ImagingStudy")] == [f"urn:oid:{uid(2)}"]


async def test_a_study_that_would_be_parked_creates_no_patient(world: World) -> None:
    world.add(1, series_count=-2)
    world.add(2, series=[series_row(series_uid="1.2.3.not-a-uid")])
    report = await world.run()
    assert report.counts.parked == 2
    assert world.fhir.of_type("Patient") == []


async def test_the_written_study_carries_the_linked_subject_and_order(world: World) -> None:
    world.order_policy = OrderPolicy.MATCH_OR_LOGICAL
    world.add(1, patient_id="PID-7", accession="ACC-7")
    await world.run()
    [patient] = world.fhir.of_type("Patient")
    written = world.study(uid(1))
    assert written["subject"] == {"reference": f"Patient/{patient['id']}"}
    assert written["basedOn"][0]["identifier"]["value"] == "ACC-7"
    assert parked(world) == {}
