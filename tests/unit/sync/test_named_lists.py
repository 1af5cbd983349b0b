"""Named studies (drained pushes, change-feed batches) fetched a page per UID-list study query."""

from __future__ import annotations

from urllib.parse import parse_qs

import pytest

from tests.builders import uid
from tests.unit.sync.world import World

pytestmark = pytest.mark.anyio


def study_queries(world: World, since: int = 0) -> list[list[str]]:
    """The UIDs each study-level query asked for (a list query names several)."""
    asked = []
    for query in world.source.queries[since:]:
        path, _, params = query.partition("?")
        if path == "/studies" and "StudyInstanceUID" in (found := parse_qs(params)):
            asked.append(found["StudyInstanceUID"][0].split(","))
    return asked


@pytest.fixture
def listing(world: World) -> World:
    world.source.page_size = 100
    world.source.list_matching = True
    return world


async def test_a_page_of_named_studies_costs_one_study_query(listing: World) -> None:
    uids = [listing.add(n) for n in range(1, 46)]
    report = await listing.worker(concurrency=3).run_studies(uids, kind="push", per_page=20)
    assert (report.status, report.counts.created) == ("ok", 45)
    assert study_queries(listing) == [uids[:20], uids[20:40], uids[40:]]
    assert len(listing.fhir.of_type("ImagingStudy")) == 45


async def test_a_study_the_list_answer_drops_is_asked_alone_and_synced_not_retired(listing: World) -> None:
    uids = [listing.add(n) for n in range(1, 6)]
    await listing.worker().run_studies(uids, per_page=5)
    listing.source.studies[uid(3)]["00081030"] = {"vr": "LO", "Value": ["changed"]}
    listing.source.dropped_from_lists = {uid(3)}
    since = len(listing.source.queries)
    report = await listing.worker().run_studies(uids, kind="push", per_page=5)
    assert study_queries(listing, since) == [uids, [uid(3)]]  # the list, then the dropped one alone
    assert report.status == "ok"
    assert (report.counts.deleted, report.deletions) == (0, [])
    assert report.counts.updated == 1  # the dropped study's change was still found and published
    assert listing.study(uid(3))["status"] != "entered-in-error"
    assert listing.study(uid(3))["description"] == "changed"


async def test_a_study_gone_from_the_archive_is_retired_only_after_its_own_query(listing: World) -> None:
    uids = [listing.add(n) for n in range(1, 6)]
    await listing.worker().run_studies(uids, per_page=5)
    del listing.source.studies[uid(4)]
    since = len(listing.source.queries)
    report = await listing.worker().run_studies(uids, kind="push", per_page=5)
    assert study_queries(listing, since) == [uids, [uid(4)]]
    assert report.counts.deleted == 1
    assert [d["study_uid"] for d in report.deletions] == [uid(4)]


async def test_an_archive_without_list_matching_gets_a_query_per_study(world: World) -> None:
    world.source.list_matching = False
    uids = [world.add(n) for n in range(1, 6)]
    report = await world.worker().run_studies(uids, kind="push", per_page=5)
    assert report.counts.created == 5
    assert sorted(study_queries(world)) == sorted([u] for u in uids)
