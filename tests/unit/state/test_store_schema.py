"""The state store's schema: migrations to head, adoption of pre-Alembic stores, refusal of newer ones.

The same tests run on PostgreSQL from tests/integration/test_migrations.py, which overrides ``db_url``.
"""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from alembic import command
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from sqlalchemy import create_engine, inspect, text

from bridge.errors import StoreError
from bridge.state.claims import claim_key
from bridge.state.migrate import BASELINE, HEAD, alembic_config, current_revision, head_revision
from bridge.state.models import SCHEMA_VERSION, Base
from bridge.state.records import Published, RunCounts
from bridge.state.store import SqlStore
from tests.unit.state import legacy_schema as legacy


@pytest.fixture
def db_url(tmp_path: Path) -> Iterator[str]:
    """An empty database (a SQLite file here; PostgreSQL in the integration variant)."""
    yield f"sqlite:///{tmp_path / 'state.db'}"


def _revision_and_version(url: str) -> tuple[str | None, int]:
    engine = create_engine(url)
    try:
        with engine.connect() as connection:
            version = connection.execute(text("SELECT version FROM schema_info")).scalar_one()
            return current_revision(connection), int(version)
    finally:
        engine.dispose()


def _schema_differences(url: str, metadata: object) -> list[object]:
    engine = create_engine(url)
    try:
        with engine.connect() as connection:
            diffs: list[object] = compare_metadata(MigrationContext.configure(connection), metadata)  # type: ignore[arg-type]
            return diffs
    finally:
        engine.dispose()


def test_a_new_store_is_migrated_to_head_and_matches_the_models(db_url: str) -> None:
    SqlStore(db_url).close()
    assert _revision_and_version(db_url) == (head_revision(), SCHEMA_VERSION)
    # Fails when a model changes without a migration: add a revision under bridge/state/migrations.
    assert _schema_differences(db_url, Base.metadata) == []


def test_the_baseline_revision_is_the_schema_bridge_0_1_created(db_url: str) -> None:
    engine = create_engine(db_url)
    try:
        with engine.begin() as connection:
            command.upgrade(alembic_config(connection), BASELINE)
    finally:
        engine.dispose()
    assert _schema_differences(db_url, legacy.metadata) == []


def test_a_store_created_without_migrations_is_adopted_with_its_state(db_url: str) -> None:
    engine = create_engine(db_url)
    legacy.create_legacy_store(engine)
    engine.dispose()

    store = SqlStore(db_url)
    try:
        known = store.known_studies(legacy.SOURCE, [legacy.STUDY_UID])
        assert known[legacy.STUDY_UID].fhir_id == "study-1"
        assert known[legacy.STUDY_UID].fhir_version == "3"
        (parked,) = store.parked(legacy.SOURCE)
        assert (parked.study_uid, parked.attribute, parked.attempts) == ("1.2.3.bad", "StudyDate", 2)
        assert (store.published_endpoint(legacy.SOURCE) or ("", ""))[0] == "e" * 64
        (run,) = store.runs()
        assert (run.status, run.created, run.parked, run.qido_queries) == (
            "parked",
            1,
            1,
            ["/studies?limit=100&offset=0"],
        )
        assert (run.deleted, run.claimed, run.deletions, run.worker) == (0, 0, [], None)
        # The new columns work on the adopted store.
        run_id = store.start_run(legacy.SOURCE)
        store.finish_run(run_id, status="ok", counts=RunCounts(seen=1, claimed=1), qido_queries=[])
        assert store.runs(1)[0].claimed == 1
        assert store.runs(1)[0].worker
    finally:
        store.close()
    assert _revision_and_version(db_url) == (head_revision(), SCHEMA_VERSION)
    assert _schema_differences(db_url, Base.metadata) == []


def test_opening_a_current_store_again_changes_nothing(db_url: str) -> None:
    store = SqlStore(db_url)
    run_id = store.start_run("pacs")
    store.close()
    store = SqlStore(db_url)
    try:
        assert [r.id for r in store.runs()] == [run_id]
    finally:
        store.close()
    assert _revision_and_version(db_url) == (head_revision(), SCHEMA_VERSION)


def test_a_store_migrated_by_a_newer_bridge_is_refused(db_url: str) -> None:
    SqlStore(db_url).close()
    engine = create_engine(db_url)
    with engine.begin() as connection:
        connection.execute(text("UPDATE alembic_version SET version_num = '9999'"))
    engine.dispose()
    with pytest.raises(StoreError, match="newer than this bridge"):
        SqlStore(db_url)


def test_tables_of_an_unknown_schema_are_refused_not_stamped(db_url: str) -> None:
    engine = create_engine(db_url)
    legacy.create_legacy_store(engine)
    with engine.begin() as connection:
        connection.execute(text("UPDATE schema_info SET version = 7"))
    engine.dispose()
    with pytest.raises(StoreError, match="schema_info version 7"):
        SqlStore(db_url)


def test_downgrade_to_the_baseline_and_back_keeps_published_studies(db_url: str) -> None:
    store = SqlStore(db_url)
    store.record_published_many("pacs", [Published("1.2.3", "q", "r", "s1", "1")])
    store.close()
    engine = create_engine(db_url)
    with engine.begin() as connection:
        command.downgrade(alembic_config(connection), BASELINE)
    engine.dispose()
    assert _revision_and_version(db_url) == (BASELINE, 1)
    store = SqlStore(db_url)
    try:
        assert store.known_studies("pacs", ["1.2.3"])["1.2.3"].fhir_id == "s1"
    finally:
        store.close()


def test_a_gone_marker_survives_the_move_to_its_own_column_and_back(db_url: str) -> None:
    store = SqlStore(db_url)
    store.record_published_many(
        "pacs", [Published("1.2.3", "q", "r", "s1", "1"), Published("1.2.4", "q", "r", "s2", "1")]
    )
    store.record_gone("pacs", "1.2.3", fhir_version="2", removed=False)
    store.close()
    engine = create_engine(db_url)
    with engine.begin() as connection:
        command.downgrade(alembic_config(connection), "0002")
        # Schema version 2 kept the marker in the fingerprint columns.
        marked = connection.execute(text("SELECT study_uid FROM studies WHERE qido_fingerprint = 'gone'"))
        assert [row[0] for row in marked] == ["1.2.3"]
    engine.dispose()
    store = SqlStore(db_url)  # upgrades to head again
    try:
        assert store.counts("pacs") == {"published": 1, "gone": 1, "parked": 0, "withdrawn": 0}
        assert store.published_count("pacs") == 1
    finally:
        store.close()


def test_runs_recorded_before_0006_keep_their_rows_and_new_runs_record_how_series_were_asked(
    db_url: str,
) -> None:
    engine = create_engine(db_url)
    with engine.begin() as connection:
        command.upgrade(alembic_config(connection), "0005")
    engine.dispose()
    engine = create_engine(db_url)
    with engine.begin() as connection:
        connection.execute(
            text(
                "INSERT INTO runs (source, kind, started_at, status, seen, created, updated, unchanged, "
                "parked, deleted, claimed, fhir_writes, qido_queries, deletions) VALUES "
                "('pacs', 'full', '2026-11-29 10:00:00', 'ok', 2, 2, 0, 0, 0, 0, 0, 3, '[]', '[]')"
            )
        )
    engine.dispose()
    store = SqlStore(db_url)  # upgrades to head
    try:
        (old,) = store.runs()
        assert (old.status, old.created, old.series_query) == ("ok", 2, None)
        run_id = store.start_run("pacs")
        store.finish_run(run_id, status="ok", counts=RunCounts(seen=1), qido_queries=[], series_query="list")
        assert [r.series_query for r in store.runs()] == ["list", None]
    finally:
        store.close()
    assert _revision_and_version(db_url) == (head_revision(), SCHEMA_VERSION)
    engine = create_engine(db_url)
    with engine.begin() as connection:
        command.downgrade(alembic_config(connection), "0005")
        columns = [c["name"] for c in inspect(connection).get_columns("runs")]
    engine.dispose()
    assert "series_query" not in columns and "qido_queries" in columns
    assert _revision_and_version(db_url) == ("0005", 5)


def test_the_head_the_store_checks_without_alembic_is_alembics_head() -> None:
    assert HEAD == head_revision()  # a new revision must move migrate.HEAD (and SCHEMA_VERSION)


def test_opening_a_store_at_head_does_not_import_alembic(db_url: str) -> None:
    SqlStore(db_url).close()  # migrated to head
    check = (
        "import sys; from bridge.state.store import SqlStore; "
        f"SqlStore({db_url!r}).close(); print('alembic' in sys.modules)"
    )
    done = subprocess.run([sys.executable, "-c", check], capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "False"


def test_claim_keys_are_stable_64_bit_and_distinct_per_source() -> None:
    key = claim_key("pacs", "1.2.3")
    assert key == claim_key("pacs", "1.2.3")
    assert -(2**63) <= key < 2**63
    assert key != claim_key("other", "1.2.3")
    assert key != claim_key("pacs", "1.2.4")
