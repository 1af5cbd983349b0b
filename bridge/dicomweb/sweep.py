"""Series rows of a whole-archive sweep, kept on disk by study until the study pages ask for them.

A series-level QIDO-RS walk at the archive's root (``/series``, PS3.18 SearchForSeries) answers in
an order the standard does not define: the series of one study may come on any page. Grouping
them in memory would grow with the archive; they go to a temporary SQLite file instead (one row
per series, indexed by Study Instance UID), so the process holds one page at a time and a study
page reads back just its studies' series.
"""

from __future__ import annotations

import json
import sqlite3
import tempfile
from collections.abc import Iterable, Sequence
from pathlib import Path

from bridge.mapping.records import DicomJson


class SeriesSweep:
    """A temporary, per-run store of series rows by study. Close it to remove the file.

    Used from one task at a time (through worker threads), hence ``check_same_thread=False``.
    """

    def __init__(self) -> None:
        self._dir = tempfile.TemporaryDirectory(prefix="bridge-series-sweep-")
        self._db = sqlite3.connect(Path(self._dir.name) / "series.db", check_same_thread=False)
        self._db.execute("PRAGMA journal_mode=OFF")  # a scratch file: nothing to recover after a crash
        self._db.execute("PRAGMA synchronous=OFF")
        # A series seen twice (pages that shift while the archive changes) is kept once; the
        # UIDs are checked here, on disk, not in a set that would grow with the archive.
        self._db.execute(
            "CREATE TABLE series (study TEXT NOT NULL, uid TEXT, row TEXT NOT NULL, UNIQUE (study, uid))"
        )
        self.rows = 0

    def add(self, rows: Iterable[tuple[str, str | None, DicomJson]]) -> int:
        """Keep (study UID, series UID, raw row) triples; returns how many were new."""
        batch = [(study, series, json.dumps(row, separators=(",", ":"))) for study, series, row in rows]
        before = self._db.total_changes
        with self._db:
            self._db.executemany("INSERT OR IGNORE INTO series (study, uid, row) VALUES (?, ?, ?)", batch)
        added = self._db.total_changes - before
        self.rows += added
        return added

    def series_of(self, study_uids: Sequence[str]) -> dict[str, list[DicomJson]]:
        """The rows of each of ``study_uids`` that the sweep saw (a study it did not see is left out)."""
        found: dict[str, list[DicomJson]] = {}
        for start in range(0, len(study_uids), 500):  # SQLite's bound on host parameters
            chunk = list(study_uids[start : start + 500])
            marks = ",".join("?" * len(chunk))
            query = f"SELECT study, row FROM series WHERE study IN ({marks}) ORDER BY rowid"  # noqa: S608
            for study, text in self._db.execute(query, chunk):
                found.setdefault(study, []).append(json.loads(text))
        return found

    def close(self) -> None:
        """Remove the file."""
        self._db.close()
        self._dir.cleanup()
