"""Unit-test fixtures: no network, no shared state between tests."""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

# `tests.builders` and `tests.unit.fakes` are imported by name; pytest's default import mode puts
# only the test folders on sys.path. (A `pythonpath = ["."]` in pyproject would make this moot.)
_ROOT = str(Path(__file__).resolve().parents[2])
if _ROOT not in sys.path:
    sys.path.insert(0, _ROOT)


@pytest.fixture
def anyio_backend() -> str:
    """Async tests run on asyncio, the loop the bridge runs on."""
    return "asyncio"


@pytest.fixture(autouse=True)
def clean_environment(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """No BRIDGE_* variable of the developer's shell leaks into a test, and no cached settings."""
    from bridge.config import get_settings

    for name in list(os.environ):
        if name.upper().startswith("BRIDGE_"):
            monkeypatch.delenv(name)
    get_settings.cache_clear()
    yield
    get_settings.cache_clear()
