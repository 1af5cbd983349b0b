"""The linker links only what matches exactly, whatever the FHIR server's token search says."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from bridge.state.store import SqlStore
from bridge.sync.policy import OrderPolicy, PatientPolicy, WriteStrategy
from tests.builders import PATIENT_SYSTEM, uid
from tests.unit.sync.world import World

pytestmark = pytest.mark.anyio

# PatientIDs that a careless token search (case folded, escapes dropped, trimmed, zeros
# stripped) takes for "PID|7,A" or "ab-1": each belongs to another person.
LOOK_ALIKES = [("ab-1", "AB-1"), ("ab-1", "Ab-1"), ("0042", "42"), ("PID|7,A", "PID7A"), ("A\\B", "AB")]


@pytest.fixture
def world(tmp_path: Path) -> Iterator[World]:
    store = SqlStore(f"sqlite:///{tmp_path / 'state.db'}")
    made = World(store)
    made.fhir.loose_tokens = True
    yield made
    store.close()


def other_patient(world: World, patient_id: str) -> str:
    """A Patient of another person, already in the EHR."""
    resource = {"resourceType": "Patient", "identifier": [{"system": PATIENT_SYSTEM, "value": patient_id}]}
    return world.fhir._store(resource, f"other-{len(world.fhir.resources)}").id


def subject_identifier(world: World, study_uid: str) -> dict[str, Any] | None:
    """The identifier of the Patient the published study points at (None when not published)."""
    try:
        study = world.study(study_uid)
    except KeyError:
        return None
    patient_id = study["subject"]["reference"].removeprefix("Patient/")
    patient = world.fhir.resources[("Patient", patient_id)]
    [identifier] = patient["identifier"]
    return identifier


@pytest.mark.parametrize("policy", [PatientPolicy.MATCH_OR_CREATE, PatientPolicy.MATCH_ONLY])
@pytest.mark.parametrize(("own", "other"), LOOK_ALIKES)
async def test_a_look_alike_patient_is_never_the_subject(
    world: World, policy: PatientPolicy, own: str, other: str
) -> None:
    world.policy = policy
    other_patient(world, other)
    study_uid = world.add(1, patient_id=own)
    report = await world.run()
    linked = subject_identifier(world, study_uid)
    assert linked is None or linked == {"system": PATIENT_SYSTEM, "value": own}
    if linked is None:  # parked, saying why, without the PatientID
        [parked] = report.parked
        assert parked.attribute == "PatientID" and own not in parked.reason and other not in parked.reason


async def test_the_exact_patient_is_found_among_look_alikes(world: World) -> None:
    other_patient(world, "ab-1")
    mine = other_patient(world, "AB-1")
    study_uid = world.add(1, patient_id="AB-1")
    await world.run()  # the server's conditional create sees two matches (412): the exact one wins
    assert world.study(study_uid)["subject"] == {"reference": f"Patient/{mine}"}


async def test_a_loose_match_alone_parks_the_study_under_conditional_writes(world: World) -> None:
    world.strategy = WriteStrategy.CONDITIONAL
    other_patient(world, "ab-1")
    study_uid = world.add(1, patient_id="AB-1")
    report = await world.run()
    assert [p.study_uid for p in report.parked] == [study_uid]
    assert "differs" in report.parked[0].reason and "BRIDGE_WRITE_STRATEGY" in report.parked[0].reason
    assert len(world.fhir.of_type("Patient")) == 1


async def test_a_loose_match_alone_gets_a_patient_of_its_own_by_id(world: World) -> None:
    other = other_patient(world, "ab-1")
    study_uid = world.add(1, patient_id="AB-1")
    report = await world.run()
    assert not report.parked and report.counts.created == 1
    assert subject_identifier(world, study_uid) == {"system": PATIENT_SYSTEM, "value": "AB-1"}
    other_identifier = world.fhir.resources[("Patient", other)]["identifier"]
    assert other_identifier == [{"system": PATIENT_SYSTEM, "value": "ab-1"}]
    assert len(world.fhir.of_type("Patient")) == 2


async def test_an_exact_server_still_creates_each_look_alike_once(world: World) -> None:
    world.fhir.loose_tokens = False
    uids = [world.add(n, patient_id=pid) for n, pid in enumerate(("ab-1", "AB-1", "0042", "42"), start=1)]
    report = await world.run()
    assert report.counts.created == 4 and not report.parked
    assert {subject_identifier(world, u)["value"] for u in uids} == {"ab-1", "AB-1", "0042", "42"}  # type: ignore[index]


async def test_an_order_with_a_look_alike_accession_is_not_linked(world: World) -> None:
    world.fhir._store(
        {"resourceType": "ServiceRequest", "identifier": [{"value": "acc0001"}], "status": "active"}, "sr-1"
    )
    world.add(1, accession="ACC0001")
    world.order_policy = OrderPolicy.MATCH
    await world.run()
    assert "basedOn" not in world.study(uid(1))


async def test_the_order_with_the_exact_accession_is_linked_among_look_alikes(world: World) -> None:
    for rid, value in (("sr-1", "acc0001"), ("sr-2", "ACC0001")):
        world.fhir._store({"resourceType": "ServiceRequest", "identifier": [{"value": value}]}, rid)
    world.add(1, accession="ACC0001")
    world.order_policy = OrderPolicy.MATCH
    await world.run()
    assert world.study(uid(1))["basedOn"] == [{"reference": "ServiceRequest/sr-2"}]


# Several accession numbers (AccessionNumber with VM > 1, as some archives send)
def _order(world: World, rid: str, value: str) -> None:
    world.fhir._store({"resourceType": "ServiceRequest", "identifier": [{"value": value}]}, rid)


async def test_two_accession_numbers_are_two_identifiers_and_the_one_matching_order_is_linked(
    world: World,
) -> None:
    _order(world, "sr-2", "ACC-B")
    world.add(1, accession=("ACC-A", "ACC-B"))
    world.order_policy = OrderPolicy.MATCH
    report = await world.run()
    assert (report.counts.created, report.counts.parked) == (1, 0)
    resource = world.study(uid(1))
    assert [i["value"] for i in resource["identifier"][1:]] == ["ACC-A", "ACC-B"]
    assert resource["basedOn"] == [{"reference": "ServiceRequest/sr-2"}]


async def test_two_accession_numbers_matching_two_orders_park_the_study_as_ambiguous(world: World) -> None:
    _order(world, "sr-1", "ACC-A")
    _order(world, "sr-2", "ACC-B")
    world.add(1, accession=("ACC-A", "ACC-B"))
    world.order_policy = OrderPolicy.MATCH
    report = await world.run()
    [held] = report.parked
    assert held.attribute == "AccessionNumber" and "ambiguous" in held.reason


async def test_two_accession_numbers_without_an_order_get_no_logical_reference(world: World) -> None:
    world.add(1, accession=("ACC-A", "ACC-B"))
    world.add(2, accession="ACC-C")
    world.order_policy = OrderPolicy.MATCH_OR_LOGICAL
    await world.run()
    assert "basedOn" not in world.study(uid(1))  # which of two orders is not known
    assert world.study(uid(2))["basedOn"][0]["identifier"]["value"] == "ACC-C"
