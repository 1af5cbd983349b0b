"""The archive-side bounds: what one DICOMweb answer may cost, and how far a walk of pages may go."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from bridge.upstream.bounds import CallLimit, Pace

if TYPE_CHECKING:
    from bridge.config import ArchiveSettings, Settings

MIB = 1024 * 1024


@dataclass(frozen=True, slots=True)
class DicomwebLimits:
    """The archive-side bounds (settings ``BRIDGE_HTTP_DEADLINE`` and ``BRIDGE_DICOMWEB_MAX_*``)."""

    deadline: float = 300.0
    page_bytes: int = 16 * MIB
    series_bytes: int = 16 * MIB
    metadata_bytes: int = 16 * MIB
    thumbnail_bytes: int = 8 * MIB
    max_pages: int = 100_000
    max_series: int = 10_000
    pace: Pace = Pace()

    @classmethod
    def from_settings(cls, archive: ArchiveSettings, settings: Settings) -> DicomwebLimits:
        """The bounds one archive's settings choose, under the upstream deadline and pace."""
        return cls(
            deadline=settings.http.deadline,
            pace=Pace.from_settings(settings),
            page_bytes=archive.max_page_bytes,
            series_bytes=archive.max_series_bytes,
            metadata_bytes=archive.max_metadata_bytes,
            thumbnail_bytes=archive.max_thumbnail_bytes,
            max_pages=archive.max_pages,
            max_series=archive.max_series,
        )

    def page(self) -> CallLimit:
        """One QIDO-RS page of studies or instances."""
        return CallLimit(
            "study page", self.page_bytes, "BRIDGE_DICOMWEB_MAX_PAGE_BYTES", self.deadline, pace=self.pace
        )

    def series(self) -> CallLimit:
        """One page of a study's series."""
        return CallLimit(
            "series list",
            self.series_bytes,
            "BRIDGE_DICOMWEB_MAX_SERIES_BYTES",
            self.deadline,
            pace=self.pace,
        )

    def metadata(self) -> CallLimit:
        """One instance's WADO-RS metadata."""
        return CallLimit(
            "metadata",
            self.metadata_bytes,
            "BRIDGE_DICOMWEB_MAX_METADATA_BYTES",
            self.deadline,
            pace=self.pace,
        )

    def thumbnail(self, deadline: float | None = None) -> CallLimit:
        """One rendered picture (``deadline``: a tighter one for an interactive caller)."""
        return CallLimit(
            "thumbnail",
            self.thumbnail_bytes,
            "BRIDGE_DICOMWEB_MAX_THUMBNAIL_BYTES",
            min(self.deadline, deadline) if deadline else self.deadline,
            pace=self.pace,
        )
