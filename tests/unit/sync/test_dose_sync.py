"""Dose reports in a sync (BRIDGE_DOSE=observation): written with the study, idempotent, retired with it."""

from __future__ import annotations

import pytest

from bridge.mapping.dose import dose_observation_id
from bridge.mapping.records import InstanceRecord
from tests.builders import context, rejection_note_json, series_row, uid
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


async def test_a_dose_report_withdrawn_by_a_rejection_note_gives_no_observation(world: World) -> None:
    world.ctx = context(dose_observations=True)
    study = _ct_with_dose_report(world)
    dose_series, ko = uid(1, 2), uid(1, 9)
    [report] = world.source.metadata[(study, dose_series)]
    report_uid = report["00080018"]["Value"][0]
    other = {**report, "00080018": {"vr": "UI", "Value": [uid(1, 2, 2)]}}  # a second report stays
    world.source.metadata[(study, dose_series)].append(other)
    world.source.series[study].append(
        series_row(series_uid=ko, number=99, modality="KO", instance_count=1, body_part=None)
    )
    world.source.instances[study] = [
        InstanceRecord(f"{uid(1, 1)}.1", uid(1, 1), "1.2.840.10008.5.1.4.1.1.2", 1),
        InstanceRecord(report_uid, dose_series, "1.2.840.10008.5.1.4.1.1.88.67", 1),
        InstanceRecord(uid(1, 2, 2), dose_series, "1.2.840.10008.5.1.4.1.1.88.67", 2),
        InstanceRecord(uid(1, 9, 1), ko, "1.2.840.10008.5.1.4.1.1.88.59", 1),
    ]
    world.source.metadata[(study, ko)] = [
        rejection_note_json(study, ko, uid(1, 9, 1), {dose_series: [report_uid]})
    ]

    await world.run()

    assert [o["identifier"][0]["value"] for o in world.fhir.of_type("Observation")] == [
        f"urn:oid:{uid(1, 2, 2)}"
    ]


def _dose_study(world: World, n: int) -> tuple[str, str]:
    """Study ``n`` with a CT series and a CT dose report of its own: (study UID, report's SOP UID)."""
    study, dose_series = uid(n), uid(n, 2)
    world.add(
        n,
        series=[
            series_row(series_uid=uid(n, 1)),
            series_row(series_uid=dose_series, number=900, modality="SR", body_part=None, instance_count=1),
        ],
    )
    report = build_dose_report(
        StudySpec(uid=study), "ct", {"dlp_total": f"{500 + n}.5", "ctdivol": "12.75", "dlp": f"{500 + n}.5"}
    )
    world.source.metadata[(study, dose_series)] = [report.to_json_dict()]
    return study, str(report.SOPInstanceUID)


def _outside_batches(world: World, since: int = 0) -> list[tuple[str, str]]:
    """The FHIR writes made as requests of their own (batch entries left out)."""
    made, inside = [], 0
    for method, kind, detail in world.fhir.calls[since:]:
        if inside:
            inside -= 1
            continue
        made.append((method, kind))
        if method == "batch":
            inside = detail
    return [(m, k) for m, k in made if m in ("update", "conditional_update", "batch")]


@pytest.fixture
def batching(world: World) -> World:
    world.ctx = context(dose_observations=True)
    world.source.page_size = 100
    world.source.list_matching = True
    world.fhir.batches = True
    return world


async def test_dose_observations_go_in_the_same_batch_as_their_studies(batching: World) -> None:
    studies = [_dose_study(batching, n)[0] for n in (1, 2, 3)]

    report = await batching.run()

    assert report.counts.created == 3
    # The Endpoint, the Patients' two batches (look-ups, then creates), then one batch: each
    # study followed by its Observation, and no Observation written on its own.
    assert _outside_batches(batching) == [("update", "Endpoint"), ("batch", ""), ("batch", ""), ("batch", "")]
    assert batching.fhir.batch_sizes[-1] == 6
    observations = batching.fhir.of_type("Observation")
    assert sorted(o["partOf"][0]["reference"] for o in observations) == sorted(
        f"ImagingStudy/{batching.study(s)['id']}" for s in studies
    )
    calls = len(batching.fhir.calls)
    again = await batching.run()
    assert again.counts.unchanged == 3 and _outside_batches(batching, calls) == []


async def test_an_observation_its_batch_refused_is_written_alone_right_after_its_study(
    batching: World,
) -> None:
    _, report_uid = _dose_study(batching, 1)
    _dose_study(batching, 2)
    refused = dose_observation_id(batching.ctx, report_uid)
    batching.fhir.reject.add(refused)

    report = await batching.run()

    # The fake refuses that id in batches only: then written alone, and the study is published.
    assert report.counts.created == 2 and not report.parked
    assert batching.fhir.batch_sizes[-1] == 4, "both studies and both Observations were in the batch"
    assert batching.fhir.calls[-1] == ("update", "Observation", {"id": refused, "if_match": None})
    assert refused in {o["id"] for o in batching.fhir.of_type("Observation")}


async def test_without_batch_each_observation_is_written_right_after_its_study(world: World) -> None:
    world.ctx = context(dose_observations=True)
    _dose_study(world, 1)

    await world.run()

    assert [kind for _, kind in _outside_batches(world)][-2:] == ["ImagingStudy", "Observation"]


async def test_one_study_with_its_dose_report_is_one_batch(batching: World) -> None:
    batching.add(1)
    await batching.run()  # the Endpoint exists from now on
    calls = len(batching.fhir.calls)
    _dose_study(batching, 2)

    report = await batching.run()

    assert report.counts.created == 1
    assert _outside_batches(batching, calls)[-1] == ("batch", "")
    assert batching.fhir.batch_sizes[-1] == 2, "the study and its Observation"
    assert ("update", "Observation") not in _outside_batches(batching, calls)
