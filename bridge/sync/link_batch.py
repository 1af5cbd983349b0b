"""A page's Patients linked in a batch or two, instead of a request per study.

Only a plain answer links here (one exact, live Patient); anything else is left to the study's own
way through :meth:`bridge.sync.link.RunLinker.subject`, as without a batch.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from typing import Any, Protocol
from urllib.parse import quote, urlencode

from bridge.errors import MappingError, UpstreamError
from bridge.mapping.context import MappingContext
from bridge.mapping.identifiers import PatientKey, patient_key
from bridge.mapping.identity import exact_matches, has_identifier, replaced_by
from bridge.mapping.records import StudyRecord
from bridge.sync.linked import LinkedPatient, new_patient
from bridge.sync.policy import PatientPolicy, WriteStrategy
from bridge.sync.protocols import FhirSink
from bridge.sync.report import SHOWN_AS_PROGRESS

logger = logging.getLogger(__name__)


class LinkConfig(Protocol):
    """What priming reads of a source's linking (``bridge.sync.link.Linker``)."""

    @property
    def fhir(self) -> FhirSink:
        """The FHIR server Patients are looked up on and created in."""

    @property
    def ctx(self) -> MappingContext:
        """The source's mapping context (issuers, systems)."""

    @property
    def patient_policy(self) -> PatientPolicy:
        """Whether a missing Patient is created (only ``match-or-create`` primes)."""

    @property
    def write_strategy(self) -> WriteStrategy:
        """Client ids (batches of PUTs) or conditional creates."""


class RunLinks(Protocol):
    """What priming reads and fills of a run's linker (``bridge.sync.link.RunLinker``, which calls it)."""

    dry_run: bool
    patients: dict[PatientKey, LinkedPatient]
    writes: int
    write_requests: int

    @property
    def config(self) -> LinkConfig:
        """The source's linking."""


async def prime_patients(
    links: RunLinks, candidates: Sequence[tuple[StudyRecord, Callable[[], None]]]
) -> None:
    """Link the Patients of a page of studies with a batch or two instead of a request each.

    Each candidate is a study and the check it must pass before its Patient may be created
    (a bad study never creates a Patient). Patients are de-duplicated within the page, and
    only those not linked yet in this run are asked for. Under ``client-id``: one batch of
    searches (and reads of the derived ids), then one batch of PUTs for the Patients nobody
    has; under ``conditional``: one batch of ``POST`` with ``ifNoneExist``, then reads of the
    Patients the server says existed. Only under ``match-or-create``; a dry run writes nothing.
    """
    config = links.config
    if config.patient_policy is not PatientPolicy.MATCH_OR_CREATE or links.dry_run:
        return
    wanted: dict[PatientKey, dict[str, Any]] = {}
    for study, check in candidates:
        try:
            key = patient_key(study, config.ctx)
            if key in links.patients or key in wanted:
                continue
            check()
            patient = new_patient(study, key, config.ctx, config.write_strategy)
        except MappingError:
            continue  # the study's own way parks it, naming the attribute
        wanted[key] = patient
    if config.write_strategy is WriteStrategy.CLIENT_ID:
        # Even one Patient: two batches (look-ups, PUT) against three requests study by study
        # (search, read of the derived id, PUT).
        if wanted:
            await _prime_by_id(links, wanted)
    elif len(wanted) > 1:  # one conditional create is one request either way
        await _prime_conditional(links, wanted)


async def _prime_by_id(links: RunLinks, wanted: dict[PatientKey, dict[str, Any]]) -> None:
    """``client-id``: search and read each key's Patient in one batch, then PUT the missing ones."""
    fhir = links.config.fhir
    keys = list(wanted)
    entries = []
    for key in keys:
        search = urlencode({"identifier": key.search()})
        entries.append({"request": {"method": "GET", "url": f"Patient?{search}"}})
        rid = quote(str(wanted[key]["id"]), safe="")
        entries.append({"request": {"method": "GET", "url": f"Patient/{rid}"}})
    try:
        answers = await fhir.batch(entries)
    except UpstreamError as exc:
        logger.warning("batch of %d Patient look-ups failed (%s): one by one", len(keys), type(exc).__name__)
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
            links.patients[key] = LinkedPatient(str(exact[0]["id"]), exact[0])
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
        written = await fhir.batch(puts)
    except UpstreamError as exc:
        logger.warning("batch of %d Patients failed (%s): one by one", len(puts), type(exc).__name__)
        return
    links.write_requests += 1
    for key, answer in zip(missing, written, strict=True):
        if answer.result is not None:
            links.writes += 1
            links.patients[key] = LinkedPatient(answer.result.id, wanted[key])
            logger.info("created Patient/%s", answer.result.id, extra=SHOWN_AS_PROGRESS)


async def _prime_conditional(links: RunLinks, wanted: dict[PatientKey, dict[str, Any]]) -> None:
    """``conditional``: one batch of conditional creates, then reads of those that existed."""
    fhir = links.config.fhir
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
        answers = await fhir.batch(entries)
    except UpstreamError as exc:
        logger.warning(
            "batch of %d Patients failed (%s): linking them one by one", len(keys), type(exc).__name__
        )
        return
    links.write_requests += 1
    to_check: dict[PatientKey, str] = {}
    for key, answer in zip(keys, answers, strict=True):
        if answer.result is None:
            continue
        if answer.result.created:
            links.writes += 1
            links.patients[key] = LinkedPatient(answer.result.id, wanted[key])
            logger.info("created Patient/%s", answer.result.id, extra=SHOWN_AS_PROGRESS)
        else:
            to_check[key] = answer.result.id
    if not to_check:
        return
    reads = [
        {"request": {"method": "GET", "url": f"Patient/{quote(rid, safe='')}"}} for rid in to_check.values()
    ]
    try:
        found = await fhir.batch(reads)
    except UpstreamError:
        return
    for (key, rid), answer in zip(to_check.items(), found, strict=True):
        # The server's token search is trusted only once its answer is checked, as study by study.
        resource = answer.resource
        if resource is not None and has_identifier(resource, key.system, key.value):
            if replaced_by(resource) is None:
                links.patients[key] = LinkedPatient(rid, resource)


def _found(bundle: dict[str, Any], resource_type: str) -> list[dict[str, Any]]:
    """The resources of a type in a searchset Bundle a batch entry answered with."""
    return [
        entry["resource"]
        for entry in bundle.get("entry") or []
        if isinstance(entry, dict)
        and isinstance(entry.get("resource"), dict)
        and entry["resource"].get("resourceType") == resource_type
    ]
