"""The operator page in-process: who may see it, what it shows of the store, and its same-origin retries."""

from __future__ import annotations

import html
import json
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest

from bridge.api.app import create_app
from bridge.api.auth.security import Caller, roles_of
from bridge.api.auth.session import SessionData
from bridge.api.routes.operator import is_operator
from bridge.state.store import SqlStore
from tests.builders import series_row, study_row, study_series_row
from tests.unit.api.test_app import client
from tests.unit.api.test_login import CLIENT, ISSUER, PUBLIC, SECRET, FakeIdp
from tests.unit.resolve.fake_fhir import DICOMWEB_BASE, FHIR_BASE, FakeFhir
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


# A browser session (its roles from the ID token), retrying through to the archive and FHIR server
class Peers:
    """The identity provider, an archive holding the parked studies, and a FHIR server taking writes."""

    def __init__(self, roles: list[str]) -> None:
        self.idp = FakeIdp(claims={"roles": roles})  # BRIDGE_OPERATOR_ROLE_CLAIM's default: roles
        self.fhir = FakeFhir()
        self.studies = {
            u: study_row(study_uid=u, patient_id=f"MRN-{n}", patient_issuer="HOSP-X")
            for n, u in enumerate((UID_A, UID_B, UID_C))
        }
        self.asked: list[str] = []

    async def handler(self, request: httpx.Request) -> httpx.Response:
        if request.url.host == httpx.URL(ISSUER).host:
            return self.idp.handler(request)
        if str(request.url).startswith(DICOMWEB_BASE):
            return self._archive(request)
        parts = request.url.path.removeprefix(httpx.URL(FHIR_BASE).path).strip("/").split("/")
        body = json.loads(request.content) if request.content else None
        if request.method == "PUT" and len(parts) == 2:
            version = request.headers.get("if-match", "").removeprefix('W/"').removesuffix('"') or None
            return _written(await self.fhir.update(body, if_match=version))
        if request.method == "PUT":
            return _written(await self.fhir.conditional_update(body, dict(request.url.params)))
        if request.method == "POST" and parts != [""]:
            return _written(await self.fhir.conditional_create(body, request.headers["if-none-exist"]))
        return self.fhir.handler(request)  # reads and searches

    def _archive(self, request: httpx.Request) -> httpx.Response:
        path, params = request.url.path, request.url.params
        uids = params.get("StudyInstanceUID", "").split(",")
        if path.endswith("/studies"):
            self.asked.extend(uids)
            rows = [self.studies[u] for u in uids if u in self.studies]
        elif path.endswith("/series") and "/studies/" in path:
            study_uid = path.split("/")[-2]
            rows = [series_row(series_uid=f"{study_uid}.1")] if study_uid in self.studies else []
        elif path.endswith("/series"):
            rows = [study_series_row(u, f"{u}.1") for u in uids if u in self.studies]
        else:
            rows = []
        if not rows:
            return httpx.Response(204)
        return httpx.Response(200, json=rows, headers={"Content-Type": "application/dicom+json"})


def _written(result: Any) -> httpx.Response:
    location = f"{FHIR_BASE}/{result.resource_type}/{result.id}/_history/{result.version}"
    return httpx.Response(
        201 if result.created else 200, headers={"Location": location, "ETag": f'W/"{result.version}"'}
    )


@asynccontextmanager
async def signed_in(tmp_path: Path, peers: Peers) -> AsyncIterator[httpx.AsyncClient]:
    """A browser signed in to a bridge whose operators hold the role 'ops', with parked studies."""
    _park(tmp_path)
    settings = make_settings(
        tmp_path,
        public_url=PUBLIC,
        oidc_issuer=ISSUER,
        oidc_client_id=CLIENT,
        oidc_client_secret=SECRET,
        operator_role="ops",
        # What the parked studies' reason asked for is done: HOSP-X has an identifier system now.
        patient_issuer_systems={"HOSP-X": "urn:oid:1.2.3.4"},
        viewer_urls={"ohif": "https://ohif.example"},
    )
    app = create_app(settings, transport=httpx.MockTransport(peers.handler))
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url=PUBLIC) as browser:
            to_idp = await browser.get("/login", headers={"Accept": "text/html"})
            assert to_idp.status_code == 302, to_idp.text
            done = await browser.get(
                "/login/callback", params=peers.idp.authorize(to_idp.headers["location"])
            )
            assert done.status_code in (302, 303), done.text
            yield browser


PAGE = {"Accept": "text/html,*/*"}
FROM_THE_PAGE = {**FORM, "Origin": PUBLIC}


def _parked_now(tmp_path: Path) -> dict[str, int]:
    store = SqlStore(f"sqlite:///{tmp_path / 'state.db'}")
    try:
        return {p.study_uid: p.attempts for p in store.parked("default")}
    finally:
        store.close()


async def test_a_signed_in_operator_retries_by_reason_and_those_studies_are_published(tmp_path: Path) -> None:
    peers = Peers(["radiology", "ops"])
    async with signed_in(tmp_path, peers) as browser:
        before = await browser.get("/operator", headers=PAGE)
        retried = await browser.post(
            "/operator/retry", data={"source": "default", "reason": NO_ISSUER}, headers=FROM_THE_PAGE
        )
        after = await browser.get(retried.headers.get("location", "/operator"), headers=PAGE)
    assert before.status_code == 200, before.text
    assert 'Signed in as <strong class="user">dr-who</strong>' in before.text and "Retry all 2" in before.text
    assert retried.status_code == 303, retried.text
    assert retried.headers["location"] == "/operator?retried=2&passed=2&still=0"
    # The two studies parked for that reason were asked of the archive and written, no other.
    assert sorted(set(peers.asked)) == [UID_A, UID_B]
    published = {s["identifier"][0]["value"] for s in peers.fhir.of_type("ImagingStudy")}
    assert published == {f"urn:oid:{UID_A}", f"urn:oid:{UID_B}"}
    assert sorted(_parked_now(tmp_path)) == sorted([UID_C, "unknown:7"])
    assert "Retried 2 studies: 2 published, 0 still parked." in after.text
    assert '<strong class="parked-count">2 parked</strong>' in after.text and NO_ISSUER not in after.text


async def test_a_retried_study_the_archive_no_longer_holds_is_told_as_still_parked(tmp_path: Path) -> None:
    peers = Peers(["ops"])
    del peers.studies[UID_A]
    async with signed_in(tmp_path, peers) as browser:
        retried = await browser.post(
            "/operator/retry", data={"source": "default", "study_uid": UID_A}, headers=FROM_THE_PAGE
        )
    # Not "published": it was never published, and it stays parked until the archive is corrected.
    assert retried.headers["location"] == "/operator?retried=1&passed=0&still=1"
    assert UID_A in _parked_now(tmp_path) and peers.fhir.of_type("ImagingStudy") == []


async def test_a_signed_in_user_without_the_operator_role_gets_a_page_naming_the_role(tmp_path: Path) -> None:
    peers = Peers(["clinician"])
    async with signed_in(tmp_path, peers) as browser:
        page = await browser.get("/operator", headers=PAGE)
        as_data = await browser.get("/operator", headers={"Accept": "application/json"})
        retry = await browser.post(
            "/operator/retry", data={"source": "default", "study_uid": UID_A}, headers=FROM_THE_PAGE
        )
    assert page.status_code == 403 and page.headers["content-type"].startswith("text/html")
    text = html.unescape(page.text)
    assert "needs the role 'ops' in the 'roles' claim" in text and "BRIDGE_OPERATOR_ROLE" in text
    assert 'Signed in as <strong class="user">dr-who</strong>' in text  # with a logout, to switch accounts
    assert "Retry" not in text and UID_A not in text
    assert as_data.status_code == 403 and as_data.json()["resourceType"] == "OperationOutcome"
    assert retry.status_code == 403
    assert _parked_now(tmp_path)[UID_A] == 1 and peers.asked == []  # nothing retried
