"""The sync worker and publisher over fakes of the archive and the FHIR server, with a real store."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from typing import Any

import pytest

from bridge.errors import (
    ConfigurationError,
    FatalUpstreamError,
    RejectedResourceError,
    UpstreamUnavailableError,
    VersionConflictError,
)
from bridge.mapping.imaging_study import imaging_study_id
from bridge.sync.link import Linker
from bridge.sync.policy import DemographicsCheck, PatientPolicy, WriteStrategy
from bridge.sync.publisher import CAPABILITIES_MAX_AGE, Publisher
from bridge.sync.worker import SyncWorker
from tests.builders import PATIENT_SYSTEM, context, series_row, study_row, uid
from tests.unit.sync.world import World, parked

pytestmark = pytest.mark.anyio


# New, unchanged and changed studies
async def test_new_studies_are_created_with_one_write_each_plus_endpoint_and_patients(world: World) -> None:
    for n in range(1, 6):
        world.add(n)
    report = await world.run()
    assert (report.status, report.counts.seen, report.counts.created) == ("ok", 5, 5)
    writes = world.fhir.writes()
    assert sum(1 for w in writes if w[1] == "ImagingStudy") == 5
    assert sum(1 for w in writes if w[1] == "Endpoint") == 1
    assert sum(1 for w in writes if w[1] == "Patient") == 5
    assert report.counts.fhir_writes == len(writes) == 11
    assert world.store.counts(world.ctx.source_name) == {
        "published": 5,
        "gone": 0,
        "parked": 0,
        "withdrawn": 0,
    }


async def test_a_published_study_links_its_patient_and_the_endpoint(world: World) -> None:
    study_uid = world.add(1, patient_id="MRN-1")
    await world.run()
    [patient] = world.fhir.of_type("Patient")
    [endpoint] = world.fhir.of_type("Endpoint")
    assert patient["identifier"] == [{"system": PATIENT_SYSTEM, "value": "MRN-1"}]
    resource = world.study(study_uid)
    assert resource["subject"] == {"reference": f"Patient/{patient['id']}"}
    assert resource["endpoint"] == [{"reference": f"Endpoint/{endpoint['id']}"}]


async def test_a_second_run_writes_nothing_and_asks_for_no_series(world: World) -> None:
    for n in range(1, 5):
        world.add(n)
    await world.run()
    calls_before, series_before = len(world.fhir.calls), len(world.source.series_calls)
    report = await world.run()
    assert (report.counts.unchanged, report.counts.created, report.counts.updated) == (4, 0, 0)
    assert report.counts.fhir_writes == 0
    assert world.fhir.calls[calls_before:] == []
    assert world.source.series_calls[series_before:] == []


async def test_a_changed_study_is_updated_with_if_match_of_the_stored_version(world: World) -> None:
    world.add(1)
    changed = world.add(2)
    await world.run()
    version = world.store.known_studies(world.ctx.source_name, [changed])[changed].fhir_version
    world.add(
        2,
        series_count=2,
        series=[series_row(series_uid=uid(2, 1)), series_row(series_uid=uid(2, 2), number=2)],
    )
    report = await world.run()
    assert (report.counts.updated, report.counts.unchanged) == (1, 1)
    [put] = [c for c in world.fhir.writes() if c[1] == "ImagingStudy"][2:]
    assert put == (
        "update",
        "ImagingStudy",
        {"id": imaging_study_id(world.ctx, changed), "if_match": version},
    )
    assert len(world.study(changed)["series"]) == 2
    assert world.store.known_studies(world.ctx.source_name, [changed])[changed].fhir_version == "2"


async def test_the_run_records_its_counts_and_exact_queries(world: World) -> None:
    for n in range(1, 4):
        world.add(n)
    report = await world.run()
    [run] = world.store.runs()
    assert run.id == report.run_id
    assert (run.status, run.seen, run.created, run.fhir_writes) == ("ok", 3, 3, report.counts.fhir_writes)
    assert run.qido_queries == world.source.queries
    assert run.finished_at is not None


# Bad studies are parked, the others go on
async def test_one_bad_study_is_parked_with_the_attribute_while_the_others_publish(world: World) -> None:
    world.add(1)
    bad = world.add(2, tz_offset="+1500")
    world.add(3)
    report = await world.run()
    assert (report.status, report.counts.created, report.counts.parked) == ("parked", 2, 1)
    [entry] = report.parked
    assert (entry.study_uid, entry.kind, entry.attribute) == (bad, "mapping", "TimezoneOffsetFromUTC")
    assert parked(world)[bad].attribute == "TimezoneOffsetFromUTC"
    assert len(world.fhir.of_type("ImagingStudy")) == 2


async def test_a_bad_study_creates_no_patient(world: World) -> None:
    world.add(1, series=[series_row(series_uid="1.2.03")])
    await world.run()
    assert world.fhir.of_type("Patient") == []
    assert parked(world)[uid(1)].attribute == "SeriesInstanceUID"


async def test_a_series_without_modality_is_published_as_ot_and_counted(world: World) -> None:
    series = [series_row(series_uid=uid(1, 1), modality=None), series_row(series_uid=uid(1, 2), number=2)]
    world.add(1, series=series)
    report = await world.run()
    assert (report.counts.created, report.counts.parked, report.counts.fallbacks) == (1, 0, 1)
    codes = [s["modality"]["code"] for s in world.study(uid(1))["series"]]
    assert codes == ["OT", "CT"]
    assert [c["code"] for c in world.study(uid(1))["modality"]] == ["CT"], "OT is no acquisition modality"


async def test_a_series_without_modality_parks_when_the_setting_says_so(world: World) -> None:
    world.ctx = context(missing_modality=None)
    world.add(1, series=[series_row(series_uid=uid(1, 1), modality=None)])
    report = await world.run()
    assert report.counts.fallbacks == 0
    assert parked(world)[uid(1)].attribute == "Modality"
    assert world.fhir.of_type("Patient") == []


async def test_a_study_without_patient_id_is_parked_naming_it(world: World) -> None:
    world.add(1, patient_id=None)
    await world.run()
    assert (parked(world)[uid(1)].kind, parked(world)[uid(1)].attribute) == ("mapping", "PatientID")


# pydicom warns about the malformed date while parsing; in production that is not an error.
@pytest.mark.filterwarnings("ignore:Invalid value for VR DA:UserWarning")
async def test_a_study_with_an_impossible_date_is_parked_naming_study_date(world: World) -> None:
    world.add(1, date="20241399")
    await world.run()
    assert parked(world)[uid(1)].attribute == "StudyDate"


async def test_a_row_without_a_uid_is_parked_and_the_rest_publish(world: World) -> None:
    world.source.add(study_row(study_uid=None, patient_id="PIDX"), [])
    world.add(1)
    report = await world.run()
    assert report.counts.created == 1
    [entry] = report.parked
    assert entry.attribute == "StudyInstanceUID"
    assert entry.study_uid.startswith("unknown:")


async def test_a_parked_study_is_retried_next_run_and_cleared_when_fixed(world: World) -> None:
    world.add(1)
    bad = world.add(2, tz_offset="+1500")
    await world.run()
    again = await world.run()
    assert again.counts.parked == 1
    assert parked(world)[bad].attempts == 2
    world.add(2, tz_offset="+0100")
    fixed = await world.run()
    assert (fixed.status, fixed.counts.created, fixed.counts.parked) == ("ok", 1, 0)
    assert parked(world) == {}
    assert world.study(bad)["started"].endswith("+01:00")


async def test_a_resource_the_server_rejects_is_parked_with_the_outcome_text(world: World) -> None:
    world.add(1)
    await world.run()  # publishes the Endpoint, so the next update is the study's
    world.add(3)
    world.fhir.fail["update"] = [
        RejectedResourceError(
            "fhir PUT /ImagingStudy/x answered 422: ImagingStudy.series[0].modality: unknown code",
            service="fhir",
            status=422,
            outcome="ImagingStudy.series[0].modality: unknown code",
        )
    ]
    report = await world.run()
    [entry] = report.parked
    assert (entry.study_uid, entry.kind) == (uid(3), "rejected")
    assert "ImagingStudy.series[0].modality: unknown code" in parked(world)[uid(3)].reason


# Patients
async def test_match_only_without_a_patient_parks_the_study_as_patient(world: World) -> None:
    world.policy = PatientPolicy.MATCH_ONLY
    world.add(1, patient_id="MRN-SECRET-77", patient_name="Secretname^Person")
    report = await world.run()
    [entry] = report.parked
    assert (entry.kind, entry.attribute) == ("patient", "PatientID")
    assert "MRN-SECRET-77" not in entry.reason
    assert "Secretname" not in entry.reason
    assert world.fhir.of_type("Patient") == []
    assert not [w for w in world.fhir.writes() if w[1] == "Patient"]


async def test_match_only_links_an_existing_patient_without_writing_it(world: World) -> None:
    world.policy = PatientPolicy.MATCH_ONLY
    existing = {
        "resourceType": "Patient",
        "identifier": [{"system": PATIENT_SYSTEM, "value": "MRN-5"}],
        "name": [{"family": "FromTheEhr"}],
    }
    world.fhir._store(existing, "ehr-patient-5")
    study_uid = world.add(1, patient_id="MRN-5", patient_name="Different^Name")
    world.demographics = DemographicsCheck.OFF  # the cross-check is tested in test_demographics.py
    report = await world.run()
    assert report.counts.created == 1
    assert world.study(study_uid)["subject"] == {"reference": "Patient/ehr-patient-5"}
    assert not [w for w in world.fhir.writes() if w[1] == "Patient"]
    assert world.fhir.resources[("Patient", "ehr-patient-5")]["name"] == [{"family": "FromTheEhr"}]


async def test_match_or_create_never_overwrites_an_existing_patient(world: World) -> None:
    existing = {
        "resourceType": "Patient",
        "identifier": [{"system": PATIENT_SYSTEM, "value": "MRN-5"}],
        "name": [{"family": "FromTheEhr"}],
    }
    world.fhir._store(existing, "ehr-patient-5")
    study_uid = world.add(1, patient_id="MRN-5", patient_name="Different^Name")
    world.demographics = DemographicsCheck.OFF  # the cross-check is tested in test_demographics.py
    report = await world.run()
    assert world.study(study_uid)["subject"] == {"reference": "Patient/ehr-patient-5"}
    assert world.fhir.resources[("Patient", "ehr-patient-5")]["name"] == [{"family": "FromTheEhr"}]
    assert world.fhir.resources[("Patient", "ehr-patient-5")]["meta"]["versionId"] == "1"
    assert report.counts.fhir_writes == 2  # the Endpoint and the ImagingStudy


async def test_two_matching_patients_park_the_study_as_ambiguous(world: World) -> None:
    world.policy = PatientPolicy.MATCH_ONLY
    for rid in ("a", "b"):
        world.fhir._store(
            {"resourceType": "Patient", "identifier": [{"system": PATIENT_SYSTEM, "value": "MRN-5"}]}, rid
        )
    world.add(1, patient_id="MRN-5")
    report = await world.run()
    [entry] = report.parked
    assert (entry.kind, entry.attribute) == ("patient", "PatientID")
    assert "more than one" in entry.reason


async def test_logical_policy_never_reads_or_writes_a_patient(world: World) -> None:
    world.policy = PatientPolicy.LOGICAL
    study_uid = world.add(1, patient_id="MRN-9")
    report = await world.run()
    assert report.counts.created == 1
    assert not [c for c in world.fhir.calls if c[1] == "Patient"]
    assert world.study(study_uid)["subject"] == {
        "type": "Patient",
        "identifier": {"system": PATIENT_SYSTEM, "value": "MRN-9"},
    }


@pytest.mark.parametrize("policy", [PatientPolicy.MATCH_OR_CREATE, PatientPolicy.MATCH_ONLY])
async def test_two_studies_of_the_same_patient_make_one_patient_lookup(
    world: World, policy: PatientPolicy
) -> None:
    world.policy = policy
    if policy is PatientPolicy.MATCH_ONLY:
        world.fhir._store(
            {"resourceType": "Patient", "identifier": [{"system": PATIENT_SYSTEM, "value": "MRN-1"}]}, "p1"
        )
    first, second = world.add(1, patient_id="MRN-1"), world.add(2, patient_id="MRN-1")
    await world.run()
    lookups = [c for c in world.fhir.calls if c[:2] == ("search", "Patient")]
    assert len(lookups) == 1
    assert world.study(first)["subject"] == world.study(second)["subject"]


async def test_the_patient_is_keyed_by_the_issuer_system(world: World) -> None:
    world.ctx = context(patient_issuer_systems={"HOSP-A": "urn:oid:1.2.3.4"})
    world.add(1, patient_id="MRN-1", patient_issuer="HOSP-A")
    await world.run()
    [patient] = world.fhir.of_type("Patient")
    assert patient["identifier"] == [{"system": "urn:oid:1.2.3.4", "value": "MRN-1"}]


# Conflicts and outages
async def test_a_412_on_update_rereads_and_retries_once(world: World) -> None:
    study_uid = world.add(1)
    await world.run()
    rid = imaging_study_id(world.ctx, study_uid)
    world.fhir.touch("ImagingStudy", rid)  # someone else wrote version 2
    world.add(1, description="Changed description")
    calls_before = len(world.fhir.calls)
    report = await world.run()
    assert report.counts.updated == 1
    assert [c for c in world.fhir.calls[calls_before:] if c[1] == "ImagingStudy"] == [
        ("update", "ImagingStudy", {"id": rid, "if_match": "1"}),
        ("read", "ImagingStudy", rid),
        ("update", "ImagingStudy", {"id": rid, "if_match": "2"}),
    ]
    assert world.study(study_uid)["description"] == "Changed description"
    assert world.store.known_studies(world.ctx.source_name, [study_uid])[study_uid].fhir_version == "3"


async def test_a_second_412_parks_the_study_instead_of_looping(world: World) -> None:
    study_uid = world.add(1)
    await world.run()
    world.add(1, description="Changed")
    conflict = VersionConflictError("fhir PUT answered 412", service="fhir", status=412)
    world.fhir.fail["update"] = [conflict, conflict]
    report = await world.run()
    assert [c[0] for c in world.fhir.calls[-3:]] == ["update", "read", "update"]
    [entry] = report.parked
    assert entry.study_uid == study_uid


async def test_an_unreachable_archive_fails_the_run_and_propagates(world: World) -> None:
    world.add(1)
    world.source.fail_listing = UpstreamUnavailableError("dicomweb GET /studies failed", service="dicomweb")
    with pytest.raises(UpstreamUnavailableError):
        await world.run()
    [run] = world.store.runs()
    assert run.status == "failed"
    assert "dicomweb GET /studies failed" in (run.error or "")
    assert run.finished_at is not None


async def test_an_unreachable_fhir_server_at_the_endpoint_fails_the_run(world: World) -> None:
    world.add(1)
    world.fhir.fail["update"] = [UpstreamUnavailableError("fhir PUT /Endpoint failed", service="fhir")]
    with pytest.raises(UpstreamUnavailableError):
        await world.run()
    assert world.store.runs()[0].status == "failed"


async def test_a_fhir_server_lost_during_a_study_propagates_upstream_unavailable(world: World) -> None:
    world.add(1)
    await world.run()  # the Endpoint is published, so the next run's first FHIR call is the study's
    world.add(2)
    world.fhir.fail["search"] = [UpstreamUnavailableError("fhir GET /Patient failed", service="fhir")]
    world.fhir.fail["capabilities"] = [UpstreamUnavailableError("fhir GET /metadata failed", service="fhir")]
    with pytest.raises(UpstreamUnavailableError):
        await world.run()
    assert world.store.runs()[0].status == "failed"


async def test_a_study_whose_archive_query_keeps_failing_is_parked_and_the_run_goes_on(world: World) -> None:
    world.add(1)
    world.add(2)
    world.source.fail_series[uid(1)] = UpstreamUnavailableError(
        "dicomweb GET /studies/x/series: connection reset", service="dicomweb"
    )
    report = await world.run()
    assert (report.counts.created, report.counts.parked) == (1, 1)
    assert report.parked[0].study_uid == uid(1) and report.parked[0].kind == "upstream"


async def test_an_archive_down_during_a_study_still_ends_the_run(world: World) -> None:
    world.add(1)
    world.source.fail_series[uid(1)] = UpstreamUnavailableError("dicomweb GET failed", service="dicomweb")
    world.source.fail_listing = None

    async def down() -> bool:
        return False

    world.source.reachable = down  # type: ignore[method-assign]
    with pytest.raises(UpstreamUnavailableError):
        await world.run()


async def test_a_study_whose_request_keeps_failing_is_parked_and_the_run_goes_on(world: World) -> None:
    world.add(1)
    await world.run()
    world.add(2)
    world.add(3)
    # One study's write breaks the connection on every retry; the server itself still answers.
    world.fhir.fail["search"] = [
        UpstreamUnavailableError("fhir GET /Patient: connection reset", service="fhir")
    ]
    report = await world.run()
    assert report.status == "parked"
    assert report.counts.parked == 1 and report.counts.created == 1
    [parked] = report.parked
    assert parked.kind == "upstream" and "connection reset" in parked.reason


async def test_a_fhir_server_lost_during_a_study_still_records_a_failed_run(world: World) -> None:
    world.add(1)
    await world.run()
    world.add(2)
    world.fhir.fail["search"] = [UpstreamUnavailableError("fhir GET /Patient failed", service="fhir")]
    world.fhir.fail["capabilities"] = [UpstreamUnavailableError("fhir GET /metadata failed", service="fhir")]
    with pytest.raises(BaseException):  # noqa: B017 - the exact type is the xfail test above
        await world.run()
    [run, _] = world.store.runs()
    assert run.status == "failed"
    assert uid(2) not in world.store.known_studies(world.ctx.source_name, [uid(2)])


# Write strategy
async def test_the_conditional_strategy_uses_conditional_updates_keyed_by_identifier(world: World) -> None:
    world.strategy = WriteStrategy.CONDITIONAL
    study_uid = world.add(1)
    report = await world.run()
    assert report.counts.created == 1
    assert not [c for c in world.fhir.calls if c[0] == "update"]
    puts = [c for c in world.fhir.calls if c[0] == "conditional_update"]
    assert (
        "conditional_update",
        "ImagingStudy",
        {"identifier": f"urn:dicom:uid|urn:oid:{study_uid}"},
    ) in puts
    assert (
        "conditional_update",
        "Endpoint",
        {"identifier": "urn:fhir-dicomweb-bridge:source|test-pacs"},
    ) in puts


async def test_the_conditional_strategy_is_idempotent_across_runs(world: World) -> None:
    world.strategy = WriteStrategy.CONDITIONAL
    study_uid = world.add(1)
    await world.run()
    world.add(1, description="Changed")
    await world.run()
    assert len(world.fhir.of_type("ImagingStudy")) == 1
    assert world.study(study_uid)["description"] == "Changed"


async def test_the_conditional_strategy_references_the_endpoint_the_server_created(world: World) -> None:
    world.strategy = WriteStrategy.CONDITIONAL
    world.add(1)
    await world.run()
    [endpoint] = world.fhir.of_type("Endpoint")
    later = world.add(2)
    await world.run()
    assert world.study(later)["endpoint"] == [{"reference": f"Endpoint/{endpoint['id']}"}]


# Privacy
async def test_a_run_logs_no_patient_data(world: World, caplog: pytest.LogCaptureFixture) -> None:
    world.add(1, patient_id="MRN-SECRET-1", patient_name="Secretfamily^Secretgiven", birth_date="19610203")
    world.add(2, patient_id="MRN-SECRET-2", tz_offset="+1500")
    with caplog.at_level(logging.DEBUG):
        await world.run()
    assert caplog.records, "the run logs something"
    text = "\n".join(r.getMessage() for r in caplog.records)
    for secret in ("MRN-SECRET", "Secretfamily", "Secretgiven", "19610203", "1961-02-03"):
        assert secret not in text


async def test_a_long_running_worker_looks_patients_up_again_in_each_run(world: World) -> None:
    world.policy = PatientPolicy.MATCH_ONLY
    world.fhir._store(
        {"resourceType": "Patient", "identifier": [{"system": PATIENT_SYSTEM, "value": "MRN-1"}]}, "old"
    )
    worker = world.worker()
    world.add(1, patient_id="MRN-1")
    await worker.run()
    del world.fhir.resources[("Patient", "old")]  # merged away in the EHR
    world.fhir._store(
        {"resourceType": "Patient", "identifier": [{"system": PATIENT_SYSTEM, "value": "MRN-1"}]}, "new"
    )
    later = world.add(2, patient_id="MRN-1")
    await worker.run()
    assert world.study(later)["subject"] == {"reference": "Patient/new"}


# A server that cannot create by PUT
async def test_a_server_refusing_update_as_create_stops_the_run_naming_the_setting(world: World) -> None:
    world.add(1)
    world.fhir.update_create = False
    with pytest.raises(ConfigurationError) as caught:
        await world.run()
    assert "BRIDGE_WRITE_STRATEGY" in str(caught.value) and "conditional" in str(caught.value)
    assert [c for c in world.fhir.writes() if c[1] == "ImagingStudy"] == []


async def test_a_put_create_refused_with_404_stops_the_run_naming_the_setting(world: World) -> None:
    # HAPI with client ids off: no updateCreate in its CapabilityStatement, 404 (HAPI-0959) on the PUT.
    world.add(1)
    world.add(2)
    world.fhir.update_create = None
    refusal = FatalUpstreamError("fhir PUT /Endpoint/x answered 404", service="fhir", status=404)
    world.fhir.fail["update"] = [refusal]
    with pytest.raises(ConfigurationError) as caught:
        await world.run()
    assert "BRIDGE_WRITE_STRATEGY" in str(caught.value) and "conditional" in str(caught.value)
    # One refused attempt (the Endpoint), then the run stops: not one refusal per study.
    assert [(c[0], c[1]) for c in world.fhir.writes()] == [("update", "Endpoint")]


async def test_a_url_that_is_no_fhir_server_stops_the_run_naming_bridge_fhir_url(world: World) -> None:
    # BRIDGE_FHIR_URL at the archive: GET metadata is a 404, and so is the PUT. The write strategy
    # is not the problem, and following advice to change it leads nowhere.
    world.add(1)
    world.fhir.fail["capabilities"] = [
        FatalUpstreamError("fhir GET /metadata answered 404", service="fhir", status=404)
    ]
    world.fhir.fail["update"] = [
        FatalUpstreamError("fhir PUT /Endpoint/x answered 404", service="fhir", status=404)
    ]
    with pytest.raises(ConfigurationError) as caught:
        await world.run()
    message = str(caught.value)
    assert (
        "BRIDGE_FHIR_URL" in message
        and "not a FHIR server" in message
        and "GET metadata answered 404" in message
    )
    assert "BRIDGE_WRITE_STRATEGY" not in message


@pytest.mark.parametrize(
    ("status", "answer"),
    [
        (404, "answered 404"),  # the archive (the scenario)
        (405, "answered 405"),  # a web server that takes no PUT
        (200, "sent a body that is not JSON"),  # a web page answering every path
    ],
)
async def test_under_conditional_writes_a_url_that_is_no_fhir_server_stops_the_run_naming_it(
    world: World, status: int, answer: str
) -> None:
    # The refused conditional PUT alone ("PUT /Endpoint?identifier=... answered 404") does not
    # say that BRIDGE_FHIR_URL points at something else.
    world.strategy = WriteStrategy.CONDITIONAL
    world.add(1)
    world.add(2)
    world.fhir.fail["capabilities"] = [
        FatalUpstreamError(f"fhir GET /metadata {answer}", service="fhir", status=status)
    ]
    world.fhir.fail["conditional_update"] = [
        FatalUpstreamError(f"fhir PUT /Endpoint?identifier=x {answer}", service="fhir", status=status)
    ]
    with pytest.raises(ConfigurationError) as caught:
        await world.run()
    message = str(caught.value)
    assert "BRIDGE_FHIR_URL" in message and "not a FHIR server" in message
    assert "BRIDGE_WRITE_STRATEGY" not in message
    said = "did not answer JSON" if status == 200 else f"answered {status}"
    assert f"GET metadata {said}" in message
    # One refused write (the Endpoint), one look at the CapabilityStatement, then the run stops.
    assert [(c[0], c[1]) for c in world.fhir.calls] == [
        ("conditional_update", "Endpoint"),
        ("capabilities", ""),
    ]


async def test_under_conditional_writes_a_fhir_server_refusing_a_write_keeps_its_own_answer(
    world: World,
) -> None:
    # A real FHIR server (its CapabilityStatement answers) that refuses the PUT: its answer is
    # the news, not "not a FHIR server".
    world.strategy = WriteStrategy.CONDITIONAL
    world.add(1)
    refused = FatalUpstreamError("fhir PUT /Endpoint?identifier=x answered 405", service="fhir", status=405)
    world.fhir.fail["conditional_update"] = [refused]
    with pytest.raises(FatalUpstreamError) as caught:
        await world.run()
    assert caught.value is refused
    assert capability_reads(world) == 1


async def test_under_conditional_writes_a_run_with_no_change_makes_no_fhir_request(world: World) -> None:
    world.strategy = WriteStrategy.CONDITIONAL
    world.add(1)
    world.add(2)
    await world.run()
    world.fhir.calls.clear()
    report = await world.run()
    assert report.counts.unchanged == 2
    assert world.fhir.calls == []


async def test_the_capability_check_costs_one_request_and_none_when_nothing_is_written(world: World) -> None:
    world.add(1)
    world.add(2)
    await world.run()
    assert [c for c in world.fhir.calls if c[0] == "capabilities"] == [("capabilities", "", None)]
    world.fhir.calls.clear()
    await world.run()
    assert world.fhir.calls == []


def capability_reads(world: World) -> int:
    return len([c for c in world.fhir.calls if c[0] == "capabilities"])


async def test_what_the_server_can_do_is_kept_so_a_later_run_with_changes_does_not_ask_again(
    world: World,
) -> None:
    world.add(1)
    await world.run()
    assert capability_reads(world) == 1
    world.add(2)  # a new study: the next run writes, in a new process (a fresh worker and publisher)
    report = await world.run()
    assert report.counts.created == 1
    assert capability_reads(world) == 1


async def test_kept_capabilities_are_asked_again_once_a_day_old_or_of_another_server(world: World) -> None:
    now = [1_000_000.0]

    def worker(server: str) -> SyncWorker:
        linker = Linker(world.fhir, world.ctx, patient_policy=world.policy)
        publisher = Publisher(
            world.fhir,
            world.store,
            world.ctx,
            write_strategy=world.strategy,
            batch_size=world.batch_size,
            server=server,
            clock=lambda: now[0],
        )
        return SyncWorker(world.source, linker, publisher, world.store, world.ctx)

    world.add(1)
    await worker("https://fhir.test/r4").run()
    world.add(2)
    now[0] += CAPABILITIES_MAX_AGE - 60
    await worker("https://fhir.test/r4").run()
    assert capability_reads(world) == 1
    world.add(3)
    now[0] += 120  # a day old
    await worker("https://fhir.test/r4").run()
    assert capability_reads(world) == 2
    world.add(4)
    await worker("https://other-fhir.test/r4").run()  # BRIDGE_FHIR_URL changed
    assert capability_reads(world) == 3


async def test_a_refusal_to_create_by_put_forgets_the_kept_capabilities(world: World) -> None:
    world.add(1)
    await world.run()
    world.add(2, patient_id="PID1")  # a Patient already linked: the refused PUT is the ImagingStudy's
    world.fhir.update_create = None  # the server changed: it no longer creates by PUT, and says nothing
    refusal = FatalUpstreamError("fhir PUT /ImagingStudy/x answered 404", service="fhir", status=404)
    world.fhir.fail["update"] = [refusal]
    with pytest.raises(ConfigurationError):
        await world.run()
    assert capability_reads(world) == 1
    world.fhir.update_create = False  # now it says so: the next run reads it and stops before writing
    world.fhir.calls.clear()
    with pytest.raises(ConfigurationError, match="updateCreate=false"):
        await world.run()
    assert capability_reads(world) == 1
    assert [c for c in world.fhir.writes() if c[1] == "ImagingStudy"] == []


async def test_conditional_writes_need_no_capability_check(world: World) -> None:
    world.strategy = WriteStrategy.CONDITIONAL
    world.fhir.update_create = False
    world.add(1)
    report = await world.run()
    assert report.counts.created == 1
    assert not [c for c in world.fhir.calls if c[0] == "capabilities"]


async def test_a_study_on_two_pages_in_a_row_is_prepared_and_written_once(world: World) -> None:
    # Offset paging shifts when a study is added ahead of the walk: the next page repeats the last
    # row of the page before, whose writes may still be in flight while the next page is prepared.
    world.strategy = WriteStrategy.CONDITIONAL
    rows = [world.source.studies[world.add(n)] for n in range(1, 5)]

    async def shifted(filters: object = None) -> AsyncIterator[list[dict[str, Any]]]:
        for page in ([rows[0], rows[1]], [rows[1], rows[2]], [rows[3]]):
            yield page

    world.source.iter_studies = shifted  # type: ignore[method-assign]
    report = await world.run()
    study_writes = [c for c in world.fhir.writes() if c[1] == "ImagingStudy"]
    assert len(study_writes) == 4 and len(world.fhir.of_type("ImagingStudy")) == 4
    assert report.counts.created == 4


# Created means the study had no ImagingStudy before, whatever status the server answers
@pytest.mark.parametrize("batches", [False, True])
async def test_a_server_answering_200_to_a_put_that_creates_still_counts_created(
    world: World, batches: bool
) -> None:
    world.fhir.create_status, world.fhir.batches = 200, batches
    for n in range(1, 4):
        world.add(n)
    first = await world.run()
    assert (first.counts.created, first.counts.updated) == (3, 0)
    world.add(2, description="Changed")
    second = await world.run()
    assert (second.counts.created, second.counts.updated, second.counts.unchanged) == (0, 1, 2)


async def test_a_study_the_server_already_holds_counts_updated_when_the_store_has_no_record(
    world: World, tmp_path: Any
) -> None:
    from bridge.state.store import SqlStore

    world.fhir.create_status = 200
    world.add(1)
    await world.run()
    fresh = SqlStore(f"sqlite:///{tmp_path / 'lost.db'}")  # the state store was lost
    try:
        world.store = fresh
        report = await world.run()
    finally:
        fresh.close()
    assert (report.counts.created, report.counts.updated) == (0, 1)


def test_a_first_version_means_created_only_where_the_server_does_not_say_201(world: World) -> None:
    from bridge.fhir.results import WriteResult
    from bridge.sync.policy import WriteStrategy as Strategy
    from bridge.sync.publisher import Publisher

    publisher = Publisher(world.fhir, world.store, world.ctx, write_strategy=Strategy.CLIENT_ID)
    assert publisher.created(WriteResult("ImagingStudy", "a", "1", False, 200))
    assert not publisher.created(WriteResult("ImagingStudy", "a", "2", False, 200))
    publisher._learn(WriteResult("ImagingStudy", "b", "1", True, 201))
    # Now the server is known to answer 201 to creates: a 200 at version 1 changed nothing (HAPI).
    assert not publisher.created(WriteResult("ImagingStudy", "a", "1", False, 200))


# Names from the best source
async def test_a_garbled_name_is_restored_from_the_part10_header_and_a_missing_one_is_counted(
    world: World,
) -> None:
    from pydicom.data import get_charset_files

    garbled = {"Alphabetic": "$B$d$", "Ideographic": "^$@"}
    restored = world.add(1, patient_id="JP-1", patient_name=garbled)
    world.add(2, patient_id="JP-2", patient_name=garbled)  # its archive has no file to give
    world.add(3, patient_id="OK-3")
    with open(get_charset_files("chrJapMulti.dcm")[0], "rb") as handle:
        world.source.files[restored] = handle.read()
    report = await world.run()
    assert (report.counts.created, report.counts.parked, report.counts.fallbacks) == (3, 0, 1)
    assert sorted(world.source.file_reads) == [uid(1), uid(2)]  # only for the garbled names
    names = {p["identifier"][0]["value"]: p.get("name") for p in world.fhir.of_type("Patient")}
    assert names["JP-1"] is not None and names["JP-1"][0]["family"] == "やまだ"  # pydicom's decoding
    assert names["JP-2"] is None  # never the garbage
    assert names["OK-3"] is not None
