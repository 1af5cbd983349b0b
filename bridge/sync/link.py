"""Links a study to the FHIR server's records: its Patient and, per the order policy, its order."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from typing import Any
from urllib.parse import urlencode

from bridge.errors import (
    FatalUpstreamError,
    MappingError,
    PatientLinkError,
    VersionConflictError,
)
from bridge.fhir.results import WriteResult
from bridge.mapping.context import MappingContext
from bridge.mapping.demographics import disagreements
from bridge.mapping.identifiers import PatientKey, accession_identifiers, escape_token, patient_key
from bridge.mapping.identity import exact_matches, has_identifier, replaced_by
from bridge.mapping.patient import logical_subject
from bridge.mapping.records import StudyRecord
from bridge.sync import metrics
from bridge.sync.link_batch import prime_patients
from bridge.sync.linked import NEW_PATIENT, LinkedPatient, new_patient
from bridge.sync.policy import DemographicsCheck, OrderPolicy, PatientPolicy, WriteStrategy
from bridge.sync.protocols import FhirSink, StateStore, refused_client_ids
from bridge.sync.report import SHOWN_AS_PROGRESS

logger = logging.getLogger(__name__)

_MAX_MERGE_HOPS = 5  # replaced-by links followed from one Patient before giving up (a loop, a chain)
_MERGE_CHECK_CHUNK = 50  # Patient ids per search when looking for merged Patients
_RECENT_MERGES_PAGE = 100  # inactive Patients per search when looking for merges since the last check


class Linker:
    """How a source's studies are linked: the FHIR server, the policies, the store; no state of a run.

    Each run (or dry run) takes a :class:`RunLinker` of its own with :meth:`begin_run`, so the
    Patients one run linked never leak into the next (the EHR may have merged patients since).
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
        self.fhir = fhir
        self.ctx = ctx
        self.patient_policy = patient_policy
        self.order_policy = order_policy
        self.write_strategy = write_strategy
        self.demographics = demographics
        self.store = store  # overrides of the demographics check and merge tracing

    def begin_run(self, *, dry_run: bool = False) -> RunLinker:
        """The linker of one run; a dry run's only reads, from the FHIR server and the store."""
        return RunLinker(self, dry_run=dry_run)


class RunLinker:
    """Finds (and, under ``match-or-create``, creates) a study's Patient and order, within one run.

    A Patient is looked up once per patient per run; an existing Patient is never written. Under
    ``client-id`` a Patient the bridge creates is PUT to an id derived from (system, PatientID),
    so no server's token search (Medplum folds case, others fold accents) can make two people
    collide; ``conditional`` keeps ``If-None-Exist`` for servers that refuse client ids. Every
    search answer is checked for the exact identifier; a merged-away Patient is never linked.
    Each study's birth date, sex and family name are cross-checked with the Patient it links to.
    """

    def __init__(self, config: Linker, *, dry_run: bool) -> None:
        self.config = config
        self._fhir = config.fhir
        self._ctx = config.ctx
        self._policy = config.patient_policy
        self._order_policy = config.order_policy
        self._strategy = config.write_strategy
        self._demographics = config.demographics
        self._store = config.store
        self.dry_run = dry_run  # read, never write (bridge sync --dry-run)
        self.patients: dict[PatientKey, LinkedPatient] = {}  # linked in this run
        self._patient_locks: dict[PatientKey, asyncio.Lock] = {}
        self._relinking: dict[str, str] = {}  # study UID -> the merged-away Patient it links to now
        self.events: list[dict[str, str]] = []  # what this run did to Patient links (the run record)
        self.writes = 0  # Patients created
        self.write_requests = 0  # FHIR requests that created them (a batch is one)

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
            if key not in self.patients:
                self.patients[key] = await self._find_or_create_patient(study, key, before_create)
        linked = self.patients[key]
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
        if self._store is not None and linked.id != NEW_PATIENT:
            check = await asyncio.to_thread(self._store.demographics_check, source, study.uid)
            if check == (linked.id, True):
                metrics.DEMOGRAPHICS.labels("accepted").inc()
                self.events.append({**event, "event": "demographics-accepted"})
                logger.info("study %s: %s disagree with %s; link accepted", study.uid, named, patient)
                return
            if not self.dry_run:  # a dry run reads the integrator's decision and records nothing
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
        patient = new_patient(study, key, self._ctx, self._strategy)
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
        logger.info("created Patient/%s", patient_id, extra=SHOWN_AS_PROGRESS)

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
        studies = await self._to_relink(merged)
        logger.info("%d Patients merged on the FHIR server: %d studies to re-link", len(merged), len(studies))
        return len(studies)

    async def _to_relink(self, merged: list[str]) -> list[str]:
        """The published studies linked to the ``merged`` Patients, made to count as changed.

        Their fingerprints are forgotten, so the run maps them again and links them anew; the
        Patient each links to now is kept for the run's record of the re-link.
        """
        assert self._store is not None
        source = self._ctx.source_name
        studies = await asyncio.to_thread(self._store.studies_linked_to, source, merged)
        if studies:
            self._relinking.update(studies)
            await asyncio.to_thread(self._store.forget_fingerprints, source, list(studies))
        return list(studies)

    @property
    def relinking(self) -> list[str]:
        """The studies this run re-links because their Patient was merged (see :meth:`notice_merges`)."""
        return list(self._relinking)

    async def notice_recent_merges(self, since: datetime) -> list[str] | None:
        """The studies linked to Patients the FHIR server marked merged since ``since``, to re-link now.

        One search for the inactive Patients changed since then (``active=false`` and
        ``_lastUpdated``; the server's filters are hints, only a ``replaced-by`` link on a Patient
        the source's studies link to counts). Their studies' fingerprints are forgotten, as in
        :meth:`notice_merges`, and their UIDs returned for the run to sync by name. None when the
        answer fills its page: more Patients changed than one search shows, and :meth:`notice_merges`
        asks about every linked Patient instead.
        """
        if self._store is None or self._policy is PatientPolicy.LOGICAL or self.dry_run:
            return []
        params = {
            "active": "false",
            "_lastUpdated": f"ge{since.astimezone(UTC):%Y-%m-%dT%H:%M:%SZ}",
            "_count": str(_RECENT_MERGES_PAGE),
        }
        found = await self._fhir.search("Patient", params)
        if len(found) >= _RECENT_MERGES_PAGE:
            return None
        merged = [str(p["id"]) for p in found if p.get("id") and replaced_by(p) is not None]
        if not merged:
            return []
        studies = await self._to_relink(merged)
        if studies:
            logger.info(
                "Patients merged on the FHIR server since the last check: %d studies to re-link", len(studies)
            )
        return studies

    async def prime_patients(self, candidates: Sequence[tuple[StudyRecord, Callable[[], None]]]) -> None:
        """Link a page's Patients with a batch or two (see :func:`bridge.sync.link_batch.prime_patients`)."""
        await prime_patients(self, candidates)

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


def _ambiguous(key: PatientKey) -> PatientLinkError:
    return PatientLinkError(
        f"more than one Patient has the study's PatientID under system {key.system}; "
        "merge them in the EHR and the study is retried on the next run",
        attribute="PatientID",
    )
