"""How the series of studies are asked of the archive: per study, by UID lists per page, or a sweep.

``BRIDGE_DICOMWEB_SERIES_QUERY`` chooses (bridge/dicomweb/query.py); under ``auto`` the archive's
first answer to a list query decides. Every answer is checked, never trusted.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Mapping, Sequence
from typing import TypeVar
from urllib.parse import quote

import httpx

from bridge.dicomweb.limits import DicomwebLimits
from bridge.dicomweb.paging import SERIES_UID, SERVICE, STUDY_UID, QidoPaging
from bridge.dicomweb.query import SeriesQuery
from bridge.dicomweb.results import SeriesOutcome
from bridge.dicomweb.sweep import SeriesSweep
from bridge.errors import (
    ConfigurationError,
    FatalUpstreamError,
    MappingError,
    UpstreamError,
    UpstreamLimitError,
)
from bridge.mapping.records import SERIES_FIELDS, DicomJson, SeriesRecord, parse_series, raw_uid
from bridge.upstream.retry import RetryPolicy

logger = logging.getLogger(__name__)

T = TypeVar("T")

# The most characters a UID list may take in a query's URL: with the other parameters the request
# line stays under 8 KiB, the smallest limit common servers and proxies set (nginx, Apache).
MAX_UID_LIST_CHARS = 6000


def _list_refused(exc: UpstreamError) -> bool:
    """Whether the archive refused a list query as such (a 4xx), not failed on it."""
    return (
        isinstance(exc, FatalUpstreamError)
        and not isinstance(exc, UpstreamLimitError)
        and exc.status is not None
        and 400 <= exc.status < 500
    )


class SeriesSearch(QidoPaging):
    """The series queries of the archive client, and the way (``series_query``) they are asked."""

    def __init__(
        self,
        client: httpx.AsyncClient,
        base_url: str,
        *,
        policy: RetryPolicy | None = None,
        page_size: int = 100,
        limits: DicomwebLimits | None = None,
        series_query: SeriesQuery = SeriesQuery.AUTO,
        series_list_size: int = 100,
        series_page_size: int = 1000,
    ) -> None:
        super().__init__(client, base_url, policy=policy, page_size=page_size, limits=limits)
        self.series_query = series_query
        self.series_list_size = series_list_size
        self.series_page_size = series_page_size
        # Under ``auto``: None until the first list query tells; then whether list matching works.
        self.list_matching: bool | None = {
            SeriesQuery.LIST: True,
            SeriesQuery.PER_STUDY: False,
            SeriesQuery.PAGED: False,
        }.get(series_query)
        self._sweep: SeriesSweep | None = None

    async def search_series(self, study_uid: str) -> list[SeriesRecord]:
        """Every series of one study; raises MappingError if a row cannot be parsed.

        A study with more than ``BRIDGE_DICOMWEB_MAX_SERIES`` series raises UpstreamLimitError,
        which parks it.
        """
        path = f"/studies/{quote(study_uid, safe='')}/series"
        records: list[SeriesRecord] = []
        cap = self.limits.max_series
        async for page in self._paged(path, SERIES_FIELDS, {}, "0020000E", self.limits.series()):
            if len(records) + len(page) > cap:
                raise UpstreamLimitError(
                    f"study {study_uid} has more than {cap} series (BRIDGE_DICOMWEB_MAX_SERIES): "
                    "not published; raise the setting if the study is real",
                    service=SERVICE,
                    setting="BRIDGE_DICOMWEB_MAX_SERIES",
                )
            records.extend(parse_series(row) for row in page)
        return records

    async def search_series_many(self, study_uids: Sequence[str]) -> dict[str, SeriesOutcome]:
        """The series of several studies with as few queries as the archive allows, per study.

        Uses UID-list matching on StudyInstanceUID (``/series?StudyInstanceUID=a,b,...``, paged),
        ``series_list_size`` studies per query. The answer is checked, never trusted: under
        ``auto`` the first list query decides whether the archive matches lists at all (a row of
        a study not asked for, or no row for any asked study, means it does not, and from then
        on nothing is answered here). A study left out of the result (no row, or a row whose
        study cannot be told) is for the caller to fetch alone with :meth:`search_series`; a
        study with an unreadable row, or too many series, gets the error that parks it.
        """
        wanted = list(dict.fromkeys(study_uids))
        if self._sweep is not None:
            found = await asyncio.to_thread(self._sweep.series_of, wanted)
            return {uid: self._series_outcome(uid, rows) for uid, rows in found.items()}
        return await self._by_lists(wanted, self._series_list, "/series")

    async def _by_lists(
        self,
        uids: list[str],
        ask: Callable[[list[str]], Awaitable[dict[str, T] | None]],
        path: str,
    ) -> dict[str, T]:
        """``ask`` (one checked list query of ``path``) for each UID list of ``uids``, answers merged.

        Nothing is asked once the archive is known not to match lists; an answer of None (the
        query showed it does not) or a refusal ends the asking, and what is left out of the
        result is for the caller to ask study by study.
        """
        result: dict[str, T] = {}
        if self.list_matching is False or len(uids) < 2:
            return result
        for chunk in self._uid_lists(uids):
            if len(chunk) < 2:
                continue  # one study alone is asked the ordinary way
            try:
                answer = await ask(chunk)
            except UpstreamError as exc:
                if _list_refused(exc):
                    # Refused (say, a URL too long or an unknown parameter): those studies go alone.
                    if self.list_matching is None:
                        self._no_list_matching(f"it answered the list query {exc.status}", path)
                    return result
                # Broken, stalled or too large: one bad study may have spoiled the whole list, so
                # its studies are asked alone (only the bad one then fails); it decides nothing.
                logger.warning(
                    "%s%s: the list query for %d studies failed (%s); asking them one by one",
                    self._base,
                    path,
                    len(chunk),
                    type(exc).__name__,
                )
                continue
            if answer is None:
                return result
            result.update(answer)
        return result

    async def _series_list(self, uids: list[str]) -> dict[str, SeriesOutcome] | None:
        """One paged list query; None when it shows the archive does not match UID lists."""
        asked = set(uids)
        rows_by_study: dict[str, list[DicomJson]] = {}
        unattributed = 0
        filters = {"StudyInstanceUID": ",".join(uids)}
        fields = (STUDY_UID, *SERIES_FIELDS)
        async for page in self._paged(
            "/series", fields, filters, SERIES_UID, self.limits.series(), self.series_page_size
        ):
            for row in page:
                study = raw_uid(row, STUDY_UID)
                if study is None:
                    unattributed += 1
                elif study not in asked:
                    # The archive ignored or misread the list: nothing it answered can be used.
                    self._no_list_matching("it answered series of a study not asked for")
                    return None
                else:
                    rows_by_study.setdefault(study, []).append(row)
        if not rows_by_study and not unattributed:
            if self.list_matching is None:
                self._no_list_matching("it answered no series for any of the studies asked")
                return None
            return {}  # the studies are fetched alone, which tells what happened to them
        if self.list_matching is None:
            self.list_matching = True
            logger.info("%s matches StudyInstanceUID lists: series are asked for per page", self._base)
        if unattributed:
            # A row without its study cannot be placed: every study of the query is fetched alone.
            logger.warning(
                "%s/series: %d series rows without StudyInstanceUID; fetching those studies one by one",
                self._base,
                unattributed,
            )
            return {}
        return {uid: self._series_outcome(uid, rows) for uid, rows in rows_by_study.items()}

    def _series_outcome(self, study_uid: str, rows: list[DicomJson]) -> SeriesOutcome:
        cap = self.limits.max_series
        if len(rows) > cap:
            return UpstreamLimitError(
                f"study {study_uid} has more than {cap} series (BRIDGE_DICOMWEB_MAX_SERIES): "
                "not published; raise the setting if the study is real",
                service=SERVICE,
                setting="BRIDGE_DICOMWEB_MAX_SERIES",
            )
        try:
            return [parse_series(row) for row in rows]
        except MappingError as exc:
            return exc

    def _uid_lists(self, uids: Sequence[str]) -> list[list[str]]:
        """``uids`` cut into the UID lists of as few queries as allowed, in order.

        A list holds at most ``series_list_size`` UIDs and at most ``MAX_UID_LIST_CHARS`` characters
        once in the URL, so that a page of long UIDs does not make a request line the archive (or
        a proxy before it) refuses.
        """
        lists: list[list[str]] = []
        chars = 0
        for uid in uids:
            # Each UID and its encoded comma (%2C), as the query string carries them.
            cost = len(quote(uid, safe="")) + 3
            if not lists or len(lists[-1]) >= self.series_list_size or chars + cost > MAX_UID_LIST_CHARS:
                lists.append([])
                chars = 0
            lists[-1].append(uid)
            chars += cost
        return lists

    def _no_list_matching(self, why: str, path: str = "/series") -> None:
        """Remember that the archive does not match UID lists: study rows and series are asked per study."""
        if self.series_query is SeriesQuery.LIST:
            raise ConfigurationError(
                f"BRIDGE_DICOMWEB_SERIES_QUERY=list: {self._base}{path} does not match "
                f"StudyInstanceUID lists ({why}); set it to auto or per-study"
            )
        self.list_matching = False
        logger.info(
            "%s%s does not match StudyInstanceUID lists (%s): studies and series asked per study",
            self._base,
            path,
            why,
        )

    async def sweep_series(self, filters: Mapping[str, str] | None = None) -> bool:
        """Under ``paged``: walk the archive's series (``/series`` at the root), kept on disk by study.

        ``filters`` are the run's study-level matching keys (PS3.18 lets a root series search match
        on the study's attributes; an archive that ignores them answers more rows, which only cost
        disk). Returns whether a sweep is now there for :meth:`search_series_many` to answer from;
        :meth:`end_sweep` removes it. Memory holds one page (``series_page_size`` rows) at a time,
        and series already kept are recognised on disk, not in memory. A study the sweep missed
        (or saw partly, as pages shift while the archive changes) is left for the caller to check
        against the study's own counts and ask alone. An archive that refuses the root query, or
        answers rows without their Study Instance UID, cannot be swept: ConfigurationError names
        the setting.
        """
        self.end_sweep()
        if self.series_query is not SeriesQuery.PAGED:
            return False
        sweep = await asyncio.to_thread(SeriesSweep)
        try:
            await self._walk_series(sweep, filters or {})
        except BaseException:
            await asyncio.to_thread(sweep.close)
            raise
        self._sweep = sweep
        logger.info("%s/series swept: %d series kept on disk for this run", self._base, sweep.rows)
        return True

    async def _walk_series(self, sweep: SeriesSweep, filters: Mapping[str, str]) -> None:
        size = self.series_page_size
        base = [("includefield", f) for f in (STUDY_UID, *SERIES_FIELDS)] + sorted(filters.items())
        offset, pages, placed, unplaced = 0, 0, 0, 0
        while True:
            pages += 1
            if pages > self.limits.max_pages:
                raise self._endless_paging("/series")
            params = [*base, ("limit", str(size)), ("offset", str(offset))]
            try:
                rows, truncated = await self._get("/series", params, self.limits.series())
            except FatalUpstreamError as exc:
                if exc.status is not None and 400 <= exc.status < 500:
                    raise ConfigurationError(
                        f"BRIDGE_DICOMWEB_SERIES_QUERY=paged: {self._base}/series refused a series search "
                        f"at the archive's root ({exc.status}); set it to per-study"
                    ) from exc
                raise
            kept = []
            for row in rows:
                study = raw_uid(row, STUDY_UID)
                if study is None:
                    unplaced += 1
                else:
                    kept.append((study, raw_uid(row, SERIES_UID), row))
            placed += len(kept)
            added = await asyncio.to_thread(sweep.add, kept) if kept else 0
            if not rows or len(rows) > size or (kept and not added):
                break  # the end, a server that ignores limit, or one that repeats a page (ignores offset)
            if len(rows) < size and not truncated:
                break
            offset += len(rows)
        if unplaced and not placed:
            raise ConfigurationError(
                f"BRIDGE_DICOMWEB_SERIES_QUERY=paged: {self._base}/series answers series without their "
                "StudyInstanceUID, so they cannot be placed; set it to per-study"
            )
        if unplaced:
            logger.warning(
                "%s/series: %d series rows without StudyInstanceUID; their studies are asked one by one",
                self._base,
                unplaced,
            )

    def end_sweep(self) -> None:
        """Remove the run's sweep, if any (from then on series are asked per study)."""
        if self._sweep is not None:
            self._sweep.close()
            self._sweep = None

    @property
    def sweeping(self) -> bool:
        """Whether series are answered from a sweep (the caller checks each study's counts)."""
        return self._sweep is not None

    @property
    def series_query_used(self) -> str:
        """How series are being asked for: ``list``, ``per-study``, ``paged``, or ``undecided``."""
        if self.series_query is SeriesQuery.PAGED:
            return SeriesQuery.PAGED.value
        if self.list_matching is None:
            return "undecided"
        return SeriesQuery.LIST.value if self.list_matching else SeriesQuery.PER_STUDY.value
