"""Studies gone from the archive: the delete policy, and the guard that refuses a mass delete."""

from __future__ import annotations

import pytest

from tests.unit.sync.world import World

pytestmark = pytest.mark.anyio


async def _published(world: World, n: int) -> list[str]:
    uids = [world.add(i) for i in range(1, n + 1)]
    await world.run()
    return uids


async def test_a_study_gone_from_the_archive_is_marked_entered_in_error(world: World) -> None:
    uids = await _published(world, 10)
    del world.source.studies[uids[0]]
    report = await world.worker().run(kind="reconcile", reconcile=True)
    assert report.deletions == [{"study_uid": uids[0], "action": "marked"}]
    assert world.study(uids[0])["status"] == "entered-in-error"
    assert "Status: entered-in-error" in world.study(uids[0])["text"]["div"], "the record shows it"
    assert world.study(uids[1])["status"] == "available"


async def test_a_sweep_missing_too_many_studies_applies_no_delete_and_says_why(world: World) -> None:
    # An archive answering with a fraction of its studies (a broken index, a wrong URL) must not
    # retire everything else.
    uids = await _published(world, 10)
    for uid in uids[:5]:
        del world.source.studies[uid]
    report = await world.worker(delete_max_fraction=0.2).run(kind="reconcile", reconcile=True)
    assert report.deletions == []
    assert report.counts.deleted == 0
    assert "BRIDGE_DELETE_MAX_FRACTION" in (report.error or "")
    assert all(world.study(uid)["status"] == "available" for uid in uids)


async def test_the_guard_allows_what_the_fraction_allows(world: World) -> None:
    uids = await _published(world, 10)
    for uid in uids[:5]:
        del world.source.studies[uid]
    report = await world.worker(delete_max_fraction=0.5).run(kind="reconcile", reconcile=True)
    assert report.counts.deleted == 5


async def test_studies_a_reconciliation_publishes_are_seen_not_retired(world: World) -> None:
    # A reconciling run that finds new studies publishes them, and must count them as seen: they
    # are recorded after their page's writes, which overlap the next page's preparation.
    await _published(world, 10)
    new = [world.add(i) for i in range(11, 14)]
    report = await world.worker(delete_max_fraction=1.0).run(kind="reconcile", reconcile=True)
    assert report.deletions == [] and report.counts.deleted == 0
    assert report.counts.created == 3
    assert all(world.study(uid)["status"] == "available" for uid in new)
