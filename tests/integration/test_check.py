"""`bridge check` against the real stack: every peer right, then each one wrong in turn (and sync's word)."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.conftest import ARTIFACTS
from tests.integration.conftest import Stack
from tests.stack.fhir import FhirTestServer
from tests.stack.orthanc import OrthancServer, ensure_installed
from tests.stack.process import free_loopback_port
from tests.stack.samples import StudySpec, build_study, stow

pytestmark = pytest.mark.integration

ARCHIVE_USER, ARCHIVE_PASSWORD = "bridge", "archive-pass-3c1a"
FHIR_TOKEN = "fhir-token-9e2d51"
WRONG = "wrong-secret-71f0"


def flat(text: str) -> str:
    return " ".join(text.split())


def _store(stack: Stack, *issuers: str | None) -> None:
    with httpx.Client(timeout=60) as client:
        for i, issuer in enumerate(issuers):
            stow(
                stack.orthanc.dicomweb_url,
                build_study(StudySpec(patient_id=f"CHK{i}", issuer=issuer)),
                client,
            )


def _viewer(stack: Stack) -> dict[str, str]:
    # Orthanc's own address stands in for a viewer that answers.
    return {
        "viewer_urls": json.dumps({"stone": stack.orthanc.base_url}),
        "viewers": "stone",
        "default_viewer": "stone",
    }


@pytest.mark.interop
def test_check_passes_against_the_real_stack_and_lists_the_issuers(stack: Stack) -> None:
    _store(stack, "HOSP-A", "HOSP-A", "HOSP-B")
    result = stack.cli("check", **_viewer(stack))
    assert result.returncode == 0, result.stdout + result.stderr
    text = flat(result.stdout)
    assert "QIDO-RS answers" in text
    assert "HOSP-A (2), HOSP-B (1)" in text
    assert "matches StudyInstanceUID lists" in text or "does not match StudyInstanceUID lists" in text
    assert "takes the writes of BRIDGE_WRITE_STRATEGY=client-id" in text
    assert "opens and takes a write" in text
    assert "all checks passed" in text
    # The one write: the source's Endpoint, so the sync that follows finds it.
    assert len(stack.fhir_search("Endpoint")) == 1
    assert stack.cli("sync").returncode == 0


def test_an_unmapped_issuer_exits_1_with_the_map_to_fill_in(stack: Stack) -> None:
    _store(stack, "HOSP-A", "HOSP-Z", "HOSP-Z", None)
    result = stack.cli("check", "--json", **_viewer(stack))
    assert result.returncode == 1, result.stdout + result.stderr
    data = json.loads(result.stdout)
    assert data["patient_issuers"]["test-orthanc"] == {"HOSP-Z": 2, "HOSP-A": 1, "(no issuer)": 1}
    wanted = data["patient_issuer_systems_to_set"]["test-orthanc"]
    assert wanted["HOSP-Z"] == "<system of HOSP-Z>"
    assert wanted["HOSP-A"].startswith("urn:oid:")  # the existing map is kept
    parks = [f for f in data["findings"] if f["severity"] == "parks"]
    assert parks and "HOSP-Z" in parks[0]["text"] and "BRIDGE_PATIENT_ISSUER_SYSTEMS" in parks[0]["text"]
    # The text form prints the setting ready to paste.
    text = stack.cli("check", **_viewer(stack)).stdout
    assert "BRIDGE_PATIENT_ISSUER_SYSTEMS='{" in text and "<system of HOSP-Z>" in text


def test_an_archive_that_does_not_answer_exits_3_naming_its_url(stack: Stack) -> None:
    result = stack.cli("check", dicomweb_url=f"http://127.0.0.1:{free_loopback_port()}/dicom-web")
    assert result.returncode == 3, result.stdout + result.stderr
    text = flat(result.stdout)
    assert "does not answer" in text and "BRIDGE_DICOMWEB_URL" in text


def test_an_archive_url_that_is_not_dicomweb_exits_2_naming_it(stack: Stack) -> None:
    result = stack.cli("check", dicomweb_url=stack.fhir.base_url)
    assert result.returncode == 2, result.stdout + result.stderr
    text = flat(result.stdout)
    assert "BRIDGE_DICOMWEB_URL" in text and "the URL before /studies" in text


@pytest.mark.parametrize("strategy", ["client-id", "conditional"])
@pytest.mark.parametrize("command", ["check", "sync"])
def test_a_fhir_url_pointing_at_the_archive_says_it_is_not_a_fhir_server(
    stack: Stack, command: str, strategy: str
) -> None:
    # Not advice to change BRIDGE_WRITE_STRATEGY (which leads to another 404), nor the bare 404
    # of the conditional PUT: under either strategy, the URL is what to fix.
    _store(stack, "HOSP-A")
    result = stack.cli(command, fhir_url=stack.orthanc.dicomweb_url, write_strategy=strategy)
    assert result.returncode == 2, result.stdout + result.stderr
    text = flat(result.stdout + result.stderr)
    assert "BRIDGE_FHIR_URL" in text and "is not a FHIR server" in text
    assert "BRIDGE_WRITE_STRATEGY" not in text


def test_a_fhir_server_that_does_not_answer_exits_3(stack: Stack) -> None:
    result = stack.cli("check", fhir_url=f"http://127.0.0.1:{free_loopback_port()}/fhir")
    assert result.returncode == 3, result.stdout + result.stderr
    assert "BRIDGE_FHIR_URL" in flat(result.stdout)


def test_a_store_that_cannot_open_exits_4_naming_the_folder_and_setting(stack: Stack, tmp_path: Path) -> None:
    missing = tmp_path / "no-such-folder" / "state.db"
    result = stack.cli("check", state_url=f"sqlite:///{missing}")
    assert result.returncode == 4, result.stdout + result.stderr
    text = flat(result.stdout)
    assert str(missing.parent) in text and "BRIDGE_STATE_URL" in text


def test_a_viewer_that_does_not_answer_exits_3_naming_the_setting(stack: Stack) -> None:
    dead = f"http://127.0.0.1:{free_loopback_port()}"
    result = stack.cli("check", viewer_urls=json.dumps({"ohif": dead}))
    assert result.returncode == 3, result.stdout + result.stderr
    text = flat(result.stdout)
    assert dead in text and "BRIDGE_VIEWER_URLS" in text


@pytest.fixture(scope="module")
def guarded() -> Iterator[tuple[OrthancServer, FhirTestServer]]:
    """An archive that wants HTTP basic credentials, and a FHIR server that wants a bearer token."""
    ensure_installed()
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    fhir = FhirTestServer(
        log_path=ARTIFACTS / "fhir-server-check.log", env={"FHIR_AUTH_STATIC_TOKENS": FHIR_TOKEN}
    )
    archive = OrthancServer(
        name="bridge-check-auth",
        basic_auth=(ARCHIVE_USER, ARCHIVE_PASSWORD),
        log_path=ARTIFACTS / "orthanc-check-auth.log",
    )
    with fhir, archive:
        yield archive, fhir


def _findings(result: Any) -> list[dict[str, Any]]:
    """The findings worth fixing (not OK), as ``bridge check --json`` gives them."""
    return [f for f in json.loads(result.stdout)["findings"] if f["severity"] != "ok"]


def test_archive_credentials_refused_exit_3_naming_the_auth_setting(
    stack: Stack, guarded: tuple[OrthancServer, FhirTestServer]
) -> None:
    archive, _ = guarded
    basic = {
        "dicomweb_url": archive.dicomweb_url,
        "dicomweb_auth": "basic",
        "dicomweb_username": ARCHIVE_USER,
    }
    refused = stack.cli("check", "--json", dicomweb_password=WRONG, **basic, **_viewer(stack))
    assert refused.returncode == 3, refused.stdout + refused.stderr
    [finding] = _findings(refused)  # the archive's, and nothing else is wrong
    assert finding["peer"] == "archive test-orthanc" and finding["severity"] == "upstream"
    assert "refused the bridge's credentials" in finding["text"] and "401" in finding["text"]
    assert "BRIDGE_DICOMWEB_AUTH" in finding["text"]
    assert WRONG not in refused.stdout + refused.stderr  # the secret is never shown
    # The right password: the same archive answers, and check passes.
    accepted = stack.cli("check", "--json", dicomweb_password=ARCHIVE_PASSWORD, **basic, **_viewer(stack))
    assert accepted.returncode == 0, accepted.stdout + accepted.stderr
    assert _findings(accepted) == []


@pytest.mark.parametrize(
    "credentials",
    [
        {
            "fhir_auth": "basic",
            "fhir_username": "bridge",
            "fhir_password": WRONG,
        },  # basic, where a token is wanted
        {"fhir_auth": "bearer", "fhir_token": WRONG},  # a token it does not know
    ],
    ids=["basic", "wrong-token"],
)
def test_fhir_credentials_refused_exit_3_naming_the_auth_setting(
    stack: Stack, guarded: tuple[OrthancServer, FhirTestServer], credentials: dict[str, str]
) -> None:
    _, fhir = guarded
    refused = stack.cli("check", "--json", fhir_url=fhir.base_url, **credentials, **_viewer(stack))
    assert refused.returncode == 3, refused.stdout + refused.stderr
    [finding] = _findings(refused)  # its CapabilityStatement answers anyone; the search wants the token
    assert finding["peer"] == "FHIR server" and finding["severity"] == "upstream"
    assert "refused the bridge's credentials" in finding["text"] and "401" in finding["text"]
    assert "BRIDGE_FHIR_AUTH" in finding["text"]
    assert WRONG not in refused.stdout + refused.stderr
    accepted = stack.cli(
        "check", "--json", fhir_url=fhir.base_url, fhir_auth="bearer", fhir_token=FHIR_TOKEN, **_viewer(stack)
    )
    assert accepted.returncode == 0, accepted.stdout + accepted.stderr


def test_a_store_that_opens_read_only_exits_4_naming_the_file_and_setting(stack: Stack) -> None:
    assert stack.cli("status").returncode == 0  # the store exists, migrated, as after any run
    read_only = f"sqlite:///file:{stack.state_path}?mode=ro&uri=true"
    result = stack.cli("check", "--json", state_url=read_only, **_viewer(stack))
    assert result.returncode == 4, result.stdout + result.stderr
    [finding] = _findings(result)
    assert finding["peer"] == "state store" and finding["severity"] == "store"
    assert f"(file {stack.state_path}) opens but takes no write" in finding["text"]
    assert "readonly database" in finding["text"] and "BRIDGE_STATE_URL" in finding["text"]
    # And sync, whose first write is its run record, says where and which setting too.
    synced = stack.cli("sync", state_url=read_only)
    assert synced.returncode == 4, synced.stdout + synced.stderr
    text = flat(synced.stderr)
    assert str(stack.state_path) in "".join(synced.stderr.split()) and "BRIDGE_STATE_URL" in text
