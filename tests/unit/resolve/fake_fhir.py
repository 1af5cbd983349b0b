"""Resources and addresses for resolver and API unit tests (the FHIR server: tests.unit.fakes.FakeFhir)."""

from __future__ import annotations

from typing import Any

from tests.unit.fakes import DICOMWEB_BASE, FHIR_BASE, JWKS_URL, FakeFhir

__all__ = ["DICOMWEB_BASE", "FHIR_BASE", "JWKS_URL", "FakeFhir", "endpoint", "imaging_study"]
CONNECTION = {
    "system": "http://terminology.hl7.org/CodeSystem/endpoint-connection-type",
    "code": "dicom-wado-rs",
}
STUDY_UID = "1.2.826.0.1.3680043.8.498.1"
SERIES_UIDS = ("1.2.826.0.1.3680043.8.498.1.1", "1.2.826.0.1.3680043.8.498.1.2")


def endpoint(eid: str = "ep1", address: str = DICOMWEB_BASE, **extra: Any) -> dict[str, Any]:
    resource = {
        "resourceType": "Endpoint",
        "id": eid,
        "status": "active",
        "connectionType": dict(CONNECTION),
        "payloadType": [{"text": "DICOM WADO-RS"}],
        "address": address,
    }
    resource.update(extra)
    return resource


def imaging_study(
    sid: str = "is1",
    uid: str = STUDY_UID,
    *,
    endpoints: list[str] | None = None,
    accession: str | None = "A1001",
    accession_system: str | None = None,
    series: list[dict[str, Any]] | None = None,
    **extra: Any,
) -> dict[str, Any]:
    identifiers: list[dict[str, Any]] = [{"system": "urn:dicom:uid", "value": f"urn:oid:{uid}"}]
    if accession is not None:
        acsn: dict[str, Any] = {
            "type": {"coding": [{"system": "http://terminology.hl7.org/CodeSystem/v2-0203", "code": "ACSN"}]},
            "value": accession,
        }
        if accession_system:
            acsn["system"] = accession_system
        identifiers.append(acsn)
    resource: dict[str, Any] = {
        "resourceType": "ImagingStudy",
        "id": sid,
        "identifier": identifiers,
        "status": "available",
        "subject": {"reference": "Patient/p1"},
        "endpoint": [{"reference": r} for r in (endpoints if endpoints is not None else ["Endpoint/ep1"])],
        "series": series
        if series is not None
        else [
            {"uid": SERIES_UIDS[0], "number": 1, "modality": {"code": "CT"}, "numberOfInstances": 2},
            {"uid": SERIES_UIDS[1], "number": 2, "modality": {"code": "CT"}, "numberOfInstances": 3},
        ],
    }
    resource.update(extra)
    return resource
