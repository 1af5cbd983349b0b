"""Several workers on one PostgreSQL store: they share the studies, publish each once, lose none.

Three ``bridge sync`` processes run at once over a few hundred studies (one small instance
each). Coordination is the store's study claims (PostgreSQL advisory locks, see
bridge/state/claims.py); the FHIR server's own counters tell what was written.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from sqlalchemy import create_engine, text

from bridge.state.store import SqlStore
from tests.integration.conftest import Stack
from tests.stack.postgres import temporary_database
from tests.stack.samples import SeriesSpec, StudySpec, build_study, stow

pytestmark = pytest.mark.integration

STUDIES = 360
WORKERS = 3
STOW_BATCH = 40


@pytest.fixture
def pg_url(postgres_server: str) -> Iterator[str]:
    with temporary_database(postgres_server) as url:
        yield url


def _load_archive(stack: Stack, count: int) -> list[str]:
    """Store ``count`` studies of one instance each, a distinct patient per study."""
    uids: list[str] = []
    batch: list[Any] = []
    with httpx.Client(timeout=120.0) as client:
        for n in range(count):
            spec = StudySpec(
                patient_id=f"R{n:05d}",
                issuer="HOSP-A",
                accession=f"ACC{n:05d}",
                description=f"Replica test study {n}",
                series=[SeriesSpec("CT", "one slice", "CHEST", instances=1)],
            )
            batch.extend(build_study(spec))
            assert spec.uid is not None
            uids.append(spec.uid)
            if len(batch) >= STOW_BATCH or n == count - 1:
                stow(stack.orthanc.dicomweb_url, batch, client=client)
                batch = []
    return uids


def _worker_env(stack: Stack, pg_url: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("BRIDGE_")}
    # Small pages: studies are recorded once per page, and the kill below must land mid-run.
    env.update(
        stack.settings_env(
            state_url=pg_url, patient_policy="logical", log_level="WARNING", qido_page_size="20"
        )
    )
    return env


def _start_worker(env: dict[str, str], log: Path) -> subprocess.Popen[str]:
    with log.open("w") as stderr:  # the child keeps its own copy of the descriptor
        return subprocess.Popen(
            [sys.executable, "-m", "bridge", "sync", "--json"],
            env=env,
            stdout=subprocess.PIPE,
            stderr=stderr,
            text=True,
        )


def _finish(worker: subprocess.Popen[str], timeout: float = 300) -> dict[str, Any]:
    stdout, _ = worker.communicate(timeout=timeout)
    assert worker.returncode == 0, f"worker exited {worker.returncode}: {stdout[-2000:]}"
    summary: dict[str, Any] = json.loads(stdout)
    return summary


def _published_uids(stack: Stack) -> Counter[str]:
    studies = stack.fhir_search("ImagingStudy", _count="2000")
    uids: Counter[str] = Counter()
    for study in studies:
        for identifier in study.get("identifier", []):
            if identifier.get("system") == "urn:dicom:uid":
                uids[identifier["value"].removeprefix("urn:oid:")] += 1
    return uids


def _store_rows(pg_url: str, sql: str) -> list[Any]:
    engine = create_engine(pg_url)
    try:
        with engine.connect() as connection:
            return list(connection.execute(text(sql)).all())
    finally:
        engine.dispose()


def _kill_all(workers: list[subprocess.Popen[str]]) -> None:
    for worker in workers:
        if worker.poll() is None:
            worker.kill()
        worker.communicate(timeout=30)  # also closes its stdout pipe


def test_three_workers_publish_every_study_exactly_once(stack: Stack, pg_url: str, tmp_path: Path) -> None:
    uids = _load_archive(stack, STUDIES)
    stack.fhir.reset_stats()
    env = _worker_env(stack, pg_url)
    started = time.perf_counter()
    workers = [_start_worker(env, tmp_path / f"worker-{i}.log") for i in range(WORKERS)]
    try:
        summaries = [_finish(w) for w in workers]
    finally:
        _kill_all(workers)
    seconds = time.perf_counter() - started

    published = _published_uids(stack)
    assert set(published) == set(uids)
    assert max(published.values()) == 1, "an ImagingStudy was created twice"
    stats = stack.fhir.stats()
    # One create per study plus the source's Endpoint; the only updates are Endpoint PUTs of
    # workers that raced for it before any had recorded it (at most one per other worker).
    assert stats["writes_by_kind"]["create"] == STUDIES + 1
    assert stats["writes_by_kind"]["update"] <= WORKERS - 1
    assert sum(s["created"] for s in summaries) == STUDIES
    assert sum(s["parked"] for s in summaries) == 0
    for s in summaries:
        assert s["seen"] == STUDIES
        # Every study a worker saw it created, found done, or left to the replica holding it.
        assert s["created"] + s["unchanged"] + s["claimed"] == STUDIES
    runs = _store_rows(pg_url, "SELECT worker, status, created, claimed FROM runs")
    assert len({r.worker for r in runs}) == WORKERS
    assert {r.status for r in runs} == {"ok"}
    assert _store_rows(pg_url, "SELECT count(*) FROM studies")[0][0] == STUDIES
    print(
        f"\n{WORKERS} workers, {STUDIES} studies in {seconds:.1f} s; created per worker "
        f"{[s['created'] for s in summaries]}, claimed-by-another per worker "
        f"{[s['claimed'] for s in summaries]}, FHIR writes {stats['writes']}"
    )


def test_a_worker_killed_mid_run_loses_nothing(stack: Stack, pg_url: str, tmp_path: Path) -> None:
    uids = _load_archive(stack, STUDIES)
    stack.fhir.reset_stats()
    env = _worker_env(stack, pg_url)
    SqlStore(pg_url).close()  # migrated up front, so the polling below finds the tables
    workers = [_start_worker(env, tmp_path / f"worker-{i}.log") for i in range(WORKERS)]
    victim = workers[0]
    try:
        # Kill the first worker once every worker has a run open and some studies are published
        # (counted on the FHIR server: the store records them a page at a time).
        deadline = time.monotonic() + 120
        while True:
            assert time.monotonic() < deadline, "the workers never got going"
            assert victim.poll() is None, "the worker to kill finished before it could be killed"
            running = _store_rows(pg_url, "SELECT count(*) FROM runs WHERE status = 'running'")
            if running[0][0] == WORKERS and stack.fhir.stats()["writes"] >= STUDIES // 5:
                break
            time.sleep(0.02)
        victim.send_signal(signal.SIGKILL)
        victim.communicate(timeout=30)
        survivors = [_finish(w) for w in workers[1:]]
    finally:
        _kill_all(workers)
    killed_at = _store_rows(pg_url, "SELECT count(*) FROM studies")[0][0]
    assert _store_rows(pg_url, "SELECT count(*) FROM runs WHERE status = 'running'")[0][0] == 1

    # The rerun an operator (or the next scheduled cycle) makes.
    rerun = _finish(_start_worker(env, tmp_path / "rerun.log"))

    published = _published_uids(stack)
    assert set(published) == set(uids), f"{len(set(uids) - set(published))} studies lost"
    assert max(published.values()) == 1, "an ImagingStudy was created twice"
    assert _store_rows(pg_url, "SELECT count(*) FROM studies")[0][0] == STUDIES
    stats = stack.fhir.stats()
    assert stats["writes_by_kind"]["create"] == STUDIES + 1
    assert rerun["parked"] == 0
    assert rerun["created"] + rerun["updated"] + rerun["unchanged"] == STUDIES
    print(
        f"\nkilled 1 of {WORKERS} workers; {killed_at} of {STUDIES} studies recorded after the survivors "
        f"({[s['created'] for s in survivors]} created, "
        f"{[s['claimed'] for s in survivors]} left to a claim); "
        f"rerun created {rerun['created']}, updated {rerun['updated']}; FHIR writes {stats['writes']}"
    )
