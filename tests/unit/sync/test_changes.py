"""Following a change feed: the checkpoint moves after what it covers, and a gap is swept."""

from __future__ import annotations

import pytest

from bridge.dicomweb.results import ChangeBatch
from bridge.errors import UpstreamUnavailableError
from bridge.sync.changes import FeedChangeSource
from tests.unit.sync.world import World

pytestmark = pytest.mark.anyio


class ScriptedFeed:
    """A feed answering the batches it is given, in order, recording the checkpoints asked from."""

    name = "test-feed"

    def __init__(self, *batches: ChangeBatch) -> None:
        self.batches = list(batches)
        self.asked: list[str | None] = []

    async def changes(self, checkpoint: str | None) -> ChangeBatch:
        self.asked.append(checkpoint)
        return self.batches.pop(0)


async def test_a_gap_in_the_feed_sweeps_the_archive_records_why_and_restarts_at_the_feeds_end(
    world: World,
) -> None:
    a, b = world.add(1), world.add(2)  # both arrived while the feed was away
    world.store.save_checkpoint(world.ctx.source_name, "test-feed", "40 20261207T030040 x")
    feed = ScriptedFeed(ChangeBatch([], "2 20261208T030002 y", False, gap="the feed restarted below 40"))
    report = await FeedChangeSource(feed, world.store, world.ctx.source_name).poll(world.worker())
    assert report.counts.created == 2
    assert {a, b} <= {
        r["identifier"][0]["value"].removeprefix("urn:oid:") for r in world.fhir.of_type("ImagingStudy")
    }
    [run] = world.store.runs(1)
    assert (run.kind, run.note) == ("feed-gap", "the feed restarted below 40")
    assert world.store.checkpoint(world.ctx.source_name, "test-feed") == "2 20261208T030002 y"


async def test_a_sweep_that_fails_keeps_the_old_checkpoint_so_the_gap_is_swept_again(world: World) -> None:
    world.add(1)
    world.store.save_checkpoint(world.ctx.source_name, "test-feed", "40 20261207T030040 x")
    world.source.fail_listing = UpstreamUnavailableError("dicomweb GET /studies failed", service="dicomweb")
    feed = ScriptedFeed(ChangeBatch([], "2 20261208T030002 y", False, gap="restarted"))
    with pytest.raises(UpstreamUnavailableError):
        await FeedChangeSource(feed, world.store, world.ctx.source_name).poll(world.worker())
    assert world.store.checkpoint(world.ctx.source_name, "test-feed") == "40 20261207T030040 x"


async def test_a_feed_batch_shares_pages_one_series_query_and_one_fhir_batch_for_its_studies(
    world: World,
) -> None:
    uids = [world.add(n) for n in range(1, 6)]
    world.source.list_matching = True
    world.fhir.batches = True
    feed = ScriptedFeed(ChangeBatch(uids, "5 20261208T030005 z", False))

    source = FeedChangeSource(feed, world.store, world.ctx.source_name, per_page=100)
    report = await source.poll(world.worker())

    assert report.counts.created == 5
    # One series query by UID list for the batch's five studies, not one per study.
    series = [q for q in world.source.queries if "/series" in q]
    assert series == [f"/series?StudyInstanceUID={','.join(uids)}"]
    # One page: its Patients' look-ups (a search and a read each), their PUTs, its five studies.
    assert world.fhir.batch_sizes == [10, 5, 5]
