"""Radiation dose reports in a sync (BRIDGE_DOSE=observation): written with the study, idempotent, retired with it."""

from __future__ import annotations

import pytest

from tests.builders import context, series_row, uid
from tests.stack.samples import StudySpec, build_dose_report
from tests.unit.sync.world import World

pytestmark = pytest.mark.anyio


def _ct_with_dose_report(world: World) -> str:
    study, dose_series = uid(1), uid(1, 2)
    world.add(
        1,
        series=[
            series_row(series_uid=uid(1, 1)),
            series_row(series_uid=dose_series, number=900, modality="SR", body_part=None, instance_count=1),
        ],
        series_count=2,
        instance_count=121,
    )
    report = build_dose_report(
        StudySpec(uid=study), "ct", {"dlp_total": "523.4", "ctdivol": "12.75", "dlp": "523.4"}
    )
    world.source.metadata[(study, dose_series)] = [report.to_json_dict()]
    return study


async def test_with_dose_observations_each_dose_report_becomes_one_observation_of_the_study(
    world: World,
) -> None:
    world.ctx = context(dose_observations=True)
    study = _ct_with_dose_report(world)

    await world.run()

    [observation] = world.fhir.of_type("Observation")
    imaging_study = world.study(study)
    assert observation["partOf"] == [{"reference": f"ImagingStudy/{imaging_study['id']}"}]
    assert observation["subject"] == imaging_study["subject"]
    values = {
        c["code"]["coding"][0]["code"]: c.get("valueQuantity", {}).get("value")
        for c in observation["component"]
    }
    assert (values["113813"], values["113830"]) == (523.4, 12.75)


async def test_a_second_run_writes_no_observation_again(world: World) -> None:
    world.ctx = context(dose_observations=True)
    _ct_with_dose_report(world)
    await world.run()
    writes = [c for c in world.fhir.calls if c[0] in ("update", "conditional_update", "batch")]

    again = await world.run()

    assert again.counts.unchanged == 1
    assert [c for c in world.fhir.calls if c[0] in ("update", "conditional_update", "batch")] == writes
    assert len(world.fhir.of_type("Observation")) == 1


async def test_dose_off_by_default_reads_no_report_and_writes_no_observation(world: World) -> None:
    _ct_with_dose_report(world)
    await world.run()
    assert world.fhir.of_type("Observation") == []
    assert world.source.metadata_calls == []


async def test_the_observation_is_retired_with_its_study(world: World) -> None:
    world.ctx = context(dose_observations=True)
    study = _ct_with_dose_report(world)
    await world.run()

    del world.source.studies[study]
    await world.worker().run(kind="reconcile", reconcile=True)

    assert world.study(study)["status"] == "entered-in-error"
    assert world.fhir.of_type("Observation")[0]["status"] == "entered-in-error"
