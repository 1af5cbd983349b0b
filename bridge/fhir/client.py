"""Async FHIR R4 REST client: read, search, update with If-Match, batch and transaction bundles."""

from __future__ import annotations

import logging
import re
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any
from urllib.parse import quote

import httpx

from bridge.errors import (
    FatalUpstreamError,
    RejectedResourceError,
    RetriableUpstreamError,
    UpstreamError,
    VersionConflictError,
)
from bridge.fhir.results import BatchAnswer, WriteResult, metadata_failure, not_a_fhir_server
from bridge.upstream.bounds import CallLimit, Pace
from bridge.upstream.errors import RETRIABLE_STATUS, json_body, where
from bridge.upstream.retry import RetryPolicy, send

if TYPE_CHECKING:
    from bridge.config import Settings

logger = logging.getLogger(__name__)

SERVICE = "fhir"
FHIR_JSON = "application/fhir+json"
_OUTCOME_LIMIT = 1000
_MAX_PAGES = 50  # a bound on next links followed for one search, whatever the server sends
# HAPI answers a search repeated within a minute from its cache of results, so a Patient created
# in the EHR since stays unfound and a study parked for it stays parked: ask for a fresh search.
_FRESH = {"Cache-Control": "no-cache"}


# Servers quote the value they reject ("The value 'Doe^Jane' is not ..."): it may be patient data.
_QUOTED = re.compile(r""""[^"]{1,200}"|(?<![A-Za-z])'[^']{1,200}'(?![A-Za-z])""")


def outcome_text(body: Any) -> str | None:
    """The readable text of an OperationOutcome (diagnostics, details, expression), if any.

    Quoted values are blanked out, since servers echo the value they reject, and the text goes
    into parked reasons, logs and ``bridge status``.
    """
    if not isinstance(body, dict) or body.get("resourceType") != "OperationOutcome":
        return None
    parts = []
    for issue in body.get("issue", []):
        text = issue.get("diagnostics") or (issue.get("details") or {}).get("text") or issue.get("code")
        text = _QUOTED.sub("'…'", str(text))
        where_ = ", ".join(issue.get("expression", []) or issue.get("location", []))
        parts.append(f"{text} ({where_})" if where_ else str(text))
    return "; ".join(parts)[:_OUTCOME_LIMIT] or None


def error_for_answer(response: httpx.Response) -> UpstreamError:
    """The error for a final (non-retriable) FHIR answer, carrying the OperationOutcome's text."""
    try:
        outcome = outcome_text(response.json()) or ""
    except ValueError:
        outcome = ""
    message = f"{SERVICE} {where(response.request)} answered {response.status_code}"
    if outcome:
        message = f"{message}: {outcome}"
    status = response.status_code
    if status in (409, 412):
        return VersionConflictError(message, service=SERVICE, status=status)
    if status in (400, 422):
        return RejectedResourceError(message, service=SERVICE, status=status, outcome=outcome)
    return FatalUpstreamError(message, service=SERVICE, status=status)


def _final(response: httpx.Response) -> bool:
    """Answers that end the retries: successes and every 4xx that is not worth retrying."""
    return response.is_success or (
        400 <= response.status_code < 500 and response.status_code not in RETRIABLE_STATUS
    )


def parse_location(location: str) -> tuple[str, str, str | None]:
    """Type, id and version from ``[base/]Type/id[/_history/vid]``."""
    parts = location.rstrip("/").split("/")
    if "_history" in parts:
        at = parts.index("_history")
        return parts[at - 2], parts[at - 1], parts[at + 1] if at + 1 < len(parts) else None
    return parts[-2], parts[-1], None


def etag_version(etag: str | None) -> str | None:
    """The version id in an ETag such as ``W/"3"``."""
    if not etag:
        return None
    return etag.removeprefix("W/").strip('"') or None


def fhir_limit(settings: Settings) -> CallLimit:
    """The bound of every FHIR answer."""
    return CallLimit(
        "FHIR",
        settings.fhir.max_response_bytes,
        "BRIDGE_FHIR_MAX_RESPONSE_BYTES",
        settings.http.deadline,
        pace=Pace.from_settings(settings),
    )


class FhirClient:
    """FHIR REST calls against one base URL through an ``httpx.AsyncClient`` given from outside."""

    def __init__(
        self,
        client: httpx.AsyncClient,
        base_url: str,
        *,
        policy: RetryPolicy | None = None,
        limit: CallLimit | None = None,
    ) -> None:
        self._limit = limit
        self._client = client
        self._base = base_url.rstrip("/")
        self._policy = policy or RetryPolicy()

    @property
    def base_url(self) -> str:
        """The FHIR base URL."""
        return self._base

    async def _send(
        self,
        method: str,
        path: str,
        *,
        params: Mapping[str, str] | None = None,
        body: Any = None,
        headers: Mapping[str, str] | None = None,
        ok: tuple[int, ...] = (),
        parse_json: bool = False,
    ) -> httpx.Response:
        # ``path`` is relative to the base, or a full URL under it (a search's next link).
        # ``parse_json``: a successful answer's JSON is parsed as it arrives
        # (bridge/upstream/jsonstream.py), for answers that can be large (reads, searches, bundles);
        # json_body() then reads it.
        url = path if path.startswith(self._base) else f"{self._base}/{path}" if path else self._base
        request = self._client.build_request(
            method,
            url,
            params=params,
            json=body,
            headers={
                "Accept": FHIR_JSON,
                **({"Content-Type": FHIR_JSON} if body else {}),
                **(headers or {}),
            },
        )
        response = await send(
            self._client,
            request,
            service=SERVICE,
            policy=self._policy,
            ok=_final,
            limit=self._limit,
            parse_json=parse_json,
        )
        if not response.is_success and response.status_code not in ok:
            raise error_for_answer(response)
        return response

    async def capabilities(self) -> dict[str, Any]:
        """The server's CapabilityStatement (also a cheap reachability check)."""
        response = await self._send("GET", "metadata", parse_json=True)
        body = json_body(response, SERVICE)
        return body if isinstance(body, dict) else {}

    async def capability_statement(self) -> dict[str, Any]:
        """The CapabilityStatement, checked: a ConfigurationError naming BRIDGE_FHIR_URL if it is none.

        A DICOMweb archive, a web page or a wrong path answers ``GET [base]/metadata`` with 404,
        HTML or other JSON; saying so beats any advice about how to write to it.
        """
        try:
            body = await self.capabilities()
        except FatalUpstreamError as exc:
            raise not_a_fhir_server(self._base, metadata_failure(exc.status)) from exc
        if body.get("resourceType") != "CapabilityStatement":
            raise not_a_fhir_server(self._base, "GET metadata answered no CapabilityStatement")
        return body

    async def read(self, resource_type: str, resource_id: str) -> dict[str, Any] | None:
        """The resource, or None if the server has none (404) or it was deleted (410)."""
        response = await self._send(
            "GET", f"{resource_type}/{quote(resource_id, safe='')}", ok=(404, 410), parse_json=True
        )
        if response.status_code in (404, 410):
            return None
        body = json_body(response, SERVICE)
        return body if isinstance(body, dict) else None

    async def delete(self, resource_type: str, resource_id: str) -> None:
        """DELETE a resource (already gone counts as done)."""
        await self._send("DELETE", f"{resource_type}/{quote(resource_id, safe='')}", ok=(404, 410))

    async def search(
        self, resource_type: str, params: Mapping[str, str], *, limit: int = 0
    ) -> list[dict[str, Any]]:
        """Resources matching a search: the first page, or up to ``limit`` of them.

        Servers cap ``_count`` at a maximum of their own (HAPI: 50 unless configured) and page
        the rest, so with ``limit`` the ``next`` links are followed until that many were found.
        Only links under this client's base URL are followed, never another host.
        """
        response = await self._send("GET", resource_type, params=params, headers=_FRESH, parse_json=True)
        bundle = json_body(response, SERVICE)
        found = _matches(bundle, resource_type)
        for _ in range(_MAX_PAGES - 1):
            if not limit or len(found) >= limit:
                break
            url = _next_link(bundle)
            if url is None:
                break
            if not (url.startswith((self._base + "/", self._base + "?")) or url == self._base):
                logger.warning("not following a search's next link off the FHIR base URL")
                break
            bundle = json_body(await self._send("GET", url, headers=_FRESH, parse_json=True), SERVICE)
            found.extend(_matches(bundle, resource_type))
        return found[:limit] if limit else found

    async def search_including(
        self, resource_type: str, params: Mapping[str, str]
    ) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
        """A search's first page: its matches, and the resources it included (``_include``).

        Included resources are those of search mode ``include``; a server that ignores
        ``_include`` simply includes none, so the caller must be ready to read them itself.
        """
        response = await self._send("GET", resource_type, params=params, headers=_FRESH, parse_json=True)
        bundle = json_body(response, SERVICE)
        return _matches(bundle, resource_type), _included(bundle)

    async def update(self, resource: dict[str, Any], *, if_match: str | None = None) -> WriteResult:
        """PUT a resource to its id (creating it if the server allows client ids)."""
        kind, rid = resource["resourceType"], resource["id"]
        headers = {"If-Match": f'W/"{if_match}"'} if if_match else {}
        response = await self._send("PUT", f"{kind}/{quote(rid, safe='')}", body=resource, headers=headers)
        return self._write_result(response, kind, rid)

    async def conditional_update(self, resource: dict[str, Any], search: Mapping[str, str]) -> WriteResult:
        """PUT ``Type?search``: create if nothing matches, update the one match, 412 if several."""
        kind = resource["resourceType"]
        body = {k: v for k, v in resource.items() if k != "id"}
        response = await self._send("PUT", kind, params=search, body=body)
        return self._write_result(response, kind, None)

    async def conditional_create(self, resource: dict[str, Any], if_none_exist: str) -> WriteResult:
        """POST with ``If-None-Exist``: the one existing match (unchanged) or a new resource.

        Several matches answer 412, raised as VersionConflictError.
        """
        kind = resource["resourceType"]
        response = await self._send("POST", kind, body=resource, headers={"If-None-Exist": if_none_exist})
        return self._write_result(response, kind, None)

    def _write_result(self, response: httpx.Response, kind: str, rid: str | None) -> WriteResult:
        version = etag_version(response.headers.get("ETag"))
        location = response.headers.get("Location") or response.headers.get("Content-Location")
        if location:
            _, rid_from_location, version_from_location = parse_location(location)
            rid = rid or rid_from_location
            version = version or version_from_location
        if rid is None or version is None:
            body = json_body(response, SERVICE) if response.content else {}
            rid = rid or body.get("id")
            version = version or (body.get("meta") or {}).get("versionId")
        if rid is None:
            raise FatalUpstreamError(
                f"{SERVICE} {where(response.request)} did not say where it wrote", service=SERVICE
            )
        return WriteResult(kind, rid, version, response.status_code == 201, response.status_code)

    async def batch(self, entries: Sequence[dict[str, Any]]) -> list[BatchAnswer]:
        """POST a ``batch`` Bundle; each entry's answer, in request order.

        Each entry succeeds or fails on its own, read as the same single request would be. Write
        answers are asked to be minimal (``Prefer: return=minimal``): the bridge needs only each
        entry's status, location and ETag. An answer with a different number of entries is a
        broken batch (FatalUpstreamError); the caller falls back to single requests.
        """
        bundle = {"resourceType": "Bundle", "type": "batch", "entry": list(entries)}
        response = await self._send(
            "POST", "", body=bundle, headers={"Prefer": "return=minimal"}, parse_json=True
        )
        body = json_body(response, SERVICE)
        answers = body.get("entry", []) if isinstance(body, dict) else []
        if not isinstance(answers, list) or len(answers) != len(entries):
            raise FatalUpstreamError(
                f"{SERVICE} {where(response.request)}: batch answered "
                f"{len(answers) if isinstance(answers, list) else 0} entries for {len(entries)}",
                service=SERVICE,
            )
        return [
            batch_answer(answer if isinstance(answer, dict) else {}, entry)
            for answer, entry in zip(answers, entries, strict=True)
        ]

    async def transaction(self, entries: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
        """POST a transaction Bundle; returns the response entries, in request order."""
        bundle = {"resourceType": "Bundle", "type": "transaction", "entry": list(entries)}
        response = await self._send("POST", "", body=bundle, parse_json=True)
        body = json_body(response, SERVICE)
        answers = body.get("entry", []) if isinstance(body, dict) else []
        if len(answers) != len(entries):
            raise FatalUpstreamError(
                f"{SERVICE} {where(response.request)}: transaction answered {len(answers)} "
                f"entries for {len(entries)}",
                service=SERVICE,
            )
        return [a if isinstance(a, dict) else {} for a in answers]


def _matches(bundle: Any, resource_type: str) -> list[dict[str, Any]]:
    """The ``match`` entries of a searchset Bundle that are of the type searched."""
    return [r for r in _entries(bundle, "match") if r.get("resourceType") == resource_type]


def _included(bundle: Any) -> list[dict[str, Any]]:
    """The resources of a searchset Bundle's ``include`` entries."""
    return _entries(bundle, "include")


def _entries(bundle: Any, mode: str) -> list[dict[str, Any]]:
    """The resources of a searchset Bundle's entries of search ``mode`` (no mode: a match)."""
    if not isinstance(bundle, dict):
        return []
    return [
        entry["resource"]
        for entry in bundle.get("entry", []) or []
        if isinstance(entry, dict)
        and isinstance(entry.get("resource"), dict)
        and (entry.get("search") or {}).get("mode", "match") == mode
    ]


def _next_link(bundle: Any) -> str | None:
    """The Bundle's ``next`` link, if any."""
    links = bundle.get("link", []) if isinstance(bundle, dict) else []
    for link in links or []:
        if isinstance(link, dict) and link.get("relation") == "next" and isinstance(link.get("url"), str):
            return str(link["url"])
    return None


def entry_result(answer: dict[str, Any], resource_type: str) -> WriteResult:
    """The WriteResult of one transaction-response entry."""
    response = answer.get("response") or {}
    status = str(response.get("status", ""))
    location = response.get("location")
    resource = answer.get("resource") or {}
    rid: str | None = None
    version = etag_version(response.get("etag"))
    if location:
        _, rid, location_version = parse_location(location)
        version = version or location_version
    rid = rid or resource.get("id")
    version = version or (resource.get("meta") or {}).get("versionId")
    if not rid:
        raise FatalUpstreamError(
            f"{SERVICE}: transaction entry for {resource_type} has no location", service=SERVICE
        )
    return WriteResult(resource_type, rid, version, status.startswith("201"), entry_status(answer))


def entry_status(answer: Mapping[str, Any]) -> int:
    """The HTTP status of a batch-response entry (``"201 Created"`` -> 201; 0 when unreadable)."""
    status = str((answer.get("response") or {}).get("status", "")).strip()
    head = status.split(" ", 1)[0]
    return int(head) if head.isdigit() else 0


def batch_answer(answer: dict[str, Any], entry: Mapping[str, Any]) -> BatchAnswer:
    """One batch-response entry, read against the request entry it answers."""
    request = entry.get("request") or {}
    method = str(request.get("method", "")).upper()
    url = str(request.get("url", ""))
    kind = url.split("?", 1)[0].split("/", 1)[0]
    status = entry_status(answer)
    resource = answer.get("resource") if isinstance(answer.get("resource"), dict) else None
    if method == "GET" and 200 <= status < 300:
        return BatchAnswer(status, resource=resource)
    # The path only: a conditional URL's query can carry a patient identifier.
    outcome = entry_outcome(answer, kind, f"{method} {url.split('?', 1)[0]}")
    if isinstance(outcome, WriteResult):
        return BatchAnswer(status, result=outcome, resource=resource)
    return BatchAnswer(status, error=outcome)


def entry_outcome(answer: dict[str, Any], resource_type: str, where_: str) -> WriteResult | UpstreamError:
    """What one batch entry did: its WriteResult, or the error the same single write would raise.

    ``where_`` names the entry's request (method and path) for the message; the outcome's text
    is blanked of quoted values as for single writes.
    """
    status = entry_status(answer)
    if 200 <= status < 300:
        try:
            return entry_result(answer, resource_type)
        except FatalUpstreamError as exc:
            return exc
    outcome = outcome_text((answer.get("response") or {}).get("outcome") or answer.get("resource")) or ""
    message = f"{SERVICE} batch entry {where_} answered {status or 'no status'}"
    if outcome:
        message = f"{message}: {outcome}"
    if status in (409, 412):
        return VersionConflictError(message, service=SERVICE, status=status)
    if status in (400, 422):
        return RejectedResourceError(message, service=SERVICE, status=status, outcome=outcome)
    if 400 <= status < 500 and status not in RETRIABLE_STATUS:
        return FatalUpstreamError(message, service=SERVICE, status=status)
    return RetriableUpstreamError(message, service=SERVICE, status=status or None)
