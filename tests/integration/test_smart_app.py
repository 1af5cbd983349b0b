"""A SMART app's view: one patient's token finds the studies on the FHIR server, then the images through
the bridge's gateway at the Endpoint's address, with the same token; another patient's study is 403.

Everything is real: Orthanc holds the studies, the bridge syncs them into the FHIR server with the
gateway as the Endpoint's address (BRIDGE_DICOMWEB_PUBLIC_URL), oidc-provider issues the app's JWT
access tokens (with `patient` and `scope`), the bridge checks them against the provider's JWKS, and
the app is dicomweb-client. The AuditEvents of the accesses end up on the FHIR server.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import httpx
import pytest
from dicomweb_client.api import DICOMwebClient
from requests import HTTPError

from bridge.api.app import create_app
from tests.integration.conftest import DEFAULT_PATIENT_SYSTEM, Stack
from tests.stack.oidc import OidcProvider, secret_client
from tests.stack.process import free_loopback_port
from tests.stack.samples import SeriesSpec, StudySpec, build_study, stow
from tests.stack.viewer import ThreadedServer

pytestmark = pytest.mark.integration

AUDIENCE = "http://127.0.0.1/fhir-dicomweb-bridge"
SMART_SCOPES = "launch/patient patient/ImagingStudy.read patient/Patient.read"
APP_SECRETS = {"app-ann": "ann-secret-4f1d", "app-bob": "bob-secret-9c2e"}


@dataclass
class World:
    fhir_base: str
    bridge: str
    idp: OidcProvider
    patients: dict[str, str]  # PatientID -> FHIR id
    studies: dict[str, tuple[str, list[str]]]  # PatientID -> (Study UID, SOP Instance UIDs)

    def token(self, client_id: str) -> str:
        answer = httpx.post(
            self.idp.token_url,
            data={"grant_type": "client_credentials", "scope": SMART_SCOPES},
            auth=(client_id, APP_SECRETS[client_id]),
            timeout=10,
        )
        answer.raise_for_status()
        return str(answer.json()["access_token"])


@contextmanager
def smart_apps(stack: Stack) -> Iterator[tuple[dict[str, str], OidcProvider]]:
    """The synced Patients (PatientID -> FHIR id), and the authorization server issuing each app's token.

    app-ann's tokens are for MRN-ANN's Patient, app-bob's for MRN-BOB's.
    """
    patients = {
        str(i["value"]): str(p["id"])
        for p in stack.fhir_search("Patient")
        for i in p.get("identifier", [])
        if i.get("system") == DEFAULT_PATIENT_SYSTEM
    }
    clients = [
        secret_client(client_id, secret, scope=SMART_SCOPES) for client_id, secret in APP_SECRETS.items()
    ]
    with OidcProvider(
        clients,
        scopes=SMART_SCOPES.split(),
        resource={"audience": AUDIENCE, "scopes": SMART_SCOPES},
        patients={"app-ann": patients["MRN-ANN"], "app-bob": patients["MRN-BOB"]},
    ) as idp:
        yield patients, idp


def app_token_settings(idp: OidcProvider) -> dict[str, str]:
    """The bridge's settings to take the apps' tokens, and to write the audit trail to the FHIR server."""
    return {
        "jwt_jwks_url": idp.jwks_url,
        "jwt_audience": AUDIENCE,
        "jwt_issuer": idp.issuer,
        "audit": "fhir",
        "audit_flush_interval": "0.2",
    }


@pytest.fixture
def world(stack: Stack, monkeypatch: pytest.MonkeyPatch) -> Iterator[World]:
    port = free_loopback_port()
    gateway_url = f"http://127.0.0.1:{port}/dicom-web"
    studies: dict[str, tuple[str, list[str]]] = {}
    for patient_id, name in (("MRN-ANN", "Ann^Example"), ("MRN-BOB", "Bob^Example")):
        datasets = build_study(
            StudySpec(patient_id=patient_id, patient_name=name, series=[SeriesSpec("CT", instances=2)])
        )
        stow(stack.orthanc.dicomweb_url, datasets)
        studies[patient_id] = (
            str(datasets[0].StudyInstanceUID),
            sorted(str(ds.SOPInstanceUID) for ds in datasets),
        )
    report = stack.sync(dicomweb_public_url=gateway_url)
    assert report.counts.created == 2
    with smart_apps(stack) as (patients, idp):
        env = stack.settings_env(dicomweb_public_url=gateway_url, **app_token_settings(idp))
        for name, value in env.items():
            monkeypatch.setenv(name, value)
        from bridge.config import load_settings

        with ThreadedServer(create_app(load_settings()), port=port, name="bridge API"):
            yield World(stack.fhir.base_url, f"http://127.0.0.1:{port}", idp, patients, studies)


def _smart_search(world: World, token: str, patient: str) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    answer = httpx.get(
        f"{world.fhir_base}/ImagingStudy",
        params={"patient": patient, "_include": "ImagingStudy:endpoint"},
        headers={"Authorization": f"Bearer {token}"},
        timeout=30,
    )
    answer.raise_for_status()
    resources = [e["resource"] for e in answer.json().get("entry", [])]
    endpoints = {f"Endpoint/{r['id']}": r for r in resources if r["resourceType"] == "Endpoint"}
    return [r for r in resources if r["resourceType"] == "ImagingStudy"], endpoints


def _audit_events(world: World, expected: int) -> list[dict[str, Any]]:
    deadline = time.monotonic() + 20
    while True:
        answer = httpx.get(
            f"{world.fhir_base}/AuditEvent",
            params={"_count": "100"},
            headers={"Cache-Control": "no-cache"},  # HAPI repeats a search's answer for 60 s otherwise
            timeout=30,
        )
        answer.raise_for_status()
        events = [e["resource"] for e in answer.json().get("entry", [])]
        if len(events) >= expected or time.monotonic() > deadline:
            return events
        time.sleep(0.3)


@pytest.mark.interop
def test_a_smart_apps_token_gets_its_patients_images_through_the_endpoint_and_nothing_else(
    world: World, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    token = world.token("app-ann")
    ann = world.patients["MRN-ANN"]
    studies, endpoints = _smart_search(world, token, ann)
    assert len(studies) == 1
    study = studies[0]
    endpoint = endpoints[study["endpoint"][0]["reference"]]
    assert endpoint["address"] == f"{world.bridge}/dicom-web"  # the Endpoint sends the app to the gateway
    study_uid, sop_uids = world.studies["MRN-ANN"]

    app = DICOMwebClient(url=endpoint["address"], headers={"Authorization": f"Bearer {token}"})
    found = app.search_for_instances(study_instance_uid=study_uid)
    assert sorted(i["00080018"]["Value"][0] for i in found) == sop_uids
    metadata = app.retrieve_study_metadata(study_uid)
    assert sorted(m["00080018"]["Value"][0] for m in metadata) == sop_uids
    series_uid = metadata[0]["0020000E"]["Value"][0]
    instance = app.retrieve_instance(study_uid, series_uid, metadata[0]["00080018"]["Value"][0])
    assert instance.PatientID == "MRN-ANN"
    assert [s["0020000D"]["Value"][0] for s in app.search_for_studies()] == [study_uid]

    # Bob's study with Ann's token: refused, by the gateway, before the archive is asked.
    bob_uid, _ = world.studies["MRN-BOB"]
    with pytest.raises(HTTPError) as refused:
        app.retrieve_study_metadata(bob_uid)
    assert refused.value.response.status_code == 403
    anonymous = DICOMwebClient(url=endpoint["address"])
    with pytest.raises(HTTPError) as unauthenticated:
        anonymous.retrieve_study_metadata(study_uid)
    assert unauthenticated.value.response.status_code == 401
    # Bob's own token opens Bob's study.
    bob = DICOMwebClient(
        url=endpoint["address"], headers={"Authorization": f"Bearer {world.token('app-bob')}"}
    )
    assert len(bob.retrieve_study_metadata(bob_uid)) == 2

    # The call without a token is a security alert, naming the study it asked for (one per address).
    everything = _audit_events(world, expected=6)  # 5 accesses and 1 alert: wait for them all
    alerts = [e for e in everything if e["type"]["code"] == "110113"]
    events = [e for e in everything if e["type"]["code"] != "110113"]
    assert [a["entity"][0]["what"]["identifier"]["value"] for a in alerts] == [f"urn:oid:{study_uid}"]
    by_outcome = {
        (e["outcome"], e["subtype"][1]["code"], e["entity"][0]["what"]["reference"]) for e in events
    }
    assert ("0", "image-read", f"Patient/{ann}") in by_outcome
    assert ("0", "image-query", f"Patient/{ann}") in by_outcome
    assert ("4", "image-read", f"Patient/{world.patients['MRN-BOB']}") in by_outcome
    reads = [e for e in events if e["subtype"][1]["code"] == "image-read" and e["outcome"] == "0"]
    assert len(reads) == 2  # Ann's three retrieves of one study are one event; Bob's is another
    assert {
        a["who"]["identifier"]["value"]
        for e in reads
        for a in e["agent"]
        if not a["requestor"] and "identifier" in a["who"]
    } == {"app-ann", "app-bob"}

    logged = caplog.text
    for secret in (token, "MRN-ANN", "MRN-BOB", "Ann^Example", "Example"):
        assert secret not in logged
