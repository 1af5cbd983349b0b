"""The plain data the mapping needs from the settings, so the mapping never reads settings itself."""

from __future__ import annotations

import uuid
from dataclasses import dataclass, field
from typing import Any

from bridge.mapping.identity import UnmappedIssuer
from bridge.mapping.records import digest
from bridge.mapping.tables import Tables

# Bump when the mapping's output changes, so every study is republished once after an upgrade.
MAPPING_VERSION = "5"

DICOM_UID_SYSTEM = "urn:dicom:uid"
DCM_SYSTEM = "http://dicom.nema.org/resources/ontology/DCM"
SOP_CLASS_SYSTEM = "urn:ietf:rfc:3986"
V2_0203 = "http://terminology.hl7.org/CodeSystem/v2-0203"
CONNECTION_TYPE_SYSTEM = "http://terminology.hl7.org/CodeSystem/endpoint-connection-type"
# meta.tag marking resources this bridge wrote (code: the source name), so it can tell its own.
BRIDGE_TAG_SYSTEM = "urn:fhir-dicomweb-bridge:source"
# The extension (valueCode) on a published ImagingStudy the bridge withdrew from clinicians: every
# API replica reads it with the study (the resolver, the gateway, the front's grant), whatever store
# it has. An extension, not a meta.security label: HAPI FHIR keeps meta labels across a PUT (and
# skips a PUT that changes only meta), so republishing would not lift a label.
WITHDRAWN_EXTENSION = "urn:fhir-dicomweb-bridge:withdrawn"
WITHDRAWN_CODES = {"conflicting-patient-identity": "conflicting patient identity"}
# One extension (valueId: the SOP Instance UID) on a published ImagingStudy per instance a rejection
# note (IHE IOCM) withdrew, the notes included: an archive that does not apply the notes keeps serving
# them, and the gateway and the front read the published study to refuse them (bridge/gateway/withdrawn.py).
WITHDRAWN_INSTANCE_EXTENSION = "urn:fhir-dicomweb-bridge:withdrawn-instance"

_ID_NAMESPACE = uuid.UUID("6f1c1f4e-4f0b-5c5e-9d7a-2b8e6f3a9c10")


@dataclass(frozen=True)
class MappingContext:
    """What a mapping call needs besides the DICOM records."""

    source_name: str
    public_base: str
    tables: Tables
    patient_system: str
    patient_issuer_systems: dict[str, str] = field(default_factory=dict)
    unmapped_issuer: UnmappedIssuer = UnmappedIssuer.PARK
    accession_system: str | None = None
    accession_issuer_systems: dict[str, str] = field(default_factory=dict)
    endpoint_system: str = "urn:fhir-dicomweb-bridge:source"
    timezone: str | None = None
    missing_modality: str | None = "OT"  # the modality of a series without one; None parks it
    include_instances: bool = False
    max_instances: int = 2000
    dose_observations: bool = False  # each radiation dose SR becomes an Observation

    def fingerprint(self) -> str:
        """A digest of every input besides the records that changes the mapping's output."""
        data: dict[str, Any] = {
            "version": MAPPING_VERSION,
            "source": self.source_name,
            "public": self.public_base,
            "patient": [self.patient_system, self.patient_issuer_systems, str(self.unmapped_issuer)],
            "accession": [self.accession_system, self.accession_issuer_systems],
            "endpoint": self.endpoint_system,
            "tz": self.timezone,
            "instances": [self.include_instances, self.max_instances],
            "missing_modality": self.missing_modality,
            "dose": self.dose_observations,
            "tables": self.tables.model_dump(mode="json"),
        }
        return digest(data)


def resource_id(kind: str, *key: str) -> str:
    """A deterministic FHIR id (a UUID, valid on every server) for a business key."""
    return str(uuid.uuid5(_ID_NAMESPACE, "|".join((kind, *key))))
