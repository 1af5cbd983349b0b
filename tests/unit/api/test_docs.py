"""/docs and /redoc load Swagger UI and ReDoc from the bridge itself, never from a public CDN."""

from __future__ import annotations

import re
from pathlib import Path

import httpx
import pytest

from tests.unit.api.test_app import client
from tests.unit.resolve.fake_fhir import FakeFhir

pytestmark = pytest.mark.anyio


@pytest.fixture
def fake() -> FakeFhir:
    return FakeFhir()  # the docs read nothing from the FHIR server


# What each referenced asset must be, by its file's ending.
TYPES = {".js": "javascript", ".css": "text/css", ".png": "image/png"}


def referenced(html: str) -> list[str]:
    """Every URL a page loads: src= and href= attributes, and the schema URL its script fetches."""
    urls = re.findall(r'(?:src|href)="([^"]+)"', html)
    urls += re.findall(r"(?:url|spec-url)['\"]?\s*[:=]\s*['\"]([^'\"]+)['\"]", html)
    return urls


async def assert_same_origin_assets(api: httpx.AsyncClient, page: str, expected: set[str]) -> None:
    answer = await api.get(page)
    assert answer.status_code == 200
    assert answer.headers["content-type"].startswith("text/html")
    urls = referenced(answer.text)
    assert expected <= set(urls), urls
    for url in urls:
        assert url.startswith("/") and not url.startswith("//"), f"{page} loads {url} from another origin"
        asset = await api.get(url)
        assert asset.status_code == 200, url
        kind = next((t for end, t in TYPES.items() if url.endswith(end)), "application/json")
        assert kind in asset.headers["content-type"], (url, asset.headers["content-type"])
        assert len(asset.content) > 0


async def test_swagger_ui_loads_its_script_style_and_schema_from_the_bridge(
    tmp_path: Path, fake: FakeFhir
) -> None:
    async with client(tmp_path, fake) as api:
        await assert_same_origin_assets(
            api,
            "/docs",
            {"/docs/assets/swagger-ui-bundle.js", "/docs/assets/swagger-ui.css", "/openapi.json"},
        )
        script = (await api.get("/docs/assets/swagger-ui-bundle.js")).text
        assert "SwaggerUIBundle" in script  # the real bundle, not an empty file
        assert (await api.get("/docs/oauth2-redirect")).status_code == 200


async def test_redoc_loads_its_script_from_the_bridge_without_google_fonts(
    tmp_path: Path, fake: FakeFhir
) -> None:
    async with client(tmp_path, fake) as api:
        await assert_same_origin_assets(api, "/redoc", {"/docs/assets/redoc.standalone.js", "/openapi.json"})


async def test_the_docs_need_the_api_key_when_api_keys_are_required_and_their_assets_do_not(
    tmp_path: Path, fake: FakeFhir
) -> None:
    async with client(tmp_path, fake, api_keys=["k-one"]) as api:
        assert (await api.get("/openapi.json")).status_code == 401
        assert (await api.get("/docs")).status_code == 401
        assert (await api.get("/docs/assets/swagger-ui.css")).status_code == 200  # no patient data
        api.headers["X-API-Key"] = "k-one"
        assert (await api.get("/openapi.json")).status_code == 200
        await assert_same_origin_assets(api, "/docs", {"/docs/assets/swagger-ui-bundle.js"})
        del api.headers["X-API-Key"]
        assert (await api.get("/docs/assets/%2e%2e/%2e%2e/%2e%2e/pyproject.toml")).status_code == 404
        assert (await api.get("/imaging-studies/is1/links")).status_code == 401  # patient data is not


async def test_a_missing_asset_is_404(tmp_path: Path, fake: FakeFhir) -> None:
    async with client(tmp_path, fake) as api:
        assert (await api.get("/docs/assets/nothing.js")).status_code == 404
