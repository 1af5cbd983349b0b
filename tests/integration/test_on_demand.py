"""The sync side of the API: POST /studies/{uid}/sync, `bridge run`, and the worker's metrics."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from typing import Any

import httpx
import pytest

from tests.integration.conftest import Stack
from tests.integration.test_resolver import running, settings_for
from tests.stack.samples import StudySpec, build_study, stow

pytestmark = pytest.mark.integration


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


def _studies(stack: Stack) -> dict[str, dict[str, Any]]:
    return {
        s["identifier"][0]["value"].removeprefix("urn:oid:"): s for s in stack.fhir_search("ImagingStudy")
    }


@pytest.mark.anyio
async def test_post_sync_publishes_one_study_now_and_retires_a_deleted_one(stack: Stack) -> None:
    wanted = StudySpec(patient_id="OD1", issuer="HOSP-A")
    other = StudySpec(patient_id="OD2", issuer="HOSP-A")
    for spec in (wanted, other):
        stow(stack.orthanc.dicomweb_url, build_study(spec))

    async with running(settings_for(stack)) as api:
        answer = await api.post(f"/studies/{wanted.uid}/sync")
        assert answer.status_code == 200, answer.text
        assert answer.json()["created"] == 1 and answer.json()["status"] == "ok"
        assert set(_studies(stack)) == {wanted.uid}

        again = await api.post(f"/studies/{wanted.uid}/sync")
        assert again.json()["unchanged"] == 1

        stack.orthanc.delete_study(wanted.uid)
        gone = await api.post(f"/studies/{wanted.uid}/sync")
        assert gone.json()["deletions"] == [{"study_uid": wanted.uid, "action": "marked"}]
        assert _studies(stack)[wanted.uid]["status"] == "entered-in-error"

        unknown = await api.post("/studies/1.2.3.999/sync")
        assert unknown.status_code == 404
        assert unknown.json()["resourceType"] == "OperationOutcome"
        malformed = await api.post("/studies/1.2.abc/sync")
        assert malformed.status_code == 422


@pytest.mark.anyio
async def test_post_sync_needs_credentials_when_keys_are_configured(stack: Stack) -> None:
    spec = StudySpec(patient_id="OD3", issuer="HOSP-A")
    stow(stack.orthanc.dicomweb_url, build_study(spec))

    async with running(settings_for(stack, api_keys="s3cret-key")) as api:
        refused = await api.post(f"/studies/{spec.uid}/sync")
        accepted = await api.post(f"/studies/{spec.uid}/sync", headers={"X-API-Key": "s3cret-key"})

    assert refused.status_code == 401
    assert accepted.status_code == 200 and accepted.json()["created"] == 1


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _wait(predicate: Any, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if predicate():
                return True
        except httpx.TransportError:
            pass
        time.sleep(0.2)
    return False


def _spawn(stack: Stack, command: str, *args: str, **overrides: str) -> subprocess.Popen[bytes]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("BRIDGE_")}
    env.update(stack.settings_env(**overrides))
    log = stack.state_path.with_suffix(f".{command}.log")
    with log.open("w") as handle:
        return subprocess.Popen(
            [sys.executable, "-m", "bridge", command, *args], env=env, stdout=handle, stderr=subprocess.STDOUT
        )


def test_bridge_run_serves_the_api_and_syncs_on_schedule(stack: Stack) -> None:
    specs = [StudySpec(patient_id=f"R{i}", issuer="HOSP-A") for i in range(3)]
    for spec in specs:
        stow(stack.orthanc.dicomweb_url, build_study(spec))
    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    process = _spawn(stack, "run", "--port", str(port), sync_interval="1", reconcile_interval="3600")
    try:
        assert _wait(lambda: len(_studies(stack)) == 3, 60), "the scheduled sync did not publish"
        later = StudySpec(patient_id="R-late", issuer="HOSP-A", study_date=time.strftime("%Y%m%d"))
        stow(stack.orthanc.dicomweb_url, build_study(later))
        assert _wait(lambda: later.uid in _studies(stack), 30), "the incremental cycle missed a new study"
        assert httpx.get(f"{url}/studies/{later.uid}/links", timeout=30).status_code == 200
        metrics = httpx.get(f"{url}/metrics", timeout=30).text
        assert 'bridge_sync_runs_total{kind="reconcile",status="ok"}' in metrics
        assert "bridge_sync_lag_seconds" in metrics
        assert 'bridge_sync_studies_total{outcome="created"}' in metrics
    finally:
        process.send_signal(signal.SIGTERM)
        code = process.wait(timeout=60)
    log = stack.state_path.with_suffix(".run.log").read_text()
    # uvicorn ends a clean shutdown by re-raising SIGTERM, so the exit status is the signal's.
    assert code in (0, -signal.SIGTERM), log[-3000:]
    assert "scheduler stopped" in log and "Application shutdown complete" in log
    assert "Traceback" not in log


def test_bridge_worker_serves_its_metrics_when_asked(stack: Stack) -> None:
    stow(stack.orthanc.dicomweb_url, build_study(StudySpec(patient_id="W1", issuer="HOSP-A")))
    port = _free_port()
    process = _spawn(stack, "worker", metrics_port=str(port), sync_interval="3600", reconcile_interval="3600")
    try:
        assert _wait(lambda: len(_studies(stack)) == 1, 60)
        assert _wait(
            lambda: (
                "bridge_sync_parked_studies 0.0"
                in httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=5).text
            ),
            30,
        )
    finally:
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=60) == 0
