"""Orthanc's change feed: a checkpoint that knows its feed, and every way a feed can lose changes."""

from __future__ import annotations

from typing import Any

import httpx
import pytest

from bridge.dicomweb.orthanc import OrthancChangeFeed
from bridge.upstream.retry import RetryPolicy

pytestmark = pytest.mark.anyio

BASE = "http://orthanc.test"
STUDY_UIDS = {f"study-{n}": f"1.2.3.{n}" for n in range(1, 50)}


class FakeOrthanc:
    """``/changes`` over a list of changes (``seq`` from 1), and ``/studies/{id}``."""

    def __init__(self, changes: list[dict[str, Any]]) -> None:
        self.changes = changes
        self.requests: list[str] = []

    def __call__(self, request: httpx.Request) -> httpx.Response:
        self.requests.append(str(request.url))
        if request.url.path == "/changes":
            params = request.url.params
            last = self.changes[-1]["Seq"] if self.changes else 0
            if "last" in params:
                return httpx.Response(200, json={"Changes": self.changes[-1:], "Done": True, "Last": last})
            since, limit = int(params["since"]), int(params["limit"])
            after = [c for c in self.changes if c["Seq"] > since]
            page = after[:limit]
            return httpx.Response(
                200,
                json={
                    "Changes": page,
                    "Done": len(after) <= limit,
                    "Last": page[-1]["Seq"] if page else last,
                },
            )
        orthanc_id = request.url.path.rsplit("/", 1)[-1]
        uid = STUDY_UIDS.get(orthanc_id)
        if uid is None:
            return httpx.Response(404)
        return httpx.Response(200, json={"MainDicomTags": {"StudyInstanceUID": uid}})


def change(
    seq: int, kind: str = "StableStudy", day: str = "20261207", study: int | None = None
) -> dict[str, Any]:
    return {
        "Seq": seq,
        "ChangeType": kind,
        "Date": f"{day}T0300{seq % 60:02d}",
        "ID": f"study-{study if study is not None else seq}",
        "ResourceType": "Study",
    }


def feed(orthanc: FakeOrthanc, batch: int = 100) -> OrthancChangeFeed:
    http = httpx.AsyncClient(transport=httpx.MockTransport(orthanc))
    return OrthancChangeFeed(http, BASE, policy=RetryPolicy(retries=0), batch_size=batch)


async def test_the_first_read_starts_at_the_end_and_names_the_change_it_stopped_at() -> None:
    orthanc = FakeOrthanc([change(1), change(2, "NewSeries")])
    batch = await feed(orthanc).changes(None)
    assert (batch.study_uids, batch.gap) == ([], None)
    assert batch.checkpoint == "2 20261207T030002 study-2"


async def test_new_stable_studies_are_read_after_the_checkpoint_which_moves_to_the_last_change() -> None:
    orthanc = FakeOrthanc([change(1), change(2), change(3, "NewInstance"), change(4)])
    reader = feed(orthanc)
    batch = await reader.changes("2 20261207T030002 study-2")
    assert batch.gap is None
    assert batch.study_uids == ["1.2.3.4"]
    assert batch.checkpoint == "4 20261207T030004 study-4"
    nothing = await reader.changes(batch.checkpoint)
    assert (nothing.study_uids, nothing.checkpoint, nothing.gap) == ([], batch.checkpoint, None)


async def test_a_feed_that_restarted_below_the_checkpoint_is_a_gap_and_restarts_at_its_end() -> None:
    orthanc = FakeOrthanc([change(1, day="20261208"), change(2, day="20261208")])  # a new database
    batch = await feed(orthanc).changes("40 20261207T030040 study-40")
    assert batch.gap is not None and "below the checkpoint 40" in batch.gap
    assert batch.study_uids == []
    assert batch.checkpoint == "2 20261208T030002 study-2"


async def test_a_feed_whose_changes_were_cleared_past_the_checkpoint_is_a_gap() -> None:
    orthanc = FakeOrthanc([change(n) for n in range(1, 11)])
    del orthanc.changes[:7]  # DELETE /changes, then new ones: 8, 9, 10 are left
    batch = await feed(orthanc).changes("5 20261207T030005 study-5")
    assert batch.gap is not None and "skips" in batch.gap
    assert batch.checkpoint == "10 20261207T030010 study-10"


async def test_another_database_with_a_change_under_the_same_number_is_a_gap() -> None:
    orthanc = FakeOrthanc([change(n, day="20261208", study=n + 20) for n in range(1, 9)])
    batch = await feed(orthanc).changes("5 20261207T030005 study-5")
    assert batch.gap is not None and "another Orthanc database" in batch.gap


async def test_an_old_checkpoint_of_the_number_alone_is_still_checked_and_then_replaced() -> None:
    orthanc = FakeOrthanc([change(1), change(2), change(3)])
    reader = feed(orthanc)
    batch = await reader.changes("2")
    assert (batch.gap, batch.study_uids, batch.checkpoint) == (None, ["1.2.3.3"], "3 20261207T030003 study-3")
    assert (await reader.changes("9")).gap is not None  # ends below it: restarted


async def test_a_long_feed_is_read_in_batches_without_losing_the_check() -> None:
    orthanc = FakeOrthanc([change(n) for n in range(1, 8)])
    reader = feed(orthanc, batch=3)
    first = await reader.changes("1 20261207T030001 study-1")
    assert (first.study_uids, first.more) == (["1.2.3.2", "1.2.3.3", "1.2.3.4"], True)
    second = await reader.changes(first.checkpoint)
    assert (second.study_uids, second.more, second.gap) == (["1.2.3.5", "1.2.3.6", "1.2.3.7"], False, None)


async def test_an_empty_feed_is_followed_from_its_start() -> None:
    orthanc = FakeOrthanc([])
    reader = feed(orthanc)
    start = await reader.changes(None)
    assert start.checkpoint == "0"
    orthanc.changes = [change(1), change(2)]
    batch = await reader.changes(start.checkpoint)
    assert (batch.gap, batch.study_uids) == (None, ["1.2.3.1", "1.2.3.2"])
