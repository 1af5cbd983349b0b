"""A whole-archive run with series paging: series from the sweep, checked against each study's counts."""

from __future__ import annotations

import pytest

from tests.builders import series_row, uid
from tests.unit.sync.world import World

pytestmark = pytest.mark.anyio


@pytest.fixture
def sweeping(world: World) -> World:
    world.source.page_size = 100
    world.source.sweeps = True
    return world


def _two_series(n: int) -> list[dict[str, object]]:
    return [series_row(series_uid=uid(n, k), number=k, instance_count=60) for k in (1, 2)]


async def test_a_full_run_takes_every_series_from_the_sweep(sweeping: World) -> None:
    for n in range(1, 8):
        sweeping.add(n, series=_two_series(n), series_count=2, instance_count=120)

    report = await sweeping.run()

    assert (report.status, report.counts.created, report.series_query) == ("ok", 7, "paged")
    assert sweeping.source.series_calls == []  # no study asked alone
    assert [q for q in sweeping.source.queries if "/series" in q] == ["/series?limit=1000&offset=0"]
    assert len(sweeping.study(uid(3))["series"]) == 2
    (run,) = sweeping.store.runs(1)
    assert run.series_query == "paged"


async def test_a_study_that_changed_after_the_sweep_is_asked_alone(sweeping: World) -> None:
    for n in range(1, 5):
        sweeping.add(n, series=_two_series(n), series_count=2, instance_count=120)
    # The sweep saw study 2 with one series and study 3 with fewer instances than its row counts now.
    swept = {u: list(rows) for u, rows in sweeping.source.series.items()}
    swept[uid(2)] = swept[uid(2)][:1]
    swept[uid(3)] = [series_row(series_uid=uid(3, k), number=k, instance_count=10) for k in (1, 2)]
    del swept[uid(4)]  # and study 4 not at all
    sweeping.source.swept = swept

    report = await sweeping.run()

    assert (report.status, report.counts.created) == ("ok", 4)
    assert sorted(sweeping.source.series_calls) == [uid(2), uid(3), uid(4)]
    assert len(sweeping.study(uid(2))["series"]) == 2  # published with what the archive has now
    assert sweeping.study(uid(3))["numberOfInstances"] == 120


async def test_without_the_studys_counts_nothing_vouches_for_the_sweep(sweeping: World) -> None:
    sweeping.add(1, series=_two_series(1), series_count=None, instance_count=None)
    sweeping.add(2, series=_two_series(2), series_count=2, instance_count=120)

    await sweeping.run()

    assert sweeping.source.series_calls == [uid(1)]


async def test_a_run_for_named_studies_does_not_sweep(sweeping: World) -> None:
    sweeping.add(1, series=_two_series(1), series_count=2, instance_count=120)

    await sweeping.worker().run_studies([uid(1)])

    assert [q for q in sweeping.source.queries if q.startswith("/series")] == []
    assert sweeping.source.series_calls == [uid(1)]


async def test_a_run_that_changes_nothing_sweeps_nothing(sweeping: World) -> None:
    for n in range(1, 4):
        sweeping.add(n, series=_two_series(n), series_count=2, instance_count=120)
    await sweeping.run()
    before = len(sweeping.source.queries)

    report = await sweeping.run()

    assert report.counts.unchanged == 3
    assert [q for q in sweeping.source.queries[before:] if "/series" in q] == []
    (run, _) = sweeping.store.runs(2)
    assert run.series_query is None  # no series asked at all


async def test_a_run_with_filters_asks_per_study(sweeping: World) -> None:
    for n in range(1, 4):
        sweeping.add(n, series=_two_series(n), series_count=2, instance_count=120)

    # An incremental window: a sweep could page through every series if the archive ignored it.
    report = await sweeping.worker().run({"StudyDate": "20240101-"})

    assert report.counts.created == 3
    assert [q for q in sweeping.source.queries if q.startswith("/series")] == []
    assert sorted(sweeping.source.series_calls) == [uid(1), uid(2), uid(3)]
