"""Pushes (POST /studies/{uid}/sync with Prefer: respond-async) against the real servers.

A push is recorded in the state store before its 202, synced soon by the worker side of the same
process (``bridge run``) or of another, once per study however often it was pushed, after an
outage if one was under way, and by one replica only when several share a PostgreSQL store.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs

import pytest

from bridge.runtime import open_runtime, push_drainer
from bridge.state.store import SqlStore
from tests.integration.conftest import Stack
from tests.integration.test_resolver import running, settings_for
from tests.stack.faultproxy import Fault, FaultProxy
from tests.stack.hapi import HapiTestServer
from tests.stack.orthanc import OrthancServer
from tests.stack.postgres import temporary_database
from tests.stack.process import free_loopback_port
from tests.stack.samples import SeriesSpec, StudySpec, build_study, stow

pytestmark = [pytest.mark.integration, pytest.mark.anyio]
ASYNC = {"Prefer": "respond-async"}


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture
def pg_url(postgres_server: str) -> Iterator[str]:
    with temporary_database(postgres_server) as url:
        yield url


def _published(stack: Stack) -> dict[str, dict[str, Any]]:
    return {
        i["value"].removeprefix("urn:oid:"): s
        for s in stack.fhir_search("ImagingStudy")
        for i in s["identifier"]
        if i["system"] == "urn:dicom:uid"
    }


async def _until(predicate: Any, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if await asyncio.to_thread(predicate):
            return True
        await asyncio.sleep(0.2)
    return False


def _store(stack: Stack, n: int = 1, prefix: str = "P") -> list[str]:
    uids = []
    for i in range(n):
        spec = StudySpec(
            patient_id=f"{prefix}{i}", issuer="HOSP-A", series=[SeriesSpec("CT", "one", "CHEST", instances=1)]
        )
        stow(stack.orthanc.dicomweb_url, build_study(spec))
        assert spec.uid is not None
        uids.append(spec.uid)
    return uids


def _run_kinds(stack: Stack, url: str | None = None) -> list[str]:
    store = SqlStore(url or f"sqlite:///{stack.state_path}")
    try:
        return [r.kind for r in store.runs(1000)]
    finally:
        store.close()


def _push_runs(stack: Stack, url: str | None = None) -> list[Any]:
    store = SqlStore(url or f"sqlite:///{stack.state_path}")
    try:
        return [r for r in store.runs(1000) if r.kind == "push"]
    finally:
        store.close()


@pytest.mark.interop
async def test_a_pushed_study_is_in_the_record_seconds_later_without_a_cycle_and_once_however_often_pushed(
    stack: Stack,
) -> None:
    settings = settings_for(stack, sync_interval="3600", reconcile_interval="3600")
    async with running(settings, run_scheduler=True) as api:
        # Start-up's sweep and first cycle run on an empty archive; then only pushes can publish.
        assert await _until(lambda: {"reconcile", "incremental"} <= set(_run_kinds(stack)), 60)
        cycles = len(_run_kinds(stack))
        [uid] = _store(stack)
        started = time.monotonic()
        answers = await asyncio.gather(*(api.post(f"/studies/{uid}/sync", headers=ASYNC) for _ in range(5)))
        assert [a.status_code for a in answers] == [202] * 5
        assert {a.json()["status"] for a in answers} <= {"queued", "coalesced"}
        assert await _until(lambda: uid in _published(stack), 20), "the push was not synced"
        seconds = time.monotonic() - started
        await asyncio.sleep(1.5)  # a second sync, if the coalescing failed, would show by now
        metrics = (await api.get("/metrics")).text
        assert 'bridge_sync_lag_seconds_count{path="push"}' in metrics
    print(f"\npushed study readable after {seconds:.2f} s")
    assert _published(stack)[uid]["meta"]["versionId"] == "1"  # five pushes, one write
    status = stack.cli("status", "--json")
    assert status.returncode == 0, status.stderr
    [health] = json.loads(status.stdout)["sources"]
    push = health["current_lag"]["push"]
    assert push["waiting"] == 0
    assert 0 <= push["last_measured"]["seconds"] <= seconds + 1  # from the push's arrival to the write
    assert health["current_lag"]["poll"]["run"]["kind"] in ("reconcile", "incremental")  # not the push run
    kinds = _run_kinds(stack)
    assert "push" in kinds
    assert len([k for k in kinds if k != "push"]) == cycles  # no cycle published it


async def test_a_push_accepted_before_a_crash_is_done_by_the_next_worker(stack: Stack) -> None:
    [uid] = _store(stack)
    settings = settings_for(stack)
    async with running(settings) as api:  # `bridge serve`: no worker side in this process
        answer = await api.post(f"/studies/{uid}/sync", headers=ASYNC)
        assert answer.status_code == 202
    # The process is gone; nothing was synced, but the push is in the store.
    assert uid not in _published(stack)
    async with open_runtime(settings) as runtime:
        assert await push_drainer([runtime]).drain() == 1
    assert uid in _published(stack)


async def test_a_push_during_a_fhir_outage_is_done_after_the_outage(stack: Stack) -> None:
    [uid] = _store(stack)
    with FaultProxy(stack.fhir.root_url) as proxy:
        proxy.add(Fault(status=503, path=""))  # the FHIR server is down
        settings = settings_for(
            stack,
            fhir_url=proxy.proxied(stack.fhir.base_url),
            sync_interval="3600",
            reconcile_interval="3600",
            http_retries="0",
        )
        async with running(settings, run_scheduler=True) as api:
            answer = await api.post(f"/studies/{uid}/sync", headers=ASYNC)
            assert answer.status_code == 202
            store = SqlStore(f"sqlite:///{stack.state_path}")
            try:
                assert await _until(lambda: (store.push(uid) or (0, 0, 0))[2] >= 1, 30), "never tried"
                assert uid not in _published(stack)
                proxy.clear()  # the outage ends
                assert await _until(lambda: uid in _published(stack), 30), "not done after the outage"
                assert await _until(lambda: store.push_queue() == (0, None), 10), "the push stayed queued"
            finally:
                store.close()


async def test_a_full_queue_answers_429_with_retry_after(stack: Stack) -> None:
    uids = _store(stack, 2, prefix="F")
    async with running(settings_for(stack, push_queue_max="1")) as api:
        assert (await api.post(f"/studies/{uids[0]}/sync", headers=ASYNC)).status_code == 202
        again = await api.post(f"/studies/{uids[0]}/sync", headers=ASYNC)
        assert (again.status_code, again.json()["status"]) == (202, "coalesced")
        full = await api.post(f"/studies/{uids[1]}/sync", headers=ASYNC)
        assert full.status_code == 429
        assert float(full.headers["Retry-After"]) > 0
        assert "BRIDGE_PUSH_QUEUE_MAX" in full.text


async def test_two_replicas_share_the_pushes_and_sync_each_study_once(stack: Stack, pg_url: str) -> None:
    uids = _store(stack, 24, prefix="Q")
    settings = settings_for(stack, state_url=pg_url)
    async with running(settings) as api:
        for uid in uids:
            assert (await api.post(f"/studies/{uid}/sync", headers=ASYNC)).status_code == 202
    async with open_runtime(settings) as one, open_runtime(settings) as two:
        first, second = push_drainer([one]), push_drainer([two])
        done = await asyncio.gather(first.drain(), second.drain())
        # A push whose sync failed (a race of the two on the store, say) is tried again after a
        # back-off, as their background loops would.
        deadline = time.monotonic() + 30
        while one.store.push_queue()[0] and time.monotonic() < deadline:
            await asyncio.sleep(0.5)
            again = await asyncio.gather(first.drain(), second.drain())
            done = [a + b for a, b in zip(done, again, strict=True)]
    print(f"\nreplicas synced {done} pushes")
    assert sum(done) == len(uids)
    assert all(done)  # both took a share
    published = _published(stack)
    assert set(uids) <= set(published)
    assert {published[u]["meta"]["versionId"] for u in uids} == {"1"}  # each written once
    # The pushes were synced in pages, several a run, so the runs are fewer than the studies; each study
    # was created by one push run of one replica, none twice.
    runs = _push_runs(stack, pg_url)
    assert (sum(r.created for r in runs), sum(r.updated for r in runs)) == (len(uids), 0)


@pytest.mark.anyio
async def test_orthanc_with_the_shipped_push_script_makes_a_stored_study_appear_without_a_cycle(
    stack: Stack, tmp_path: Path
) -> None:
    port, key = free_loopback_port(), "push-test-key"
    bridge_url = f"http://127.0.0.1:{port}"
    with OrthancServer(
        name="bridge-push", push_to=(bridge_url, key), log_path=tmp_path / "orthanc.log"
    ) as archive:
        env = {k: v for k, v in os.environ.items() if not k.startswith("BRIDGE_")}
        env.update(
            stack.settings_env(
                dicomweb_url=archive.dicomweb_url,
                api_keys=key,
                sync_interval="3600",
                reconcile_interval="3600",
            )
        )
        log = tmp_path / "run.log"
        with log.open("w") as handle:
            process = subprocess.Popen(
                [sys.executable, "-m", "bridge", "run", "--port", str(port)],
                env=env,
                stdout=handle,
                stderr=subprocess.STDOUT,
            )
        try:
            started = await _until(lambda: {"reconcile", "incremental"} <= set(_run_kinds(stack)), 90)
            assert started, log.read_text()[-3000:]
            cycles = len(_run_kinds(stack))
            spec = StudySpec(
                patient_id="LUA1", issuer="HOSP-A", series=[SeriesSpec("CT", "one", "CHEST", instances=1)]
            )
            stow(archive.dicomweb_url, build_study(spec))
            stored = time.monotonic()
            assert await _until(lambda: spec.uid in _published(stack), 30), (
                tmp_path / "orthanc.log"
            ).read_text()[-3000:] + log.read_text()[-3000:]
            print(f"\nstored to readable through the Lua push: {time.monotonic() - stored:.2f} s")
            kinds = _run_kinds(stack)
            assert "push" in kinds
            assert len([k for k in kinds if k != "push"]) == cycles  # no cycle published it
        finally:
            process.send_signal(signal.SIGTERM)
            process.wait(timeout=60)


@pytest.mark.interop
async def test_a_burst_of_pushes_costs_page_batched_fhir_requests_not_per_study(stack: Stack) -> None:
    n, page = 45, 20
    uids = _store(stack, n, prefix="BU")
    settings = settings_for(stack, qido_page_size=str(page))
    async with running(settings) as api:  # `bridge serve`: the pushes wait in the store
        for uid in uids:
            assert (await api.post(f"/studies/{uid}/sync", headers=ASYNC)).status_code == 202
    stack.fhir.reset_stats()
    async with open_runtime(settings) as runtime:
        assert await push_drainer([runtime]).drain() == n
        assert runtime.store.push_queue() == (0, None)
    published = _published(stack)
    assert set(uids) <= set(published)
    assert {published[u]["meta"]["versionId"] for u in uids} == {"1"}
    # One run of three pages (up to PUSH_PAGES_PER_RUN pages a run): one page written while the
    # next is read and prepared, as a full sync's pages are.
    [run] = _push_runs(stack)
    pages = -(-n // page)
    assert run.created == n
    stats = stack.fhir.stats()
    # Per page: one batch of Patient look-ups, one of Patient PUTs, one of ImagingStudies; besides
    # them a few requests once per drain (the CapabilityStatement, the Endpoint), however many
    # studies. Study by study it would be more than 3 * n.
    assert stats["by_method"].get("PUT", 0) <= 1, stats  # the Endpoint; the studies went in batches
    if not isinstance(stack.fhir, HapiTestServer):  # its cached batch searches cost extra Patient requests
        batches = stats["by_interaction"].get("batch", 0)
        assert batches == 3 * pages, stats["by_interaction"]
        assert stats["requests"] - batches <= 3, stats["by_interaction"]
    assert run.fhir_writes == 2 * n + 1  # n Patients, n studies, the Endpoint
    # Orthanc matches StudyInstanceUID lists: a page's study rows come in one study query, as a
    # full sync lists a page, not a query per study.
    study_queries = [parse_qs(q.split("?", 1)[1]) for q in run.qido_queries if q.startswith("/studies?")]
    listed = sorted(len(q["StudyInstanceUID"][0].split(",")) for q in study_queries)
    assert listed == sorted([page, page, n - 2 * page]), run.qido_queries
