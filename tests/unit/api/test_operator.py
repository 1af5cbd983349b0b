"""The operator page in-process: who may see it, what it shows of the store, and its same-origin retries."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest

from bridge.api.auth.security import Caller, roles_of
from bridge.api.auth.session import SessionData
from bridge.api.routes.operator import is_operator
from bridge.state.store import SqlStore
from tests.unit.api.test_app import client
from tests.unit.resolve.fake_fhir import FakeFhir
from tests.unit.settings_factory import make_settings

pytestmark = pytest.mark.anyio

UID_A, UID_B, UID_C = (
    "1.2.826.0.1.3680043.8.498.11",
    "1.2.826.0.1.3680043.8.498.12",
    "1.2.826.0.1.3680043.8.498.13",
)
NO_ISSUER = "IssuerOfPatientID 'HOSP-X' has no identifier system: add it to BRIDGE_PATIENT_ISSUER_SYSTEMS"
FORM = {"Content-Type": "application/x-www-form-urlencoded"}
SAME_ORIGIN = {**FORM, "Origin": "http://bridge.test"}


def _park(tmp_path: Path) -> None:
    store = SqlStore(f"sqlite:///{tmp_path / 'state.db'}")
    try:
        for uid in (UID_A, UID_B):
            store.park("default", uid, kind="patient", reason=NO_ISSUER, attribute="IssuerOfPatientID")
        store.park("default", UID_C, kind="mapping", reason="StudyDate is not a date", attribute="StudyDate")
        store.park("default", "unknown:7", kind="mapping", reason="StudyDate is not a date", attribute=None)
    finally:
        store.close()


@asynccontextmanager
async def operator_api(tmp_path: Path, **overrides: Any) -> AsyncIterator[httpx.AsyncClient]:
    _park(tmp_path)
    async with client(tmp_path, FakeFhir(), **overrides) as api:
        yield api


def test_who_is_an_operator() -> None:
    settings = make_settings(operator_role="ops")
    unset = make_settings()
    assert is_operator(Caller("api-key"), settings) and is_operator(Caller("anonymous"), unset)
    assert is_operator(Caller("session", "u", roles=frozenset({"ops", "x"})), settings)
    assert is_operator(Caller("jwt", "u", roles=frozenset({"ops"})), settings)
    assert not is_operator(Caller("jwt", "u", roles=frozenset({"ops"})), unset)  # no role named: keys only
    assert not is_operator(Caller("session", "u", roles=frozenset({"clinician"})), settings)
    # one patient's caller (EHR launch, SMART app) never, whatever its roles
    assert not is_operator(Caller("session", "u", patient="p1", roles=frozenset({"ops"})), settings)


def test_roles_are_read_from_a_list_or_a_string_and_nothing_else() -> None:
    assert roles_of({"roles": ["ops", 3, ""]}, "roles") == {"ops"}
    assert roles_of({"groups": "ops admins"}, "groups") == {"ops", "admins"}
    assert roles_of({"roles": {"ops": True}}, "roles") == frozenset()
    kept = SessionData("u", None, frozenset(), "c", roles=frozenset({"ops"}))
    assert SessionData.from_json(kept.to_json()).caller().roles == {"ops"}  # a session keeps its roles


async def test_the_page_shows_parked_studies_by_reason_with_retry_buttons_and_the_runs(
    tmp_path: Path,
) -> None:
    async with operator_api(tmp_path) as api:
        page = await api.get("/operator")
    assert page.status_code == 200 and page.headers["cache-control"] == "no-store"
    text = page.text
    assert "Last successful run: <strong>never</strong>" in text
    assert '<strong class="parked-count">4 parked</strong>' in text
    # Grouped by reason, the largest group first, each with its button and one per study.
    assert text.index(NO_ISSUER.replace("'", "&#x27;")) < text.index("StudyDate is not a date")
    assert text.count('class="retry-reason"') == 2 and "Retry all 2" in text
    assert text.count('class="retry-study"') == 4
    assert f'data-study-uid="{UID_A}"' in text and "(IssuerOfPatientID)" in text
    assert "No runs yet." in text


async def test_an_api_key_is_an_operator_and_a_key_less_browser_is_told_how_to_sign_in(
    tmp_path: Path,
) -> None:
    async with operator_api(tmp_path, api_keys=["k-1"]) as api:
        with_key = await api.get("/operator", headers={"X-API-Key": "k-1"})
        browser = await api.get("/operator", headers={"Accept": "text/html"})
        program = await api.post("/operator/retry", data={"source": "default", "study_uid": UID_A})
    assert with_key.status_code == 200 and "Signed in with an API key" in with_key.text
    assert browser.status_code == 401 and "Sign-in needed" in browser.text
    assert program.status_code == 401


async def test_a_retry_must_come_from_the_page_itself_unless_a_key_sends_it(tmp_path: Path) -> None:
    form = {"source": "default", "study_uid": "unknown:7"}
    async with operator_api(tmp_path) as api:  # no authentication: a browser's POST is a cookie-less CSRF
        cross = await api.post(
            "/operator/retry", data=form, headers={**FORM, "Origin": "https://evil.example"}
        )
        blind = await api.post("/operator/retry", data=form, headers=FORM)
        same = await api.post("/operator/retry", data=form, headers=SAME_ORIGIN)
        by_referer = await api.post(
            "/operator/retry", data=form, headers={**FORM, "Referer": "http://bridge.test/operator"}
        )
    assert cross.status_code == 403 and "same origin" in cross.json()["issue"][0]["diagnostics"]
    assert blind.status_code == 403
    # A row parked before its UID was read cannot be asked of the archive: nothing retried.
    assert same.status_code == 303 and same.headers["location"] == "/operator?retried=0&passed=0&still=0"
    assert by_referer.status_code == 303
    async with client(tmp_path, FakeFhir(), api_keys=["k-1"]) as api:
        keyed = await api.post("/operator/retry", data=form, headers={**FORM, "X-API-Key": "k-1"})
    assert keyed.status_code == 303


async def test_a_retry_names_a_known_source_and_one_study_or_one_reason(tmp_path: Path) -> None:
    async with operator_api(tmp_path) as api:
        both = await api.post(
            "/operator/retry",
            data={"source": "default", "study_uid": UID_A, "reason": NO_ISSUER},
            headers=SAME_ORIGIN,
        )
        neither = await api.post("/operator/retry", data={"source": "default"}, headers=SAME_ORIGIN)
        unknown = await api.post(
            "/operator/retry", data={"source": "x", "study_uid": UID_A}, headers=SAME_ORIGIN
        )
        huge = await api.post("/operator/retry", content=b"reason=" + b"x" * 20_000, headers=SAME_ORIGIN)
    for answer in (both, neither, unknown, huge):
        assert answer.status_code == 422 and answer.json()["resourceType"] == "OperationOutcome"
    assert "no source is named 'x'" in unknown.json()["issue"][0]["diagnostics"]
