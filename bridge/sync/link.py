"""Links a study to the FHIR server's records: its Patient and, per the order policy, its order."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote, urlencode

from bridge.dicomweb.records import StudyRecord
from bridge.errors import (
    FatalUpstreamError,
    MappingError,
    PatientLinkError,
    UpstreamError,
    VersionConflictError,
)
from bridge.fhir.results import WriteResult
from bridge.mapping.context import MappingContext
from bridge.mapping.demographics import disagreements
from bridge.mapping.identifiers import PatientKey, accession_identifiers, escape_token, patient_key
from bridge.mapping.identity import exact_matches, has_identifier, replaced_by
from bridge.mapping.patient import logical_subject, map_patient, patient_resource_id
from bridge.mapping.validate import validate
from bridge.sync import metrics
from bridge.sync.policy import DemographicsCheck, OrderPolicy, PatientPolicy, WriteStrategy
from bridge.sync.protocols import FhirSink, StateStore, refused_client_ids

logger = logging.getLogger(__name__)

NEW_PATIENT = "(new)"  # a dry run's stand-in for a Patient the sync would create
_MAX_MERGE_HOPS = 5  # replaced-by links followed from one Patient before giving up (a loop, a chain)
_MERGE_CHECK_CHUNK = 50  # Patient ids per search when looking for merged Patients


@dataclass(frozen=True, slots=True)
class LinkedPatient:
    """The Patient a key links to: its id, the resource as read or written, and the merge it came through."""

    id: str
    resource: dict[str, Any]
    replaced: str | None = None  # the id of the merged-away Patient that led here, if any


class Linker:
    """Finds (and, under ``match-or-create``, creates) a study's Patient and order.

    A Patient is looked up once per patient per run; an existing Patient is never written. Under
    ``client-id`` a Patient the bridge creates is PUT to an id derived from (system, PatientID),
    so no server's token search (Medplum folds case, others fold accents) can make two people
    collide; ``conditional`` keeps ``If-None-Exist`` for servers that refuse client ids. Every
    search answer is checked for the exact identifier; a merged-away Patient is never linked.
    Each study's birth date, sex and family name are cross-checked with the Patient it links to.
    """

    def __init__(
        self,
        fhir: FhirSink,
        ctx: MappingContext,
        *,
        patient_policy: PatientPolicy,
        order_policy: OrderPolicy = OrderPolicy.NONE,
        write_strategy: WriteStrategy = WriteStrategy.CLIENT_ID,
        demographics: DemographicsCheck = DemographicsCheck.PARK,
        store: StateStore | None = None,
    ) -> None:
        self._fhir = fhir
        self._ctx = ctx
        self._policy = patient_policy
        self._order_policy = order_policy
        self._strategy = write_strategy
        self._demographics = demographics
        self._store = store  # overrides of the demographics check and merge tracing; none in previews
        self.dry_run = False  # read, never write (bridge sync --dry-run)
        self._patients: dict[PatientKey, LinkedPatient] = {}
        self._patient_locks: dict[PatientKey, asyncio.Lock] = {}
        self._relinking: dict[str, str] = {}  # study UID -> the merged-away Patient it links to now
        self.events: list[dict[str, str]] = []  # what this run did to Patient links (the run record)
        self.writes = 0  # Patients created
        self.write_requests = 0  # FHIR requests that created them (a batch is one)

    def begin_run(self) -> None:
        """Forget the Patient links of the previous run (the EHR may have merged patients since)."""
        self._patients.clear()
        self._patient_locks.clear()
        self._relinking.clear()
        self.events = []

    async def subject(
        self, study: StudyRecord, *, before_create: Callable[[], None] | None = None
    ) -> dict[str, Any]:
        """The ImagingStudy.subject Reference, per the patient policy.

        Raises MappingError when PatientID is missing and PatientLinkError when no single Patient
        can be linked under ``match-only`` (or several match under ``match-or-create``), or when
        the study's demographics disagree with the Patient (BRIDGE_DEMOGRAPHICS_CHECK=park).
        """
        key = patient_key(study, self._ctx)
        if self._policy is PatientPolicy.LOGICAL:
            return logical_subject(key)
        lock = self._patient_locks.setdefault(key, asyncio.Lock())
        async with lock:  # one lookup per patient per run, even with studies in parallel
            if key not in self._patients:
                self._patients[key] = await self._find_or_create_patient(study, key, before_create)
        linked = self._patients[key]
        await self._check_demographics(study, linked)
        self._note_merge(study.uid, linked)
        if linked.id == NEW_PATIENT:
            return {"display": "a new Patient, created by the sync"}
        return {"reference": f"Patient/{linked.id}"}

    def _note_merge(self, study_uid: str, linked: LinkedPatient) -> None:
        """Record in the run a link that a merge on the FHIR server decided (FHIR ids only)."""
        before = self._relinking.get(study_uid)
        if before is not None and before != linked.id:
            event = {"event": "relinked", "from": f"Patient/{before}"}
        elif linked.replaced is not None:
            event = {"event": "linked-to-survivor", "from": f"Patient/{linked.replaced}"}
        else:
            return
        self.events.append({"study_uid": study_uid, **event, "to": f"Patient/{linked.id}"})
        logger.info("study %s linked to Patient/%s, which replaced %s", study_uid, linked.id, event["from"])

    async def _check_demographics(self, study: StudyRecord, linked: LinkedPatient) -> None:
        """Park (or count) a study whose birth date, sex or family name disagrees with its Patient.

        Only attribute names are reported, never values. A link the integrator accepted for this
        study and this Patient (``bridge retry --study UID --accept-demographics``) passes.
        """
        if self._demographics is DemographicsCheck.OFF:
            return
        attributes = disagreements(study, linked.resource)
        if not attributes:
            return
        named = ",".join(attributes)
        patient = f"Patient/{linked.id}" if linked.id != NEW_PATIENT else "the Patient to be created"
        event = {"study_uid": study.uid, "attributes": named, "patient": patient}
        if self._demographics is DemographicsCheck.WARN:
            metrics.DEMOGRAPHICS.labels("warn").inc()
            self.events.append({**event, "event": "demographics-warning"})
            logger.warning("study %s: %s disagree with %s; published (warn)", study.uid, named, patient)
            return
        source = self._ctx.source_name
        if self._store is not None and not self.dry_run and linked.id != NEW_PATIENT:
            check = await asyncio.to_thread(self._store.demographics_check, source, study.uid)
            if check == (linked.id, True):
                metrics.DEMOGRAPHICS.labels("accepted").inc()
                self.events.append({**event, "event": "demographics-accepted"})
                logger.info("study %s: %s disagree with %s; link accepted", study.uid, named, patient)
                return
            await asyncio.to_thread(
                self._store.record_demographics_check,
                source,
                study.uid,
                patient_id=linked.id,
                attributes=named,
            )
        metrics.DEMOGRAPHICS.labels("park").inc()
        raise PatientLinkError(
            f"{named} of the study disagree with {patient}, which has the study's PatientID (the "
            "demographics cross-check; values are not shown): correct the study in the archive or the "
            f"Patient in the EHR and run bridge retry, or accept this link with bridge retry --study "
            f"{study.uid} --accept-demographics; BRIDGE_DEMOGRAPHICS_CHECK=warn publishes such studies",
            attribute=named,
        )

    async def _find_or_create_patient(
        self, study: StudyRecord, key: PatientKey, before_create: Callable[[], None] | None
    ) -> LinkedPatient:
        if self._policy is PatientPolicy.MATCH_ONLY:
            linked = await self._existing_patient(key)
            if linked is None:
                raise PatientLinkError(
                    f"no Patient has the study's PatientID under system {key.system} "
                    "(patient policy match-only); the study is retried on the next run",
                    attribute="PatientID",
                )
            return linked
        patient = map_patient(study, key, self._ctx)
        if self._strategy is WriteStrategy.CLIENT_ID:
            patient = {"resourceType": "Patient", "id": patient_resource_id(key), **patient}
        validate(patient)
        if self.dry_run:
            return await self._existing_patient(key) or LinkedPatient(NEW_PATIENT, patient)
        if self._strategy is WriteStrategy.CLIENT_ID:
            return await self._find_or_put(key, patient, before_create)
        if before_create is not None:
            before_create()
        try:
            result = await self._fhir.conditional_create(patient, urlencode({"identifier": key.search()}))
        except VersionConflictError:
            # Several Patients matched the server's search: at most one may match exactly.
            return await self._one_exact_patient(key)
        if result.created:
            self._created(result.id)
            return LinkedPatient(result.id, patient)
        # The server says one Patient matched: its token search is trusted only once checked.
        found = await self._fhir.read("Patient", result.id)
        if found is not None and has_identifier(found, key.system, key.value) and replaced_by(found) is None:
            return LinkedPatient(result.id, found)
        return await self._one_exact_patient(key)

    async def _find_or_put(
        self, key: PatientKey, patient: dict[str, Any], before_create: Callable[[], None] | None
    ) -> LinkedPatient:
        """The existing Patient, or the new one PUT to the id derived from the key (``client-id``).

        Searched first (the EHR's own Patients have server ids), then the derived id is read: a
        Patient the bridge created and the EHR changed since is never written over.
        """
        linked = await self._existing_patient(key)
        if linked is not None:
            return linked
        current = await self._fhir.read("Patient", patient["id"])
        if current is not None:
            return await self._own_patient(key, current)
        if before_create is not None:
            before_create()
        result = await self._put_patient(patient)
        self._created(result.id)
        return LinkedPatient(result.id, patient)

    async def _own_patient(self, key: PatientKey, current: dict[str, Any]) -> LinkedPatient:
        """The Patient at the key's derived id, which the search did not find (a stale search cache)."""
        linked = await self._pick(key, exact_matches([current], key.system, key.value))
        if linked is None:
            raise PatientLinkError(
                f"the Patient the bridge created for the study's PatientID under system {key.system} "
                f"(Patient/{current.get('id')}) no longer carries that identifier: the EHR changed it; "
                "the bridge never writes over it: correct the PatientID in the archive or the "
                "Patient in the EHR; the study is retried on the next run",
                attribute="PatientID",
            )
        return linked

    async def _put_patient(self, patient: dict[str, Any]) -> WriteResult:
        """PUT the new Patient to its derived id; a server refusing client ids stops the run once."""
        try:
            return await self._fhir.update(patient)
        except FatalUpstreamError as exc:
            if exc.status not in (404, 405):
                raise
            raise refused_client_ids("Patient", exc.status) from exc

    def _created(self, patient_id: str) -> None:
        self.writes += 1
        self.write_requests += 1
        logger.info("created Patient/%s", patient_id)

    async def _existing_patient(self, key: PatientKey) -> LinkedPatient | None:
        """The one live Patient with exactly the key's identifier, following merges; None if none."""
        found = await self._fhir.search("Patient", {"identifier": key.search()})
        return await self._pick(key, exact_matches(found, key.system, key.value))

    async def _pick(self, key: PatientKey, exact: list[dict[str, Any]]) -> LinkedPatient | None:
        """The one Patient to link among exact matches: a live one, else the survivor of their merge.

        Several live Patients are ambiguous (PatientLinkError); a merged-away Patient leads to the
        Patient that replaced it, which must itself carry the key's identifier exactly.
        """
        live = [p for p in exact if replaced_by(p) is None]
        if len(live) > 1:
            raise _ambiguous(key)
        if live:
            return LinkedPatient(str(live[0]["id"]), live[0])
        survivors: dict[str, LinkedPatient] = {}
        for merged in exact:
            linked = await self._survivor(key, merged)
            survivors[linked.id] = linked
        if len(survivors) > 1:
            raise _ambiguous(key)
        return next(iter(survivors.values()), None)

    async def _survivor(self, key: PatientKey, merged: dict[str, Any]) -> LinkedPatient:
        """The live Patient a merged-away one leads to through its replaced-by links."""
        current = merged
        for _ in range(_MAX_MERGE_HOPS):
            target = replaced_by(current)
            if target is None:
                if has_identifier(current, key.system, key.value):
                    return LinkedPatient(str(current["id"]), current, replaced=str(merged["id"]))
                break
            found = await self._fhir.read("Patient", target) if target else None
            if found is None:
                break
            current = found
        raise PatientLinkError(
            f"the Patient with the study's PatientID under system {key.system} (Patient/{merged.get('id')}) "
            "was merged on the FHIR server, and no surviving Patient carries that identifier: add it to the "
            "surviving Patient in the EHR, or correct the PatientID in the archive; the study is retried "
            "on the next run",
            attribute="PatientID",
        )

    async def prime_patients(self, candidates: Sequence[tuple[StudyRecord, Callable[[], None]]]) -> None:
        """Link the Patients of a page of studies with a batch or two instead of a request each.

        Each candidate is a study and the check it must pass before its Patient may be created
        (a bad study never creates a Patient). Patients are de-duplicated within the page, and
        only those not linked yet in this run are asked for. Under ``client-id``: one batch of
        searches (and reads of the derived ids), then one batch of PUTs for the Patients nobody
        has; under ``conditional``: one batch of ``POST`` with ``ifNoneExist``, then reads of the
        Patients the server says existed. Only a plain answer links here (one exact, live
        Patient); anything else (an entry that failed, a merge, several matches, a looser match)
        is left for :meth:`subject` to do study by study, as without a batch. Only under
        ``match-or-create``; a dry run writes nothing.
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
                if self._strategy is WriteStrategy.CLIENT_ID:
                    patient = {"resourceType": "Patient", "id": patient_resource_id(key), **patient}
                validate(patient)
            except MappingError:
                continue  # the study's own way parks it, naming the attribute
            wanted[key] = patient
        if self._strategy is WriteStrategy.CLIENT_ID:
            # Even one Patient: two batches (look-ups, PUT) against three requests study by study
            # (search, read of the derived id, PUT).
            if wanted:
                await self._prime_by_id(wanted)
        elif len(wanted) > 1:  # one conditional create is one request either way
            await self._prime_conditional(wanted)

    async def _prime_by_id(self, wanted: dict[PatientKey, dict[str, Any]]) -> None:
        """``client-id``: search and read each key's Patient in one batch, then PUT the missing ones."""
        keys = list(wanted)
        entries = []
        for key in keys:
            search = urlencode({"identifier": key.search()})
            entries.append({"request": {"method": "GET", "url": f"Patient?{search}"}})
            rid = quote(str(wanted[key]["id"]), safe="")
            entries.append({"request": {"method": "GET", "url": f"Patient/{rid}"}})
        try:
            answers = await self._fhir.batch(entries)
        except UpstreamError as exc:
            logger.warning(
                "batch of %d Patient look-ups failed (%s): one by one", len(keys), type(exc).__name__
            )
            return
        missing: list[PatientKey] = []
        for n, key in enumerate(keys):
            searched, own = answers[2 * n], answers[2 * n + 1]
            if searched.resource is None or not (own.status == 404 or own.resource is not None):
                continue  # an entry failed: left for subject()
            exact = exact_matches(_found(searched.resource, "Patient"), key.system, key.value)
            if own.resource is not None and not any(p.get("id") == own.resource.get("id") for p in exact):
                continue  # the derived id holds a Patient the search missed: subject() sorts it out
            if not exact:
                missing.append(key)
            elif len(exact) == 1 and replaced_by(exact[0]) is None:
                self._patients[key] = LinkedPatient(str(exact[0]["id"]), exact[0])
        if not missing:
            return
        puts = [
            {
                "resource": wanted[key],
                "request": {"method": "PUT", "url": f"Patient/{quote(str(wanted[key]['id']), safe='')}"},
            }
            for key in missing
        ]
        try:
            written = await self._fhir.batch(puts)
        except UpstreamError as exc:
            logger.warning("batch of %d Patients failed (%s): one by one", len(puts), type(exc).__name__)
            return
        self.write_requests += 1
        for key, answer in zip(missing, written, strict=True):
            if answer.result is not None:
                self.writes += 1
                self._patients[key] = LinkedPatient(answer.result.id, wanted[key])
                logger.info("created Patient/%s", answer.result.id)

    async def _prime_conditional(self, wanted: dict[PatientKey, dict[str, Any]]) -> None:
        """``conditional``: one batch of conditional creates, then reads of those that existed."""
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
                self._patients[key] = LinkedPatient(answer.result.id, wanted[key])
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
            resource = answer.resource
            if resource is not None and has_identifier(resource, key.system, key.value):
                if replaced_by(resource) is None:
                    self._patients[key] = LinkedPatient(rid, resource)

    async def notice_merges(self) -> int:
        """Make the studies linked to Patients merged on the FHIR server count as changed.

        Asks the FHIR server about the Patients the source's published studies link to (one
        search per 50 of them), once, at the start of a reconciling run: those that carry a
        ``replaced-by`` link have their studies' fingerprints forgotten, so the run, which walks
        the whole archive, maps them again and re-links them (exact identity and demographics
        checked anew; the run records the re-link). Returns how many studies that concerns.
        """
        if self._store is None or self._policy is PatientPolicy.LOGICAL or self.dry_run:
            return 0
        source = self._ctx.source_name
        ids = await asyncio.to_thread(self._store.linked_patients, source)
        merged: list[str] = []
        for start in range(0, len(ids), _MERGE_CHECK_CHUNK):
            chunk = ids[start : start + _MERGE_CHECK_CHUNK]
            found = await self._fhir.search(
                "Patient", {"_id": ",".join(chunk), "active": "false", "_count": str(len(chunk))}
            )
            # The server's filter is a hint: only a replaced-by link on a Patient asked for counts.
            merged.extend(str(p["id"]) for p in found if p.get("id") in chunk and replaced_by(p) is not None)
        if not merged:
            return 0
        studies = await asyncio.to_thread(self._store.studies_linked_to, source, merged)
        self._relinking.update(studies)
        await asyncio.to_thread(self._store.forget_fingerprints, source, list(studies))
        logger.info("%d Patients merged on the FHIR server: %d studies to re-link", len(merged), len(studies))
        return len(studies)

    def take_events(self) -> list[dict[str, str]]:
        """The Patient-link events of the run so far (for its record), emptied."""
        events, self.events = self.events, []
        return events

    async def _one_exact_patient(self, key: PatientKey) -> LinkedPatient:
        """The one exactly matching Patient, when the server's own matching was looser."""
        linked = await self._existing_patient(key)
        if linked is None:
            raise PatientLinkError(
                f"the FHIR server matched the study's PatientID under system {key.system} to a Patient "
                "whose identifier differs (case, escaped characters, spaces or leading zeros); the "
                "bridge links exact matches only and cannot create the Patient through this server's "
                "conditional create: set BRIDGE_WRITE_STRATEGY=client-id if the server accepts client "
                "ids, or create the Patient in the EHR; the study is retried on the next run",
                attribute="PatientID",
            )
        return linked

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


def _found(bundle: dict[str, Any], resource_type: str) -> list[dict[str, Any]]:
    """The resources of a type in a searchset Bundle a batch entry answered with."""
    return [
        entry["resource"]
        for entry in bundle.get("entry") or []
        if isinstance(entry, dict)
        and isinstance(entry.get("resource"), dict)
        and entry["resource"].get("resourceType") == resource_type
    ]


def _ambiguous(key: PatientKey) -> PatientLinkError:
    return PatientLinkError(
        f"more than one Patient has the study's PatientID under system {key.system}; "
        "merge them in the EHR and the study is retried on the next run",
        attribute="PatientID",
    )
