"""TLS to real servers on loopback: verification on by default, a custom CA bundle, mutual TLS, HTTP/2."""

from __future__ import annotations

import json
import os
import ssl
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.conftest import ARTIFACTS
from tests.stack.faultproxy import FaultProxy
from tests.stack.fhir import FhirTestServer
from tests.stack.orthanc import OrthancServer
from tests.stack.samples import SeriesSpec, StudySpec, build_study, stow
from tests.stack.tls import Pki, make_pki

pytestmark = pytest.mark.integration


@dataclass
class TlsStack:
    pki: Pki
    orthanc: OrthancServer
    archive: FaultProxy  # terminates HTTPS in front of Orthanc (whose own HTTPS crashes)
    fhir: FhirTestServer  # HTTPS, HTTP/2 and HTTP/1.1
    fhir_mtls: FhirTestServer  # HTTPS, client certificate required
    tmp: Path

    def cli(self, fhir: FhirTestServer, **overrides: str | None) -> subprocess.CompletedProcess[str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("BRIDGE_")}
        settings: dict[str, str | None] = {
            "dicomweb_url": self.archive.proxied(self.orthanc.dicomweb_url),
            "dicomweb_ca_bundle": str(self.pki.ca_cert),
            "fhir_url": fhir.base_url,
            "fhir_ca_bundle": str(self.pki.ca_cert),
            "state_url": f"sqlite:///{self.tmp / 'state.db'}",
            "source_name": "tls-test",
            "http_retries": "1",
            "http_retry_max_wait": "0.2",
            **overrides,
        }
        env.update({f"BRIDGE_{k.upper()}": v for k, v in settings.items() if v is not None})
        return subprocess.run(
            [sys.executable, "-m", "bridge", "sync", "--json"],
            env=env,
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )


def _context(pki: Pki, *, client: bool = False) -> ssl.SSLContext:
    context = ssl.create_default_context(cafile=str(pki.ca_cert))
    if client:
        context.load_cert_chain(str(pki.client_cert), str(pki.client_key))
    return context


def _server_context(pki: Pki) -> ssl.SSLContext:
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(str(pki.server_cert), str(pki.server_key))
    return context


@pytest.fixture(scope="module")
def tls_servers(
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[tuple[Pki, FaultProxy, FhirTestServer, FhirTestServer]]:
    pki = make_pki(tmp_path_factory.mktemp("pki"))
    tls_env = {"FHIR_TLS_CERT": str(pki.server_cert), "FHIR_TLS_KEY": str(pki.server_key)}
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    fhir = FhirTestServer(log_path=ARTIFACTS / "fhir-server-tls.log", env=tls_env, admin_verify=_context(pki))
    fhir_mtls = FhirTestServer(
        log_path=ARTIFACTS / "fhir-server-mtls.log",
        env={**tls_env, "FHIR_TLS_CLIENT_CA": str(pki.ca_cert)},
        admin_verify=_context(pki, client=True),
    )
    with fhir, fhir_mtls:
        yield pki, _server_context(pki), fhir, fhir_mtls


@pytest.fixture
def tls(
    tls_servers: tuple[Pki, ssl.SSLContext, FhirTestServer, FhirTestServer],
    orthanc: OrthancServer,
    tmp_path: Path,
) -> Iterator[TlsStack]:
    pki, server_context, fhir, fhir_mtls = tls_servers
    orthanc.clear()
    for server in (fhir, fhir_mtls):
        server.clear()
        server.reset_stats()
    for i in range(2):
        spec = StudySpec(patient_id=f"TLS{i}", series=[SeriesSpec(instances=1)])
        stow(orthanc.dicomweb_url, build_study(spec))
    with FaultProxy(orthanc.base_url, tls=server_context) as archive:
        yield TlsStack(pki, orthanc, archive, fhir, fhir_mtls, tmp_path)


def test_a_custom_ca_bundle_connects_over_tls_and_http2_is_used_where_offered(tls: TlsStack) -> None:
    result = tls.cli(tls.fhir)
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["created"] == 2
    assert tls.archive.url.startswith("https://") and tls.archive.log, "the archive was reached over TLS"
    versions = tls.fhir.stats()["by_http_version"]
    assert set(versions) == {"2.0"}, versions


def test_http2_can_be_turned_off(tls: TlsStack) -> None:
    result = tls.cli(tls.fhir, http2="false")
    assert result.returncode == 0, result.stderr
    assert set(tls.fhir.stats()["by_http_version"]) == {"1.1"}


@pytest.mark.parametrize("ca", ["default", "other"])
def test_verification_is_on_by_default_and_an_untrusted_server_fails_clearly(tls: TlsStack, ca: str) -> None:
    result = tls.cli(tls.fhir, fhir_ca_bundle=None if ca == "default" else str(tls.pki.other_ca_cert))
    assert result.returncode == 3, result.stdout
    message = " ".join(result.stderr.split())
    assert (
        "FHIR server refused" in message and "not trusted" in message and "BRIDGE_FHIR_CA_BUNDLE" in message
    )
    assert tls.fhir.stats()["requests"] == 0


def test_verification_can_be_turned_off_and_says_so(tls: TlsStack) -> None:
    result = tls.cli(tls.fhir, fhir_ca_bundle=None, fhir_verify_tls="false")
    assert result.returncode == 0, result.stderr
    assert "verification is OFF" in result.stderr


@pytest.mark.parametrize("http2", ["true", "false"])
def test_mutual_tls_needs_the_client_certificate(tls: TlsStack, http2: str) -> None:
    # The refusal is a TLS alert racing with the client's first write: the bridge sees either the
    # alert (a clear "refused" naming the client certificate settings, not retried) or a broken
    # pipe (retried as a network fault, then exit 3 naming the upstream).
    refused = tls.cli(tls.fhir_mtls, http2=http2, http_retries="3", http_retry_max_wait="0.05")
    assert refused.returncode == 3, refused.stdout
    assert "Traceback" not in refused.stderr
    message = " ".join(refused.stderr.split())
    clear = "FHIR server refused" in message and "BRIDGE_FHIR_CLIENT_CERT" in message
    assert clear or "upstream error: fhir" in message, message[-500:]
    assert tls.fhir_mtls.stats()["requests"] == 0

    accepted = tls.cli(
        tls.fhir_mtls, fhir_client_cert=str(tls.pki.client_cert), fhir_client_key=str(tls.pki.client_key)
    )
    assert accepted.returncode == 0, accepted.stderr
    assert json.loads(accepted.stdout)["created"] == 2
