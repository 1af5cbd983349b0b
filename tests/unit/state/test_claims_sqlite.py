"""Study claims on SQLite: one process owns the store, so every claim succeeds."""

from __future__ import annotations

from pathlib import Path

from bridge.state.store import SqlStore


def test_claims_are_a_no_op_on_sqlite(tmp_path: Path) -> None:
    store = SqlStore(f"sqlite:///{tmp_path / 'state.db'}")
    try:
        assert store.claim_study("pacs", "1.2.3") is True
        assert store.claim_study("pacs", "1.2.3") is True
        store.release_study("pacs", "1.2.3")
        store.release_study("pacs", "never-claimed")
    finally:
        store.close()
