"""A study's way to the ImagingStudy that is written: its records fetched, mapped, validated and linked."""

from __future__ import annotations

import logging
from typing import Any

from bridge.dicomweb.records import InstanceRecord, StudyRecord, with_header
from bridge.mapping.context import MappingContext
from bridge.mapping.imaging_study import fallbacks, map_imaging_study
from bridge.mapping.validate import validate
from bridge.sync.link import Linker
from bridge.sync.protocols import StudySource

logger = logging.getLogger(__name__)

_PLACEHOLDER_SUBJECT = {"reference": "Patient/unresolved"}


class StudyAssembler:
    """Builds the ImagingStudy of one study from the archive's answers and the FHIR server's links."""

    def __init__(
        self, source: StudySource, linker: Linker, ctx: MappingContext, *, read_instance_header: bool
    ) -> None:
        self._source = source
        self._linker = linker
        self._ctx = ctx
        self._read_header = read_instance_header

    async def build(self, study: StudyRecord, endpoint: str, used: list[str] | None = None) -> dict[str, Any]:
        """The ImagingStudy for a study, ready to write.

        Series (and, per the settings, instances and one instance header) are fetched, mapped and
        validated; then the order and the Patient are linked, the Patient only once the mapping
        has succeeded, so a bad study never creates a Patient. The documented fallbacks the mapping
        takes for missing Type 1 data are added to ``used``, to count and log them.
        """
        series = await self._source.search_series(study.uid)
        if used is not None:
            used.extend(fallbacks(series, self._ctx))
        instances: list[InstanceRecord] = []
        if self._ctx.include_instances:
            instances = await self._source.search_instances(study.uid, limit=self._ctx.max_instances)
            if len(instances) > self._ctx.max_instances:
                logger.info(
                    "study %s has over %d instances: instance detail left out",
                    study.uid,
                    self._ctx.max_instances,
                )
        if self._read_header:
            header = await self._source.instance_header(study.uid, instances[0] if instances else None)
            if header is not None:
                study = with_header(study, header)
        resource = map_imaging_study(
            study,
            series,
            self._ctx,
            subject=_PLACEHOLDER_SUBJECT,
            endpoint_reference=endpoint,
            instances=instances,
        )
        validate(resource)
        based_on = await self._linker.based_on(study)
        if based_on:
            resource["basedOn"] = based_on
        resource["subject"] = await self._linker.subject(study)
        return resource
