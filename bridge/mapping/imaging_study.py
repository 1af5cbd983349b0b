"""A study and its series, as QIDO-RS described them, to an R4 ImagingStudy."""

from __future__ import annotations

from collections.abc import Collection, Sequence
from typing import Any

from bridge.errors import MappingError
from bridge.mapping.context import (
    BRIDGE_TAG_SYSTEM,
    DCM_SYSTEM,
    SOP_CLASS_SYSTEM,
    WITHDRAWN_INSTANCE_EXTENSION,
    MappingContext,
    resource_id,
)
from bridge.mapping.dates import fhir_datetime
from bridge.mapping.identifiers import accession_identifiers, check_uid, study_identifier
from bridge.mapping.narrative import imaging_study_narrative, with_narrative
from bridge.mapping.patient import display_name
from bridge.mapping.records import Code, InstanceRecord, SeriesRecord, StudyRecord

Resource = dict[str, Any]


def imaging_study_id(ctx: MappingContext, study_uid: str) -> str:
    """The deterministic id of a study's ImagingStudy for this source."""
    return resource_id("ImagingStudy", ctx.source_name, study_uid)


def modality_coding(ctx: MappingContext, modality: str) -> dict[str, str]:
    """A DCM Coding for a modality; unknown terms keep their code, without a display."""
    return ctx.tables.modality.coding(modality) or {"system": DCM_SYSTEM, "code": modality}


def codeable_concepts(codes: Sequence[Code], ctx: MappingContext) -> list[Resource]:
    """CodeableConcepts from DICOM code sequence items (system from the designator table)."""
    concepts = []
    for code in codes:
        coding: Resource = {}
        system = ctx.tables.coding_schemes.system(code.scheme)
        if system is not None:
            coding["system"] = system
        coding["code"] = code.value
        if code.meaning:
            coding["display"] = code.meaning
        concept: Resource = {"coding": [coding]}
        if code.meaning:
            concept["text"] = code.meaning
        concepts.append(concept)
    return concepts


def _instances(instances: Sequence[InstanceRecord], series_uid: str) -> list[Resource]:
    out = []
    for instance in sorted(instances, key=lambda i: (i.number is None, i.number or 0, i.uid)):
        if instance.series_uid != series_uid:
            continue
        check_uid(instance.uid, "SOPInstanceUID")
        if instance.sop_class is None:
            raise MappingError(f"instance {instance.uid} has no SOPClassUID", attribute="SOPClassUID")
        check_uid(instance.sop_class, "SOPClassUID")
        entry: Resource = {
            "uid": instance.uid,
            "sopClass": {"system": SOP_CLASS_SYSTEM, "code": f"urn:oid:{instance.sop_class}"},
        }
        if instance.number is not None and instance.number >= 0:
            entry["number"] = instance.number
        out.append(entry)
    return out


def _series(
    series: SeriesRecord, study: StudyRecord, ctx: MappingContext, instances: Sequence[InstanceRecord]
) -> Resource:
    check_uid(series.uid, "SeriesInstanceUID")
    modality = series.modality or ctx.missing_modality
    if modality is None:
        raise MappingError(f"series {series.uid} has no Modality", attribute="Modality")
    out: Resource = {"uid": series.uid}
    if series.number is not None:
        if series.number < 0:
            raise MappingError(f"series {series.uid}: SeriesNumber is negative", "SeriesNumber")
        out["number"] = series.number
    out["modality"] = modality_coding(ctx, modality)
    if series.description:
        out["description"] = series.description
    if series.instance_count is not None:
        out["numberOfInstances"] = series.instance_count
    body_site = ctx.tables.body_part.coding(series.body_part)
    if body_site is not None:
        out["bodySite"] = body_site
    laterality = ctx.tables.laterality.coding(series.laterality)
    if laterality is not None:
        out["laterality"] = laterality
    started = fhir_datetime(
        series.date,
        series.time,
        study.tz_offset,
        zone=ctx.timezone,
        date_attribute="SeriesDate",
        time_attribute="SeriesTime",
    )
    if started is not None:
        out["started"] = started
    performers = [display_name(name) for name in series.performers]
    if any(performers):
        out["performer"] = [{"actor": {"display": name}} for name in performers if name]
    mapped_instances = _instances(instances, series.uid)
    if mapped_instances:
        out["instance"] = mapped_instances
    return out


def acquisition_modalities(modalities: Sequence[str], ctx: MappingContext) -> list[str]:
    """The study-level modalities: the acquisition ones (CID 29) among its series', sorted, once each.

    R4 defines ImagingStudy.modality as "the series.modality values that are actual acquisition
    modalities"; an SR, SEG or KO series keeps its modality on the series only. A study with no
    acquisition series (a lone report) has no study-level modality.
    """
    return sorted({m for m in modalities if ctx.tables.modality.is_acquisition(m)})


def fallbacks(series: Sequence[SeriesRecord], ctx: MappingContext) -> list[str]:
    """The attributes a documented fallback stood in for when mapping these series (one per use)."""
    return ["Modality" for s in series if s.modality is None and ctx.missing_modality is not None]


def _series_key(series: SeriesRecord) -> tuple[int, int, str]:
    return (series.number is None, series.number or 0, series.uid)


def withdrawn_extensions(withdrawn: Collection[str]) -> Resource:
    """The ImagingStudy's extensions naming the withdrawn instances, sorted (a stable fingerprint)."""
    if not withdrawn:
        return {}
    return {"extension": [{"url": WITHDRAWN_INSTANCE_EXTENSION, "valueId": uid} for uid in sorted(withdrawn)]}


def map_imaging_study(
    study: StudyRecord,
    series: Sequence[SeriesRecord],
    ctx: MappingContext,
    *,
    subject: Resource,
    endpoint_reference: str,
    instances: Sequence[InstanceRecord] = (),
    based_on: Sequence[Resource] = (),
    withdrawn: Collection[str] = (),
) -> Resource:
    """The ImagingStudy for ``study`` (raises MappingError naming the attribute at fault).

    ``subject`` is the Reference to the Patient, resolved by the caller per the patient policy;
    ``based_on`` the References to the order(s). ``instances`` are listed per series only when
    the context asks for instance detail and the study has no more than ``max_instances``.
    ``withdrawn`` are the SOP Instance UIDs rejection notes withdrew (left out of ``series``):
    each is named in an extension, so the gateway refuses them though the archive still holds them.
    """
    check_uid(study.uid, "StudyInstanceUID")
    identifiers: list[Any] = [study_identifier(study.uid), *accession_identifiers(study, ctx)]
    resource: Resource = {
        "resourceType": "ImagingStudy",
        "id": imaging_study_id(ctx, study.uid),
        "meta": {"tag": [{"system": BRIDGE_TAG_SYSTEM, "code": ctx.source_name}]},
        **withdrawn_extensions(withdrawn),
        "identifier": identifiers,
        "status": "available",
        "subject": subject,
    }
    if based_on:
        resource["basedOn"] = list(based_on)
    referrer = display_name(study.referring_physician or "")
    if referrer:  # an empty Type 2 value (most real studies) is no referrer, not an empty one
        resource["referrer"] = {"display": referrer}
    started = fhir_datetime(study.date, study.time, study.tz_offset, zone=ctx.timezone)
    if started is not None:
        resource["started"] = started
    if not ctx.include_instances or len(instances) > ctx.max_instances:
        instances = ()
    mapped = [_series(s, study, ctx, instances) for s in sorted(series, key=_series_key)]
    modalities = acquisition_modalities([s["modality"]["code"] for s in mapped] or study.modalities, ctx)
    if modalities:
        resource["modality"] = [modality_coding(ctx, m) for m in modalities]
    resource["endpoint"] = [{"reference": endpoint_reference}]
    if study.series_count is not None:
        resource["numberOfSeries"] = study.series_count
    if study.instance_count is not None:
        resource["numberOfInstances"] = study.instance_count
    if study.procedure_codes:
        resource["procedureCode"] = codeable_concepts(study.procedure_codes, ctx)
    if study.reason_codes:
        resource["reasonCode"] = codeable_concepts(study.reason_codes, ctx)
    if study.description:
        resource["description"] = study.description
    if mapped:
        resource["series"] = mapped
    return with_narrative(resource, imaging_study_narrative)
