"""One way for unit tests to make ``Settings``: the fake upstreams' URLs, then what a test sets."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from bridge.config import Settings
from tests.unit.resolve.fake_fhir import DICOMWEB_BASE, FHIR_BASE


def make_settings(tmp_path: Path | None = None, /, **overrides: Any) -> Settings:
    """Settings for a test, given by their flat names as operators write them.

    With ``tmp_path`` they are an app's under test: its state store in that folder and no retries
    (the fakes answer at once, and a test of a failure wants it on the first try).
    """
    values: dict[str, Any] = {"dicomweb_url": DICOMWEB_BASE, "fhir_url": FHIR_BASE}
    if tmp_path is not None:
        values |= {"state_url": f"sqlite:///{tmp_path / 'state.db'}", "http_retries": 0}
    return Settings(**(values | overrides))
