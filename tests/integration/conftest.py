"""Fixtures that give each integration test an empty archive, FHIR server and store."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest

from bridge.config import Settings, load_settings
from bridge.runtime import open_runtime
from bridge.sync.report import RunReport
from tests.conftest import ARTIFACTS
from tests.stack.conformance import Collector, check, report, search_all
from tests.stack.fhir import FhirTestServer
from tests.stack.hapi import HapiTestServer
from tests.stack.orthanc import OrthancServer

pytestmark = pytest.mark.integration

ISSUERS = {"HOSP-A": "urn:oid:1.2.826.0.1.3680043.10.1001", "HOSP-B": "urn:oid:1.2.826.0.1.3680043.10.1002"}
DEFAULT_PATIENT_SYSTEM = "urn:oid:1.2.826.0.1.3680043.10.1000"


@dataclass
class Stack:
    """The real servers, emptied for one test, and the bridge settings pointing at them."""

    orthanc: OrthancServer
    fhir: FhirTestServer | HapiTestServer
    state_path: Path
    env: dict[str, str] = field(default_factory=dict)

    def settings_env(self, **overrides: str) -> dict[str, str]:
        env = dict(self.env)
        env.update({f"BRIDGE_{k.upper()}": v for k, v in overrides.items()})
        return env

    def settings(self, **overrides: str) -> Settings:
        """The bridge's settings as it would read them from this environment (plus overrides)."""
        env = self.settings_env(**overrides)
        saved = {k: os.environ.get(k) for k in env}
        os.environ.update(env)
        try:
            return load_settings()
        finally:
            for k, v in saved.items():
                if v is None:
                    os.environ.pop(k, None)
                else:
                    os.environ[k] = v

    def sync(self, **overrides: str) -> RunReport:
        """One in-process sync pass with these settings."""
        settings = self.settings(**overrides)

        async def run() -> RunReport:
            async with open_runtime(settings) as runtime:
                return await runtime.worker.run()

        return asyncio.run(run())

    def cli(self, *args: str, **overrides: str) -> subprocess.CompletedProcess[str]:
        """Run the real ``bridge`` command in a subprocess."""
        env = {k: v for k, v in os.environ.items() if not k.startswith("BRIDGE_")}
        env.update(self.settings_env(**overrides))
        return subprocess.run(
            [sys.executable, "-m", "bridge", *args],
            env=env,
            capture_output=True,
            text=True,
            timeout=300,
            check=False,
        )

    def fhir_search(self, resource_type: str, **params: str) -> list[dict[str, Any]]:
        """Every resource of a type matching ``params``, across pages, never from a search cache."""
        return search_all(self.fhir.base_url, resource_type, **params)

    def fhir_read(self, reference: str) -> dict[str, Any]:
        response = httpx.get(f"{self.fhir.base_url}/{reference}", timeout=30)
        response.raise_for_status()
        body: dict[str, Any] = response.json()
        return body


# FHIR_TEST_VALIDATE=off skips the conformance check while iterating (CI always runs it).
VALIDATE = os.environ.get("FHIR_TEST_VALIDATE", "on") != "off"


@pytest.fixture(scope="session")
def conformance() -> Iterator[Collector]:
    """Every resource the bridge published in the session, validated at its end by HAPI's validator.

    Any error fails the session (reported at the teardown of its last test); the summary, with
    every kind of warning counted, is printed and kept in test-artifacts/conformance.txt.
    """
    collector = Collector()
    yield collector
    if not VALIDATE or not len(collector):
        return
    checked = check(collector.checked())
    summary = report(checked)
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    (ARTIFACTS / "conformance.txt").write_text(summary + "\n", encoding="utf-8")
    print("\n" + summary)
    errors = [c for c in checked if c.errors]
    assert not errors, f"published resources the FHIR validator finds errors in:\n{summary}"


@pytest.fixture(autouse=True)
def _published_resources_are_collected(
    request: pytest.FixtureRequest, conformance: Collector
) -> Iterator[None]:
    """After each test, what its FHIR server holds goes to the session's conformance check."""
    yield
    server = request.node.funcargs.get("fhir_server") if hasattr(request.node, "funcargs") else None
    if VALIDATE and server is not None and server.running:
        conformance.collect(server.base_url, request.node.nodeid)


@pytest.fixture
def stack(
    orthanc: OrthancServer, fhir_server: FhirTestServer | HapiTestServer, tmp_path: Path
) -> Iterator[Stack]:
    """Empty archive, empty FHIR server, fresh store; settings for the bridge to use them."""
    orthanc.clear()
    fhir_server.clear()
    fhir_server.reset_stats()
    state = tmp_path / "state.db"
    import json

    yield Stack(
        orthanc,
        fhir_server,
        state,
        env={
            "BRIDGE_DICOMWEB_URL": orthanc.dicomweb_url,
            "BRIDGE_FHIR_URL": fhir_server.base_url,
            "BRIDGE_STATE_URL": f"sqlite:///{state}",
            "BRIDGE_SOURCE_NAME": "test-orthanc",
            "BRIDGE_PATIENT_IDENTIFIER_SYSTEM": DEFAULT_PATIENT_SYSTEM,
            "BRIDGE_PATIENT_ISSUER_SYSTEMS": json.dumps(ISSUERS),
            "BRIDGE_HTTP_RETRIES": "1",
            "BRIDGE_HTTP_RETRY_MAX_WAIT": "0.2",
        },
    )
