"""Idempotent writes: the source's Endpoint and the ImagingStudy (and its retirement)."""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import time
from collections.abc import Callable, Sequence
from typing import Any

from bridge.errors import (
    BridgeError,
    ConfigurationError,
    FatalUpstreamError,
    MappingError,
    RetriableUpstreamError,
    UpstreamError,
    VersionConflictError,
)
from bridge.fhir.results import WriteResult, metadata_failure, no_fhir_answer, not_a_fhir_server
from bridge.mapping.context import BRIDGE_TAG_SYSTEM, WITHDRAWN_EXTENSION, MappingContext
from bridge.mapping.endpoint import endpoint_id, endpoint_identifier, map_endpoint
from bridge.mapping.identifiers import identifier_search, study_search
from bridge.mapping.identity import exact_matches
from bridge.mapping.narrative import imaging_study_narrative, with_narrative
from bridge.mapping.records import digest
from bridge.mapping.validate import validate
from bridge.sync.bundles import StudyWrite, lists_interaction, per_study, study_entries, supports_batch
from bridge.sync.policy import DeletePolicy, WriteStrategy
from bridge.sync.protocols import FhirSink, StateStore, refused_client_ids

logger = logging.getLogger(__name__)

# What the FHIR server can do is kept in the state store under this checkpoint name, so a cycle
# does not ask for it again; it is asked again after CAPABILITIES_MAX_AGE seconds, when the FHIR
# base URL changes, and when an answer contradicts it.
CAPABILITIES = "fhir-capabilities"
CAPABILITIES_MAX_AGE = 86400.0
_BATCHES = {"yes": True, "try": None, "no": False}


class Publisher:
    """Writes keyed by business identifiers, so replays and re-runs never duplicate anything.

    * Endpoint: one per source, written only when it changed.
    * ImagingStudy: one PUT per changed study, to an id derived from the Study Instance UID (or a
      conditional PUT on the identifier), with ``If-Match`` when the version is known.
    """

    def __init__(
        self,
        fhir: FhirSink,
        store: StateStore,
        ctx: MappingContext,
        *,
        write_strategy: WriteStrategy,
        batch_size: int = 0,
        server: str = "",
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._fhir = fhir
        self._store = store
        self._ctx = ctx
        self._strategy = write_strategy
        self._server_check = asyncio.Lock()
        self._server_checked = False
        self._refusal: str | None = None
        # Why GET [base]/metadata showed no FHIR server, if it did not: a refused write then says so.
        self._not_fhir: str | None = None
        # Whether the server takes batch Bundles: True when its CapabilityStatement lists batch; None
        # (try, and learn from the first answer) when it lists only transaction, as HAPI's does
        # although it processes batches; False otherwise.
        self._batches: bool | None = False
        self.batch_size = batch_size
        # Which FHIR server the kept capabilities belong to (a digest of its base URL).
        self._server = hashlib.sha256(server.encode()).hexdigest()[:16]
        self._clock = clock
        self.writes = 0  # resources written
        self.write_requests = 0  # FHIR requests that wrote (a batch is one)
        # Whether the server has answered 201 to a write here: then it says "created" itself, and
        # a 200 is an update even at version 1 (HAPI's answer to a PUT that changes nothing).
        self._says_created = False

    def created(self, result: WriteResult) -> bool:
        """Whether a write created its resource, as far as the server's answer can tell.

        201 says so. Some servers answer 200 to a PUT that creates (Medplum's own batch does):
        there the first version id ("1", from the ETag or the location) says so, unless the server
        was seen answering 201 to its creates. The caller adds what it knows itself (no record).
        """
        if result.created:
            return True
        return not self._says_created and 200 <= result.status < 300 and result.version == "1"

    def _learn(self, result: WriteResult) -> WriteResult:
        if result.created:
            self._says_created = True
        return result

    async def ensure_endpoint(self) -> str:
        """Publish the source's Endpoint if it changed; returns the reference to it."""
        resource = map_endpoint(self._ctx)
        fingerprint = digest(resource)
        source = self._ctx.source_name
        published = await asyncio.to_thread(self._store.published_endpoint, source)
        if published is not None and published[0] == fingerprint:
            return f"Endpoint/{published[1]}"  # the server chose the id under conditional writes
        validate(resource)  # only what is written: the same content was valid when it was
        search = {"identifier": identifier_search(endpoint_identifier(self._ctx))}
        result = await self._write(resource, search)
        await asyncio.to_thread(
            self._store.record_endpoint,
            source,
            fingerprint=fingerprint,
            fhir_id=result.id,
            fhir_version=result.version,
        )
        logger.info("endpoint Endpoint/%s published for source %s", result.id, source)
        return f"Endpoint/{result.id}"

    async def reachable(self) -> bool:
        """Whether the FHIR server answers at all (its CapabilityStatement), after a study failed."""
        try:
            await self._fhir.capabilities()
        except UpstreamError:
            return False
        return True

    async def endpoint_reference(self) -> str:
        """The Endpoint reference without writing anything (for dry runs)."""
        published = await asyncio.to_thread(self._store.published_endpoint, self._ctx.source_name)
        if published is not None:
            return f"Endpoint/{published[1]}"
        if self._strategy is WriteStrategy.CLIENT_ID:
            return f"Endpoint/{endpoint_id(self._ctx)}"
        identifier = endpoint_identifier(self._ctx)
        found = await self._fhir.search("Endpoint", {"identifier": identifier_search(identifier)})
        found = exact_matches(found, identifier["system"], identifier["value"])
        return f"Endpoint/{found[0]['id']}" if found else "Endpoint/new"

    async def current_study(self, resource: dict[str, Any]) -> dict[str, Any] | None:
        """What the FHIR server holds now for this ImagingStudy, if anything."""
        if self._strategy is WriteStrategy.CLIENT_ID:
            return await self._fhir.read("ImagingStudy", resource["id"])
        uid = resource["identifier"][0]["value"].removeprefix("urn:oid:")
        found = await self._fhir.search("ImagingStudy", {"identifier": study_search(uid)})
        identifier = resource["identifier"][0]
        exact = exact_matches(found, identifier["system"], identifier["value"])
        return exact[0] if exact else None

    async def put_study(self, resource: dict[str, Any], known_version: str | None) -> WriteResult:
        """Create or update the ImagingStudy; a stale ``If-Match`` is re-read and retried once."""
        uid = resource["identifier"][0]["value"].removeprefix("urn:oid:")
        search = {"identifier": study_search(uid)}
        try:
            return await self._write(resource, search, if_match=known_version)
        except (VersionConflictError, FatalUpstreamError) as exc:
            if known_version is None or exc.status not in (404, 409, 412):
                raise
        return await self._overwrite(resource, search)

    async def _overwrite(self, resource: dict[str, Any], search: dict[str, str]) -> WriteResult:
        """Someone else wrote the study since (another worker, a person): write over the current version."""
        current = await self._fhir.read("ImagingStudy", resource["id"])
        version = (current or {}).get("meta", {}).get("versionId")
        logger.info("ImagingStudy/%s changed on the server; writing over version %s", resource["id"], version)
        return await self._write(resource, search, if_match=version)

    async def batching(self) -> bool:
        """Whether writes go in batch Bundles: a batch size is set and the server lists ``batch``.

        Asks for the CapabilityStatement once per publisher, and only when something is to be
        written (a run with no change makes no request).
        """
        if self.batch_size < 2:
            return False
        if not self._server_checked:
            await self._check_update_create()
        return self._batches is not False

    async def _check_update_create(self) -> None:
        """Before the first write: learn what the server can do, once.

        A server that says it cannot create by PUT (Google's FHIR stores by default) would refuse
        every new study one by one under client ids; better to stop once, naming the setting that
        fixes it. Learned only when something is to be written, so a run with no change makes no
        request; and kept in the state store, so later cycles and processes make none for it
        either, until it is a day old or an answer contradicts it (:meth:`_forget_capabilities`).
        A refusal is never kept: once the server or the setting is fixed, the next run asks again.
        """
        async with self._server_check:
            if self._server_checked:
                return
            if await self._kept_capabilities():
                self._server_checked = True
                return
            try:
                statement = await self._fhir.capabilities()
            except FatalUpstreamError as exc:
                statement = {}  # no readable CapabilityStatement: try, and park what fails
                self._not_fhir = metadata_failure(exc.status)
            else:
                if statement.get("resourceType") != "CapabilityStatement":
                    self._not_fhir = "GET metadata answered no CapabilityStatement"
            refusing = sorted(
                str(entry.get("type"))
                for rest in statement.get("rest", []) or []
                for entry in rest.get("resource", []) or []
                if entry.get("type") in ("Endpoint", "ImagingStudy") and entry.get("updateCreate") is False
            )
            self._batches = (
                True
                if supports_batch(statement)
                else (None if lists_interaction(statement, "transaction") else False)
            )
            if refusing:
                self._refusal = (
                    f"BRIDGE_WRITE_STRATEGY: the FHIR server does not create {' or '.join(refusing)} "
                    "by PUT to a new id (CapabilityStatement updateCreate=false); set it to 'conditional'"
                )
            elif statement:
                await self._keep_capabilities()
            self._server_checked = True

    async def _kept_capabilities(self) -> bool:
        """Take what the state store keeps of this server's capabilities, if it is fresh and its own."""
        raw = await asyncio.to_thread(self._store.checkpoint, self._ctx.source_name, CAPABILITIES)
        try:
            kept = json.loads(raw) if raw else None
            fresh = (
                isinstance(kept, dict)
                and kept.get("server") == self._server
                and kept.get("batches") in _BATCHES
                and 0 <= self._clock() - float(kept["at"]) < CAPABILITIES_MAX_AGE
            )
        except (ValueError, TypeError, KeyError):
            fresh = False
        if not fresh:
            return False
        assert isinstance(kept, dict)
        self._batches = _BATCHES[kept["batches"]]
        return True

    async def _keep_capabilities(self) -> None:
        batches = next(k for k, v in _BATCHES.items() if v is self._batches)
        # Whole seconds, rounded down: a time in the future would not count as fresh.
        value = json.dumps({"server": self._server, "batches": batches, "at": int(self._clock())})
        await asyncio.to_thread(self._store.save_checkpoint, self._ctx.source_name, CAPABILITIES, value)

    async def _forget_capabilities(self) -> None:
        """An answer contradicted what was kept: the next run reads the CapabilityStatement again."""
        await asyncio.to_thread(self._store.save_checkpoint, self._ctx.source_name, CAPABILITIES, "")

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
                if if_match is not None or not no_fhir_answer(exc):
                    raise
                if self._not_fhir is not None:
                    # No CapabilityStatement and no PUT: the URL is wrong, not the write strategy.
                    refusal = not_a_fhir_server(None, self._not_fhir)
                    self._refusal = str(refusal)
                    raise refusal from exc
                if exc.status not in (404, 405):
                    raise
                refused = refused_client_ids(resource["resourceType"], exc.status)
                self._refusal = str(refused)
                await self._forget_capabilities()
                raise refused from exc
        else:
            try:
                result = await self._fhir.conditional_update(resource, search)
            except FatalUpstreamError as exc:
                if not no_fhir_answer(exc):
                    raise
                await self._unless_not_fhir(exc)
                raise
        self.writes += 1
        self.write_requests += 1
        return self._learn(result)

    async def _unless_not_fhir(self, exc: FatalUpstreamError) -> None:
        """A conditional PUT failed as at no FHIR server: if [base]/metadata shows none, say that.

        A FHIR server takes ``PUT Type?identifier=...``; a DICOMweb archive, a web page or a wrong
        path answers 404, 405 or a page, and the bare answer would not say that BRIDGE_FHIR_URL is
        the fix.
        Asked only after such a failure (a run with no change still makes no request), once per
        publisher, and not at all when the state store keeps this server's capabilities (it
        answered a CapabilityStatement then).
        """
        if not self._server_checked:
            try:
                await self._check_update_create()
            except UpstreamError:
                return  # no answer to GET metadata either: the write's own failure is told
        if self._not_fhir is not None:
            raise not_a_fhir_server(None, self._not_fhir) from exc

    async def put_studies(self, items: Sequence[StudyWrite]) -> list[WriteResult | BridgeError]:
        """Write ImagingStudies and their dose Observations, in batch Bundles where the server takes them.

        Each item is a resource, the version it is known at and its Observations, which go in the
        same batch right after their study (PUT to their derived ids, partOf the study's id): one
        request for a study and its dose summaries. Observations whose entry failed, or whose study
        is written alone, are written alone right after it; if that fails too, the study's outcome
        is that error (it is parked, and written again with them on the next run).

        Each study's entry is the same idempotent write as :meth:`put_study` (PUT to the derived
        id, ``ifMatch`` when the version is known); per entry, a 412/409/404 on a known version
        re-reads and retries just that study, other 4xx are that study's error (it is parked), and
        a 5xx writes that study alone. A batch that fails as a whole (after the retries) or answers
        broken falls back to study-by-study writes; a 413 halves the batch. Returns, in order, each
        study's result or error.
        """
        results: list[WriteResult | BridgeError | None] = [None] * len(items)
        conflicts: set[int] = set()
        observations_left = {i for i, item in enumerate(items) if item.observations}  # not yet written
        entries = sum(1 + len(item.observations) for item in items)  # one study with its dose: a batch too
        if self._strategy is WriteStrategy.CLIENT_ID and entries > 1 and await self.batching():
            if self._refusal is not None:
                raise ConfigurationError(self._refusal)
            start = 0
            while start < len(items):
                chunk = items[start : start + self.batch_size]
                try:
                    answers = await self._fhir.batch([e for item in chunk for e in study_entries(item)])
                except FatalUpstreamError as exc:
                    if exc.status == 413 and self.batch_size > 2:
                        self.batch_size //= 2
                        logger.info("the FHIR server refused a batch as too large; now %d", self.batch_size)
                        continue
                    if self._batches is None and exc.status is not None and 400 <= exc.status < 500:
                        self._batches = False  # it does not take batches after all
                        logger.info("the FHIR server refused a batch Bundle: writing study by study")
                        await self._keep_capabilities()
                    logger.warning(
                        "batch of %d ImagingStudies failed (%s); writing them one by one",
                        len(chunk),
                        type(exc).__name__,
                    )
                    start += len(chunk)
                    continue
                except RetriableUpstreamError:
                    logger.warning(
                        "batch of %d ImagingStudies failed after retries; writing them one by one", len(chunk)
                    )
                    start += len(chunk)
                    continue
                observations_left -= set(range(start, start + len(chunk)))
                self.write_requests += 1
                if self._batches is None:
                    self._batches = True  # learned: kept so later runs batch from the start
                    await self._keep_capabilities()
                for offset, answer, observed in per_study(chunk, answers):
                    self.writes += sum(1 for a in observed if a.result is not None)
                    if any(a.result is None for a in observed):
                        observations_left.add(start + offset)  # written alone below, after the study
                    if answer.result is not None:
                        self.writes += 1
                        results[start + offset] = self._learn(answer.result)
                    elif isinstance(answer.error, RetriableUpstreamError):
                        continue  # written alone below
                    elif (
                        isinstance(answer.error, FatalUpstreamError)
                        and answer.error.status in (404, 409, 412)
                        and chunk[offset].version is not None
                    ):
                        conflicts.add(start + offset)  # re-read below, then written alone
                    else:
                        results[start + offset] = answer.error or FatalUpstreamError(
                            "fhir batch entry answered nothing usable", service="fhir"
                        )
                start += len(chunk)
        for index, outcome in enumerate(results):
            resource, version, observations = items[index]
            if isinstance(outcome, BridgeError) or (outcome is not None and index not in observations_left):
                continue  # parked, or written in a batch with its Observations
            try:
                if index in conflicts:
                    uid = resource["identifier"][0]["value"].removeprefix("urn:oid:")
                    results[index] = await self._overwrite(resource, {"identifier": study_search(uid)})
                elif outcome is None:
                    results[index] = await self.put_study(resource, version)
                written = results[index]
                if observations and isinstance(written, WriteResult):
                    await self.put_observations(observations, f"ImagingStudy/{written.id}")
            except (MappingError, FatalUpstreamError, RetriableUpstreamError) as exc:
                results[index] = exc
        return [r for r in results if r is not None]

    async def put_observations(self, observations: Sequence[dict[str, Any]], study_reference: str) -> None:
        """Write a study's dose Observations, each keyed by its report's SOP Instance UID, partOf the study.

        ``study_reference`` is where the study was written (under conditional writes the server
        chose its id).
        """
        for observation in observations:
            observation["partOf"] = [{"reference": study_reference}]
            uid = observation["identifier"][0]["value"].removeprefix("urn:oid:")
            await self._write(observation, {"identifier": study_search(uid)})

    async def retire_observations(self, study_id: str, policy: DeletePolicy) -> None:
        """Retire the dose Observations this source wrote for a study, as the study is."""
        if policy is DeletePolicy.IGNORE:
            return
        found = await self._fhir.search("Observation", {"part-of": f"ImagingStudy/{study_id}"})
        for observation in found:
            if not self._owns(observation) or observation.get("status") == "entered-in-error":
                continue
            if policy is DeletePolicy.DELETE:
                await self._fhir.delete("Observation", observation["id"])
            else:
                version = (observation.get("meta") or {}).get("versionId")
                observation["status"] = "entered-in-error"
                await self._fhir.update(observation, if_match=version)
            self.writes += 1
            self.write_requests += 1

    def _owns(self, resource: dict[str, Any]) -> bool:
        tags = (resource.get("meta") or {}).get("tag") or []
        return any(
            t.get("system") == BRIDGE_TAG_SYSTEM and t.get("code") == self._ctx.source_name for t in tags
        )

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
        if not self._owns(current):
            return "not-owned", version
        if self._ctx.dose_observations:
            await self.retire_observations(fhir_id, policy)
        if policy is DeletePolicy.DELETE:
            await self._fhir.delete("ImagingStudy", fhir_id)
            self.writes += 1
            self.write_requests += 1
            return "deleted", None
        if current.get("status") == "entered-in-error":
            return "marked", version
        current["status"] = "entered-in-error"
        current = with_narrative(current, imaging_study_narrative)  # the record shows the withdrawal
        result = await self._fhir.update(current, if_match=version)
        self.writes += 1
        self.write_requests += 1
        return "marked", result.version

    async def withdraw_study(self, fhir_id: str, code: str) -> str | None:
        """Mark a published ImagingStudy as withdrawn from clinicians (the withdrawal extension, ``code``).

        Everything else stays as published, its subject above all: a conflicting newcomer never
        moves a study. Returns the version after it (None if the resource is not there).
        """
        for attempt in range(2):
            current = await self._fhir.read("ImagingStudy", fhir_id)
            if current is None:
                return None
            version = (current.get("meta") or {}).get("versionId")
            extensions = [e for e in current.get("extension") or [] if isinstance(e, dict)]
            if any(e.get("url") == WITHDRAWN_EXTENSION and e.get("valueCode") == code for e in extensions):
                return str(version) if version is not None else None
            current["extension"] = [*extensions, {"url": WITHDRAWN_EXTENSION, "valueCode": code}]
            try:
                result = await self._fhir.update(current, if_match=version)
            except VersionConflictError:
                if attempt:
                    raise
                continue  # written meanwhile (another replica): mark the version there is now
            self.writes += 1
            self.write_requests += 1
            return result.version
        return None  # not reached: the second conflict is raised

