"""`bridge serve`'s /docs in a real browser: Swagger UI renders the API from the bridge's own assets."""

from __future__ import annotations

from pathlib import Path
from urllib.parse import urlsplit

import pytest

from tests.integration.conftest import Stack
from tests.integration.test_resolver import serve
from tests.stack.viewer import ensure_chromium, ensure_installed, run_page

pytestmark = pytest.mark.integration


def test_swagger_ui_renders_the_api_from_the_bridges_own_assets(stack: Stack, tmp_path: Path) -> None:
    chromium = ensure_chromium()
    ensure_installed()  # playwright-core
    with serve(stack) as url:
        seen = run_page(
            {
                "url": f"{url}/docs",
                # Swagger UI's operation blocks exist only once its script ran and read /openapi.json.
                "waitFor": ".opblock-summary-path",
                "screenshot": str(tmp_path / "docs.png"),
                "chromium": chromium,
            },
            tmp_path,
            timeout=120,
        )
    assert seen["status"] == 200
    assert "/imaging-studies/{id}/links" in seen["text"]
    origins = {f"{p.scheme}://{p.netloc}" for p in map(urlsplit, seen["requests"]) if p.scheme != "data"}
    assert origins == {url}, origins  # nothing from a CDN, fonts included
    assert seen["failed_requests"] == []
    assert (tmp_path / "docs.png").stat().st_size > 10_000  # a rendered page, not a blank one
