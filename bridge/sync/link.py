"""Links a study to the FHIR server's records: its Patient and, per the order policy, its order."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Sequence
from typing import Any
from urllib.parse import quote, urlencode

from bridge.dicomweb.records import StudyRecord
from bridge.errors import MappingError, PatientLinkError, UpstreamError, VersionConflictError
from bridge.mapping.context import MappingContext
from bridge.mapping.identifiers import PatientKey, accession_identifiers, escape_token, patient_key
from bridge.mapping.identity import exact_matches, has_identifier
from bridge.mapping.patient import logical_subject, map_patient
from bridge.mapping.validate import validate
from bridge.sync.policy import OrderPolicy, PatientPolicy
from bridge.sync.protocols import FhirSink

logger = logging.getLogger(__name__)

NEW_PATIENT = "(new)"  # a dry run's stand-in for a Patient the sync would create


class Linker:
    """Finds (and, under ``match-or-create``, conditionally creates) a study's Patient and order.

    A Patient is looked up once per patient per run; an existing Patient is never written.
    """

    def __init__(
        self,
        fhir: FhirSink,
        ctx: MappingContext,
        *,
        patient_policy: PatientPolicy,
        order_policy: OrderPolicy = OrderPolicy.NONE,
    ) -> None:
        self._fhir = fhir
        self._ctx = ctx
        self._policy = patient_policy
        self._order_policy = order_policy
        self.dry_run = False  # read, never write (bridge sync --dry-run)
        self._patients: dict[PatientKey, str] = {}
        self._patient_locks: dict[PatientKey, asyncio.Lock] = {}
        self.writes = 0  # Patients created
        self.write_requests = 0  # FHIR requests that created them (a batch is one)

    def begin_run(self) -> None:
        """Forget the Patient links of the previous run (the EHR may have merged patients since)."""
        self._patients.clear()
        self._patient_locks.clear()

    async def subject(
        self, study: StudyRecord, *, before_create: Callable[[], None] | None = None
    ) -> dict[str, Any]:
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
                self._patients[key] = await self._find_or_create_patient(study, key, before_create)
        if self._patients[key] == NEW_PATIENT:
            return {"display": "a new Patient, created by the sync"}
        return {"reference": f"Patient/{self._patients[key]}"}

    async def _find_or_create_patient(
        self, study: StudyRecord, key: PatientKey, before_create: Callable[[], None] | None
    ) -> str:
        if self._policy is PatientPolicy.MATCH_ONLY:
            matches = await self._exact_patients(key)
            if not matches:
                raise PatientLinkError(
                    f"no Patient has the study's PatientID under system {key.system} "
                    "(patient policy match-only); the study is retried on the next run",
                    attribute="PatientID",
                )
            if len(matches) > 1:
                raise _ambiguous(key)
            return matches[0]
        patient = map_patient(study, key, self._ctx)
        validate(patient)
        if self.dry_run:
            matches = await self._exact_patients(key)
            if len(matches) > 1:
                raise _ambiguous(key)
            return matches[0] if matches else NEW_PATIENT
        if before_create is not None:
            before_create()
        try:
            result = await self._fhir.conditional_create(patient, urlencode({"identifier": key.search()}))
        except VersionConflictError:
            # Several Patients matched the server's search: at most one may match exactly.
            return await self._one_exact_patient(key)
        if result.created:
            self.writes += 1
            self.write_requests += 1
            logger.info("created Patient/%s", result.id)
            return result.id
        # The server says one Patient matched: its token search is trusted only once checked.
        found = await self._fhir.read("Patient", result.id)
        if found is not None and has_identifier(found, key.system, key.value):
            return result.id
        return await self._one_exact_patient(key)

    async def prime_patients(self, candidates: Sequence[tuple[StudyRecord, Callable[[], None]]]) -> None:
        """Link the Patients of a page of studies with one batch of conditional creates.

        Each candidate is a study and the check it must pass before its Patient may be created
        (a bad study never creates a Patient). Patients are de-duplicated within the page, and
        only those not linked yet in this run are asked for: one ``POST Patient`` entry with
        ``ifNoneExist`` each (a conditional create never touches an existing Patient). A Patient
        the server says already existed is linked only once a second batch of reads shows its
        identifier equals the study's exactly. Anything else (an entry that failed, a batch that
        failed, a looser match) is left for :meth:`subject` to do study by study, as without a
        batch. Only under ``match-or-create``; a dry run writes nothing.
        """
        if self._policy is not PatientPolicy.MATCH_OR_CREATE or self.dry_run:
            return
        wanted: dict[PatientKey, dict[str, Any]] = {}
        for study, check in candidates:
            try:
                key = patient_key(study, self._ctx)
                if key in self._patients or key in wanted:
                    continue
                check()
                patient = map_patient(study, key, self._ctx)
                validate(patient)
            except MappingError:
                continue  # the study's own way parks it, naming the attribute
            wanted[key] = patient
        if len(wanted) < 2:
            return  # one Patient is one request either way
        keys = list(wanted)
        entries = [
            {
                "resource": wanted[key],
                "request": {
                    "method": "POST",
                    "url": "Patient",
                    "ifNoneExist": urlencode({"identifier": key.search()}),
                },
            }
            for key in keys
        ]
        try:
            answers = await self._fhir.batch(entries)
        except UpstreamError as exc:
            logger.warning(
                "batch of %d Patients failed (%s): linking them one by one", len(keys), type(exc).__name__
            )
            return
        self.write_requests += 1
        to_check: dict[PatientKey, str] = {}
        for key, answer in zip(keys, answers, strict=True):
            if answer.result is None:
                continue
            if answer.result.created:
                self.writes += 1
                self._patients[key] = answer.result.id
                logger.info("created Patient/%s", answer.result.id)
            else:
                to_check[key] = answer.result.id
        if not to_check:
            return
        reads = [
            {"request": {"method": "GET", "url": f"Patient/{quote(rid, safe='')}"}}
            for rid in to_check.values()
        ]
        try:
            found = await self._fhir.batch(reads)
        except UpstreamError:
            return
        for (key, rid), answer in zip(to_check.items(), found, strict=True):
            # The server's token search is trusted only once its answer is checked, as study by study.
            if answer.resource is not None and has_identifier(answer.resource, key.system, key.value):
                self._patients[key] = rid

    async def _exact_patients(self, key: PatientKey) -> list[str]:
        """Ids of the Patients the server finds whose identifier equals the key exactly."""
        found = await self._fhir.search("Patient", {"identifier": key.search()})
        return [str(p["id"]) for p in exact_matches(found, key.system, key.value)]

    async def _one_exact_patient(self, key: PatientKey) -> str:
        """The one exactly matching Patient, when the server's own matching was looser."""
        matches = await self._exact_patients(key)
        if len(matches) > 1:
            raise _ambiguous(key)
        if not matches:
            raise PatientLinkError(
                f"the FHIR server matched the study's PatientID under system {key.system} to a Patient "
                "whose identifier differs (case, escaped characters, spaces or leading zeros); the "
                "bridge links exact matches only and cannot create the Patient through this server's "
                "conditional create: create the Patient in the EHR or fix the server's token search; "
                "the study is retried on the next run",
                attribute="PatientID",
            )
        return matches[0]

    async def based_on(self, study: StudyRecord) -> list[dict[str, Any]]:
        """ImagingStudy.basedOn per the order policy: the ServiceRequest with the accession number.

        Several ServiceRequests with the study's accession numbers (one number or several) park
        the study (MappingError): linking one at random could attach the images to the wrong order.
        """
        if self._order_policy is OrderPolicy.NONE:
            return []
        identifiers = accession_identifiers(study, self._ctx)
        orders: dict[str, dict[str, Any]] = {}
        for identifier in identifiers:
            value = escape_token(str(identifier["value"]))
            system = identifier.get("system")
            token = f"{escape_token(str(system))}|{value}" if system else value
            found = await self._fhir.search("ServiceRequest", {"identifier": token})
            # Only orders whose accession equals the study's exactly (a loose token search may differ).
            for match in exact_matches(found, str(system) if system else None, str(identifier["value"])):
                orders[str(match["id"])] = match
        if len(orders) > 1:
            raise MappingError(
                "several ServiceRequests carry the study's accession number; the order is ambiguous",
                attribute="AccessionNumber",
            )
        if orders:
            return [{"reference": f"ServiceRequest/{next(iter(orders))}"}]
        if self._order_policy is OrderPolicy.MATCH_OR_LOGICAL and len(identifiers) == 1:
            # A logical reference names one order; with several accession numbers none is known.
            return [{"type": "ServiceRequest", "identifier": identifiers[0]}]
        return []


def _ambiguous(key: PatientKey) -> PatientLinkError:
    return PatientLinkError(
        f"more than one Patient has the study's PatientID under system {key.system}; "
        "merge them in the EHR and the study is retried on the next run",
        attribute="PatientID",
    )
