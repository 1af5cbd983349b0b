"""Idempotent writes: the source's Endpoint, the study's Patient link, and the ImagingStudy."""

from __future__ import annotations

import asyncio
import logging
from typing import Any
from urllib.parse import urlencode

from bridge.config import DeletePolicy, OrderPolicy, PatientPolicy, WriteStrategy
from bridge.dicomweb.records import StudyRecord, digest
from bridge.errors import (
    ConfigurationError,
    FatalUpstreamError,
    MappingError,
    PatientLinkError,
    VersionConflictError,
)
from bridge.fhir.client import WriteResult
from bridge.mapping.context import BRIDGE_TAG_SYSTEM, MappingContext
from bridge.mapping.endpoint import endpoint_id, endpoint_identifier, map_endpoint
from bridge.mapping.identifiers import (
    PatientKey,
    accession_identifier,
    escape_token,
    patient_key,
    study_search,
)
from bridge.mapping.patient import logical_subject, map_patient
from bridge.mapping.validate import validate
from bridge.sync.protocols import FhirSink, StateStore

logger = logging.getLogger(__name__)

NEW_PATIENT = "(new)"  # a dry run's stand-in for a Patient the sync would create


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
        order_policy: OrderPolicy = OrderPolicy.NONE,
    ) -> None:
        self._fhir = fhir
        self._store = store
        self._ctx = ctx
        self._policy = patient_policy
        self._strategy = write_strategy
        self._order_policy = order_policy
        self.dry_run = False  # read, never write (bridge sync --dry-run)
        self._server_check = asyncio.Lock()
        self._server_checked = False
        self._refusal: str | None = None
        self._patients: dict[PatientKey, str] = {}
        self._patient_locks: dict[PatientKey, asyncio.Lock] = {}
        self.writes = 0

    def begin_run(self) -> None:
        """Forget the Patient links of the previous run (the EHR may have merged patients since)."""
        self._patients.clear()
        self._patient_locks.clear()

    async def ensure_endpoint(self) -> str:
        """Publish the source's Endpoint if it changed; returns the reference to it."""
        resource = map_endpoint(self._ctx)
        validate(resource)
        fingerprint = digest(resource)
        source = self._ctx.source_name
        published = await asyncio.to_thread(self._store.published_endpoint, source)
        if published is not None and published[0] == fingerprint:
            return f"Endpoint/{published[1]}"  # the server chose the id under conditional writes
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
        if self._patients[key] == NEW_PATIENT:
            return {"display": "a new Patient, created by the sync"}
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
        if self.dry_run:
            matches = await self._fhir.search("Patient", {"identifier": key.search()})
            if len(matches) > 1:
                raise _ambiguous(key)
            return str(matches[0]["id"]) if matches else NEW_PATIENT
        try:
            result = await self._fhir.conditional_create(patient, urlencode({"identifier": key.search()}))
        except VersionConflictError as exc:
            raise _ambiguous(key) from exc
        if result.created:
            self.writes += 1
            logger.info("created Patient/%s", result.id)
        return result.id

    async def endpoint_reference(self) -> str:
        """The Endpoint reference without writing anything (for dry runs)."""
        published = await asyncio.to_thread(self._store.published_endpoint, self._ctx.source_name)
        if published is not None:
            return f"Endpoint/{published[1]}"
        if self._strategy is WriteStrategy.CLIENT_ID:
            return f"Endpoint/{endpoint_id(self._ctx)}"
        found = await self._fhir.search("Endpoint", {"identifier": _token(endpoint_identifier(self._ctx))})
        return f"Endpoint/{found[0]['id']}" if found else "Endpoint/new"

    async def current_study(self, resource: dict[str, Any]) -> dict[str, Any] | None:
        """What the FHIR server holds now for this ImagingStudy, if anything."""
        if self._strategy is WriteStrategy.CLIENT_ID:
            return await self._fhir.read("ImagingStudy", resource["id"])
        uid = resource["identifier"][0]["value"].removeprefix("urn:oid:")
        found = await self._fhir.search("ImagingStudy", {"identifier": study_search(uid)})
        return found[0] if found else None

    async def based_on(self, study: StudyRecord) -> list[dict[str, Any]]:
        """ImagingStudy.basedOn per the order policy: the ServiceRequest with the accession number.

        Several ServiceRequests with that accession park the study (MappingError): linking one
        at random could attach the images to the wrong order.
        """
        if self._order_policy is OrderPolicy.NONE:
            return []
        identifier = accession_identifier(study, self._ctx)
        if identifier is None:
            return []
        value = escape_token(str(identifier["value"]))
        system = identifier.get("system")
        token = f"{escape_token(str(system))}|{value}" if system else value
        matches = await self._fhir.search("ServiceRequest", {"identifier": token})
        if len(matches) > 1:
            raise MappingError(
                "several ServiceRequests carry the study's accession number; the order is ambiguous",
                attribute="AccessionNumber",
            )
        if matches:
            return [{"reference": f"ServiceRequest/{matches[0]['id']}"}]
        if self._order_policy is OrderPolicy.MATCH_OR_LOGICAL:
            return [{"type": "ServiceRequest", "identifier": identifier}]
        return []

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

    async def _check_update_create(self) -> None:
        """Before the first client-id write: refuse a server that says it cannot create by PUT.

        Such a server (Google's FHIR stores by default) would refuse every new study one by one;
        better to stop once, naming the setting that fixes it. Asked once per publisher, and only
        when something is to be written, so a run with no change still makes no request.
        """
        async with self._server_check:
            if self._server_checked:
                return
            try:
                statement = await self._fhir.capabilities()
            except FatalUpstreamError:
                statement = {}  # no readable CapabilityStatement: try, and park what fails
            refusing = sorted(
                str(entry.get("type"))
                for rest in statement.get("rest", []) or []
                for entry in rest.get("resource", []) or []
                if entry.get("type") in ("Endpoint", "ImagingStudy") and entry.get("updateCreate") is False
            )
            if refusing:
                self._refusal = (
                    f"BRIDGE_WRITE_STRATEGY: the FHIR server does not create {' or '.join(refusing)} "
                    "by PUT to a new id (CapabilityStatement updateCreate=false); set it to 'conditional'"
                )
            self._server_checked = True

    async def _write(
        self, resource: dict[str, Any], search: dict[str, str], *, if_match: str | None = None
    ) -> WriteResult:
        if self._strategy is WriteStrategy.CLIENT_ID:
            if not self._server_checked:
                await self._check_update_create()
            if self._refusal is not None:
                raise ConfigurationError(self._refusal)
            try:
                result = await self._fhir.update(resource, if_match=if_match)
            except FatalUpstreamError as exc:
                # A PUT with no If-Match to an id the server does not hold is a create; 404 or 405
                # says the server will not create there (HAPI with client ids off answers 404,
                # and its CapabilityStatement says nothing of updateCreate). Stop once, with advice.
                if if_match is not None or exc.status not in (404, 405):
                    raise
                self._refusal = (
                    f"BRIDGE_WRITE_STRATEGY: the FHIR server refused to create {resource['resourceType']} "
                    f"by PUT to a new id ({exc.status}: it does not accept client-assigned ids); "
                    "set it to 'conditional'"
                )
                raise ConfigurationError(self._refusal) from exc
        else:
            result = await self._fhir.conditional_update(resource, search)
        self.writes += 1
        return result

    async def retire_study(self, fhir_id: str, policy: DeletePolicy) -> tuple[str, str | None]:
        """Apply the delete policy to the ImagingStudy of a study gone from the archive.

        Returns the action taken (``marked``, ``deleted``, ``left``, ``absent``,
        ``not-owned``) and the resource's version after it.
        """
        current = await self._fhir.read("ImagingStudy", fhir_id)
        if current is None:
            return "absent", None
        version = (current.get("meta") or {}).get("versionId")
        if policy is DeletePolicy.IGNORE:
            return "left", version
        tags = (current.get("meta") or {}).get("tag") or []
        owned = any(
            t.get("system") == BRIDGE_TAG_SYSTEM and t.get("code") == self._ctx.source_name for t in tags
        )
        if not owned:
            return "not-owned", version
        if policy is DeletePolicy.DELETE:
            await self._fhir.delete("ImagingStudy", fhir_id)
            self.writes += 1
            return "deleted", None
        if current.get("status") == "entered-in-error":
            return "marked", version
        current["status"] = "entered-in-error"
        result = await self._fhir.update(current, if_match=version)
        self.writes += 1
        return "marked", result.version


def _token(identifier: dict[str, str]) -> str:
    return f"{identifier['system']}|{identifier['value']}"


def _ambiguous(key: PatientKey) -> PatientLinkError:
    return PatientLinkError(
        f"more than one Patient has the study's PatientID under system {key.system}; "
        "merge them in the EHR and the study is retried on the next run",
        attribute="PatientID",
    )
