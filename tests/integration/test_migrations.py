"""The state store's migrations on PostgreSQL: the SQLite schema tests, run again on a real server."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.stack.postgres import temporary_database
from tests.unit.state.test_store_schema import (  # noqa: F401 - collected here with db_url below
    test_a_gone_marker_survives_the_move_to_its_own_column_and_back,
    test_a_new_store_is_migrated_to_head_and_matches_the_models,
    test_a_store_created_without_migrations_is_adopted_with_its_state,
    test_a_store_migrated_by_a_newer_bridge_is_refused,
    test_downgrade_to_the_baseline_and_back_keeps_published_studies,
    test_opening_a_current_store_again_changes_nothing,
    test_opening_a_store_at_head_does_not_import_alembic,
    test_runs_recorded_before_0006_keep_their_rows_and_new_runs_record_how_series_were_asked,
    test_tables_of_an_unknown_schema_are_refused_not_stamped,
    test_the_baseline_revision_is_the_schema_bridge_0_1_created,
)


@pytest.fixture
def db_url(postgres_server: str) -> Iterator[str]:
    """An empty PostgreSQL database, dropped after the test."""
    with temporary_database(postgres_server) as url:
        yield url
