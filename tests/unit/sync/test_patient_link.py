"""The Patient link: ids derived from identity, the demographics cross-check, merges made by the EHR."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlencode

import pytest

from bridge.mapping.identifiers import PatientKey
from bridge.mapping.patient import patient_resource_id
from bridge.metrics import REGISTRY
from bridge.sync.policy import DemographicsCheck, WriteStrategy
from tests.builders import PATIENT_SYSTEM, uid
from tests.unit.sync.world import World, parked

pytestmark = pytest.mark.anyio


@pytest.fixture
def world(tmp_path: Path) -> Iterator[World]:
    from bridge.state.store import SqlStore

    store = SqlStore(f"sqlite:///{tmp_path / 'state.db'}")
    made = World(store)
    made.fhir.loose_tokens = True  # a server whose token search folds case and drops escapes
    yield made
    store.close()


def subject(world: World, study_uid: str) -> str:
    return str(world.study(study_uid)["subject"]["reference"]).removeprefix("Patient/")


def patient_of(world: World, study_uid: str) -> dict[str, Any]:
    return world.fhir.resources[("Patient", subject(world, study_uid))]


def ehr_patient(world: World, rid: str, value: str, **elements: Any) -> str:
    resource = {
        "resourceType": "Patient",
        "identifier": [{"system": PATIENT_SYSTEM, "value": value}],
        **elements,
    }
    return world.fhir._store(resource, rid).id


# Publish every distinct identity
@pytest.mark.parametrize("batching", [False, True])
async def test_look_alike_patient_ids_get_patients_of_their_own_at_derived_ids(
    world: World, batching: bool
) -> None:
    world.fhir.batches = batching
    ids = ["ab-1", "AB-1", "PID|7", "pid|7", "PID,7", "PID$7", "PID7"]
    uids = [world.add(n, patient_id=pid, patient_name=f"Person{n}^A") for n, pid in enumerate(ids, start=1)]
    report = await world.run()
    assert (report.counts.created, report.counts.parked) == (len(ids), 0)
    for study_uid, pid in zip(uids, ids, strict=True):
        key = PatientKey(PATIENT_SYSTEM, pid)
        assert subject(world, study_uid) == patient_resource_id(key)
        assert patient_of(world, study_uid)["identifier"] == [{"system": PATIENT_SYSTEM, "value": pid}]
    assert len(world.fhir.of_type("Patient")) == len(ids)
    # A new run finds each Patient again and writes none.
    for n, pid in enumerate(ids, start=1):
        world.add(n, patient_id=pid, patient_name=f"Person{n}^A", description="again")
    calls = len(world.fhir.calls)
    await world.run()
    assert not [c for c in world.fhir.calls[calls:] if c[0] == "update" and c[1] == "Patient"]


def test_derived_patient_ids_never_meet_across_the_bar() -> None:
    assert patient_resource_id(PatientKey("urn:s|a", "b")) != patient_resource_id(PatientKey("urn:s", "a|b"))
    assert patient_resource_id(PatientKey("urn:s", "A")) != patient_resource_id(PatientKey("urn:s", "a"))


async def test_token_searches_escape_the_reserved_characters(world: World) -> None:
    world.add(1, patient_id="a\\|b,c$d".replace("\\", "/"))  # DICOM forbids "\" in one value
    await world.run()
    [search] = [c for c in world.fhir.calls if c[:2] == ("search", "Patient")]
    assert search[2]["identifier"] == f"{PATIENT_SYSTEM}|a/\\|b\\,c\\$d"


async def test_a_patient_the_ehr_changed_at_the_derived_id_is_never_written_over(world: World) -> None:
    world.fhir.loose_tokens = False
    rid = patient_resource_id(PatientKey(PATIENT_SYSTEM, "MRN-1"))
    ehr_patient(world, rid, "MRN-1-CORRECTED")
    study_uid = world.add(1, patient_id="MRN-1")
    report = await world.run()
    assert [p.study_uid for p in report.parked] == [study_uid]
    assert report.parked[0].attribute == "PatientID" and "MRN-1" not in report.parked[0].reason
    assert world.fhir.resources[("Patient", rid)]["identifier"][0]["value"] == "MRN-1-CORRECTED"


async def test_conditional_writes_still_create_patients_with_server_ids(world: World) -> None:
    world.fhir.loose_tokens = False
    world.strategy = WriteStrategy.CONDITIONAL
    study_uid = world.add(1, patient_id="MRN-1")
    await world.run()
    assert subject(world, study_uid).startswith("patient-")
    assert (
        "conditional_create",
        "Patient",
        urlencode({"identifier": f"{PATIENT_SYSTEM}|MRN-1"}),
    ) in world.fhir.calls


# Demographics cross-check
DEMOGRAPHICS_ACTIONS = ("park", "warn", "accepted")


def disagreements_counted() -> dict[str, float]:
    """bridge_sync_demographics_disagreements by action, as the API's /metrics serves it."""
    return {
        action: REGISTRY.get_sample_value("bridge_sync_demographics_disagreements_total", {"action": action})
        or 0.0
        for action in DEMOGRAPHICS_ACTIONS
    }


def counted_since(before: dict[str, float]) -> dict[str, float]:
    """What each action of the disagreements metric gained since ``before`` (the registry is shared)."""
    now = disagreements_counted()
    return {action: now[action] - before[action] for action in DEMOGRAPHICS_ACTIONS}


def two_people_one_id(world: World) -> tuple[str, str]:
    """Two studies with the same PatientID (no issuer): the second is of another person."""
    first = world.add(1, patient_id="MRN-7", patient_name="Doe^Jane", birth_date="19700101", sex="F")
    second = world.add(2, patient_id="MRN-7", patient_name="Roe^Richard", birth_date="19851231", sex="M")
    return first, second


async def test_one_patient_id_for_two_people_parks_the_second_naming_the_attributes(world: World) -> None:
    world.source.page_size = 1  # the first creates the Patient, the second is checked against it
    first, second = two_people_one_id(world)
    before = disagreements_counted()
    report = await world.run()
    assert counted_since(before) == {"park": 1, "warn": 0, "accepted": 0}
    assert subject(world, first)
    [entry] = report.parked
    assert entry.study_uid == second and entry.kind == "patient"
    assert entry.attribute == "PatientBirthDate,PatientSex,PatientName"
    for value in ("Roe", "Richard", "Doe", "1985", "1970", "MRN-7"):
        assert value not in entry.reason
    assert "--accept-demographics" in entry.reason and "BRIDGE_DEMOGRAPHICS_CHECK" in entry.reason
    assert len(world.fhir.of_type("Patient")) == 1


async def test_an_existing_patient_with_other_demographics_parks_the_study(world: World) -> None:
    ehr_patient(world, "ehr-1", "MRN-5", name=[{"family": "Doe"}], birthDate="1970-01-01", gender="female")
    study_uid = world.add(1, patient_id="MRN-5", patient_name="Doe^Jane", birth_date="19700102", sex="F")
    report = await world.run()
    assert [(p.study_uid, p.attribute) for p in report.parked] == [(study_uid, "PatientBirthDate")]
    assert world.store.demographics_check(world.ctx.source_name, study_uid) == ("ehr-1", False)


async def test_warn_publishes_and_counts_the_disagreement_in_the_run_record(world: World) -> None:
    world.demographics = DemographicsCheck.WARN
    world.source.page_size = 1
    first, second = two_people_one_id(world)
    before = disagreements_counted()
    report = await world.run()
    assert report.counts.parked == 0 and subject(world, first) == subject(world, second)
    assert report.demographics_warnings == 1
    assert counted_since(before) == {"park": 0, "warn": 1, "accepted": 0}
    [event] = report.patient_events
    assert event["study_uid"] == second and event["event"] == "demographics-warning"
    assert event["attributes"] == "PatientBirthDate,PatientSex,PatientName"
    [run] = world.store.runs(1)
    assert run.patient_events == report.patient_events


async def test_off_publishes_without_comparing(world: World) -> None:
    world.demographics = DemographicsCheck.OFF
    world.source.page_size = 1
    two_people_one_id(world)
    before = disagreements_counted()
    report = await world.run()
    assert (report.counts.created, report.counts.parked, report.patient_events) == (2, 0, [])
    assert counted_since(before) == {"park": 0, "warn": 0, "accepted": 0}


async def test_an_accepted_override_publishes_the_study_and_is_recorded(world: World) -> None:
    world.source.page_size = 1
    _, second = two_people_one_id(world)
    await world.run()
    assert second in parked(world)
    assert world.store.accept_demographics(world.ctx.source_name, second)
    before = disagreements_counted()
    report = await world.worker().run_studies([second], kind="retry")
    assert report.counts.parked == 0 and second not in parked(world)
    assert counted_since(before) == {"park": 0, "warn": 0, "accepted": 1}
    [event] = report.patient_events
    assert event["event"] == "demographics-accepted" and event["study_uid"] == second
    # Accepted for that Patient only: linked to another one, the study is checked again.
    world.store.record_demographics_check(
        world.ctx.source_name, second, patient_id="another", attributes="PatientSex"
    )
    assert world.store.demographics_check(world.ctx.source_name, second) == ("another", False)


async def test_nothing_to_accept_for_a_study_the_check_never_parked(world: World) -> None:
    assert not world.store.accept_demographics(world.ctx.source_name, uid(9))


async def test_a_correction_in_the_archive_publishes_the_study_on_retry(world: World) -> None:
    ehr_patient(world, "ehr-1", "MRN-5", name=[{"family": "Doe"}], gender="female")
    study_uid = world.add(1, patient_id="MRN-5", patient_name="Doe^Jane", sex="M")
    await world.run()
    assert study_uid in parked(world)
    world.add(1, patient_id="MRN-5", patient_name="Doe^Jane", sex="F")  # corrected at the modality
    report = await world.worker().run_studies([study_uid], kind="retry")
    assert report.counts.parked == 0 and subject(world, study_uid) == "ehr-1"


# Merges the EHR makes
def merge(world: World, old: str, survivor: str) -> None:
    """The EHR merges Patient ``old`` into ``survivor`` as an ADT merge is published in FHIR."""
    resource = dict(world.fhir.resources[("Patient", old)])
    resource["active"] = False
    resource["link"] = [{"other": {"reference": f"Patient/{survivor}"}, "type": "replaced-by"}]
    world.fhir._store(resource, old)


async def test_studies_of_a_merged_patient_are_relinked_to_the_survivor_on_the_reconciling_run(
    world: World,
) -> None:
    world.fhir.loose_tokens = False
    study_uid = world.add(1, patient_id="MRN-1", patient_name="Doe^Jane")
    await world.run()
    old = subject(world, study_uid)
    ehr_patient(world, "survivor", "MRN-1", name=[{"family": "Doe"}], gender="female")
    merge(world, old, "survivor")
    calls = len(world.fhir.calls)
    assert (await world.run()).counts.unchanged == 1  # an incremental cycle asks nothing of the FHIR server
    assert world.fhir.calls[calls:] == []
    report = await world.worker().run(reconcile=True)
    assert subject(world, study_uid) == "survivor" and report.counts.updated == 1
    assert report.patient_events == [
        {"study_uid": study_uid, "event": "relinked", "from": f"Patient/{old}", "to": "Patient/survivor"}
    ]
    assert world.store.runs(1)[0].patient_events == report.patient_events
    assert world.fhir.resources[("Patient", old)]["active"] is False  # the merged record is left alone


def merge_check_ago(world: World, seconds: float) -> None:
    """The last merge check was ``seconds`` ago."""
    from datetime import UTC, datetime, timedelta

    from bridge.sync.worker import MERGE_CHECK

    when = datetime.now(UTC) - timedelta(seconds=seconds)
    world.store.save_checkpoint(world.ctx.source_name, MERGE_CHECK, when.isoformat())


def merge_searches(world: World, since: int) -> list[dict[str, str]]:
    return [c[2] for c in world.fhir.calls[since:] if c[0] == "search" and c[2].get("active") == "false"]


async def test_a_cycle_follows_a_merge_once_a_check_is_due_with_one_search_and_none_between(
    world: World,
) -> None:
    world.fhir.loose_tokens = False
    study_uid = world.add(1, patient_id="MRN-1", patient_name="Doe^Jane")
    await world.run()
    worker = world.worker(merge_check_interval=300)
    calls = len(world.fhir.calls)
    assert await worker.follow_merges() is None  # the first check only marks its time
    assert world.fhir.calls[calls:] == []
    old = subject(world, study_uid)
    ehr_patient(world, "survivor", "MRN-1", name=[{"family": "Doe"}], gender="female")
    merge(world, old, "survivor")
    assert await worker.follow_merges() is None  # not due: a no-change cycle asks nothing
    assert world.fhir.calls[calls:] == []
    merge_check_ago(world, 301)
    report = await worker.follow_merges()
    assert report is not None and subject(world, study_uid) == "survivor"
    [search] = merge_searches(world, calls)
    assert search["_lastUpdated"].startswith("ge") and search["_lastUpdated"].endswith("Z")
    assert report.patient_events == [
        {"study_uid": study_uid, "event": "relinked", "from": f"Patient/{old}", "to": "Patient/survivor"}
    ]
    [run] = world.store.runs(1)
    assert run.kind == "relink" and run.patient_events == report.patient_events
    calls = len(world.fhir.calls)
    assert await worker.follow_merges() is None  # the check moved on: not due again yet
    assert world.fhir.calls[calls:] == []


async def test_a_check_that_finds_no_merge_of_a_linked_patient_runs_nothing(world: World) -> None:
    study_uid = world.add(1, patient_id="MRN-1")
    await world.run()
    ehr_patient(world, "elsewhere", "MRN-9")
    ehr_patient(world, "kept", "MRN-8")
    merge(world, "elsewhere", "kept")  # a merge of Patients none of the source's studies link to
    worker = world.worker(merge_check_interval=60)
    await worker.follow_merges()
    merge_check_ago(world, 61)
    runs = len(world.store.runs(50))
    assert await worker.follow_merges() is None
    assert len(world.store.runs(50)) == runs and subject(world, study_uid) != "kept"


async def test_no_interval_leaves_merges_to_the_reconciling_sweep(world: World) -> None:
    world.add(1, patient_id="MRN-1")
    await world.run()
    worker = world.worker()  # merge_check_interval 0
    merge_check_ago(world, 10_000)
    calls = len(world.fhir.calls)
    assert await worker.follow_merges() is None
    assert world.fhir.calls[calls:] == []


async def test_more_merges_than_one_search_shows_asks_about_every_linked_patient(world: World) -> None:
    world.fhir.loose_tokens = False
    study_uid = world.add(1, patient_id="MRN-1", patient_name="Doe^Jane")
    await world.run()
    old = subject(world, study_uid)
    ehr_patient(world, "survivor", "MRN-1", name=[{"family": "Doe"}], gender="female")
    merge(world, old, "survivor")
    for n in range(100):  # a busy day of merges elsewhere fills the search's page
        ehr_patient(world, f"gone-{n}", f"OTHER-{n}")
        merge(world, f"gone-{n}", "survivor")
    worker = world.worker(merge_check_interval=60)
    merge_check_ago(world, 61)
    calls = len(world.fhir.calls)
    report = await worker.follow_merges()
    assert report is not None and subject(world, study_uid) == "survivor"
    assert any("_id" in search for search in merge_searches(world, calls))  # the linked Patients, by id


async def test_a_relink_run_that_fails_checks_the_same_span_again(world: World) -> None:
    from bridge.errors import UpstreamUnavailableError

    world.fhir.loose_tokens = False
    study_uid = world.add(1, patient_id="MRN-1", patient_name="Doe^Jane")
    await world.run()
    old = subject(world, study_uid)
    ehr_patient(world, "survivor", "MRN-1", name=[{"family": "Doe"}], gender="female")
    merge(world, old, "survivor")
    worker = world.worker(merge_check_interval=60)
    merge_check_ago(world, 61)
    before = world.store.checkpoint(world.ctx.source_name, "merge-check")
    world.source.fail_listing = UpstreamUnavailableError("archive down", service="dicomweb")
    with pytest.raises(UpstreamUnavailableError):
        await worker.follow_merges()
    assert world.store.checkpoint(world.ctx.source_name, "merge-check") == before
    world.source.fail_listing = None
    report = await worker.follow_merges()
    assert report is not None and subject(world, study_uid) == "survivor"


async def test_a_survivor_without_the_study_patient_id_parks_the_relink(world: World) -> None:
    world.fhir.loose_tokens = False
    study_uid = world.add(1, patient_id="MRN-1")
    await world.run()
    old = subject(world, study_uid)
    ehr_patient(world, "survivor", "MRN-2")
    merge(world, old, "survivor")
    report = await world.worker().run(reconcile=True)
    [entry] = report.parked
    assert entry.study_uid == study_uid and entry.attribute == "PatientID" and "merged" in entry.reason


async def test_a_new_study_of_a_merged_patient_links_to_the_survivor_never_the_replaced(world: World) -> None:
    world.fhir.loose_tokens = False
    ehr_patient(world, "old", "MRN-1")
    ehr_patient(world, "new", "MRN-1")
    merge(world, "old", "new")
    study_uid = world.add(1, patient_id="MRN-1")
    report = await world.run()
    assert subject(world, study_uid) == "new" and not report.parked
