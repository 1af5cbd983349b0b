"""Links of a cached study (answered before FastAPI routes them): the same answers, checks and records."""

from __future__ import annotations

import logging
import re
from pathlib import Path

import anyio
import pytest
from cryptography.hazmat.primitives.asymmetric import rsa

from tests.unit.api.test_app import _pem, _token, client, fake, rsa_key  # noqa: F401 - fixtures
from tests.unit.resolve.fake_fhir import STUDY_UID, FakeFhir

pytestmark = pytest.mark.anyio
BY_UID = f"/studies/{STUDY_UID}/links"
BY_ID = "/imaging-studies/is1/links"


def _count(metrics: str, name: str, **labels: str) -> float:
    """The value of one series of the Prometheus text (0 when absent); labels in alphabetical order, as written."""
    prefix = name + "{" + ",".join(f'{k}="{v}"' for k, v in labels.items()) + "} "
    values = [float(line[len(prefix) :]) for line in metrics.splitlines() if line.startswith(prefix)]
    return values[0] if values else 0.0


@pytest.mark.parametrize("path", [BY_UID, BY_ID])
async def test_a_cached_study_answers_the_same_bytes_headers_and_counts_without_the_fhir_server(
    tmp_path: Path, fake: FakeFhir, path: str
) -> None:
    async with client(tmp_path, fake) as api:
        first = await api.get(path)
        asked = len(fake.requests)
        before = (await api.get("/metrics")).text
        again = [await api.get(path) for _ in range(3)]
        after = (await api.get("/metrics")).text
    assert first.status_code == 200 and first.json()["study_uid"] == STUDY_UID
    for answer in again:
        assert (answer.status_code, answer.content) == (200, first.content)
        assert sorted(answer.headers.items()) == sorted(first.headers.items())
        assert answer.headers["x-content-type-options"] == "nosniff"
    assert len(fake.requests) == asked
    template = "/studies/{study_uid}/links" if path == BY_UID else "/imaging-studies/{id}/links"
    requests = "bridge_http_requests_total"
    series = {"method": "GET", "route": template, "status": "200"}
    assert _count(after, requests, **series) - _count(before, requests, **series) == 3
    kind = "uid" if path == BY_UID else "id"
    hits = "bridge_resolver_lookups_total"
    assert _count(after, hits, cache="hit", kind=kind) - _count(before, hits, cache="hit", kind=kind) == 3
    assert STUDY_UID not in after and "is1" not in after


async def test_a_cached_study_still_honours_the_page_asked_for_and_refuses_a_bad_one(
    tmp_path: Path, fake: FakeFhir
) -> None:
    async with client(tmp_path, fake) as api:
        whole = (await api.get(BY_UID)).json()
        page = (await api.get(BY_UID, params={"series_offset": 1, "series_count": 1})).json()
        bad = await api.get(BY_UID, params={"series_count": 0})
        trailing = await api.get(BY_UID + "/")
    assert len(whole["series"]) == 2
    assert [s["uid"] for s in page["series"]] == [whole["series"][1]["uid"]]
    assert (page["series_offset"], page["series_total"]) == (1, 2)
    assert bad.status_code == 422 and bad.json()["resourceType"] == "OperationOutcome"
    assert trailing.status_code == 404


async def test_a_cached_study_refuses_a_missing_or_wrong_api_key(tmp_path: Path, fake: FakeFhir) -> None:
    async with client(tmp_path, fake, api_keys=["k-one"]) as api:
        assert (await api.get(BY_UID, headers={"X-API-Key": "k-one"})).status_code == 200
        assert (await api.get(BY_UID, headers={"X-API-Key": "k-one"})).status_code == 200
        wrong = await api.get(BY_UID, headers={"X-API-Key": "k-two"})
        missing = await api.get(BY_UID)
    assert wrong.status_code == 401 and wrong.json()["resourceType"] == "OperationOutcome"
    assert missing.status_code == 401


async def test_a_cached_study_refuses_and_audits_a_caller_of_another_patient_and_audits_each_reader(
    tmp_path: Path, fake: FakeFhir, rsa_key: rsa.RSAPrivateKey, caplog: pytest.LogCaptureFixture
) -> None:
    scope = "launch/patient patient/ImagingStudy.read"
    overrides = {"jwt_public_key": _pem(rsa_key), "jwt_audience": "bridge", "audit": "log"}

    def bearer(client_id: str, patient: str) -> dict[str, str]:
        token = _token(rsa_key, client_id=client_id, patient=patient, scope=scope)
        return {"Authorization": f"Bearer {token}"}

    caplog.set_level(logging.INFO, logger="bridge.audit.access")
    async with client(tmp_path, fake, **overrides) as api:
        own = await api.get(BY_UID, headers=bearer("viewer-one", "p1"))  # loads and caches it
        other = await api.get(BY_UID, headers=bearer("viewer-one", "p2"))
        second_reader = await api.get(BY_UID, headers=bearer("viewer-two", "p1"))
    assert own.status_code == 200 and second_reader.content == own.content
    assert other.status_code == 403 and "another patient" in other.text
    lines = [r.getMessage() for r in caplog.records if r.name == "bridge.audit.access"]
    assert any(re.search(r"action=links outcome=refused .*client=viewer-one", line) for line in lines)
    assert any(re.search(r"action=links outcome=success .*client=viewer-two", line) for line in lines)


async def test_a_cached_study_answers_a_browser_of_an_allowed_origin_with_cors_headers(
    tmp_path: Path, fake: FakeFhir
) -> None:
    async with client(tmp_path, fake, cors_origins=["https://viewer.example"]) as api:
        first = await api.get(BY_UID)
        again = await api.get(BY_UID)
        ok = await api.get(BY_UID, headers={"Origin": "https://viewer.example"})
        other = await api.get(BY_UID, headers={"Origin": "https://evil.example"})
    assert ok.headers["access-control-allow-origin"] == "https://viewer.example"
    assert "access-control-allow-origin" not in other.headers
    # without an Origin the answer still varies by it, for the caches in between
    assert first.headers["vary"] == again.headers["vary"] == "Origin"


async def test_a_changed_study_is_answered_anew_once_the_cache_ttl_is_over(tmp_path: Path, fake: FakeFhir) -> None:
    async with client(tmp_path, fake, resolver_cache_ttl=0.5) as api:
        first = (await api.get(BY_UID)).json()
        study = fake.resources[("ImagingStudy", "is1")]
        study["series"] = study["series"][:1]
        within = (await api.get(BY_UID)).json()
        await anyio.sleep(0.6)
        after = (await api.get(BY_UID)).json()
        again = (await api.get(BY_UID)).json()
    assert len(first["series"]) == 2 and within == first
    assert len(after["series"]) == 1 and again == after
