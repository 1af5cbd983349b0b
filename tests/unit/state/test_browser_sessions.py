"""The store's browser sessions: live entries only, a login's state taken once, a cap on logins under way."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from bridge.state.store import SqlStore


@pytest.fixture
def store(tmp_path: Path) -> Iterator[SqlStore]:
    opened = SqlStore(f"sqlite:///{tmp_path / 'state.db'}")
    yield opened
    opened.close()


def test_an_entry_is_read_until_it_expires_and_only_as_its_kind(store: SqlStore) -> None:
    assert store.put_browser_session("k1", "session", {"subject": "u"}, 100.0, now=0.0)
    assert store.browser_session("k1", "session", 99.0) == {"subject": "u"}
    assert store.browser_session("k1", "login", 99.0) is None
    assert store.browser_session("k1", "session", 100.0) is None
    assert store.browser_session("unknown", "session", 0.0) is None


def test_a_login_is_taken_once(store: SqlStore) -> None:
    store.put_browser_session("s1", "login", {"nonce": "n"}, 100.0, now=0.0)
    assert store.take_browser_session("s1", "login", 1.0) == {"nonce": "n"}
    assert store.take_browser_session("s1", "login", 1.0) is None
    store.put_browser_session("s2", "login", {"nonce": "n"}, 100.0, now=0.0)
    assert store.take_browser_session("s2", "login", 100.0) is None  # expired: gone, and not given


def test_ending_and_purging(store: SqlStore) -> None:
    store.put_browser_session("a", "session", {}, 10.0, now=0.0)
    store.put_browser_session("b", "session", {}, 50.0, now=0.0)
    store.end_browser_session("b")
    assert store.browser_session("b", "session", 1.0) is None
    assert store.purge_browser_sessions(20.0) == 1
    assert store.browser_session("a", "session", 1.0) is None


def test_the_cap_counts_live_entries_of_the_kind(store: SqlStore) -> None:
    assert store.put_browser_session("l1", "login", {}, 10.0, now=0.0, limit=2)
    assert store.put_browser_session("l2", "login", {}, 10.0, now=0.0, limit=2)
    assert store.put_browser_session("s1", "session", {}, 10.0, now=0.0, limit=2)  # another kind
    assert not store.put_browser_session("l3", "login", {}, 10.0, now=0.0, limit=2)
    assert store.put_browser_session("l3", "login", {}, 30.0, now=20.0, limit=2)  # the others expired
