"""An in-memory FHIR server behind httpx.MockTransport, for resolver and API unit tests."""

from __future__ import annotations

import json
from typing import Any

import httpx

FHIR_BASE = "https://fhir.example.org/R4"
DICOMWEB_BASE = "https://pacs.example.org/dicom-web"
JWKS_URL = "https://idp.example.org/.well-known/jwks.json"
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


class FakeFhir:
    """Reads by id and token searches on ``identifier`` (with ``_include=ImagingStudy:endpoint``).

    Counts requests; can be switched off.
    """

    def __init__(self) -> None:
        self.resources: dict[tuple[str, str], dict[str, Any]] = {}
        self.requests: list[httpx.Request] = []
        self.down = False
        self.status_when_down: int | None = None  # None: connection refused
        self.jwks: dict[str, Any] = {"keys": []}
        self.ignores_include = False  # as a server that does not support _include
        self.refuses_include = False  # as a strict server: _include is a 400
        self.extra_included: list[dict[str, Any]] = []  # entries added to every _include answer

    def add(self, *resources: dict[str, Any]) -> None:
        for r in resources:
            self.resources[(r["resourceType"], r["id"])] = r

    def handler(self, request: httpx.Request) -> httpx.Response:
        self.requests.append(request)
        url = str(request.url)
        if url.startswith(DICOMWEB_BASE):
            return httpx.Response(200, json=[])
        if url.startswith(JWKS_URL):
            assert "authorization" not in request.headers
            return httpx.Response(200, json=self.jwks)
        if self.down:
            if self.status_when_down is None:
                raise httpx.ConnectError("refused", request=request)
            return httpx.Response(self.status_when_down, headers={"Retry-After": "7"})
        assert url.startswith(FHIR_BASE), f"the fake was asked for {url}"
        parts = request.url.path.removeprefix(httpx.URL(FHIR_BASE).path).strip("/").split("/")
        if parts == ["metadata"]:
            return httpx.Response(200, json={"resourceType": "CapabilityStatement"})
        if len(parts) == 2:
            found = self.resources.get((parts[0], parts[1]))
            if found is None:
                return httpx.Response(404, json={"resourceType": "OperationOutcome", "issue": []})
            return httpx.Response(200, content=json.dumps(found))
        if len(parts) == 1:
            token = request.url.params.get("identifier", "")
            system, _, value = token.rpartition("|") if "|" in token else (None, "", token)
            value = value.replace("\\|", "|")
            entries = []
            for (kind, _), resource in self.resources.items():
                if kind != parts[0]:
                    continue
                for ident in resource.get("identifier", []):
                    if ident.get("value") == value and (system is None or ident.get("system") == system):
                        entries.append({"resource": resource, "search": {"mode": "match"}})
                        break
            if "_include" in request.url.params and self.refuses_include:
                issue = {"severity": "error", "code": "not-supported"}
                outcome = {"resourceType": "OperationOutcome", "issue": [issue]}
                return httpx.Response(400, json=outcome)
            if request.url.params.get("_include") == "ImagingStudy:endpoint":
                if not self.ignores_include:
                    entries.extend(self._included_endpoints([e["resource"] for e in entries]))
                entries.extend(self.extra_included)
            return httpx.Response(200, json={"resourceType": "Bundle", "type": "searchset", "entry": entries})
        return httpx.Response(400)

    def _included_endpoints(self, matches: list[dict[str, Any]]) -> list[dict[str, Any]]:
        refs = {e.get("reference") for r in matches for e in r.get("endpoint", [])}
        found = [
            self.resources[("Endpoint", ref.split("/")[1])] for ref in refs if ref in self._endpoint_refs()
        ]
        return [{"resource": r, "search": {"mode": "include"}} for r in found]

    def _endpoint_refs(self) -> set[str]:
        return {f"Endpoint/{rid}" for kind, rid in self.resources if kind == "Endpoint"}

    def transport(self) -> httpx.MockTransport:
        return httpx.MockTransport(self.handler)

    def reads(self, kind: str) -> int:
        return sum(1 for r in self.requests if f"/{kind}/" in r.url.path)

    def searches(self, kind: str) -> int:
        return sum(1 for r in self.requests if r.url.path.endswith(f"/{kind}"))
