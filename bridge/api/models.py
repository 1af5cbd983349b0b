"""Response bodies of the API, as pydantic models (they make the OpenAPI schema)."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, Field


class Issue(BaseModel):
    """One OperationOutcome issue."""

    severity: Literal["fatal", "error", "warning", "information"]
    code: str = Field(description="FHIR IssueType code, e.g. not-found, invalid, conflict, transient")
    diagnostics: str


class OperationOutcome(BaseModel):
    """The body of every error answer: a FHIR R4 OperationOutcome."""

    resourceType: Literal["OperationOutcome"] = "OperationOutcome"  # noqa: N815 - FHIR's name
    issue: list[Issue]


class WadoLinks(BaseModel):
    """WADO-RS URLs of a study or series (DICOM PS3.18 section 10.4)."""

    url: str = Field(description="The study or series resource (multipart DICOM instances)")
    metadata: str = Field(description="Its metadata (DICOM JSON)")
    rendered: str = Field(description="Rendered media (e.g. image/jpeg)")
    thumbnail: str = Field(description="A thumbnail")


class SeriesLinks(BaseModel):
    """One series: what identifies it and where to fetch it (a series endpoint overrides the study's)."""

    uid: str
    number: int | None = None
    modality: str | None = None
    number_of_instances: int | None = None
    dicomweb_base: str | None = Field(description="WADO-RS base serving this series; null if none is usable")
    url: str | None = None
    metadata: str | None = None
    rendered: str | None = None
    thumbnail: str | None = None
    unavailable: str | None = Field(default=None, description="Why the series has no links, if it has none")


class StudyLinks(BaseModel):
    """Everything a program or a clinician needs to reach a study's images."""

    imaging_study: str = Field(description="Relative reference, ImagingStudy/{id}")
    imaging_study_url: str = Field(description="Absolute URL of the ImagingStudy on the FHIR server")
    study_uid: str = Field(description="Study Instance UID")
    accession: str | None = None
    dicomweb_base: str = Field(description="WADO-RS base URL (the Endpoint address)")
    study: WadoLinks
    series: list[SeriesLinks] = Field(
        description="One page of the series: see series_offset and series_total"
    )
    series_total: int | None = Field(default=None, description="How many series the study has")
    series_offset: int = Field(default=0, description="Index of the first series in this answer")
    viewers: dict[str, str] = Field(description="Viewer name -> URL opening the study")
    default_viewer: str | None = None


class ViewerInfo(BaseModel):
    """A viewer offered by /viewer."""

    name: str
    title: str
    default: bool


class Health(BaseModel):
    """The answer of /healthz."""

    status: Literal["ok"] = "ok"


class Readiness(BaseModel):
    """The answer of /readyz: each dependency's state."""

    status: Literal["ready", "not-ready"]
    checks: dict[str, str] = Field(description="fhir, dicomweb, store -> ok or the reason it is not")
