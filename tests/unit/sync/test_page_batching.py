"""Cost per page: a page's series in one list query, its Patients and ImagingStudies in one batch each."""

from __future__ import annotations

import pytest

from bridge.errors import FatalUpstreamError, UpstreamUnavailableError
from bridge.mapping.imaging_study import imaging_study_id
from bridge.sync.bundles import supports_batch
from tests.builders import series_row, uid
from tests.unit.sync.world import World, parked

pytestmark = pytest.mark.anyio


@pytest.fixture
def batching(world: World) -> World:
    world.source.page_size = 100
    world.source.list_matching = True
    world.fhir.batches = True
    return world


def requests(world: World, since: int = 0) -> list[str]:
    """The FHIR requests made: batch entries are inside their batch, not requests of their own."""
    made: list[str] = []
    inside = 0
    for method, kind, detail in world.fhir.calls[since:]:
        if inside:
            inside -= 1
            continue
        made.append(f"{method} {kind}".strip())
        if method == "batch":
            inside = detail
    return made


async def test_a_page_of_new_studies_costs_one_series_query_and_one_batch_each_for_patients_and_studies(
    batching: World,
) -> None:
    for n in range(1, 41):
        batching.add(n)
    report = await batching.run()
    assert (report.status, report.counts.created) == ("ok", 40)
    assert batching.source.series_calls == []  # no per-study series query
    assert len(batching.source.list_calls) == 1
    # One batch looks the Patients up (a search and a read of the derived id each), one PUTs
    # the 40 new ones to their derived ids, one writes the studies.
    assert requests(batching) == ["capabilities", "update Endpoint", "batch", "batch", "batch"]
    assert batching.fhir.batch_sizes == [80, 40, 40]
    assert len(batching.fhir.of_type("Patient")) == 40
    assert report.counts.fhir_writes == 81  # resources written: 40 Patients, 40 studies, the Endpoint
    assert report.fhir_write_requests == 3  # the Endpoint's PUT and two batches of writes
    assert report.series_query == "list"


async def test_no_change_cycle_makes_no_fhir_request_and_no_series_query(batching: World) -> None:
    for n in range(1, 11):
        batching.add(n)
    await batching.run()
    calls, lists = len(batching.fhir.calls), len(batching.source.list_calls)
    report = await batching.run()
    assert report.counts.unchanged == 10
    assert batching.fhir.calls[calls:] == []
    assert batching.source.list_calls[lists:] == []


async def test_k_changed_studies_cost_one_series_query_and_one_batch(batching: World) -> None:
    for n in range(1, 21):
        batching.add(n)
    await batching.run()
    calls = len(batching.fhir.calls)
    for n in (3, 7, 11):
        batching.add(n, description="changed")
    report = await batching.run()
    assert (report.counts.updated, report.counts.unchanged) == (3, 17)
    assert batching.source.list_calls[-1] == [uid(3), uid(7), uid(11)]
    # What the server can do was kept by the first run; the Patients exist already (one batch of
    # look-ups finds them, nothing is written to them), then one batch of studies.
    assert requests(batching, calls) == ["batch", "batch"]
    assert batching.fhir.batch_sizes[-1] == 3
    assert all(batching.study(uid(n))["description"] == "changed" for n in (3, 7, 11))


async def test_one_bad_entry_parks_that_study_and_the_others_are_published(batching: World) -> None:
    for n in range(1, 101):
        batching.add(n)
    batching.fhir.reject.add(imaging_study_id(batching.ctx, uid(50)))
    report = await batching.run()
    assert (report.status, report.counts.created, report.counts.parked) == ("parked", 99, 1)
    [bad] = parked(batching).values()
    assert bad.study_uid == uid(50) and bad.kind == "rejected" and "422" in bad.reason
    assert batching.store.counts(batching.ctx.source_name)["published"] == 99
    assert batching.fhir.batch_sizes == [200, 100, 100]  # Patient look-ups, Patients, studies


async def test_a_stale_version_is_reread_and_that_study_alone_is_retried(batching: World) -> None:
    for n in range(1, 6):
        batching.add(n)
    await batching.run()
    stale = imaging_study_id(batching.ctx, uid(2))
    batching.fhir.touch("ImagingStudy", stale)  # someone else wrote it since
    for n in range(1, 6):
        batching.add(n, description="again")
    calls = len(batching.fhir.calls)
    report = await batching.run()
    assert (report.status, report.counts.updated) == ("ok", 5)
    writes = [c for c in batching.fhir.calls[calls:] if c[0] == "update" and c[2]["id"] == stale]
    assert [c[2]["if_match"] for c in writes] == ["1", "2"]  # the batch entry's 412, then alone
    assert ("read", "ImagingStudy", stale) in batching.fhir.calls
    assert batching.study(uid(2))["description"] == "again"


async def test_a_failed_batch_falls_back_to_writing_study_by_study(batching: World) -> None:
    for n in range(1, 6):
        batching.add(n)
    batching.fhir.fail["batch"] = [
        UpstreamUnavailableError("fhir POST / kept failing", service="fhir", status=503),
        FatalUpstreamError("fhir POST / answered broken", service="fhir"),
    ]
    report = await batching.run()
    assert (report.status, report.counts.created) == ("ok", 5)
    assert len(batching.fhir.of_type("Patient")) == 5
    assert sum(1 for c in batching.fhir.calls if c[0] == "update" and c[1] == "ImagingStudy") == 5


async def test_a_server_without_batch_gets_writes_study_by_study(batching: World) -> None:
    batching.fhir.batches = False
    for n in range(1, 6):
        batching.add(n)
    report = await batching.run()
    assert report.counts.created == 5
    assert not any(c[0] == "batch" for c in batching.fhir.calls)


async def test_patients_are_deduplicated_within_the_page_and_an_existing_one_is_never_written(
    batching: World,
) -> None:
    for n in range(1, 7):
        batching.add(n, patient_id="SAME" if n <= 3 else f"PID{n}")
    await batching.run()
    assert len(batching.fhir.of_type("Patient")) == 4
    [same] = [p for p in batching.fhir.of_type("Patient") if p["identifier"][0]["value"] == "SAME"]
    assert {batching.study(uid(n))["subject"]["reference"] for n in (1, 2, 3)} == {f"Patient/{same['id']}"}
    assert batching.fhir.batch_sizes[:2] == [8, 4]  # a look-up pair, then a PUT per distinct patient


async def test_a_loose_server_match_is_never_linked_from_the_batch(batching: World) -> None:
    batching.fhir.loose_tokens = True
    batching.add(1, patient_id="abc")
    batching.add(2, patient_id="XYZ")
    batching.fhir._store(  # an EHR Patient whose identifier differs only in case
        {"resourceType": "Patient", "identifier": [{"system": batching.ctx.patient_system, "value": "ABC"}]},
        "ehr-1",
    )
    report = await batching.run()
    # The look-alike is not linked: "abc" gets a Patient of its own, at the id derived from it.
    subject = batching.study(uid(1))["subject"]["reference"].removeprefix("Patient/")
    assert subject != "ehr-1"
    assert batching.fhir.resources[("Patient", subject)]["identifier"][0]["value"] == "abc"
    assert batching.study(uid(2))["subject"]["reference"].startswith("Patient/")
    assert report.counts.created == 2 and not report.parked


async def test_a_study_whose_series_rows_are_bad_is_parked_alone(batching: World) -> None:
    for n in range(1, 5):
        batching.add(n)
    batching.add(9, series=[series_row(series_uid=None)])
    report = await batching.run()
    assert (report.counts.created, report.counts.parked) == (4, 1)
    assert parked(batching)[uid(9)].kind == "mapping"


async def test_series_the_list_left_out_are_fetched_alone(batching: World) -> None:
    for n in range(1, 4):
        batching.add(n)
    batching.add(
        7, series=[series_row(series_uid=uid(7, 1)), series_row(series_uid=uid(7, 2))], series_count=3
    )
    report = await batching.run()
    assert report.counts.created == 4
    assert batching.source.series_calls == [uid(7)]  # its count disagreed with the list answer


async def test_a_server_listing_only_transaction_is_tried_once_with_a_batch(batching: World) -> None:
    batching.fhir.transaction_only = True
    for n in range(1, 6):
        batching.add(n)
    report = await batching.run()
    assert report.counts.created == 5
    assert batching.fhir.batch_sizes == [10, 5, 5]  # it took them: Patient look-ups, Patients, studies


async def test_a_server_refusing_the_first_batch_is_written_study_by_study_from_then_on(
    batching: World,
) -> None:
    batching.fhir.transaction_only = True
    batching.source.page_size = 3
    for n in range(1, 7):
        batching.add(n)
    refused = FatalUpstreamError("fhir POST / answered 400", service="fhir", status=400)
    batching.fhir.fail["batch"] = [refused, refused]  # the Patient look-ups, then the studies'
    report = await batching.run()
    assert (report.status, report.counts.created) == ("ok", 6)
    assert sum(1 for c in batching.fhir.calls if c[0] == "batch") == 2  # never again after the refusal
    assert sum(1 for c in batching.fhir.calls if c[0] == "update" and c[1] == "ImagingStudy") == 6


def test_supports_batch_reads_the_system_interactions() -> None:
    assert supports_batch({"rest": [{"interaction": [{"code": "transaction"}, {"code": "batch"}]}]})
    assert not supports_batch({"rest": [{"interaction": [{"code": "transaction"}]}]})
    assert not supports_batch({})
