"""A dry run: what a sync would do to each study, compared with what the FHIR server holds."""

from __future__ import annotations

import asyncio
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from bridge.dicomweb.records import DicomJson, digest, parse_study, raw_uid
from bridge.errors import FatalUpstreamError, MappingError
from bridge.mapping.context import MappingContext
from bridge.sync.assemble import StudyAssembler
from bridge.sync.diff import changed_paths
from bridge.sync.link import Linker
from bridge.sync.protocols import StateStore, StudySource
from bridge.sync.publisher import Publisher


@dataclass(frozen=True, slots=True)
class Preview:
    """What a sync would do to one study: create, update (with the paths), unchanged, or park."""

    study_uid: str
    action: str
    changes: tuple[str, ...] = ()
    reason: str | None = None


class Previewer:
    """Walks studies like a run does, reading from the FHIR server and writing nothing."""

    def __init__(
        self,
        source: StudySource,
        assembler: StudyAssembler,
        linker: Linker,
        publisher: Publisher,
        store: StateStore,
        ctx: MappingContext,
        context_fingerprint: str,
    ) -> None:
        self._source = source
        self._assembler = assembler
        self._linker = linker
        self._publisher = publisher
        self._store = store
        self._ctx = ctx
        self._context_fingerprint = context_fingerprint

    async def preview(
        self, filters: Mapping[str, str] | None = None, study_uids: Sequence[str] = ()
    ) -> list[Preview]:
        """What a run would do, study by study, compared with what the FHIR server holds.

        Nothing is written: not to the FHIR server (Patients are searched, not created), not to
        the store.
        """
        self._linker.begin_run()
        self._linker.dry_run = True
        try:
            endpoint = await self._publisher.endpoint_reference()
            if study_uids:
                pages = [self._source.iter_studies({"StudyInstanceUID": uid}) for uid in study_uids]
            else:
                pages = [self._source.iter_studies(filters)]
            previews: list[Preview] = []
            for walk in pages:
                async for page in walk:
                    previews.extend(await self._preview_page(page, endpoint))
            return previews
        finally:
            self._linker.dry_run = False

    async def _preview_page(self, rows: list[DicomJson], endpoint: str) -> list[Preview]:
        out: list[Preview] = []
        studies = []
        for row in rows:
            try:
                studies.append(parse_study(row))
            except MappingError as exc:
                out.append(Preview(raw_uid(row) or "unknown", "park", reason=str(exc)))
        known = await asyncio.to_thread(
            self._store.known_studies, self._ctx.source_name, [s.uid for s in studies]
        )
        for study in studies:
            seen = known.get(study.uid)
            fingerprint = digest([study.fingerprint(), self._context_fingerprint])
            if seen is not None and seen.qido_fingerprint == fingerprint:
                out.append(Preview(study.uid, "unchanged"))
                continue
            try:
                resource = await self._assembler.build(study, endpoint)
                current = await self._publisher.current_study(resource)
            except (MappingError, FatalUpstreamError) as exc:
                out.append(Preview(study.uid, "park", reason=str(exc)))
                continue
            if current is None:
                out.append(Preview(study.uid, "create"))
                continue
            changes = tuple(changed_paths(current, resource))
            out.append(Preview(study.uid, "update" if changes else "unchanged", changes))
        return out
