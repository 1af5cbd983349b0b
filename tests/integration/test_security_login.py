"""Refused logins and launches as the audit trail sees them, and SMART claims of another type, for real.

The companion of test_security.py (the attacks on sessions, the gateway and the front): here the
callbacks an attacker forges or replays and the identity provider's own refusals, each against
oidc-provider, the bridge under uvicorn and the FHIR server that receives the audit trail. Every
one is a DICOM "Security Alert" AuditEvent, one per source address and BRIDGE_AUDIT_WINDOW, and
none carries a code, a state or a token. The AuditEvents are read once the bridge has stopped: its
last flush has written everything it recorded, so a count is exact, not a count so far.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any
from urllib.parse import parse_qs, urlsplit

import httpx
import jwt
import pytest

from bridge.api.app import create_app
from tests.integration.conftest import Stack
from tests.integration.test_login import EHR_CLIENT_ID, EHR_CLIENT_SECRET, USER, login_stack
from tests.integration.test_security import _action, _callback_of
from tests.integration.test_smart_app import AUDIENCE, SMART_SCOPES, app_token_settings
from tests.stack.oidc import OidcProvider, secret_client
from tests.stack.process import free_loopback_port
from tests.stack.samples import SeriesSpec, StudySpec, build_study, stow
from tests.stack.viewer import ThreadedServer

pytestmark = pytest.mark.integration

HTML = {"Accept": "text/html"}
METADATA = {"Accept": "application/dicom+json"}
FORGED_STATE, FORGED_CODE = "forged-state-0c3e", "forged-code-0c3e"
UNKNOWN_LAUNCH = "launch-nobody-knows"  # the provider answers access_denied to a launch it never issued


def _security_alerts(stack: Stack) -> list[dict[str, Any]]:
    """The DICOM Security Alert AuditEvents on the FHIR server (read once the bridge has stopped)."""
    return [e for e in stack.fhir_search("AuditEvent") if e["type"]["code"] == "110113"]


def _query(url: str) -> dict[str, str]:
    return {k: v[0] for k, v in parse_qs(urlsplit(url).query).items()}


def _forged(browser: httpx.Client, api: str, idp: OidcProvider) -> tuple[httpx.Response, list[str]]:
    answer = browser.get(f"{api}/login/callback", params={"state": FORGED_STATE, "code": FORGED_CODE})
    return answer, [FORGED_STATE, FORGED_CODE]


def _replayed(browser: httpx.Client, api: str, idp: OidcProvider) -> tuple[httpx.Response, list[str]]:
    """A real login's callback, used once (the session opens), then opened again."""
    callback = _callback_of(browser, browser.get(f"{api}/login", headers=HTML), api)
    first = browser.get(callback, headers=HTML)
    assert first.status_code == 200 and str(first.url) == f"{api}/record", first.text[:300]
    query = _query(callback)
    return browser.get(callback, headers=HTML), [query["state"], query["code"]]


def _provider_error(browser: httpx.Client, api: str, idp: OidcProvider) -> tuple[httpx.Response, list[str]]:
    """An EHR launch the provider refuses: it sends the browser back with error=access_denied."""
    start = browser.get(f"{api}/launch", params={"iss": idp.fhir_iss, "launch": UNKNOWN_LAUNCH}, headers=HTML)
    callback = _callback_of(browser, start, api)
    query = _query(callback)
    assert query.get("error") == "access_denied" and "code" not in query, callback
    return browser.get(callback, headers=HTML), [query["state"]]


Attempt = Callable[[httpx.Client, str, OidcProvider], tuple[httpx.Response, list[str]]]


@pytest.mark.parametrize(
    ("attempt", "status", "why"),
    [
        (_forged, 400, "state is unknown, already used or expired"),
        (_replayed, 400, "state is unknown, already used or expired"),
        (_provider_error, 401, "the identity provider answered access_denied"),
    ],
    ids=["forged callback", "replayed callback", "provider error"],
)
def test_a_forged_or_replayed_callback_and_a_provider_error_each_leave_one_security_alert(
    stack: Stack, monkeypatch: pytest.MonkeyPatch, attempt: Attempt, status: int, why: str
) -> None:
    with (
        login_stack(
            stack,
            monkeypatch,
            smart_launch_client_id=EHR_CLIENT_ID,
            smart_launch_client_secret=EHR_CLIENT_SECRET,
            audit="fhir",
            audit_flush_interval="0.2",
        ) as (api, idp),
        httpx.Client(follow_redirects=True, timeout=30) as browser,
    ):
        answer, secrets = attempt(browser, api, idp)
    alerts = _security_alerts(stack)  # the bridge has stopped: everything it recorded is written

    assert answer.status_code == status, answer.text[:500]
    assert "Sign in again" in answer.text
    assert len(alerts) == 1, [a.get("outcomeDesc") for a in alerts]
    (alert,) = alerts
    assert _action(alert) == "login" and alert["outcome"] == "4"
    assert alert["subtype"][0]["code"] == "110132"  # Use of Restricted Function
    assert alert["agent"][0]["network"]["address"] == "127.0.0.1"
    assert why in alert["outcomeDesc"]
    recorded = json.dumps(alert)
    for secret in (*secrets, USER, EHR_CLIENT_SECRET, UNKNOWN_LAUNCH, "eyJ"):
        assert secret not in recorded


def test_a_burst_of_twenty_refused_callbacks_from_one_address_is_one_security_alert(
    stack: Stack, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A prober varying what it sends (forged states, a replay, the provider's refusal) within
    BRIDGE_AUDIT_WINDOW is one AuditEvent, not twenty (the window is long here so that a slow
    machine cannot split the burst in two)."""
    with (
        login_stack(
            stack,
            monkeypatch,
            smart_launch_client_id=EHR_CLIENT_ID,
            smart_launch_client_secret=EHR_CLIENT_SECRET,
            audit="fhir",
            audit_flush_interval="0.2",
            audit_window="3600",
        ) as (api, idp),
        httpx.Client(follow_redirects=True, timeout=30) as browser,
    ):
        replay, _ = _replayed(browser, api, idp)  # the first refusal: one login's callback used twice
        callback = str(replay.url)
        statuses = [replay.status_code, _provider_error(browser, api, idp)[0].status_code]
        for n in range(18):
            forged = {"state": f"{FORGED_STATE}-{n}", ("code", "error")[n % 2]: "x"}
            url, params = (callback, None) if n % 3 == 0 else (f"{api}/login/callback", forged)
            answer = browser.get(url, params=params)
            statuses.append(answer.status_code)
    alerts = _security_alerts(stack)

    assert len(statuses) == 20 and set(statuses) == {400, 401}
    assert len(alerts) == 1, [a.get("outcomeDesc") for a in alerts]
    assert _action(alerts[0]) == "login" and alerts[0]["agent"][0]["network"]["address"] == "127.0.0.1"


# --- SMART claims of another type: an empty patient, a scope given as a JSON list ------------------------


def test_a_token_with_an_empty_patient_or_a_list_of_scopes_is_refused_never_unlimited(stack: Stack) -> None:
    uids = {}
    for patient_id, name in (("MRN-ANN", "Ann^Example"), ("MRN-BOB", "Bob^Example")):
        datasets = build_study(StudySpec(patient_id=patient_id, patient_name=name, series=[SeriesSpec()]))
        stow(stack.orthanc.dicomweb_url, datasets)
        uids[patient_id] = str(datasets[0].StudyInstanceUID)
    port = free_loopback_port()
    gateway_url = f"http://127.0.0.1:{port}/dicom-web"
    assert stack.sync(dicomweb_public_url=gateway_url).counts.created == 2
    ann = next(p["id"] for p in stack.fhir_search("Patient") if "MRN-ANN" in json.dumps(p["identifier"]))
    secrets = {
        "app-ann": "s-ann-1",  # Ann's patient: sees Ann's study, not Bob's
        "app-empty": "s-empty-2",  # patient "" (falsy: would read as "not limited to a patient")
        "app-scopes": "s-scopes-3",  # no patient, the same patient/ scopes as a string: limited by them
        "app-scope-list": "s-list-4",  # no patient, the scopes as a JSON list (ignored: no scopes, all)
    }
    with OidcProvider(
        [secret_client(c, s, scope=SMART_SCOPES) for c, s in secrets.items()],
        scopes=SMART_SCOPES.split(),
        resource={"audience": AUDIENCE, "scopes": SMART_SCOPES},
        patients={"app-ann": ann, "app-empty": ""},
        scope_lists=["app-scope-list"],
    ) as idp:
        settings = stack.settings(dicomweb_public_url=gateway_url, **app_token_settings(idp))

        def get(client: str, uid: str) -> httpx.Response:
            answer = httpx.post(
                idp.token_url,
                data={"grant_type": "client_credentials", "scope": SMART_SCOPES},
                auth=(client, secrets[client]),
                timeout=10,
            )
            answer.raise_for_status()
            token = answer.json()["access_token"]
            claims = jwt.decode(token, options={"verify_signature": False})
            # the provider signed what the test asked for
            assert claims.get("patient") == {"app-ann": ann, "app-empty": ""}.get(client)
            assert isinstance(claims["scope"], list if client == "app-scope-list" else str)
            return httpx.get(
                f"{gateway_url}/studies/{uid}/metadata",
                headers={**METADATA, "Authorization": f"Bearer {token}"},
                timeout=30,
            )

        with ThreadedServer(create_app(settings), port=port, name="bridge API"):
            own = get("app-ann", uids["MRN-ANN"])
            crossed = get("app-ann", uids["MRN-BOB"])
            scoped = get("app-scopes", uids["MRN-BOB"])
            empty = get("app-empty", uids["MRN-BOB"])
            listed = get("app-scope-list", uids["MRN-BOB"])
    alerts = _security_alerts(stack)

    assert own.status_code == 200 and crossed.status_code == 403 and scoped.status_code == 403
    assert empty.status_code == 401, empty.text
    assert "patient claim" in empty.json()["issue"][0]["diagnostics"]
    assert 'error="invalid_token"' in empty.headers["www-authenticate"]
    assert listed.status_code == 401, listed.text
    assert "scope claim" in listed.json()["issue"][0]["diagnostics"]
    # both refusals, from one address within the window: one security alert, the credential's
    assert [_action(a) for a in alerts] == ["authentication"]
    assert "eyJ" not in json.dumps(alerts)
