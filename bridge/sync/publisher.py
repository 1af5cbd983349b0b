"""Idempotent writes: the source's Endpoint, the study's Patient link, and the ImagingStudy."""

from __future__ import annotations

import asyncio
import logging
from typing import Any
from urllib.parse import urlencode

from bridge.config import PatientPolicy, WriteStrategy
from bridge.dicomweb.records import StudyRecord, digest
from bridge.errors import FatalUpstreamError, PatientLinkError, VersionConflictError
from bridge.fhir.client import WriteResult
from bridge.mapping.context import MappingContext
from bridge.mapping.endpoint import endpoint_identifier, map_endpoint
from bridge.mapping.identifiers import PatientKey, patient_key, study_search
from bridge.mapping.patient import logical_subject, map_patient
from bridge.mapping.validate import validate
from bridge.sync.protocols import FhirSink, StateStore

logger = logging.getLogger(__name__)


class Publisher:
    """Writes keyed by business identifiers, so replays and re-runs never duplicate anything.

    * Endpoint: one per source, written only when it changed.
    * Patient: found (and, under ``match-or-create``, conditionally created) once per patient per
      run; an existing Patient is never written.
    * ImagingStudy: one PUT per changed study, to an id derived from the Study Instance UID (or a
      conditional PUT on the identifier), with ``If-Match`` when the version is known.
    """

    def __init__(
        self,
        fhir: FhirSink,
        store: StateStore,
        ctx: MappingContext,
        *,
        patient_policy: PatientPolicy,
        write_strategy: WriteStrategy,
    ) -> None:
        self._fhir = fhir
        self._store = store
        self._ctx = ctx
        self._policy = patient_policy
        self._strategy = write_strategy
        self._patients: dict[PatientKey, str] = {}
        self._patient_locks: dict[PatientKey, asyncio.Lock] = {}
        self.writes = 0

    async def ensure_endpoint(self) -> str:
        """Publish the source's Endpoint if it changed; returns the reference to it."""
        resource = map_endpoint(self._ctx)
        validate(resource)
        fingerprint = digest(resource)
        source = self._ctx.source_name
        if await asyncio.to_thread(self._store.endpoint_fingerprint, source) == fingerprint:
            return f"Endpoint/{resource['id']}"
        result = await self._write(resource, {"identifier": _token(endpoint_identifier(self._ctx))})
        await asyncio.to_thread(
            self._store.record_endpoint,
            source,
            fingerprint=fingerprint,
            fhir_id=result.id,
            fhir_version=result.version,
        )
        logger.info("endpoint Endpoint/%s published for source %s", result.id, source)
        return f"Endpoint/{result.id}"

    async def subject(self, study: StudyRecord) -> dict[str, Any]:
        """The ImagingStudy.subject Reference, per the patient policy.

        Raises MappingError when PatientID is missing and PatientLinkError when no single Patient
        can be linked under ``match-only`` (or several match under ``match-or-create``).
        """
        key = patient_key(study, self._ctx)
        if self._policy is PatientPolicy.LOGICAL:
            return logical_subject(key)
        lock = self._patient_locks.setdefault(key, asyncio.Lock())
        async with lock:  # one lookup per patient per run, even with studies in parallel
            if key not in self._patients:
                self._patients[key] = await self._find_or_create_patient(study, key)
        return {"reference": f"Patient/{self._patients[key]}"}

    async def _find_or_create_patient(self, study: StudyRecord, key: PatientKey) -> str:
        if self._policy is PatientPolicy.MATCH_ONLY:
            matches = await self._fhir.search("Patient", {"identifier": key.search()})
            if not matches:
                raise PatientLinkError(
                    f"no Patient has the study's PatientID under system {key.system} "
                    "(patient policy match-only); the study is retried on the next run",
                    attribute="PatientID",
                )
            if len(matches) > 1:
                raise _ambiguous(key)
            return str(matches[0]["id"])
        patient = map_patient(study, key, self._ctx)
        validate(patient)
        try:
            result = await self._fhir.conditional_create(patient, urlencode({"identifier": key.search()}))
        except VersionConflictError as exc:
            raise _ambiguous(key) from exc
        if result.created:
            self.writes += 1
            logger.info("created Patient/%s", result.id)
        return result.id

    async def put_study(self, resource: dict[str, Any], known_version: str | None) -> WriteResult:
        """Create or update the ImagingStudy; a stale ``If-Match`` is re-read and retried once."""
        uid = resource["identifier"][0]["value"].removeprefix("urn:oid:")
        search = {"identifier": study_search(uid)}
        try:
            return await self._write(resource, search, if_match=known_version)
        except (VersionConflictError, FatalUpstreamError) as exc:
            if known_version is None or exc.status not in (404, 409, 412):
                raise
        # Someone else wrote it since (another worker, a person): take the current version.
        current = await self._fhir.read("ImagingStudy", resource["id"])
        version = (current or {}).get("meta", {}).get("versionId")
        logger.info("ImagingStudy/%s changed on the server; writing over version %s", resource["id"], version)
        return await self._write(resource, search, if_match=version)

    async def _write(
        self, resource: dict[str, Any], search: dict[str, str], *, if_match: str | None = None
    ) -> WriteResult:
        if self._strategy is WriteStrategy.CLIENT_ID:
            result = await self._fhir.update(resource, if_match=if_match)
        else:
            result = await self._fhir.conditional_update(resource, search)
        self.writes += 1
        return result


def _token(identifier: dict[str, str]) -> str:
    return f"{identifier['system']}|{identifier['value']}"


def _ambiguous(key: PatientKey) -> PatientLinkError:
    return PatientLinkError(
        f"more than one Patient has the study's PatientID under system {key.system}; "
        "merge them in the EHR and the study is retried on the next run",
        attribute="PatientID",
    )
