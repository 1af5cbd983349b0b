"""Freshness: the lag from the archive's change to the FHIR write, per path, for written studies only."""

from __future__ import annotations

import json
from functools import partial

import pytest

from bridge.metrics import REGISTRY
from bridge.sync.freshness import measured
from tests.unit.sync.world import World

pytestmark = pytest.mark.anyio


def observed(path: str) -> float:
    return REGISTRY.get_sample_value("bridge_sync_lag_seconds_count", {"path": path}) or 0.0


async def test_a_written_study_is_measured_from_the_archives_time_and_the_run_slowest_kept(
    world: World,
) -> None:
    uid = world.add(1)
    before = observed("push")
    source = world.ctx.source_name
    changed = {uid: 1_000.0}  # the archive's time for the change, long ago: the lag is large
    await measured(world.store, source, "push", changed, partial(world.worker().run_studies, [uid]))
    assert observed("push") == before + 1
    kept = json.loads(world.store.checkpoint(source, "lag-push") or "{}")
    written_at = world.store.sync_marks(source, [uid])[uid][1]
    assert kept["studies"] == 1 and kept["seconds"] == pytest.approx(written_at - 1_000.0, abs=0.01)


async def test_a_study_the_run_did_not_write_is_not_measured(world: World) -> None:
    uid = world.add(1)
    source = world.ctx.source_name
    await world.run()
    before = observed("feed")
    await measured(world.store, source, "feed", {uid: 1_000.0}, partial(world.worker().run_studies, [uid]))
    assert observed("feed") == before  # unchanged: nothing was written, nothing to measure
    assert world.store.checkpoint(source, "lag-feed") is None
