"""Rejection notes (IHE IOCM) in a sync: withdrawn images leave the published study, before or after."""

from __future__ import annotations

import pytest

from bridge.mapping.context import WITHDRAWN_INSTANCE_EXTENSION
from bridge.mapping.records import InstanceRecord
from bridge.mapping.validate import validate
from bridge.resolve.published import withdrawn_instances
from tests.builders import rejection_note_json, series_row, uid
from tests.unit.sync.world import World

pytestmark = pytest.mark.anyio

KOS = "1.2.840.10008.5.1.4.1.1.88.59"


def _ct_study(world: World, images: int = 3) -> tuple[str, str]:
    study, ct = uid(1), uid(1, 1)
    world.add(
        1, series=[series_row(series_uid=ct, instance_count=images)], series_count=1, instance_count=images
    )
    world.source.instances[study] = [
        InstanceRecord(f"{ct}.{i}", ct, "1.2.840.10008.5.1.4.1.1.2", i) for i in range(1, images + 1)
    ]
    return study, ct


def _reject(world: World, study: str, ct: str, sops: list[str]) -> None:
    """Store a rejection note in its own KO series, as a modality or PACS workstation would."""
    ko, note = uid(1, 9), uid(1, 9, 1)
    rows = world.source.series[study]
    rows.append(series_row(series_uid=ko, number=99, modality="KO", instance_count=1, body_part=None))
    world.source.studies[study] = {
        **world.source.studies[study],
        "00201206": {"vr": "IS", "Value": [len(rows)]},
        "00201208": {"vr": "IS", "Value": [len(world.source.instances[study]) + 1]},
    }
    world.source.instances[study].append(InstanceRecord(note, ko, KOS, 1))
    world.source.metadata[(study, ko)] = [rejection_note_json(study, ko, note, {ct: sops})]


async def test_a_study_with_a_rejection_note_is_published_without_the_withdrawn_images(world: World) -> None:
    study, ct = _ct_study(world)
    _reject(world, study, ct, [f"{ct}.2"])

    await world.run()

    published = world.study(study)
    assert [(s["uid"], s["numberOfInstances"]) for s in published["series"]] == [(ct, 2)]
    assert (published["numberOfSeries"], published["numberOfInstances"]) == (1, 2)
    assert [c["code"] for c in published["modality"]] == ["CT"]


async def test_a_rejection_arriving_after_publication_updates_the_study(world: World) -> None:
    study, ct = _ct_study(world)
    await world.run()
    assert world.study(study)["numberOfInstances"] == 3

    _reject(world, study, ct, [f"{ct}.1", f"{ct}.3"])
    report = await world.run()

    assert report.counts.updated == 1
    assert world.study(study)["numberOfInstances"] == 1
    assert world.study(study)["series"][0]["numberOfInstances"] == 1


async def test_a_study_whose_every_image_is_rejected_is_retired_per_the_delete_policy(world: World) -> None:
    study, ct = _ct_study(world, images=2)
    await world.run()

    _reject(world, study, ct, [f"{ct}.1", f"{ct}.2"])
    report = await world.run()

    assert report.deletions == [{"study_uid": study, "action": "marked"}]
    assert world.study(study)["status"] == "entered-in-error"

    again = await world.run()
    assert again.deletions == [], "retired once, not again on every run"
    assert world.study(study)["status"] == "entered-in-error"


async def test_a_study_rejected_whole_before_publication_is_never_published(world: World) -> None:
    study, ct = _ct_study(world, images=1)
    _reject(world, study, ct, [f"{ct}.1"])

    report = await world.run()

    assert world.fhir.of_type("ImagingStudy") == []
    assert world.fhir.of_type("Patient") == [], "no Patient is created for a study with nothing to show"
    assert report.counts.parked == 0


async def test_studies_without_key_object_series_cost_no_metadata_read(world: World) -> None:
    _ct_study(world)
    await world.run()
    assert world.source.metadata_calls == []


async def test_the_published_study_names_each_withdrawn_instance_and_the_gateway_reads_them(
    world: World,
) -> None:
    study, ct = _ct_study(world)
    _reject(world, study, ct, [f"{ct}.2"])

    await world.run()

    published = world.study(study)
    named = [e["valueId"] for e in published["extension"] if e["url"] == WITHDRAWN_INSTANCE_EXTENSION]
    assert named == sorted([f"{ct}.2", uid(1, 9, 1)]), "the rejected image and the note itself"
    assert withdrawn_instances(published) == {f"{ct}.2", uid(1, 9, 1)}
    validate(published)


async def test_a_study_without_rejections_names_no_withdrawn_instance(world: World) -> None:
    study, _ = _ct_study(world)
    await world.run()
    assert "extension" not in world.study(study)
