"""The source's Endpoint resource."""

from __future__ import annotations

from bridge.mapping.endpoint import endpoint_id, map_endpoint
from bridge.mapping.validate import validate
from tests.builders import context


def test_endpoint_is_a_valid_active_wado_rs_endpoint() -> None:
    resource = map_endpoint(context())
    validate(resource)
    assert resource["status"] == "active"
    assert resource["connectionType"] == {
        "system": "http://terminology.hl7.org/CodeSystem/endpoint-connection-type",
        "code": "dicom-wado-rs",
    }
    assert resource["payloadMimeType"] == ["application/dicom"]


def test_endpoint_has_the_payload_type_r4_requires() -> None:
    resource = map_endpoint(context())
    assert resource["payloadType"], "R4 Endpoint.payloadType is 1..*"
    assert all(p.get("coding") or p.get("text") for p in resource["payloadType"])


def test_endpoint_address_is_the_public_base_not_the_polled_one() -> None:
    resource = map_endpoint(context(public_base="https://viewer-facing.example.org/wado"))
    assert resource["address"] == "https://viewer-facing.example.org/wado"


def test_endpoint_identifier_is_the_source_name_in_the_endpoint_system() -> None:
    resource = map_endpoint(context(source_name="ct-archive", endpoint_system="urn:example:sources"))
    assert resource["identifier"] == [{"system": "urn:example:sources", "value": "ct-archive"}]


def test_endpoint_id_is_stable_per_source() -> None:
    assert map_endpoint(context())["id"] == map_endpoint(context())["id"] == endpoint_id(context())
    assert endpoint_id(context(source_name="a")) != endpoint_id(context(source_name="b"))
