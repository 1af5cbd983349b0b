"""A study and its series, as QIDO-RS described them, to an R4 ImagingStudy."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from bridge.dicomweb.records import SeriesRecord, StudyRecord
from bridge.errors import MappingError
from bridge.mapping.context import BRIDGE_TAG_SYSTEM, DCM_SYSTEM, MappingContext, resource_id
from bridge.mapping.dates import fhir_datetime
from bridge.mapping.identifiers import accession_identifier, check_uid, study_identifier

Resource = dict[str, Any]


def imaging_study_id(ctx: MappingContext, study_uid: str) -> str:
    """The deterministic id of a study's ImagingStudy for this source."""
    return resource_id("ImagingStudy", ctx.source_name, study_uid)


def modality_coding(ctx: MappingContext, modality: str) -> dict[str, str]:
    """A DCM Coding for a modality; unknown terms keep their code, without a display."""
    return ctx.tables.modality.coding(modality) or {"system": DCM_SYSTEM, "code": modality}


def _series(series: SeriesRecord, study: StudyRecord, ctx: MappingContext) -> Resource:
    check_uid(series.uid, "SeriesInstanceUID")
    if series.modality is None:
        raise MappingError(f"series {series.uid} has no Modality", attribute="Modality")
    out: Resource = {"uid": series.uid}
    if series.number is not None:
        if series.number < 0:
            raise MappingError(f"series {series.uid}: SeriesNumber is negative", "SeriesNumber")
        out["number"] = series.number
    out["modality"] = modality_coding(ctx, series.modality)
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
    return out


def _series_key(series: SeriesRecord) -> tuple[int, int, str]:
    return (series.number is None, series.number or 0, series.uid)


def map_imaging_study(
    study: StudyRecord,
    series: Sequence[SeriesRecord],
    ctx: MappingContext,
    *,
    subject: Resource,
    endpoint_reference: str,
) -> Resource:
    """The ImagingStudy for ``study`` (raises MappingError naming the attribute at fault).

    ``subject`` is the Reference to the Patient, resolved by the caller per the patient policy.
    """
    check_uid(study.uid, "StudyInstanceUID")
    identifiers: list[Any] = [study_identifier(study.uid)]
    accession = accession_identifier(study, ctx)
    if accession is not None:
        identifiers.append(accession)
    resource: Resource = {
        "resourceType": "ImagingStudy",
        "id": imaging_study_id(ctx, study.uid),
        "meta": {"tag": [{"system": BRIDGE_TAG_SYSTEM, "code": ctx.source_name}]},
        "identifier": identifiers,
        "status": "available",
        "subject": subject,
    }
    started = fhir_datetime(study.date, study.time, study.tz_offset, zone=ctx.timezone)
    if started is not None:
        resource["started"] = started
    mapped = [_series(s, study, ctx) for s in sorted(series, key=_series_key)]
    modalities = sorted({s.modality for s in series if s.modality} or set(study.modalities))
    if modalities:
        resource["modality"] = [modality_coding(ctx, m) for m in modalities]
    resource["endpoint"] = [{"reference": endpoint_reference}]
    if study.series_count is not None:
        resource["numberOfSeries"] = study.series_count
    if study.instance_count is not None:
        resource["numberOfInstances"] = study.instance_count
    if study.description:
        resource["description"] = study.description
    if mapped:
        resource["series"] = mapped
    return resource
