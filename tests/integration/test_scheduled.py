"""Scheduled, incremental sync against the real servers: changes, deletes, crashes, change feed."""

from __future__ import annotations

import asyncio
import itertools
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable
from datetime import date
from pathlib import Path
from typing import Any

import httpx
import pytest
from pydicom.uid import generate_uid

from bridge.runtime import Runtime, open_runtime
from bridge.state.store import SqlStore
from tests.integration.conftest import DEFAULT_PATIENT_SYSTEM, Stack
from tests.stack.fhir import FhirTestServer
from tests.stack.hostile import HostileArchive
from tests.stack.orthanc import OrthancServer
from tests.stack.process import free_loopback_port
from tests.stack.samples import SeriesSpec, StudySpec, build_study, stow

pytestmark = pytest.mark.integration

TODAY = f"{date.today():%Y%m%d}"


def _with_runtime(stack: Stack, action: Callable[[Runtime], Awaitable[Any]], **overrides: str) -> Any:
    settings = stack.settings(**overrides)

    async def run() -> Any:
        async with open_runtime(settings) as runtime:
            return await action(runtime)

    return asyncio.run(run())


def _cycle(stack: Stack, kind: str, **overrides: str) -> int:
    """One scheduler cycle (incremental or reconcile); returns the run id it made."""

    async def action(runtime: Runtime) -> int:
        scheduler = runtime.scheduler()
        await getattr(scheduler, kind)()
        return runtime.store.runs(1)[0].id

    return int(_with_runtime(stack, action, **overrides))


def _run(stack: Stack, run_id: int) -> Any:
    store = SqlStore(f"sqlite:///{stack.state_path}")
    try:
        return next(r for r in store.runs(1000) if r.id == run_id)
    finally:
        store.close()


def _studies(stack: Stack) -> dict[str, dict[str, Any]]:
    out: dict[str, dict[str, Any]] = {}
    for study in stack.fhir_search("ImagingStudy"):
        uid = study["identifier"][0]["value"].removeprefix("urn:oid:")
        assert uid not in out, f"two ImagingStudies for {uid}"
        out[uid] = study
    return out


def _store(stack: Stack, spec: StudySpec) -> StudySpec:
    stow(stack.orthanc.dicomweb_url, build_study(spec))
    return spec


@pytest.mark.interop
def test_changes_in_the_archive_are_reflected_after_the_next_cycle(stack: Stack) -> None:
    old = _store(
        stack, StudySpec(patient_id="C1", issuer="HOSP-A", study_date="20200105", description="Old CT")
    )
    doomed = _store(stack, StudySpec(patient_id="C2", issuer="HOSP-A", study_date="20210105"))
    renamed = _store(
        stack, StudySpec(patient_id="C3", issuer="HOSP-A", study_date="20220105", description="Before")
    )
    for i in range(3):  # enough untouched studies that one delete stays under the safety fraction
        _store(stack, StudySpec(patient_id=f"K{i}", issuer="HOSP-A", study_date="20190101"))
    first = _run(stack, _cycle(stack, "reconcile"))
    assert (first.created, first.parked) == (6, 0)

    # A new study today is found by the incremental cycle (the QIDO window), not needing a sweep.
    new = _store(stack, StudySpec(patient_id="C4", issuer="HOSP-A", study_date=TODAY))
    incremental = _run(stack, _cycle(stack, "incremental"))
    assert (incremental.created, incremental.seen) == (1, 1)
    assert new.uid in _studies(stack)

    # A series added to an old study, a deleted study, a changed description: the next sweep.
    _store(
        stack,
        StudySpec(
            **{**old.__dict__, "series": [SeriesSpec("SR", instances=1, number=7, uid=generate_uid())]}
        ),
    )
    stack.orthanc.delete_study(doomed.uid)
    _store(stack, StudySpec(**{**renamed.__dict__, "description": "After"}))
    sweep = _run(stack, _cycle(stack, "reconcile"))

    assert (sweep.updated, sweep.deleted) == (2, 1)
    assert sweep.deletions == [{"study_uid": doomed.uid, "action": "marked"}]
    studies = _studies(stack)
    assert studies[old.uid]["numberOfSeries"] == 2
    assert {c["code"] for c in studies[old.uid]["modality"]} == {"CT"}  # acquisition modalities only
    assert {s["modality"]["code"] for s in studies[old.uid]["series"]} == {"CT", "SR"}
    assert studies[renamed.uid]["description"] == "After"
    assert studies[doomed.uid]["status"] == "entered-in-error"
    assert studies[new.uid]["status"] == "available"


@pytest.mark.interop
def test_delete_policy_delete_removes_only_what_the_bridge_wrote(stack: Stack) -> None:
    specs = [_store(stack, StudySpec(patient_id=f"D{i}", issuer="HOSP-A")) for i in range(5)]
    _cycle(stack, "reconcile", delete_policy="delete")
    stack.orthanc.delete_study(specs[0].uid)

    sweep = _run(stack, _cycle(stack, "reconcile", delete_policy="delete"))

    assert sweep.deletions == [{"study_uid": specs[0].uid, "action": "deleted"}]
    assert set(_studies(stack)) == {s.uid for s in specs[1:]}


def test_a_sweep_that_finds_too_many_studies_gone_applies_no_delete(stack: Stack) -> None:
    specs = [_store(stack, StudySpec(patient_id=f"M{i}", issuer="HOSP-A")) for i in range(4)]
    _cycle(stack, "reconcile")
    for spec in specs[:3]:
        stack.orthanc.delete_study(spec.uid)

    sweep = _run(stack, _cycle(stack, "reconcile"))

    assert sweep.deleted == 0 and "BRIDGE_DELETE_MAX_FRACTION" in (sweep.error or "")
    assert all(s["status"] == "available" for s in _studies(stack).values())


@pytest.mark.interop
def test_a_cycle_with_no_change_writes_nothing_and_queries_only_pages(stack: Stack) -> None:
    n, page = 25, 10
    for i in range(n):
        _store(
            stack,
            StudySpec(
                patient_id=f"N{i}", issuer="HOSP-A", study_date=TODAY, series=[SeriesSpec(instances=1)]
            ),
        )
    _cycle(stack, "incremental", qido_page_size=str(page))
    stack.fhir.reset_stats()

    quiet = _run(stack, _cycle(stack, "incremental", qido_page_size=str(page)))

    assert quiet.unchanged == n and quiet.fhir_writes == 0
    assert stack.fhir.stats()["requests"] == 0
    assert len(quiet.qido_queries) == -(-n // page)  # study pages only: no series query
    assert all(q.startswith("/studies?") and "StudyDate=" in q for q in quiet.qido_queries)


def test_orthanc_change_feed_picks_up_a_new_study_without_a_full_poll(stack: Stack) -> None:
    for i in range(5):
        _store(stack, StudySpec(patient_id=f"F{i}", issuer="HOSP-A"))
    feed = {"change_source": "orthanc", "orthanc_url": stack.orthanc.base_url}
    _cycle(stack, "reconcile", **feed)
    assert _wait_for(lambda: _all_stable(stack), 30)
    _cycle(stack, "incremental", **feed)  # starts the feed's checkpoint at its current end

    new = _store(stack, StudySpec(patient_id="F-new", issuer="HOSP-A", study_date="20150101"))
    deadline = time.monotonic() + 30
    while True:  # Orthanc reports StableStudy once the study has been quiet for StableAge
        run = _run(stack, _cycle(stack, "incremental", **feed))
        if run.created or time.monotonic() > deadline:
            break
        time.sleep(0.5)

    assert run.created == 1 and run.seen == 1
    # Only the new study was queried: by its UID, then its series; no enumeration of the archive.
    assert run.qido_queries and all(new.uid in q for q in run.qido_queries)
    assert new.uid in _studies(stack)
    store = SqlStore(f"sqlite:///{stack.state_path}")
    try:
        # The checkpoint names the change it stopped at: its number, date and Orthanc id.
        checkpoint = (store.checkpoint("test-orthanc", "orthanc-changes") or "0").split()
        assert int(checkpoint[0]) > 0 and len(checkpoint) == 3
        # The new study's lag, from Orthanc's StableStudy timestamp to the write, was measured.
        lag = json.loads(store.checkpoint("test-orthanc", "lag-feed") or "{}")
        assert lag["studies"] == 1 and 0 <= lag["seconds"] < 60
    finally:
        store.close()


def test_a_replaced_orthanc_database_makes_the_feed_sweep_the_archive(stack: Stack, tmp_path: Path) -> None:
    port = free_loopback_port()

    def archive(folder: str) -> OrthancServer:
        (tmp_path / folder).mkdir()
        return OrthancServer(name=f"bridge-{folder}", http_port=port, storage_dir=tmp_path / folder)

    feed = {
        "change_source": "orthanc",
        "orthanc_url": f"http://127.0.0.1:{port}",
        "dicomweb_url": f"http://127.0.0.1:{port}/dicom-web",
    }
    with archive("first") as first:
        for i in range(3):
            stow(first.dicomweb_url, build_study(StudySpec(patient_id=f"G{i}", issuer="HOSP-A")))
        assert _run(stack, _cycle(stack, "reconcile", **feed)).created == 3
        _cycle(stack, "incremental", **feed)  # the checkpoint: the first database's last change
    # Orthanc comes back on a fresh storage: its feed starts again from 1, under the checkpoint.
    with archive("second") as second:
        late = StudySpec(patient_id="G-late", issuer="HOSP-A", study_date="20150101")
        stow(second.dicomweb_url, build_study(late))
        run = _run(stack, _cycle(stack, "incremental", **feed))
        assert run.kind == "feed-gap"
        assert run.note is not None and "below the checkpoint" in run.note
        assert run.created == 1  # the study the feed could not tell of
        assert late.uid in _studies(stack)
        after = _run(stack, _cycle(stack, "incremental", **feed))
        assert after.kind == "changes"  # the new feed is followed from its end: no second sweep


def test_on_demand_sync_of_one_study_and_of_a_deleted_one(stack: Stack) -> None:
    a = _store(stack, StudySpec(patient_id="O1", issuer="HOSP-A"))
    b = _store(stack, StudySpec(patient_id="O2", issuer="HOSP-A"))

    result = stack.cli("sync", "--study", a.uid, "--json")

    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["created"] == 1
    assert set(_studies(stack)) == {a.uid}

    stack.orthanc.delete_study(a.uid)
    result = stack.cli("sync", "--study", a.uid, "--json")
    summary = json.loads(result.stdout)
    assert summary["deletions"] == [{"study_uid": a.uid, "action": "marked"}]
    assert _studies(stack)[a.uid]["status"] == "entered-in-error"
    assert b.uid not in _studies(stack)

    bad = stack.cli("sync", "--study", "1.2.abc")
    assert bad.returncode == 2 and "not a valid DICOM UID" in bad.stderr


def test_on_demand_sync_of_a_study_in_no_archive_says_so_and_exits_1(stack: Stack) -> None:
    here = _store(stack, StudySpec(patient_id="O3", issuer="HOSP-A"))
    absent = "1.2.826.0.1.3680043.10.999.1"

    result = stack.cli("sync", "--study", absent, "--study", here.uid)

    assert result.returncode == 1, result.stderr
    message = " ".join(result.stderr.split())
    assert f"not found: study {absent} is in no archive of test-orthanc" in message
    assert f"study {here.uid} is in no archive" not in message  # the one the archive holds is synced
    assert set(_studies(stack)) == {here.uid}


def test_backfill_slices_by_date_and_resumes(stack: Stack) -> None:
    days = ["20230101", "20230102", "20230103", "20230105"]
    specs = [
        _store(stack, StudySpec(patient_id=f"B{i}", issuer="HOSP-A", study_date=d))
        for i, d in enumerate(days)
    ]
    outside = _store(stack, StudySpec(patient_id="B-out", issuer="HOSP-A", study_date="20230201"))
    store = SqlStore(f"sqlite:///{stack.state_path}")
    try:  # as if an earlier backfill was interrupted after its slice ending 2023-01-02
        store.save_checkpoint("test-orthanc", "backfill:20230101-20230105", "20230102")
    finally:
        store.close()

    result = stack.cli("backfill", "--from", "2023-01-01", "--to", "2023-01-05", "--slice-days", "2")

    assert result.returncode == 0, result.stderr
    assert "resuming after 20230102" in result.stdout
    assert set(_studies(stack)) == {specs[2].uid, specs[3].uid}
    assert outside.uid not in _studies(stack)
    again = stack.cli("backfill", "--from", "2023-01-01", "--to", "2023-01-05")
    assert "resuming after 20230105" in again.stdout


def _all_stable(stack: Stack) -> bool:
    studies = httpx.get(f"{stack.orthanc.base_url}/studies", params={"expand": ""}, timeout=30).json()
    return all(s["IsStable"] for s in studies)


def _worker(stack: Stack, **overrides: str) -> subprocess.Popen[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("BRIDGE_")}
    env.update(stack.settings_env(**overrides))
    log = stack.state_path.with_suffix(f".worker-{time.monotonic_ns()}.log")
    with log.open("w") as handle:  # the child keeps its own copy of the descriptor
        process = subprocess.Popen(
            [sys.executable, "-m", "bridge", "worker"],
            env=env,
            stdout=handle,
            stderr=subprocess.STDOUT,
            text=True,
        )
    process.log = log  # type: ignore[attr-defined]
    return process


def _wait_for(predicate: Callable[[], bool], timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.2)
    return False


def _count(stack: Stack) -> int:
    response = httpx.get(
        f"{stack.fhir.base_url}/ImagingStudy",
        params={"_summary": "count"},
        headers={"Cache-Control": "no-cache"},  # HAPI would repeat its first answer for a minute
        timeout=30,
    )
    return int(response.json()["total"])


def test_worker_killed_mid_cycle_ends_exactly_right_after_a_restart(stack: Stack) -> None:
    n = 150
    specs = [
        _store(stack, StudySpec(patient_id=f"K{i % 20}", issuer="HOSP-A", series=[SeriesSpec(instances=1)]))
        for i in range(n)
    ]
    # Small pages: a page's studies are written in one batch, so the kill lands between pages.
    settings = {
        "sync_concurrency": "2",
        "sync_interval": "3600",
        "reconcile_interval": "3600",
        "qido_page_size": "10",
    }

    worker = _worker(stack, **settings)
    try:
        assert _wait_for(lambda: _count(stack) >= 20, 60), "the worker published nothing"
        worker.send_signal(signal.SIGKILL)
        worker.wait(timeout=10)
    finally:
        if worker.poll() is None:
            worker.kill()
    assert _count(stack) < n, "the cycle finished before the kill; the test needs more studies"

    restarted = _worker(stack, **settings)
    try:
        assert _wait_for(lambda: _count(stack) >= n, 120), "the restarted worker did not finish"
        time.sleep(1)
    finally:
        restarted.send_signal(signal.SIGTERM)
        restarted.wait(timeout=60)

    studies = _studies(stack)  # asserts one ImagingStudy per UID
    assert set(studies) == {s.uid for s in specs}
    assert all(s["status"] == "available" for s in studies.values())
    assert len(stack.fhir_search("Endpoint")) == 1
    assert len(stack.fhir_search("Patient")) == 20


def test_sigterm_finishes_the_study_in_flight_and_exits_cleanly(stack: Stack) -> None:
    for i in range(60):
        _store(stack, StudySpec(patient_id=f"T{i}", issuer="HOSP-A", series=[SeriesSpec(instances=1)]))
    worker = _worker(stack, sync_concurrency="1", sync_interval="3600", reconcile_interval="3600")
    assert _wait_for(lambda: _count(stack) >= 5, 60)

    worker.send_signal(signal.SIGTERM)
    worker.wait(timeout=60)
    output = worker.log.read_text()  # type: ignore[attr-defined]

    assert worker.returncode == 0, output
    assert "Traceback" not in output, output[output.index("Traceback") - 300 :]
    store = SqlStore(f"sqlite:///{stack.state_path}")
    try:
        last = store.runs(1)[0]
        published = store.counts("test-orthanc")["published"]
    finally:
        store.close()
    assert last.status in ("stopped", "ok")
    assert published == _count(stack)  # nothing published that the store does not know


INTERVAL = 3.0  # BRIDGE_SYNC_INTERVAL in the test below
DRIP_DEADLINE = 1.5  # BRIDGE_HTTP_DEADLINE: well inside one interval


def test_a_dripping_archive_fails_each_cycle_at_its_deadline_and_the_next_starts_on_time(
    fhir_server: FhirTestServer, tmp_path: Path
) -> None:
    # The real `bridge worker` (APScheduler) against an archive whose study page drips one byte
    # every 0.2 s forever: without a deadline on the whole answer the first cycle never ends, and
    # with it every later one (max_instances=1) is skipped.
    fhir_server.clear()
    state = tmp_path / "state.db"
    with HostileArchive(drip=0.2) as archive:
        env = {k: v for k, v in os.environ.items() if not k.startswith("BRIDGE_")}
        env.update(
            {
                "BRIDGE_DICOMWEB_URL": archive.base_url("drip-studies"),
                "BRIDGE_FHIR_URL": fhir_server.base_url,
                "BRIDGE_STATE_URL": f"sqlite:///{state}",
                "BRIDGE_SOURCE_NAME": "dripping",
                "BRIDGE_PATIENT_IDENTIFIER_SYSTEM": DEFAULT_PATIENT_SYSTEM,
                "BRIDGE_SYNC_INTERVAL": str(INTERVAL),
                "BRIDGE_RECONCILE_INTERVAL": "3600",  # one sweep at start-up, then incremental cycles
                "BRIDGE_HTTP_DEADLINE": str(DRIP_DEADLINE),
                "BRIDGE_HTTP_TIMEOUT": "1",
                "BRIDGE_HTTP_RETRIES": "0",
            }
        )
        log = tmp_path / "worker.log"
        with log.open("w") as handle:
            worker = subprocess.Popen(
                [sys.executable, "-m", "bridge", "worker"], env=env, stdout=handle, stderr=subprocess.STDOUT
            )
        try:
            # The store is read only once the worker has made it (a store mid-migration is refused).
            assert _wait_for(lambda: "scheduler started" in log.read_text(), 30), log.read_text()[-3000:]
            assert _wait_for(lambda: len(_finished(state, "incremental")) >= 5, 45), log.read_text()[-3000:]
        finally:
            worker.send_signal(signal.SIGTERM)
            worker.wait(timeout=30)
    output = log.read_text()

    assert worker.returncode == 0, output[-3000:]
    assert "Traceback" not in output, output[output.index("Traceback") - 300 :]
    runs = _finished(state, "incremental")
    sweeps = _finished(state, "reconcile")
    assert len(sweeps) == 1
    for run in [*sweeps, *runs]:
        assert run.status == "failed"
        assert "BRIDGE_HTTP_DEADLINE" in (run.error or "") and "dicomweb" in (run.error or "")
        seconds = (run.finished_at - run.started_at).total_seconds()
        assert seconds < DRIP_DEADLINE + 1.0, f"a run took {seconds:.1f} s"
    starts = [run.started_at for run in runs]
    gaps = [(b - a).total_seconds() for a, b in itertools.pairwise(starts)]
    print(f"\nincremental cycles {len(runs)}, started {', '.join(f'{g:.2f}' for g in gaps)} s apart")
    # The first cycle waited for the start-up sweep (the two never overlap); every later one
    # started at its scheduled time, one interval after the one before.
    assert all(abs(gap - INTERVAL) < 0.5 for gap in gaps[1:]), gaps
    # each failure is one line naming the archive's URL (no query string) and the setting
    failure = f"incremental cycle failed: dicomweb GET {archive.base_url('drip-studies')}/studies:"
    assert output.count(failure) >= 5


def _finished(state: Path, kind: str) -> list[Any]:
    if not state.exists():
        return []
    store = SqlStore(f"sqlite:///{state}")
    try:
        runs = [r for r in store.runs(100) if r.kind == kind and r.finished_at is not None]
    finally:
        store.close()
    return sorted(runs, key=lambda r: r.started_at)
