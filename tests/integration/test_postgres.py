"""The state store on PostgreSQL: study claims between replicas, and replicas migrating at once."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import pytest
from sqlalchemy import create_engine, text

from bridge.state.migrate import current_revision, head_revision
from bridge.state.records import Published
from bridge.state.store import SqlStore
from tests.stack.postgres import temporary_database


@pytest.fixture
def pg_url(postgres_server: str) -> Iterator[str]:
    with temporary_database(postgres_server) as url:
        yield url


@pytest.fixture
def two_stores(pg_url: str) -> Iterator[tuple[SqlStore, SqlStore]]:
    a, b = SqlStore(pg_url), SqlStore(pg_url)
    try:
        yield a, b
    finally:
        a.close()
        b.close()


def test_a_claimed_study_is_refused_to_other_replicas_until_released(
    two_stores: tuple[SqlStore, SqlStore],
) -> None:
    a, b = two_stores
    assert a.claim_study("pacs", "1.2.3")
    assert not b.claim_study("pacs", "1.2.3")
    # Another task of the same process is refused too (PostgreSQL's own locks are re-entrant).
    assert not a.claim_study("pacs", "1.2.3")
    assert b.claim_study("pacs", "1.2.4")
    assert b.claim_study("other-pacs", "1.2.3"), "claims are per source"
    a.release_study("pacs", "1.2.3")
    assert b.claim_study("pacs", "1.2.3")
    assert not a.claim_study("pacs", "1.2.3")


def test_closing_a_store_releases_its_claims(pg_url: str) -> None:
    a, b = SqlStore(pg_url), SqlStore(pg_url)
    try:
        assert a.claim_study("pacs", "1.2.3")
        a.close()
        assert b.claim_study("pacs", "1.2.3")
    finally:
        b.close()


def test_claims_hold_no_transaction_open(two_stores: tuple[SqlStore, SqlStore], pg_url: str) -> None:
    a, _ = two_stores
    assert a.claim_study("pacs", "1.2.3")
    engine = create_engine(pg_url)
    try:
        with engine.connect() as connection:
            idle = connection.execute(
                text(
                    "SELECT count(*) FROM pg_stat_activity "
                    "WHERE datname = current_database() AND state = 'idle in transaction'"
                )
            ).scalar_one()
            locks = connection.execute(
                text("SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND granted")
            ).scalar_one()
    finally:
        engine.dispose()
    assert idle == 0
    assert locks >= 1


_HOLDER = """
import sys, time
from bridge.state.store import SqlStore
store = SqlStore(sys.argv[1])
assert store.claim_study("pacs", "1.2.3")
print("claimed", flush=True)
time.sleep(120)
"""


def test_a_killed_replica_leaves_its_study_to_the_others(pg_url: str) -> None:
    holder = subprocess.Popen(
        [sys.executable, "-c", _HOLDER, pg_url], stdout=subprocess.PIPE, text=True, env=dict(os.environ)
    )
    store = SqlStore(pg_url)
    try:
        assert holder.stdout is not None
        assert holder.stdout.readline().strip() == "claimed"
        assert not store.claim_study("pacs", "1.2.3")
        holder.send_signal(signal.SIGKILL)
        holder.wait(10)
        deadline = time.monotonic() + 10
        while not store.claim_study("pacs", "1.2.3"):
            assert time.monotonic() < deadline, "the dead replica's claim was never freed"
            time.sleep(0.05)
    finally:
        if holder.poll() is None:
            holder.kill()
            holder.wait(10)
        if holder.stdout is not None:
            holder.stdout.close()
        store.close()


def test_replicas_starting_together_migrate_once(pg_url: str) -> None:
    def open_and_close(_: int) -> None:
        SqlStore(pg_url).close()

    with ThreadPoolExecutor(4) as pool:
        list(pool.map(open_and_close, range(4)))
    engine = create_engine(pg_url)
    try:
        with engine.connect() as connection:
            assert current_revision(connection) == head_revision()
            assert connection.execute(text("SELECT count(*) FROM schema_info")).scalar_one() == 1
    finally:
        engine.dispose()


def test_the_store_round_trips_state_on_postgresql(pg_url: str) -> None:
    store = SqlStore(pg_url)
    try:
        store.record_published_many("pacs", [Published("1.2.3", "q", "r", "s1", "2")])
        store.park("pacs", "1.2.4", kind="mapping", reason="StudyDate is not a date", attribute="StudyDate")
        store.park("pacs", "1.2.4", kind="mapping", reason="StudyDate is not a date", attribute="StudyDate")
        assert store.known_studies("pacs", ["1.2.3", "9.9"])["1.2.3"].fhir_version == "2"
        assert [p.attempts for p in store.parked("pacs")] == [2]
        assert store.counts("pacs") == {"published": 1, "gone": 0, "parked": 1, "withdrawn": 0}
    finally:
        store.close()
