"""The small interfaces the worker depends on, and the values they pass: sync never depends on HTTP or SQL.

The FHIR client (bridge/fhir/client.py) and the store (bridge/state/store.py) implement them; the
values they pass are theirs (bridge/fhir/results.py, bridge/state/records.py, bridge/dicomweb/results.py).
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterable, Mapping, Sequence
from datetime import datetime
from typing import Any, Protocol

from bridge.dicomweb.results import SeriesOutcome
from bridge.errors import ConfigurationError
from bridge.fhir.results import BatchAnswer, WriteResult
from bridge.mapping.records import DicomJson, InstanceRecord, SeriesRecord
from bridge.state.records import KnownStudy, Published, RunCounts


class StudySource(Protocol):
    """Where studies come from (a QIDO-RS client, or a fake in tests)."""

    queries: list[str]

    def iter_studies(self, filters: Mapping[str, str] | None = None) -> AsyncIterator[list[DicomJson]]:
        """Pages of study-level DICOM JSON rows: a Study UID once per patient it is listed under."""
        ...

    async def search_studies_many(self, study_uids: Sequence[str]) -> dict[str, list[DicomJson]]:
        """The study rows of several named studies in as few queries as the source allows, by UID.

        A study left out is to be asked alone with ``iter_studies`` (only that tells it is gone).
        """
        ...

    async def search_series(self, study_uid: str) -> list[SeriesRecord]:
        """Every series of one study."""
        ...

    async def search_series_many(self, study_uids: Sequence[str]) -> dict[str, SeriesOutcome]:
        """The series of several studies in as few queries as the source allows, per study.

        A study left out is to be fetched alone with ``search_series``; an error parks its study.
        """
        ...

    async def sweep_series(self, filters: Mapping[str, str] | None = None) -> bool:
        """Prepare the series of every study matching ``filters`` at once, where the source does so.

        Returns whether :meth:`search_series_many` now answers from that sweep (then its answers
        must be checked against each study's own counts); ``end_sweep`` drops it.
        """
        ...

    def end_sweep(self) -> None:
        """Drop the sweep, if any."""
        ...

    @property
    def series_query_used(self) -> str:
        """How series are being asked for (``list``, ``per-study``, ``undecided``), for the run record."""
        ...

    async def reachable(self) -> bool:
        """Whether the archive answers at all (asked after one study's call kept failing)."""
        ...

    async def search_instances(self, study_uid: str, limit: int | None = None) -> list[InstanceRecord]:
        """The study's instances (stopping past ``limit``)."""
        ...

    async def instance_header(
        self, study_uid: str, instance: InstanceRecord | None = None
    ) -> DicomJson | None:
        """The full header of one instance of the study."""
        ...

    async def patient_name_from_file(
        self, study_uid: str, instance: InstanceRecord | None = None
    ) -> tuple[str | None, str | None]:
        """PatientName from one instance's Part 10 header: (name, None) or (None, why not)."""
        ...

    async def series_metadata(self, study_uid: str, series_uid: str) -> list[DicomJson]:
        """The full headers (WADO-RS metadata) of every instance of one series."""
        ...


def refused_client_ids(resource_type: str, status: int | None) -> ConfigurationError:
    """The error for a server that will not create a resource by PUT to a new id, naming the setting."""
    return ConfigurationError(
        f"BRIDGE_WRITE_STRATEGY: the FHIR server refused to create {resource_type} by PUT to a new id "
        f"({status}: it does not accept client-assigned ids); set it to 'conditional'"
    )


class FhirSink(Protocol):
    """The FHIR calls the publisher makes (a FhirClient, or a fake in tests)."""

    async def capabilities(self) -> dict[str, Any]:
        """The server's CapabilityStatement."""
        ...

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

    async def delete(self, resource_type: str, resource_id: str) -> None:
        """DELETE by id."""
        ...

    async def conditional_create(self, resource: dict[str, Any], if_none_exist: str) -> WriteResult:
        """POST with If-None-Exist."""
        ...

    async def batch(self, entries: Sequence[dict[str, Any]]) -> list[BatchAnswer]:
        """POST a batch Bundle; each entry's answer, in request order (a broken batch raises)."""
        ...


class StateStore(Protocol):
    """What the worker remembers between runs (blocking calls; the worker runs them in threads)."""

    def known_studies(self, source: str, uids: Iterable[str]) -> dict[str, KnownStudy]:
        """Remembered state of those of ``uids`` that were published."""
        ...

    def claim_study(self, source: str, study_uid: str) -> bool:
        """Claim a study for this worker; False while another replica holds it. Never waits."""
        ...

    def release_study(self, source: str, study_uid: str) -> None:
        """Release a claim taken with claim_study."""
        ...

    def park(self, source: str, study_uid: str, *, kind: str, reason: str, attribute: str | None) -> None:
        """Park a failed study with its reason."""
        ...

    def demographics_check(self, source: str, study_uid: str) -> tuple[str, bool] | None:
        """The Patient id the demographics check last compared the study with, and whether it was accepted."""
        ...

    def record_demographics_check(
        self, source: str, study_uid: str, *, patient_id: str, attributes: str
    ) -> None:
        """Remember that the check parked the study (an acceptance for another Patient is dropped)."""
        ...

    def studies_linked_to(self, source: str, patient_ids: Iterable[str]) -> dict[str, str]:
        """Published studies (UID -> Patient id) linked to any of these Patients."""
        ...

    def linked_patients(self, source: str) -> list[str]:
        """The distinct Patient ids the source's published studies link to."""
        ...

    def forget_fingerprints(self, source: str, uids: Iterable[str]) -> None:
        """Make these published studies count as changed, so the next run that sees them maps them again."""
        ...

    def record_published_many(self, source: str, studies: Sequence[Published]) -> None:
        """Remember several published studies at once (a withdrawal they carried is lifted)."""
        ...

    def withdraw(self, source: str, study_uid: str, *, reason: str, fhir_version: str | None) -> None:
        """Remember that a published study is withdrawn from clinicians, and why."""
        ...

    @property
    def claims_enabled(self) -> bool:
        """Whether claims coordinate several replicas (else every claim succeeds)."""
        ...

    def mark_seen(self, source: str, uids: Iterable[str], run_id: int) -> None:
        """Note that a reconciliation run saw these studies."""
        ...

    def unseen_studies(self, source: str, run_id: int) -> list[KnownStudy]:
        """Published studies a reconciliation run did not see."""
        ...

    def record_gone(self, source: str, study_uid: str, *, fhir_version: str | None, removed: bool) -> None:
        """Remember that a study left the archive."""
        ...

    def published_count(self, source: str) -> int:
        """How many of the source's studies are published and still in the archive."""
        ...

    def newest_published(self, source: str) -> str | None:
        """The latest ``started`` among published studies."""
        ...

    def counts(self, source: str | None = None) -> dict[str, int]:
        """How many studies are published and parked."""
        ...

    def checkpoint(self, source: str, name: str) -> str | None:
        """A change source's saved position."""
        ...

    def save_checkpoint(self, source: str, name: str, value: str) -> None:
        """Save a change source's position."""
        ...

    def sync_marks(self, source: str, uids: Sequence[str]) -> dict[str, tuple[str | None, float]]:
        """Published studies' FHIR version and when they were last recorded (epoch s), by UID."""
        ...

    def note_run(self, run_id: int, note: str) -> None:
        """Say why a run was made (a gap in the change feed, say)."""
        ...

    def last_run(self, source: str, kind: str, statuses: Sequence[str] = ("ok", "parked")) -> datetime | None:
        """When the last run of ``kind`` that ended in one of ``statuses`` finished."""
        ...

    def published_endpoint(self, source: str) -> tuple[str, str] | None:
        """Fingerprint and FHIR id of the Endpoint as last published."""
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
        deletions: list[dict[str, str]] | None = None,
        series_query: str | None = None,
        relinked: list[dict[str, str]] | None = None,
        patient_events: list[dict[str, str]] | None = None,
    ) -> None:
        """Close a run record."""
        ...
