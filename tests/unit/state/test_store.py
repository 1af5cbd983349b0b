"""The SQLite state store: published studies, parked failures, runs, counts, schema checks."""

from __future__ import annotations

import sqlite3
from collections.abc import Iterator
from pathlib import Path

import pytest

from bridge.errors import StoreError
from bridge.state.models import SCHEMA_VERSION
from bridge.state.records import Published, RunCounts
from bridge.state.store import SqlStore

SOURCE = "test-pacs"


@pytest.fixture
def db(tmp_path: Path) -> Path:
    return tmp_path / "state.db"


@pytest.fixture
def store(db: Path) -> Iterator[SqlStore]:
    opened = SqlStore(f"sqlite:///{db}")
    yield opened
    opened.close()


def publish(store: SqlStore, uid: str, *, source: str = SOURCE, version: str = "1", fp: str = "q1") -> None:
    store.record_published_many(source, [Published(uid, fp, "r1", f"id-{uid}", version)])


def test_an_empty_store_knows_nothing(store: SqlStore) -> None:
    assert store.known_studies(SOURCE, ["1.2.3"]) == {}
    assert store.known_studies(SOURCE, []) == {}
    assert store.counts(SOURCE) == {"published": 0, "gone": 0, "parked": 0, "withdrawn": 0}
    assert store.runs() == []


def test_a_published_study_is_known_with_its_fhir_id_and_version(store: SqlStore) -> None:
    publish(store, "1.2.3", version="7")
    known = store.known_studies(SOURCE, ["1.2.3", "1.2.4"])
    assert list(known) == ["1.2.3"]
    study = known["1.2.3"]
    assert (study.qido_fingerprint, study.resource_fingerprint) == ("q1", "r1")
    assert (study.fhir_id, study.fhir_version) == ("id-1.2.3", "7")


def test_publishing_again_updates_the_record(store: SqlStore) -> None:
    publish(store, "1.2.3", version="1", fp="old")
    publish(store, "1.2.3", version="2", fp="new")
    study = store.known_studies(SOURCE, ["1.2.3"])["1.2.3"]
    assert (study.qido_fingerprint, study.fhir_version) == ("new", "2")
    assert store.counts(SOURCE)["published"] == 1


def test_studies_are_kept_per_source(store: SqlStore) -> None:
    publish(store, "1.2.3", source="a")
    assert store.known_studies("b", ["1.2.3"]) == {}
    assert store.counts("a")["published"] == 1
    assert store.counts("b")["published"] == 0


def test_a_parked_study_keeps_its_reason_and_attribute(store: SqlStore) -> None:
    store.park(
        SOURCE, "1.2.9", kind="mapping", reason="StudyDate is not a calendar date", attribute="StudyDate"
    )
    [parked] = store.parked(SOURCE)
    assert (parked.study_uid, parked.kind, parked.attribute) == ("1.2.9", "mapping", "StudyDate")
    assert parked.reason == "StudyDate is not a calendar date"
    assert parked.attempts == 1
    assert store.counts(SOURCE) == {"published": 0, "gone": 0, "parked": 1, "withdrawn": 0}


def test_parking_again_counts_attempts_and_keeps_the_latest_reason(store: SqlStore) -> None:
    store.park(SOURCE, "1.2.9", kind="mapping", reason="first", attribute="StudyDate")
    store.park(SOURCE, "1.2.9", kind="patient", reason="second", attribute="PatientID")
    [parked] = store.parked(SOURCE)
    assert (parked.attempts, parked.kind, parked.reason, parked.attribute) == (
        2,
        "patient",
        "second",
        "PatientID",
    )
    assert parked.last_failed_at >= parked.first_failed_at


def test_publishing_a_parked_study_clears_it(store: SqlStore) -> None:
    store.park(SOURCE, "1.2.9", kind="mapping", reason="bad", attribute=None)
    publish(store, "1.2.9")
    assert store.parked(SOURCE) == []
    assert store.counts(SOURCE) == {"published": 1, "gone": 0, "parked": 0, "withdrawn": 0}


def test_a_run_is_recorded_with_counts_status_and_queries(store: SqlStore) -> None:
    run_id = store.start_run(SOURCE, "full")
    [running] = store.runs()
    assert (running.id, running.status, running.finished_at) == (run_id, "running", None)
    counts = RunCounts(seen=5, created=3, updated=1, unchanged=0, parked=1, fhir_writes=5)
    store.finish_run(run_id, status="parked", counts=counts, qido_queries=["/studies?limit=100&offset=0"])
    [run] = store.runs()
    assert run.status == "parked"
    assert run.finished_at is not None
    assert (run.seen, run.created, run.updated, run.unchanged, run.parked, run.fhir_writes) == (
        5,
        3,
        1,
        0,
        1,
        5,
    )
    assert run.qido_queries == ["/studies?limit=100&offset=0"]
    assert run.error is None


def test_runs_are_listed_newest_first_and_limited(store: SqlStore) -> None:
    ids = [store.start_run(SOURCE) for _ in range(4)]
    assert [r.id for r in store.runs(limit=2)] == ids[::-1][:2]


def test_finishing_an_unknown_run_is_a_store_error(store: SqlStore) -> None:
    with pytest.raises(StoreError):
        store.finish_run(999, status="ok", counts=RunCounts(), qido_queries=[])


def test_the_endpoint_fingerprint_is_remembered(store: SqlStore) -> None:
    assert store.published_endpoint(SOURCE) is None
    store.record_endpoint(SOURCE, fingerprint="f1", fhir_id="e1", fhir_version="1")
    store.record_endpoint(SOURCE, fingerprint="f2", fhir_id="e1", fhir_version="2")
    assert store.published_endpoint(SOURCE) == ("f2", "e1")


def test_the_state_survives_reopening(db: Path) -> None:
    first = SqlStore(f"sqlite:///{db}")
    publish(first, "1.2.3")
    first.close()
    again = SqlStore(f"sqlite:///{db}")
    try:
        assert "1.2.3" in again.known_studies(SOURCE, ["1.2.3"])
    finally:
        again.close()


def test_a_store_newer_than_the_bridge_is_refused(db: Path) -> None:
    SqlStore(f"sqlite:///{db}").close()
    with sqlite3.connect(db) as conn:
        tables = {row[0] for row in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
        conn.execute("UPDATE schema_info SET version = ?", (SCHEMA_VERSION + 1,))
        if "alembic_version" in tables:  # a migrated store records its revision there
            conn.execute("UPDATE alembic_version SET version_num = 'ffff_from_the_future'")
    with pytest.raises(StoreError, match="newer|unknown|upgrade"):
        SqlStore(f"sqlite:///{db}")


def test_a_store_that_cannot_be_opened_is_a_store_error(tmp_path: Path) -> None:
    with pytest.raises(StoreError):
        SqlStore(f"sqlite:///{tmp_path}/no/such/folder/state.db")


def test_a_study_gone_from_the_archive_counts_apart_and_comes_back(store: SqlStore) -> None:
    store.record_published_many(SOURCE, [Published("1.2.3", "q", "r", "i", "1")])
    store.record_gone(SOURCE, "1.2.3", fhir_version="2", removed=False)
    assert store.counts(SOURCE) == {"published": 0, "gone": 1, "parked": 0, "withdrawn": 0}
    assert store.published_count(SOURCE) == 0
    # Its fingerprints no longer match anything, so a return to the archive republishes it.
    assert store.known_studies(SOURCE, ["1.2.3"])["1.2.3"].qido_fingerprint != "q"
    store.record_published_many(SOURCE, [Published("1.2.3", "q", "r", "i", "3")])
    assert store.counts(SOURCE) == {"published": 1, "gone": 0, "parked": 0, "withdrawn": 0}
