"""The store's browser sessions on PostgreSQL: the SQLite tests, run again on a real server."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from bridge.state.store import SqlStore
from tests.stack.postgres import temporary_database
from tests.unit.state.test_browser_sessions import (  # noqa: F401 - collected here with store below
    test_a_login_is_taken_once,
    test_an_entry_is_read_until_it_expires_and_only_as_its_kind,
    test_ending_and_purging,
    test_the_cap_counts_live_entries_of_the_kind,
)

pytestmark = pytest.mark.integration


@pytest.fixture
def store(postgres_server: str) -> Iterator[SqlStore]:
    """A store in an empty PostgreSQL database, dropped after the test."""
    with temporary_database(postgres_server) as url:
        opened = SqlStore(url)
        yield opened
        opened.close()
