"""Cost per page on the real stack, counted in requests (never timed)."""

from __future__ import annotations

import json
from typing import Any

import pytest
from pydicom.uid import generate_uid

from bridge.state.store import SqlStore
from tests.integration.conftest import Stack
from tests.stack.faultproxy import Fault, FaultProxy
from tests.stack.hapi import HapiTestServer
from tests.stack.samples import SeriesSpec, StudySpec, build_study, stow

pytestmark = pytest.mark.integration


def _store(stack: Stack, n: int, *, patients: int = 7, **spec: Any) -> list[StudySpec]:
    specs = [
        StudySpec(
            patient_id=f"TP{i % patients}",
            issuer="HOSP-A",
            series=[SeriesSpec("CT", instances=1), SeriesSpec("CT", instances=1, number=2)],
            **spec,
        )
        for i in range(n)
    ]
    for s in specs:
        stow(stack.orthanc.dicomweb_url, build_study(s))
    return specs


def _queries(stack: Stack, run_id: int) -> list[str]:
    from bridge.state.store import SqlStore

    store = SqlStore(f"sqlite:///{stack.state_path}")
    try:
        return next(r.qido_queries for r in store.runs(100) if r.id == run_id)
    finally:
        store.close()


def _series_query(stack: Stack, run_id: int) -> str | None:
    from bridge.state.store import SqlStore

    store = SqlStore(f"sqlite:///{stack.state_path}")
    try:
        return next(r.series_query for r in store.runs(100) if r.id == run_id)
    finally:
        store.close()


def _ceil(a: int, b: int) -> int:
    return -(-a // b)


def _caches_batch_searches(stack: Stack) -> bool:
    """Whether the server answers the searches inside a batch from a search cache (HAPI, 60 s).

    A known cost regression, left open on issue 22: such a server can answer a page's batched
    Patient look-ups with an earlier empty answer; the read of the derived id then finds the
    Patient the search missed, and that Patient is searched again alone (no-cache). What is
    published is the same; only the Patient requests of a page are more than its two batches, so
    only they are left unchecked there.
    """
    return isinstance(stack.fhir, HapiTestServer)


@pytest.mark.interop
def test_full_sync_costs_per_page_not_per_study(stack: Stack) -> None:
    n, page = 45, 20
    _store(stack, n)

    report = stack.sync(qido_page_size=str(page))

    assert (report.status, report.counts.created) == ("ok", n)
    assert report.series_query == "list"
    assert _series_query(stack, report.run_id) == "list"  # kept with the run, beside its queries
    queries = _queries(stack, report.run_id)
    assert len([q for q in queries if q.startswith("/studies?")]) == _ceil(n, page)
    series = [q for q in queries if "/series" in q]
    assert len(series) == _ceil(n, page)  # one UID-list query per page, no per-study query
    assert all(q.startswith("/series?") and "StudyInstanceUID=" in q for q in series)
    stats = stack.fhir.stats()
    # The CapabilityStatement, the Endpoint, on each page that brings a new patient one batch of
    # Patient look-ups and one of Patient PUTs (the archive's order decides whether all 7 come on
    # the first page), then one batch of ImagingStudies per page.
    pages = _ceil(n, page)
    if not _caches_batch_searches(stack):
        patient_pages, odd = divmod(stats["requests"] - (1 + 1 + pages), 2)
        assert odd == 0 and 1 <= patient_pages <= pages, (stats["by_interaction"], stats["by_status"])
        assert report.fhir_write_requests == 1 + patient_pages + pages
    studies = stack.fhir_search("ImagingStudy")
    assert len(studies) == n
    assert len({i["value"] for s in studies for i in s["identifier"] if i["system"] == "urn:dicom:uid"}) == n
    assert len(stack.fhir_search("Patient")) == 7
    assert all(s["numberOfSeries"] == 2 and len(s["series"]) == 2 for s in studies)


def test_a_full_sync_with_series_paging_costs_pages_not_studies(stack: Stack) -> None:
    """BRIDGE_DICOMWEB_SERIES_QUERY=paged (for archives without UID lists), on the real Orthanc."""
    n, page, series_page = 45, 20, 25
    _store(stack, n)

    report = stack.sync(
        qido_page_size=str(page),
        dicomweb_series_query="paged",
        dicomweb_series_page_size=str(series_page),
    )

    assert (report.status, report.counts.created, report.series_query) == ("ok", n, "paged")
    queries = _queries(stack, report.run_id)
    assert len([q for q in queries if q.startswith("/studies?")]) == _ceil(n, page)
    series = [q for q in queries if "/series" in q]
    # 90 series in pages of 25: 4 root-level pages (the last one short); no query per study.
    assert len(series) == _ceil(2 * n, series_page)
    assert all(q.startswith("/series?") and "StudyInstanceUID" not in q for q in series)
    assert _series_query(stack, report.run_id) == "paged"
    studies = stack.fhir_search("ImagingStudy")
    assert len(studies) == n
    assert all(s["numberOfSeries"] == 2 and len(s["series"]) == 2 for s in studies)


@pytest.mark.interop
def test_incremental_cycle_with_k_changed_studies_and_a_no_change_cycle(stack: Stack) -> None:
    n, k = 30, 4
    specs = _store(stack, n)
    stack.sync()

    stack.fhir.reset_stats()
    unchanged = stack.sync()
    assert unchanged.counts.unchanged == n
    assert [q for q in _queries(stack, unchanged.run_id) if "/series" in q] == []
    assert stack.fhir.stats()["requests"] == 0

    for s in specs[:k]:  # a late series arrives in k studies
        late = SeriesSpec("CR", instances=1, number=9, uid=generate_uid())
        stow(stack.orthanc.dicomweb_url, build_study(StudySpec(**{**s.__dict__, "series": [late]})))
    stack.fhir.reset_stats()
    report = stack.sync()

    assert (report.counts.updated, report.counts.unchanged) == (k, n - k)
    queries = _queries(stack, report.run_id)
    assert len([q for q in queries if q.startswith("/studies?")]) == 1  # one page of 100
    assert len([q for q in queries if "/series" in q]) == _ceil(k, 100)
    stats = stack.fhir.stats()
    # What the server can do was kept by the first run, so this new process does not ask again;
    # the k studies' Patients (already there) are found by one batch of look-ups, which writes
    # nothing; one write batch.
    assert "capabilities" not in stats["by_interaction"]
    if not _caches_batch_searches(stack):
        assert stats["requests"] <= 2 + _ceil(k, 100), stats["by_interaction"]
    assert report.fhir_write_requests == _ceil(k, 100)
    published = {
        i["value"].removeprefix("urn:oid:"): s
        for s in stack.fhir_search("ImagingStudy")
        for i in s["identifier"]
        if i["system"] == "urn:dicom:uid"
    }
    assert len(published) == n
    assert all(published[s.uid]["numberOfSeries"] == 3 for s in specs[:k])
    assert len(stack.fhir_search("Patient")) == 7


@pytest.mark.interop
def test_a_page_that_brings_one_new_patient_costs_two_patient_requests(stack: Stack) -> None:
    """One new Patient on a page: a batch of look-ups and a batch of one PUT, not three requests.

    Alone, under client ids, it would cost a search, a read of its derived id and a PUT; the
    archive's page order decides how many pages bring exactly one, so the cost must not depend on it.
    """
    _store(stack, 3, patients=1)
    stack.sync()
    for _ in range(2):  # two studies of one new patient
        new = StudySpec(patient_id="TP-NEW", issuer="HOSP-A", series=[SeriesSpec("CT", instances=1)])
        stow(stack.orthanc.dicomweb_url, build_study(new))

    stack.fhir.reset_stats()
    report = stack.sync()

    assert (report.status, report.counts.created) == ("ok", 2)
    stats = stack.fhir.stats()
    if not _caches_batch_searches(stack):
        # The Patient look-ups, the PUT of the new Patient, the page's ImagingStudies.
        assert stats["by_interaction"] == {"batch": 3}, stats["by_interaction"]
    assert report.fhir_write_requests == 2
    assert len(stack.fhir_search("Patient")) == 2


def _refuse_the_50th_study(body: bytes) -> bytes:
    """The FHIR server's answer to a batch of ImagingStudies, with entry 50 turned into a 422."""
    answer = json.loads(body)
    entries = answer.get("entry") or []
    locations = [str((e.get("response") or {}).get("location", "")) for e in entries]
    if answer.get("type") == "batch-response" and len(entries) >= 50 and "ImagingStudy/" in locations[49]:
        entries[49] = {
            "response": {
                "status": "422 Unprocessable Entity",
                "outcome": {
                    "resourceType": "OperationOutcome",
                    "issue": [
                        {"severity": "error", "code": "invalid", "diagnostics": "refused for the test"}
                    ],
                },
            }
        }
    return json.dumps(answer).encode()


def test_a_batch_with_one_bad_entry_parks_that_study_and_publishes_the_other_99(stack: Stack) -> None:
    _store(stack, 100, patients=10)
    with FaultProxy(stack.fhir.root_url) as proxy:
        proxy.add(Fault(kind="corrupt", method="POST", path=r"/R4/?$", rewrite=_refuse_the_50th_study))
        report = stack.sync(fhir_url=proxy.proxied(stack.fhir.base_url))

    assert (report.counts.created, report.counts.parked) == (99, 1)
    [parked] = report.parked
    assert parked.kind == "rejected" and "refused for the test" in parked.reason
    stats = stack.fhir.stats()
    # metadata, the Endpoint, the Patients' look-ups and their PUTs (two batches), the studies' batch
    assert stats["requests"] == 5
    assert stats["by_method"].get("PUT", 0) == 1  # the Endpoint; the studies went in the batch
    store = SqlStore(f"sqlite:///{stack.state_path}")
    try:
        assert store.counts("test-orthanc") == {"published": 99, "gone": 0, "parked": 1, "withdrawn": 0}
    finally:
        store.close()
