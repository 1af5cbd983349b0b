"""Session-wide real servers for the integration tests (started once, by the project's scripts)."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

ARTIFACTS = Path(os.environ.get("BRIDGE_TEST_ARTIFACTS", Path(__file__).parent.parent / "test-artifacts"))


@pytest.fixture(autouse=True)
def _no_bridge_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every test starts from no BRIDGE_ settings, whatever the shell had."""
    for name in list(os.environ):
        if name.upper().startswith("BRIDGE_") and name != "BRIDGE_TEST_ARTIFACTS":
            monkeypatch.delenv(name)
    from bridge.config import get_settings

    get_settings.cache_clear()


@pytest.fixture(scope="session")
def orthanc() -> Iterator[object]:
    """A real Orthanc with the DICOMweb plugin on a free loopback port, temporary storage."""
    from tests.stack.orthanc import OrthancServer, ensure_installed

    ensure_installed()
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    with OrthancServer(log_path=ARTIFACTS / "orthanc.log") as server:
        yield server


@pytest.fixture(scope="session")
def orthanc_b() -> Iterator[object]:
    """A second, independent Orthanc: another archive feeding the same FHIR server."""
    from tests.stack.orthanc import OrthancServer, ensure_installed

    ensure_installed()
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    with OrthancServer(name="bridge-test-b", log_path=ARTIFACTS / "orthanc-b.log") as server:
        yield server


FHIR_ENGINES = ("medplum", "hapi")
# The engine of the tests not marked interop: FHIR_TEST_ENGINE=hapi runs them all on HAPI. (Not a
# BRIDGE_ name: the bridge rejects unknown BRIDGE_ settings, and the tests pass the environment on.)
DEFAULT_FHIR_ENGINE = os.environ.get("FHIR_TEST_ENGINE", "medplum")


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    """Tests marked ``interop`` run once per FHIR engine; the HAPI runs carry the ``hapi`` mark."""
    if "fhir_server" in metafunc.fixturenames and metafunc.definition.get_closest_marker("interop"):
        metafunc.parametrize(
            "fhir_server",
            [pytest.param("medplum", id="medplum"), pytest.param("hapi", id="hapi", marks=pytest.mark.hapi)],
            indirect=True,
            scope="session",
        )


@pytest.fixture(scope="session")
def medplum_server() -> Iterator[object]:
    """The Medplum-based FHIR R4 test server on a free loopback port."""
    from tests.stack.fhir import FhirTestServer

    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    with FhirTestServer(log_path=ARTIFACTS / "fhir-server.log") as server:
        yield server


@pytest.fixture(scope="session")
def hapi_server() -> Iterator[object]:
    """The HAPI FHIR JPA test server (H2 database) on a free loopback port, started once."""
    from tests.stack.hapi import HapiTestServer

    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    with HapiTestServer(log_path=ARTIFACTS / "hapi-server.log") as server:
        yield server


@pytest.fixture(scope="session")
def fhir_server(request: pytest.FixtureRequest) -> object:
    """The FHIR server a test runs against: Medplum, or each engine for ``interop`` tests.

    The engines themselves are session fixtures of their own, so each starts once however the
    tests that use them are ordered.
    """
    engine = getattr(request, "param", DEFAULT_FHIR_ENGINE)
    if engine not in FHIR_ENGINES:
        raise pytest.UsageError(f"FHIR_TEST_ENGINE must be one of {', '.join(FHIR_ENGINES)}")
    return request.getfixturevalue(f"{engine}_server")


@pytest.fixture(scope="session")
def postgres_server() -> Iterator[str]:
    """Admin URL of a PostgreSQL server: ``BRIDGE_TEST_POSTGRES``, or one started for the session."""
    from tests.stack.postgres import running_server

    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    with running_server(log_path=ARTIFACTS / "postgres.log") as url:
        yield url
