"""The study rows of several named studies in one study-level query: UID-list matching on /studies.

A drained burst of pushes names its studies; asking for them a query per study costs a page of
named studies as many requests as it has studies, where a full sync lists a page in one. PS3.18
UID-list matching (``/studies?StudyInstanceUID=a,b,...``) asks for a page at once. Whether the
archive matches lists is the one ``list_matching`` flag the series step keeps (bridge/dicomweb/series.py):
either step's first answer decides it for both. Every answer is checked, never trusted.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

from bridge.dicomweb.paging import STUDY_UID
from bridge.dicomweb.series import SeriesSearch
from bridge.mapping.records import STUDY_FIELDS, DicomJson, raw_uid

logger = logging.getLogger(__name__)


class StudyLists(SeriesSearch):
    """The study-level UID-list queries of the archive client."""

    async def search_studies_many(self, study_uids: Sequence[str]) -> dict[str, list[DicomJson]]:
        """The study rows of the named studies, by UID, with as few queries as the archive allows.

        A UID is left out of the result whenever the list answer cannot vouch for it: a study the
        answer does not hold (gone from the archive, or dropped by a list query that misbehaves),
        one listed more than once (the same UID under two patients, which its own query settles),
        and every study of a query that failed or was refused. The caller asks each left-out study
        alone, so a study is only ever counted missing by its own query.
        """
        return await self._by_lists(list(dict.fromkeys(study_uids)), self._study_list, "/studies")

    async def _study_list(self, uids: list[str]) -> dict[str, list[DicomJson]] | None:
        """One paged list query; None when it shows the archive does not match UID lists."""
        asked = set(uids)
        rows_by_study: dict[str, list[DicomJson]] = {}
        unattributed = 0
        filters = {"StudyInstanceUID": ",".join(uids)}
        # A study is one row (more only when listed under several patients): a page one row longer
        # than the list shows the answer's end in one request, where a full page would ask again.
        size = max(self.page_size, len(uids) + 1)
        async for page in self._paged("/studies", STUDY_FIELDS, filters, STUDY_UID, page_size=size):
            for row in page:
                study = raw_uid(row, STUDY_UID)
                if study is None:
                    unattributed += 1
                elif study not in asked:
                    # The archive ignored or misread the list: nothing it answered can be used.
                    self._no_list_matching("it answered a study not asked for", "/studies")
                    return None
                else:
                    rows_by_study.setdefault(study, []).append(row)
        if not rows_by_study:
            # No row for any study asked: they may all be gone, which its own query of each tells;
            # the series step (or the next page) decides on list matching.
            return {}
        if self.list_matching is None:
            self.list_matching = True
            logger.info("%s matches StudyInstanceUID lists: studies and series asked per page", self._base)
        if unattributed:
            logger.warning(
                "%s/studies: %d study rows without StudyInstanceUID; fetching those studies one by one",
                self._base,
                unattributed,
            )
            return {}
        return {uid: rows for uid, rows in rows_by_study.items() if len(rows) == 1}
