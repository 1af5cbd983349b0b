"""Fixtures of the sync tests: a real SQLite store in a temporary folder, and a world around it."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from bridge.state.store import SqlStore
from tests.unit.sync.world import World


@pytest.fixture
def store(tmp_path: Path) -> Iterator[SqlStore]:
    opened = SqlStore(f"sqlite:///{tmp_path / 'state.db'}")
    yield opened
    opened.close()


@pytest.fixture
def world(store: SqlStore) -> World:
    return World(store)
