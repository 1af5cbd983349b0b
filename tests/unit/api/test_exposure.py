"""Secure by default: no anonymous API off loopback unless asked; auth on every patient-data route."""

from __future__ import annotations

from pathlib import Path

import pytest

from bridge.api.exposure import check_listen_address
from bridge.config.hosts import is_loopback
from bridge.errors import ConfigurationError
from tests.unit.api.test_app import client, settings
from tests.unit.resolve.fake_fhir import FakeFhir, endpoint, imaging_study

pytestmark = pytest.mark.anyio


@pytest.mark.parametrize("host", ["127.0.0.1", "127.0.0.2", "::1", "[::1]", "localhost", "LOCALHOST"])
def test_loopback_addresses(host: str) -> None:
    assert is_loopback(host)


@pytest.mark.parametrize("host", ["0.0.0.0", "::", "10.1.2.3", "bridge.example.org", "localhost.evil.org"])
def test_other_addresses(host: str) -> None:
    assert not is_loopback(host)


def test_no_anonymous_api_on_a_non_loopback_address(tmp_path: Path) -> None:
    with pytest.raises(ConfigurationError, match="BRIDGE_API_ALLOW_ANONYMOUS=true"):
        check_listen_address("0.0.0.0", settings(tmp_path))
    check_listen_address("127.0.0.1", settings(tmp_path))
    check_listen_address("0.0.0.0", settings(tmp_path, api_keys=["k"]))
    check_listen_address("0.0.0.0", settings(tmp_path, api_allow_anonymous=True))


def test_anonymous_on_purpose_is_said_at_start_up(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    check_listen_address("0.0.0.0", settings(tmp_path, api_allow_anonymous=True))
    assert "without authentication" in caplog.text


@pytest.fixture
def fake() -> FakeFhir:
    server = FakeFhir()
    server.add(imaging_study(), endpoint())
    return server


async def test_record_and_on_demand_sync_need_the_configured_auth(tmp_path: Path, fake: FakeFhir) -> None:
    async with client(tmp_path, fake, api_keys=["k-one"]) as c:
        assert (await c.get("/record/imaging-studies/is1/thumbnail")).status_code == 401
        assert (await c.post("/studies/1.2.3/sync")).status_code == 401
        assert (await c.post("/studies/1.2.3/sync", headers={"X-API-Key": "k-one"})).status_code != 401


async def test_metrics_and_docs_follow_the_auth_unless_a_setting_opens_them(
    tmp_path: Path, fake: FakeFhir
) -> None:
    closed = ("/metrics", "/docs", "/redoc", "/openapi.json")
    async with client(tmp_path, fake, api_keys=["k-one"]) as c:  # default: auth on, so these need it
        assert [(await c.get(path)).status_code for path in closed] == [401] * 4
        key = {"X-API-Key": "k-one"}
        assert [(await c.get(path, headers=key)).status_code for path in closed] == [200] * 4
        assert (await c.get("/openapi.json", headers=key)).json()["info"]["title"]
        assert (await c.get("/healthz")).status_code == 200  # probes stay open
    async with client(tmp_path, fake, api_keys=["k-one"], api_metrics_auth=False, api_docs_auth=False) as c:
        assert [(await c.get(path)).status_code for path in closed] == [200] * 4
    async with client(tmp_path, fake) as c:  # no auth configured: nothing to ask for
        assert [(await c.get(path)).status_code for path in closed] == [200] * 4


def test_bridge_serve_refuses_all_addresses_without_auth(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    from typer.testing import CliRunner

    from bridge.cli import app

    monkeypatch.setenv("BRIDGE_DICOMWEB_URL", "http://127.0.0.1:1/dicom-web")
    monkeypatch.setenv("BRIDGE_FHIR_URL", "http://127.0.0.1:1/fhir")
    monkeypatch.setenv("BRIDGE_STATE_URL", f"sqlite:///{tmp_path / 'state.db'}")
    for command in ("serve", "run"):
        result = CliRunner().invoke(app, [command, "--host", "0.0.0.0"])
        assert result.exit_code == 2
        assert "BRIDGE_API_ALLOW_ANONYMOUS" in " ".join(result.stderr.split())


async def test_a_trailing_slash_never_redirects_to_the_callers_host(tmp_path: Path, fake: FakeFhir) -> None:
    async with client(tmp_path, fake) as c:
        answer = await c.get("/viewers/", headers={"Host": "evil.example"})
        assert answer.status_code == 404
        assert "location" not in answer.headers
        assert (await c.get("/viewers")).status_code == 200
