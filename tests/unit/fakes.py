"""In-memory fakes of the worker's Protocols (StudySource, FhirSink), recording what they were asked."""

from __future__ import annotations

import json
import re
from collections.abc import AsyncIterator, Mapping, Sequence
from typing import Any
from urllib.parse import parse_qs, urlencode

import httpx

from bridge.dicomweb.results import SeriesOutcome
from bridge.errors import (
    MappingError,
    RejectedResourceError,
    UpstreamError,
    VersionConflictError,
)
from bridge.fhir.results import BatchAnswer, WriteResult
from bridge.mapping.records import DicomJson, InstanceRecord, SeriesRecord, parse_series, part10_patient_name


class FakeSource:
    """A StudySource over study rows (by UID) and their series rows."""

    def __init__(self, page_size: int = 2) -> None:
        self.page_size = page_size
        self.studies: dict[str, DicomJson] = {}
        self.series: dict[str, list[DicomJson]] = {}
        self.queries: list[str] = []
        self.series_calls: list[str] = []
        self.fail_listing: Exception | None = None
        self.list_matching = False  # answer search_series_many (one "query" per call), as Orthanc can
        self.list_calls: list[list[str]] = []
        self.study_list_calls: list[list[str]] = []
        self.dropped_from_lists: set[str] = set()  # left out of list answers (a misbehaving archive)
        self.fail_series: dict[str, Exception] = {}  # by study UID
        self.sweeps = False  # sweep the series of a whole run first (BRIDGE_DICOMWEB_SERIES_QUERY=paged)
        self.swept: dict[str, list[DicomJson]] | None = None  # what the sweep saw (default: the series)
        self._sweeping = False
        # Further rows of UIDs already listed, and where in the listing (as Orthanc lists a Study
        # UID once per patient that holds it).
        self.extra_rows: list[tuple[int, DicomJson]] = []
        self.files: dict[str, bytes] = {}  # a Part 10 file of one instance, by study UID
        self.file_reads: list[str] = []
        self.metadata: dict[tuple[str, str], list[DicomJson]] = {}  # by (study, series) UID
        self.instances: dict[str, list[InstanceRecord]] = {}  # by study UID
        self.metadata_calls: list[tuple[str, str]] = []
        self.headers: dict[str, DicomJson] = {}  # instance headers by study UID (BRIDGE_READ_INSTANCE_HEADER)

    async def patient_name_from_file(
        self, study_uid: str, instance: InstanceRecord | None = None
    ) -> tuple[str | None, str | None]:
        self.file_reads.append(study_uid)
        if study_uid not in self.files:
            return None, "the archive answered 404 to a Part 10 retrieve"
        return part10_patient_name(self.files[study_uid], complete=True) or (None, "unreadable")

    def add(self, study: DicomJson, series: list[DicomJson]) -> None:
        uid = study["0020000D"]["Value"][0] if "0020000D" in study else f"row-{len(self.studies)}"
        self.studies[uid] = study
        self.series[uid] = series

    async def instance_header(self, study_uid: str, instance: object = None) -> DicomJson | None:
        """The WADO-RS metadata of one instance of the study, as set in ``headers`` (None: none)."""
        self.queries.append(f"/studies/{study_uid}/instances?limit=1")
        return self.headers.get(study_uid)

    def add_row(self, row: DicomJson, at: int) -> None:
        """Another study row of a UID already listed, at position ``at`` of the listing."""
        self.extra_rows.append((at, row))

    async def iter_studies(self, filters: Mapping[str, str] | None = None) -> AsyncIterator[list[DicomJson]]:
        rows = list(self.studies.values())
        for at, extra in sorted(self.extra_rows, key=lambda e: e[0]):
            rows.insert(at, extra)
        if filters and "StudyInstanceUID" in filters:
            wanted = filters["StudyInstanceUID"]
            rows = [r for r in rows if r.get("0020000D", {}).get("Value", [None])[0] == wanted]
        for offset in range(0, len(rows) + 1, self.page_size):
            self.queries.append(f"/studies?{urlencode({**(filters or {}), 'offset': offset})}")
            if self.fail_listing is not None:
                raise self.fail_listing
            page = rows[offset : offset + self.page_size]
            if page:
                yield page

    async def search_studies_many(self, study_uids: Sequence[str]) -> dict[str, list[DicomJson]]:
        """One list query for the page where ``list_matching``, less ``dropped_from_lists``."""
        if not self.list_matching or len(study_uids) < 2:
            return {}
        self.study_list_calls.append(list(study_uids))
        self.queries.append(f"/studies?{urlencode({'StudyInstanceUID': ','.join(study_uids), 'offset': 0})}")
        if self.fail_listing is not None:
            raise self.fail_listing
        return {
            uid: [self.studies[uid]]
            for uid in study_uids
            if uid in self.studies and uid not in self.dropped_from_lists
        }

    async def reachable(self) -> bool:
        self.queries.append("/studies?limit=1")
        return self.fail_listing is None

    async def search_series(self, study_uid: str) -> list[SeriesRecord]:
        self.series_calls.append(study_uid)
        if study_uid in self.fail_series:
            raise self.fail_series[study_uid]
        self.queries.append(f"/studies/{study_uid}/series")
        return [parse_series(row) for row in self.series.get(study_uid, [])]

    async def series_metadata(self, study_uid: str, series_uid: str) -> list[DicomJson]:
        self.metadata_calls.append((study_uid, series_uid))
        self.queries.append(f"/studies/{study_uid}/series/{series_uid}/metadata")
        return self.metadata.get((study_uid, series_uid), [])

    async def search_instances(self, study_uid: str, limit: int | None = None) -> list[InstanceRecord]:
        self.queries.append(f"/studies/{study_uid}/instances")
        return list(self.instances.get(study_uid, []))

    async def search_series_many(self, study_uids: Sequence[str]) -> dict[str, SeriesOutcome]:
        if self._sweeping:
            swept = self.swept if self.swept is not None else self.series
            return {u: [parse_series(r) for r in swept[u]] for u in study_uids if u in swept}
        if not self.list_matching or len(study_uids) < 2:
            return {}
        self.list_calls.append(list(study_uids))
        self.queries.append(f"/series?StudyInstanceUID={','.join(study_uids)}")
        answer: dict[str, SeriesOutcome] = {}
        for uid in study_uids:
            if uid not in self.series:
                continue
            try:
                answer[uid] = [parse_series(row) for row in self.series[uid]]
            except MappingError as exc:
                answer[uid] = exc
        return answer

    async def sweep_series(self, filters: Mapping[str, str] | None = None) -> bool:
        if not self.sweeps:
            return False
        self.queries.append("/series?limit=1000&offset=0")
        self._sweeping = True
        return True

    def end_sweep(self) -> None:
        self._sweeping = False

    @property
    def series_query_used(self) -> str:
        if self.sweeps:
            return "paged"
        return "list" if self.list_matching else "per-study"


_UNESCAPED_BAR = re.compile(r"(?<!\\)\|")


def _token(text: str) -> tuple[str | None, str]:
    unescape = lambda s: re.sub(r"\\(.)", r"\1", s)  # noqa: E731
    parts = _UNESCAPED_BAR.split(text, maxsplit=1)
    if len(parts) == 1:  # a value alone: any system
        return None, unescape(parts[0])
    return unescape(parts[0]), unescape(parts[1])


def _loosely(text: str) -> str:
    """How a careless token search compares: case folded, escapes and separators lost, trimmed."""
    return re.sub(r"[\\|,]", "", text).strip().lstrip("0").casefold()


def _matches(resource: dict[str, Any], token: str, loose: bool = False) -> bool:
    system, value = _token(token)
    if loose:
        return any(
            system in (None, i.get("system")) and _loosely(str(i.get("value"))) == _loosely(value)
            for i in resource.get("identifier", [])
        )
    return any(
        system in (None, i.get("system")) and i.get("value") == value for i in resource.get("identifier", [])
    )


FHIR_BASE = "https://fhir.example.org/R4"
DICOMWEB_BASE = "https://pacs.example.org/dicom-web"
JWKS_URL = "https://idp.example.org/.well-known/jwks.json"


class FakeFhir:
    """An in-memory FHIR server, the one fake of the unit tests, used two ways.

    As a FhirSink (the sync's tests) it keeps resources with version ids like a conformant R4
    server: ``calls`` records (method, resource type, detail) in order; ``fail`` queues exceptions
    per method name, raised (first in, first out) instead of doing the call.

    Over HTTP (the resolver's and the API's tests), ``transport()`` answers reads by id and token
    searches on ``identifier`` (with ``_include=ImagingStudy:endpoint``) from the same resources,
    counts ``requests``, and can be switched ``down``.
    """

    def __init__(self) -> None:
        self.resources: dict[tuple[str, str], dict[str, Any]] = {}
        self.calls: list[tuple[str, str, Any]] = []
        self.fail: dict[str, list[Exception]] = {}
        self._next_id = 0
        self.update_create = True  # what the CapabilityStatement says of PUT to a new id
        self.loose_tokens = False  # match identifier tokens as a careless server does
        self.batches = False  # whether the CapabilityStatement lists the batch interaction
        self.transaction_only = False  # it lists transaction only (as HAPI's does), batches or not
        self.reject: set[str] = set()  # ImagingStudy ids whose batch entry answers 422
        self.batch_sizes: list[int] = []
        self.create_status = 201  # 200: answer a PUT that creates as Medplum's own router does
        # over HTTP
        self.requests: list[httpx.Request] = []
        self.down = False
        self.status_when_down: int | None = None  # None: connection refused
        self.jwks: dict[str, Any] = {"keys": []}
        self.ignores_include = False  # as a server that does not support _include
        self.refuses_include = False  # as a strict server: _include is a 400
        self.extra_included: list[dict[str, Any]] = []  # entries added to every _include answer

    # helpers for tests
    def _raise_if_queued(self, method: str) -> None:
        queued = self.fail.get(method)
        if queued:
            raise queued.pop(0)

    def _new_id(self, prefix: str) -> str:
        self._next_id += 1
        return f"{prefix}-{self._next_id}"

    def _store(self, resource: dict[str, Any], rid: str) -> WriteResult:
        kind = resource["resourceType"]
        current = self.resources.get((kind, rid))
        version = str(int(current["meta"]["versionId"]) + 1) if current else "1"
        stored = {**resource, "id": rid, "meta": {**resource.get("meta", {}), "versionId": version}}
        self.resources[(kind, rid)] = stored
        status = 200 if current is not None else self.create_status
        return WriteResult(kind, rid, version, status == 201, status)

    def of_type(self, kind: str) -> list[dict[str, Any]]:
        return [r for (k, _), r in self.resources.items() if k == kind]

    def writes(self) -> list[tuple[str, str, Any]]:
        return [
            c for c in self.calls if c[0] in ("update", "conditional_update", "conditional_create", "delete")
        ]

    def touch(self, kind: str, rid: str) -> None:
        """Someone else writes the resource: its version moves on."""
        self._store(self.resources[(kind, rid)], rid)

    # FhirSink
    async def capabilities(self) -> dict[str, Any]:
        self.calls.append(("capabilities", "", None))
        self._raise_if_queued("capabilities")
        kinds = ("Patient", "Endpoint", "ImagingStudy")
        rest: dict[str, Any] = {"resource": [{"type": k, "updateCreate": self.update_create} for k in kinds]}
        if self.transaction_only:
            rest["interaction"] = [{"code": "transaction"}]
        elif self.batches:
            rest["interaction"] = [{"code": "transaction"}, {"code": "batch"}]
        return {"resourceType": "CapabilityStatement", "rest": [rest]}

    async def read(self, resource_type: str, resource_id: str) -> dict[str, Any] | None:
        self.calls.append(("read", resource_type, resource_id))
        self._raise_if_queued("read")
        found = self.resources.get((resource_type, resource_id))
        return dict(found) if found else None

    async def search(self, resource_type: str, params: Mapping[str, str]) -> list[dict[str, Any]]:
        self.calls.append(("search", resource_type, dict(params)))
        self._raise_if_queued("search")
        found = self.of_type(resource_type)
        if "part-of" in params:  # a study's dose Observations
            found = [r for r in found if {"reference": params["part-of"]} in r.get("partOf", [])]
        if "_id" in params:
            found = [r for r in found if r["id"] in params["_id"].split(",")]
        if "active" in params:  # a boolean token: absent counts as true, as servers index it
            found = [r for r in found if str(r.get("active", True)).lower() == params["active"]]
        if "identifier" in params:
            found = [r for r in found if _matches(r, params["identifier"], self.loose_tokens)]
        return found

    async def update(self, resource: dict[str, Any], *, if_match: str | None = None) -> WriteResult:
        kind, rid = resource["resourceType"], resource["id"]
        self.calls.append(("update", kind, {"id": rid, "if_match": if_match}))
        self._raise_if_queued("update")
        current = self.resources.get((kind, rid))
        if if_match is not None and (current is None or current["meta"]["versionId"] != if_match):
            raise VersionConflictError(f"fhir PUT /{kind}/{rid} answered 412", service="fhir", status=412)
        return self._store(resource, rid)

    async def conditional_update(self, resource: dict[str, Any], search: Mapping[str, str]) -> WriteResult:
        kind = resource["resourceType"]
        self.calls.append(("conditional_update", kind, dict(search)))
        self._raise_if_queued("conditional_update")
        found = [r for r in self.of_type(kind) if _matches(r, search["identifier"])]
        if len(found) > 1:
            raise VersionConflictError("several matches", service="fhir", status=412)
        body = {k: v for k, v in resource.items() if k != "id"}
        return self._store(body, found[0]["id"] if found else self._new_id(f"srv-{kind.lower()}"))

    async def conditional_create(self, resource: dict[str, Any], if_none_exist: str) -> WriteResult:
        kind = resource["resourceType"]
        self.calls.append(("conditional_create", kind, if_none_exist))
        self._raise_if_queued("conditional_create")
        [token] = parse_qs(if_none_exist)["identifier"]
        found = [r for r in self.of_type(kind) if _matches(r, token, self.loose_tokens)]
        if len(found) > 1:
            raise VersionConflictError("several matches", service="fhir", status=412)
        if found:
            return WriteResult(kind, found[0]["id"], found[0]["meta"]["versionId"], False)
        return self._store(resource, self._new_id(kind.lower()))

    async def delete(self, resource_type: str, resource_id: str) -> None:
        self.calls.append(("delete", resource_type, resource_id))
        self._raise_if_queued("delete")
        self.resources.pop((resource_type, resource_id), None)

    async def batch(self, entries: Sequence[dict[str, Any]]) -> list[BatchAnswer]:
        self.calls.append(("batch", "", len(entries)))
        self._raise_if_queued("batch")
        self.batch_sizes.append(len(entries))
        answers: list[BatchAnswer] = []
        for entry in entries:
            request = entry["request"]
            method, url = request["method"], request["url"]
            try:
                if method == "GET" and "?" in url:  # a search: a searchset Bundle
                    kind, query = url.split("?", 1)
                    params = {k: v[0] for k, v in parse_qs(query).items()}
                    found = await self.search(kind, params)
                    bundle = {
                        "resourceType": "Bundle",
                        "type": "searchset",
                        "entry": [{"resource": r} for r in found],
                    }
                    answers.append(BatchAnswer(200, resource=bundle))
                    continue
                if method == "GET":
                    kind, rid = url.split("/")
                    found = await self.read(kind, rid)
                    answers.append(BatchAnswer(200 if found else 404, resource=found))
                    continue
                resource = entry["resource"]
                if method == "PUT":
                    if resource["id"] in self.reject:
                        raise RejectedResourceError(
                            "fhir batch entry answered 422: bad study",
                            service="fhir",
                            status=422,
                            outcome="bad study",
                        )
                    if_match = request.get("ifMatch")
                    version = if_match.removeprefix('W/"').rstrip('"') if if_match else None
                    result = await self.update(resource, if_match=version)
                else:
                    result = await self.conditional_create(resource, request["ifNoneExist"])
                answers.append(BatchAnswer(result.status or 200, result=result))
            except UpstreamError as exc:
                answers.append(BatchAnswer(exc.status or 500, error=exc))
        return answers

    # over HTTP
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
