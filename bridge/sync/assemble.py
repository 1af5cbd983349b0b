"""The study-level parts of the sync pipeline: fetch a study's records, link, map (pure).

The pipeline (bridge/sync/pipeline.py) runs them for a page of studies and validates, once, the very
resource that is then written (or, in a dry run, shown).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from typing import Any

from bridge.dicomweb.guard import check_value_sizes
from bridge.mapping.context import MappingContext
from bridge.mapping.dose import DOSE_REPORT_MODALITY, is_dose_report, map_dose_observation, sop_uid
from bridge.mapping.imaging_study import fallbacks, map_imaging_study
from bridge.mapping.records import (
    DicomJson,
    InstanceRecord,
    PatientIdentity,
    SeriesRecord,
    StudyRecord,
    header_patient,
    parse_study,
    with_header,
)
from bridge.mapping.rejection import KEY_OBJECT_MODALITY, RejectionNote, apply_rejections, rejection_notes
from bridge.mapping.validate import validate
from bridge.sync.identity import conflict, conflicting
from bridge.sync.link import RunLinker
from bridge.sync.protocols import StudySource

logger = logging.getLogger(__name__)

# Stands in for the Patient while a study is checked before its Patient may be created.
_PLACEHOLDER_SUBJECT = {"reference": "Patient/unresolved"}


@dataclass(frozen=True, slots=True)
class StudyRecords:
    """What the archive says about one study: the study (with its header, if read), series, instances."""

    study: StudyRecord
    series: Sequence[SeriesRecord]
    instances: Sequence[InstanceRecord] = ()
    # SOP Instance UIDs rejection notes (IHE IOCM) left out, the notes included
    withdrawn: frozenset[str] = frozenset()
    dose_reports: Sequence[DicomJson] = ()  # radiation dose SRs' metadata, with BRIDGE_DOSE=observation

    @property
    def all_withdrawn(self) -> bool:
        """Whether rejection notes withdrew everything: the study is to be retired, not published."""
        return bool(self.withdrawn) and not self.series


@dataclass(frozen=True, slots=True)
class Links:
    """The study's references into the FHIR server's records."""

    subject: dict[str, Any]
    based_on: Sequence[dict[str, Any]] = ()


class StudyAssembler:
    """Builds the ImagingStudy of one study from the archive's answers and the FHIR server's links."""

    def __init__(self, source: StudySource, ctx: MappingContext, *, read_instance_header: bool) -> None:
        self._source = source
        self._ctx = ctx
        self._read_header = read_instance_header

    async def fetch(self, study: StudyRecord, series: Sequence[SeriesRecord] | None = None) -> StudyRecords:
        """The study's series (and, per the settings, its instances and one instance header).

        ``series`` are the study's series when already fetched with its page's (then not asked again).
        Raises PatientConflictError when the study row, its series rows and the instance header
        name more than one patient (a series query by Study Instance UID answers every patient's
        series of that UID).
        """
        if series is None:
            series = await self._source.search_series(study.uid)
        instances: list[InstanceRecord] = []
        if self._ctx.include_instances:
            instances = await self._source.search_instances(study.uid, limit=self._ctx.max_instances)
            if len(instances) > self._ctx.max_instances:
                logger.info(
                    "study %s has over %d instances: instance detail left out",
                    study.uid,
                    self._ctx.max_instances,
                )
        named: list[PatientIdentity | None] = [study.patient, *(s.patient for s in series)]
        if self._read_header:
            header = await self._source.instance_header(study.uid, instances[0] if instances else None)
            if header is not None:
                study = with_header(study, header)
                named.append(header_patient(header))
        if conflicting(named):
            raise conflict("the archive's study row, series rows and instance header of this study")
        if study.patient_name_problem is not None:
            study = await self._name_from_file(study, instances[0] if instances else None)
        records = await self._apply_rejections(StudyRecords(study, series, instances))
        if self._ctx.dose_observations:
            records = replace(records, dose_reports=await self._dose_reports(records))
        return records

    async def _dose_reports(self, records: StudyRecords) -> list[DicomJson]:
        """The radiation dose SRs among the study's SR series (only those series' metadata is read)."""
        reports: list[DicomJson] = []
        for s in records.series:
            if (s.modality or "").strip().upper() == DOSE_REPORT_MODALITY:
                metadata = await self._source.series_metadata(records.study.uid, s.uid)
                # A dose report a rejection note withdrew is no more published than its series would be.
                reports.extend(
                    ds for ds in metadata if is_dose_report(ds) and sop_uid(ds) not in records.withdrawn
                )
        return reports

    def observations(
        self, records: StudyRecords, links: Links, study: dict[str, Any]
    ) -> list[dict[str, Any]]:
        """The dose Observations of the study, partOf its ImagingStudy as mapped (pure)."""
        mapped = (
            map_dose_observation(r, self._ctx, subject=links.subject, study=study)
            for r in records.dose_reports
        )
        return [o for o in mapped if o is not None]

    async def _apply_rejections(self, records: StudyRecords) -> StudyRecords:
        """The study without what its rejection notes withdraw (IHE IOCM), when it has any.

        Only Key Object Selection series are read (their WADO-RS metadata: small); a study with
        rejection notes then has its instances listed once, so its counts are those of what is left.
        """
        study = records.study
        notes: list[RejectionNote] = []
        for s in records.series:
            if (s.modality or "").strip().upper() == KEY_OBJECT_MODALITY:
                notes.extend(rejection_notes(await self._source.series_metadata(study.uid, s.uid), study.uid))
        if not notes:
            return records
        listed = await self._source.search_instances(study.uid)
        left = apply_rejections(study, records.series, listed, notes)
        kept = {(i.series_uid, i.uid) for i in left.instances}
        instances = [i for i in records.instances if (i.series_uid, i.uid) in kept]
        logger.info(
            "study %s: %d rejection notes withdraw %d instances; %d series left",
            study.uid,
            len(notes),
            len(left.withdrawn),
            len(left.series),
        )
        return StudyRecords(left.study, left.series, instances, left.withdrawn)

    async def every_row_agrees(self, study_uid: str) -> None:
        """Ask the archive for every study row of ``study_uid``; PatientConflictError if they disagree.

        Asked when a study's row names another identity than the one it was published under: a
        correction moves every row, a conflicting newcomer leaves the old row beside its own.
        """
        named: list[PatientIdentity | None] = []
        async for page in self._source.iter_studies({"StudyInstanceUID": study_uid}):
            for row in page:
                found = parse_study(check_value_sizes(row))
                if found.uid == study_uid:
                    named.append(found.patient)
        if conflicting(named):
            raise conflict("the archive's study rows of this Study Instance UID")

    async def _name_from_file(self, study: StudyRecord, instance: InstanceRecord | None) -> StudyRecord:
        """The study with the PatientName of its Part 10 header, its archive's answer being garbled.

        Without a good name there either, the name stays out (the Patient is published without
        one) and the problem stays on the record, for the run to count.
        """
        name, problem = await self._source.patient_name_from_file(study.uid, instance)
        if name is not None:
            logger.info(
                "study %s: PatientName garbled in the archive's answer (%s); read from the Part 10 header",
                study.uid,
                study.patient_name_problem,
            )
            return replace(study, patient_name=name, patient_name_problem=None)
        logger.warning(
            "study %s: PatientName garbled in the archive's answer (%s), and no good name in the Part 10 "
            "header (%s): the Patient is published without a name",
            study.uid,
            study.patient_name_problem,
            problem or "no name",
        )
        why = problem or "it has no name"
        return replace(study, patient_name_problem=f"{study.patient_name_problem}; Part 10 header: {why}")

    def fallbacks(self, records: StudyRecords) -> list[str]:
        """The documented fallbacks the study takes (attribute names), to count and log them."""
        used = fallbacks(records.series, self._ctx)
        if records.study.patient_name_problem is not None:
            used.append("PatientName")  # no good name anywhere: published without one
        return used

    async def link(self, records: StudyRecords, endpoint: str, linker: RunLinker) -> Links:
        """The order and the Patient; a missing Patient is created only for a study that would publish."""
        based_on = await linker.based_on(records.study)

        check = self.patient_check(records, endpoint, based_on)
        subject = await linker.subject(records.study, before_create=check)
        return Links(subject, based_on)

    def patient_check(
        self, records: StudyRecords, endpoint: str, based_on: Sequence[dict[str, Any]] = ()
    ) -> Callable[[], None]:
        """What a study must pass before its Patient may be created (raises MappingError if not).

        A bad study never creates a Patient: the study, mapped and validated with a stand-in
        subject, must pass first. Run only when a Patient is about to be created.
        """

        def check_before_creating_a_patient() -> None:
            validate(self.map(records, Links(_PLACEHOLDER_SUBJECT, based_on), endpoint))

        return check_before_creating_a_patient

    def map(self, records: StudyRecords, links: Links, endpoint: str) -> dict[str, Any]:
        """The ImagingStudy from the records and the links (pure)."""
        return map_imaging_study(
            records.study,
            records.series,
            self._ctx,
            subject=links.subject,
            based_on=links.based_on,
            endpoint_reference=endpoint,
            instances=records.instances,
            withdrawn=records.withdrawn,
        )
