"""The small interfaces the worker depends on, so it never depends on HTTP or SQL directly."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterable, Mapping
from typing import Any, Protocol

from bridge.dicomweb.records import DicomJson, SeriesRecord
from bridge.fhir.client import WriteResult
from bridge.state.store import KnownStudy, RunCounts


class StudySource(Protocol):
    """Where studies come from (a QIDO-RS client, or a fake in tests)."""

    queries: list[str]

    def iter_studies(self, filters: Mapping[str, str] | None = None) -> AsyncIterator[list[DicomJson]]:
        """Pages of study-level DICOM JSON rows, each study once."""
        ...

    async def search_series(self, study_uid: str) -> list[SeriesRecord]:
        """Every series of one study."""
        ...


class FhirSink(Protocol):
    """The FHIR calls the publisher makes (a FhirClient, or a fake in tests)."""

    async def read(self, resource_type: str, resource_id: str) -> dict[str, Any] | None:
        """Read by id; None when absent."""
        ...

    async def search(self, resource_type: str, params: Mapping[str, str]) -> list[dict[str, Any]]:
        """Search; the matching resources."""
        ...

    async def update(self, resource: dict[str, Any], *, if_match: str | None = None) -> WriteResult:
        """PUT to the resource's id."""
        ...

    async def conditional_update(self, resource: dict[str, Any], search: Mapping[str, str]) -> WriteResult:
        """PUT Type?search."""
        ...

    async def conditional_create(self, resource: dict[str, Any], if_none_exist: str) -> WriteResult:
        """POST with If-None-Exist."""
        ...


class StateStore(Protocol):
    """What the worker remembers between runs (blocking calls; the worker runs them in threads)."""

    def known_studies(self, source: str, uids: Iterable[str]) -> dict[str, KnownStudy]:
        """Remembered state of those of ``uids`` that were published."""
        ...

    def record_published(
        self,
        source: str,
        study_uid: str,
        *,
        qido_fingerprint: str,
        resource_fingerprint: str,
        fhir_id: str,
        fhir_version: str | None,
    ) -> None:
        """Remember a published study."""
        ...

    def park(self, source: str, study_uid: str, *, kind: str, reason: str, attribute: str | None) -> None:
        """Park a failed study with its reason."""
        ...

    def endpoint_fingerprint(self, source: str) -> str | None:
        """Fingerprint of the Endpoint as last published."""
        ...

    def record_endpoint(
        self, source: str, *, fingerprint: str, fhir_id: str, fhir_version: str | None
    ) -> None:
        """Remember the published Endpoint."""
        ...

    def start_run(self, source: str, kind: str = "full") -> int:
        """Open a run record."""
        ...

    def finish_run(
        self,
        run_id: int,
        *,
        status: str,
        counts: RunCounts,
        qido_queries: list[str],
        error: str | None = None,
    ) -> None:
        """Close a run record."""
        ...
