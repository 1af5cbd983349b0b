"""Fault tolerance against the real servers: a fault-injecting proxy, a dying FHIR server, bad DICOM JSON."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.integration.conftest import Stack
from tests.stack.faultproxy import Fault, FaultProxy, retry_gaps
from tests.stack.fhir import FhirTestServer
from tests.stack.process import free_loopback_port
from tests.stack.samples import SeriesSpec, StudySpec, build_study, stow

pytestmark = pytest.mark.integration

# Small waits so the whole file runs in well under a minute; the policy is the production one.
# Most faults here are aimed at the per-study requests (a study's series query, its ImagingStudy
# PUT, a Patient's POST): those tests ask for them. The page-batched way has its own test below.
PER_STUDY = {"dicomweb_series_query": "per-study", "fhir_batch_size": "0"}
FAST_RETRIES = {
    "http_retries": "8",
    "http_retry_max_wait": "3",
    "http_retry_total": "30",
    "http_circuit_failures": "5",
    "http_circuit_reset": "0.5",
}


def _store_studies(dicomweb_url: str, count: int, prefix: str) -> list[StudySpec]:
    specs = []
    with httpx.Client(timeout=60) as client:
        for i in range(count):
            spec = StudySpec(
                patient_id=f"{prefix}{i % 3:03d}",
                issuer="HOSP-A",
                accession=f"{prefix}-ACC-{i}",
                description=f"fault study {i}",
                series=[SeriesSpec(modality="CT", instances=1)]
                + ([SeriesSpec(modality="MR", instances=1)] if i % 2 else []),
            )
            stow(dicomweb_url, build_study(spec), client=client)
            specs.append(spec)
    return specs


def _published(stack: Stack, base_url: str | None = None) -> Counter[str]:
    """How many ImagingStudy resources the FHIR server holds per Study Instance UID."""
    base = base_url or stack.fhir.base_url
    response = httpx.get(f"{base}/ImagingStudy", params={"_count": "1000"}, timeout=30)
    response.raise_for_status()
    counts: Counter[str] = Counter()
    for entry in response.json().get("entry", []):
        for identifier in entry["resource"]["identifier"]:
            if identifier.get("system") == "urn:dicom:uid":
                counts[identifier["value"].removeprefix("urn:oid:")] += 1
    return counts


def _assert_no_duplicates(stack: Stack, base_url: str | None = None) -> None:
    base = base_url or stack.fhir.base_url
    for kind in ("Patient", "Endpoint"):
        response = httpx.get(f"{base}/{kind}", params={"_count": "1000"}, timeout=30)
        keys = [
            json.dumps(e["resource"]["identifier"], sort_keys=True) for e in response.json().get("entry", [])
        ]
        assert len(keys) == len(set(keys)), f"duplicate {kind}"


def _api_failures(stack: Stack) -> dict[str, Any]:
    """GET /failures from the API app (in-process, its lifespan running) on the test's store."""
    from bridge.api.app import create_app
    from bridge.config import load_settings

    saved = dict(os.environ)
    os.environ.update(stack.env)
    try:
        settings = load_settings()
    finally:
        os.environ.clear()
        os.environ.update(saved)

    async def get() -> dict[str, Any]:
        app = create_app(settings)
        async with app.router.lifespan_context(app):
            transport = httpx.ASGITransport(app=app)
            async with httpx.AsyncClient(transport=transport, base_url="http://bridge.test") as client:
                response = await client.get("/failures")
                response.raise_for_status()
                body: dict[str, Any] = response.json()
                return body

    return asyncio.run(get())


@pytest.fixture
def proxies(stack: Stack) -> Iterator[tuple[FaultProxy, FaultProxy]]:
    with (
        FaultProxy(stack.orthanc.base_url, seed=11) as archive,
        FaultProxy(stack.fhir.root_url, seed=12) as fhir,
    ):
        yield archive, fhir


def test_faults_from_both_servers_lose_and_duplicate_nothing_and_retry_after_is_honoured(
    stack: Stack, proxies: tuple[FaultProxy, FaultProxy]
) -> None:
    archive, fhir = proxies
    specs = _store_studies(stack.orthanc.dicomweb_url, 8, "FLT")
    faults = [
        archive.add(Fault(status=429, retry_after=1, times=1, method="GET", path=r"/dicom-web/studies\?")),
        archive.add(Fault(kind="truncate", keep=0.4, on=(1, 4), path=r"/series")),
        archive.add(Fault(kind="reset", when="before", on=(2,), path=r"/series")),
        archive.add(Fault(kind="delay", delay=0.2, probability=0.3, path=r"/series")),
        fhir.add(Fault(status=503, retry_after=1, times=1, method="PUT", path=r"/ImagingStudy/")),
        fhir.add(Fault(kind="reset", when="after", on=(3,), method="PUT", path=r"/ImagingStudy/")),
        fhir.add(Fault(kind="truncate", keep=0.5, on=(2,), method="PUT", path=r"/Patient/")),
        fhir.add(Fault(status=503, probability=0.15, path=r"/fhir/R4/")),
    ]
    started = time.monotonic()
    report = stack.sync(
        dicomweb_url=archive.proxied(stack.orthanc.dicomweb_url),
        dicomweb_public_url=stack.orthanc.dicomweb_url,
        fhir_url=fhir.proxied(stack.fhir.base_url),
        **FAST_RETRIES,
        **PER_STUDY,
    )
    took = time.monotonic() - started

    assert all(f.fired >= 1 for f in faults), [(f.kind, f.path, f.fired) for f in faults]
    assert report.counts.parked == 0, report.parked
    assert report.counts.created + report.counts.updated == len(specs)
    assert _published(stack) == Counter({s.uid: 1 for s in specs if s.uid})
    _assert_no_duplicates(stack)

    gaps = [gap for r in retry_gaps(archive.log + fhir.log) for gap in r.gaps]
    assert len(gaps) >= 2
    for asked, waited in gaps:
        assert waited >= asked - 0.02, f"retried after {waited:.2f} s, asked to wait {asked} s"
    assert took < 30

    # A second run through the same faults changes nothing: the fingerprints are unchanged.
    again = stack.sync(
        dicomweb_url=archive.proxied(stack.orthanc.dicomweb_url),
        dicomweb_public_url=stack.orthanc.dicomweb_url,
        fhir_url=fhir.proxied(stack.fhir.base_url),
        **FAST_RETRIES,
        **PER_STUDY,
    )
    assert (again.counts.unchanged, again.counts.fhir_writes) == (len(specs), 0)


def test_malformed_dicom_json_parks_only_that_study_and_retry_clears_it(
    stack: Stack, proxies: tuple[FaultProxy, FaultProxy]
) -> None:
    archive, _ = proxies
    specs = _store_studies(stack.orthanc.dicomweb_url, 5, "BAD")
    broken_json, bad_dicom = specs[1].uid, specs[3].uid
    archive.add(
        Fault(
            kind="corrupt",
            path=rf"/studies/{broken_json}/series",
            rewrite=lambda body: body[: len(body) // 2],
        )
    )
    archive.add(
        Fault(
            kind="corrupt",
            path=rf"/studies/{bad_dicom}/series",
            rewrite=lambda body: json.dumps([{"0020000E": {"vr": "UI"}}]).encode(),
        )
    )
    env = {"dicomweb_url": archive.proxied(stack.orthanc.dicomweb_url), **FAST_RETRIES, **PER_STUDY}

    run = stack.cli("sync", "--json", **env)
    assert run.returncode == 1, run.stderr
    summary = json.loads(run.stdout)
    parked = {p["study_uid"]: p for p in summary["parked_studies"]}
    assert set(parked) == {broken_json, bad_dicom}
    assert "not JSON" in parked[broken_json]["reason"] and parked[broken_json]["kind"] == "upstream"
    assert parked[bad_dicom]["attribute"] == "SeriesInstanceUID" and parked[bad_dicom]["kind"] == "mapping"
    assert set(_published(stack)) == {s.uid for s in specs} - {broken_json, bad_dicom}
    listed = _api_failures(stack)
    assert {f["study_uid"]: f["kind"] for f in listed["failures"]} == {
        broken_json: "upstream",
        bad_dicom: "mapping",
    }

    # The archive is mended; `bridge retry --study` re-syncs one, `bridge retry` the rest.
    archive.clear()
    one = stack.cli("retry", "--study", broken_json, "--json", **env)
    assert one.returncode == 0, one.stderr
    status = json.loads(stack.cli("status", "--json", **env).stdout)
    assert [p["study_uid"] for p in status["parked_studies"]] == [bad_dicom]
    rest = stack.cli("retry", **env)
    assert rest.returncode == 0, rest.stderr
    status = json.loads(stack.cli("status", "--json", **env).stdout)
    assert status["parked_studies"] == []
    assert _api_failures(stack) == {"count": 0, "failures": []}
    assert _published(stack) == Counter({s.uid: 1 for s in specs if s.uid})
    nothing = stack.cli("retry", **env)
    assert nothing.returncode == 0 and "no parked study" in nothing.stdout


# The FHIR server dies mid-sync ------------------------------------------------------------------


@pytest.fixture
def own_fhir(tmp_path: Path) -> Iterator[FhirTestServer]:
    """A FHIR server of this test's own, on a fixed port, keeping its data in a file across restarts."""
    server = FhirTestServer(
        port=free_loopback_port(),
        log_path=tmp_path / "fhir.log",
        env={"FHIR_DATA_FILE": str(tmp_path / "fhir-data.json")},
    )
    server.start()
    try:
        yield server
    finally:
        server.stop()


def _sync_process(stack: Stack, fhir_url: str, **overrides: str) -> subprocess.Popen[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("BRIDGE_")}
    env.update(stack.settings_env(fhir_url=fhir_url, sync_concurrency="2", **{**PER_STUDY, **overrides}))
    return subprocess.Popen(
        [sys.executable, "-m", "bridge", "sync", "--json"],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def _stop_after_writes(
    proxy: FaultProxy, server: FhirTestServer, writes: int, restart_after: float | None
) -> threading.Event:
    """Stop ``server`` when the ``writes``-th ImagingStudy write passes the proxy (and maybe restart it)."""
    seen = 0
    done = threading.Event()

    def stop_and_maybe_restart() -> None:
        server.stop()
        done.set()
        if restart_after is not None:
            time.sleep(restart_after)
            server.start()

    def hook(method: str, target: str, headers: dict[str, str]) -> None:
        nonlocal seen
        if method == "PUT" and "/ImagingStudy/" in target:
            seen += 1
            if seen == writes:
                threading.Thread(target=stop_and_maybe_restart, daemon=True).start()

    proxy.on_request = hook
    proxy.add(Fault(kind="delay", delay=0.05, method="PUT", path=r"/ImagingStudy/"))
    return done


def test_fhir_server_down_mid_sync_exits_3_and_a_rerun_publishes_each_study_once(
    stack: Stack, own_fhir: FhirTestServer
) -> None:
    specs = _store_studies(stack.orthanc.dicomweb_url, 10, "DWN")
    with FaultProxy(own_fhir.root_url) as proxy:
        stopped = _stop_after_writes(proxy, own_fhir, writes=4, restart_after=None)
        started = time.monotonic()
        process = _sync_process(
            stack, proxy.proxied(own_fhir.base_url), http_retry_total="3", http_retry_max_wait="1"
        )
        out, err = process.communicate(timeout=120)
        took = time.monotonic() - started
    assert stopped.is_set()
    assert process.returncode == 3, (out, err)
    message = " ".join(err.split())  # rich wraps long lines
    assert "upstream error: fhir" in message and "nothing is lost" in message
    assert "Traceback" not in err
    assert took < 30

    own_fhir.start()  # same port, same data file
    published_before = _published(stack, own_fhir.base_url)
    assert 1 <= sum(published_before.values()) < len(specs)
    rerun = stack.cli("sync", "--json", fhir_url=own_fhir.base_url)
    assert rerun.returncode == 0, rerun.stderr
    assert _published(stack, own_fhir.base_url) == Counter({s.uid: 1 for s in specs if s.uid})
    _assert_no_duplicates(stack, own_fhir.base_url)


def test_fhir_server_restarted_mid_sync_is_waited_for_and_the_run_completes(
    stack: Stack, own_fhir: FhirTestServer
) -> None:
    specs = _store_studies(stack.orthanc.dicomweb_url, 10, "RST")
    with FaultProxy(own_fhir.root_url) as proxy:
        stopped = _stop_after_writes(proxy, own_fhir, writes=4, restart_after=1.5)
        process = _sync_process(
            stack,
            proxy.proxied(own_fhir.base_url),
            http_retries="20",
            http_retry_total="30",
            http_retry_max_wait="1",
            http_circuit_reset="0.5",
        )
        out, err = process.communicate(timeout=120)
        down = proxy.events("upstream-down")
    assert stopped.is_set() and down, "the server was stopped while the run went on"
    assert process.returncode == 0, (out, err)
    summary: dict[str, Any] = json.loads(out)
    assert summary["parked"] == 0
    assert _published(stack, own_fhir.base_url) == Counter({s.uid: 1 for s in specs if s.uid})
    _assert_no_duplicates(stack, own_fhir.base_url)
    # The circuit kept the bridge from hammering the dead server: a handful of tries, not hundreds.
    assert len(down) < 40, len(down)


# Killed between batches ----------------------------------------------------------------------------


@pytest.mark.parametrize("kill_on", [1, 2, 3, 4])
def test_a_sync_killed_at_any_batch_reruns_to_exactly_one_of_each(stack: Stack, kill_on: int) -> None:
    """SIGKILL while the ``kill_on``-th batch is on its way (the server still gets it); then rerun.

    Pages of 4 studies, 3 patients: batch 1 creates the Patients, 2-4 are the pages' ImagingStudies.
    """
    specs = _store_studies(stack.orthanc.dicomweb_url, 12, "KIL")
    with FaultProxy(stack.fhir.root_url) as proxy:
        seen = 0
        process: subprocess.Popen[str] | None = None
        killed = threading.Event()

        def hook(method: str, target: str, headers: dict[str, str]) -> None:
            nonlocal seen
            if method == "POST" and target.rstrip("/").endswith("/R4") and process is not None:
                seen += 1
                if seen == kill_on:
                    process.kill()
                    killed.set()

        proxy.on_request = hook
        proxy.add(Fault(kind="delay", delay=0.3, method="POST", path=r"/R4/?$"))
        process = _sync_process(
            stack,
            proxy.proxied(stack.fhir.base_url),
            qido_page_size="4",
            fhir_batch_size="100",
            dicomweb_series_query="auto",
        )
        process.communicate(timeout=120)
        assert killed.is_set()
        assert process.returncode == -signal.SIGKILL
        time.sleep(0.5)  # the delayed batch reaches the server after its client died

    rerun = stack.cli("sync", "--json")
    assert rerun.returncode == 0, rerun.stderr
    assert _published(stack) == Counter({s.uid: 1 for s in specs if s.uid})
    _assert_no_duplicates(stack)
    patients = httpx.get(f"{stack.fhir.base_url}/Patient", params={"_count": "100"}, timeout=30).json()
    assert len(patients.get("entry", [])) == 3
    again = json.loads(stack.cli("sync", "--json").stdout)
    assert again["unchanged"] == len(specs)
