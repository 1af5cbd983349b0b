"""The Endpoint that tells clients where a source's WADO-RS service is."""

from __future__ import annotations

from typing import Any

from bridge.mapping.context import (
    BRIDGE_TAG_SYSTEM,
    CONNECTION_TYPE_SYSTEM,
    MappingContext,
    resource_id,
)
from bridge.mapping.narrative import endpoint_narrative, with_narrative


def endpoint_id(ctx: MappingContext) -> str:
    """The deterministic id of the source's Endpoint."""
    return resource_id("Endpoint", ctx.source_name)


def endpoint_identifier(ctx: MappingContext) -> dict[str, str]:
    """The stable business identifier of the source's Endpoint."""
    return {"system": ctx.endpoint_system, "value": ctx.source_name}


def map_endpoint(ctx: MappingContext) -> dict[str, Any]:
    """One Endpoint per DICOMweb source; clients append ``/studies/{uid}`` to its address."""
    endpoint = {
        "resourceType": "Endpoint",
        "id": endpoint_id(ctx),
        "meta": {"tag": [{"system": BRIDGE_TAG_SYSTEM, "code": ctx.source_name}]},
        "identifier": [endpoint_identifier(ctx)],
        "status": "active",
        "connectionType": {"system": CONNECTION_TYPE_SYSTEM, "code": "dicom-wado-rs"},
        "name": f"DICOMweb WADO-RS ({ctx.source_name})",
        "payloadType": [{"text": "DICOM WADO-RS"}],
        "payloadMimeType": ["application/dicom"],
        "address": ctx.public_base,
    }
    return with_narrative(endpoint, endpoint_narrative)
