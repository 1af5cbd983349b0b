"""Async QIDO-RS client: paged study enumeration and per-study series queries."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Mapping, Sequence
from urllib.parse import quote, urlencode

import httpx

from bridge.dicomweb.records import (
    INSTANCE_FIELDS,
    SERIES_FIELDS,
    STUDY_FIELDS,
    DicomJson,
    InstanceRecord,
    SeriesRecord,
    parse_instance,
    parse_series,
    raw_uid,
)
from bridge.errors import FatalUpstreamError, UpstreamError
from bridge.http import RetryPolicy, json_body, send, where

logger = logging.getLogger(__name__)

SERVICE = "dicomweb"
ACCEPT = "application/dicom+json, application/json;q=0.9"


class DicomwebClient:
    """QIDO-RS against one DICOMweb base URL, through an ``httpx.AsyncClient`` given from outside.

    Every query made is appended to ``queries`` (path and parameters, which never carry patient
    data here) so a run can be audited and repeated.
    """

    def __init__(
        self,
        client: httpx.AsyncClient,
        base_url: str,
        *,
        policy: RetryPolicy | None = None,
        page_size: int = 100,
    ) -> None:
        self._client = client
        self._base = base_url.rstrip("/")
        self._policy = policy or RetryPolicy()
        self.page_size = page_size
        self.queries: list[str] = []

    async def _get(self, path: str, params: Sequence[tuple[str, str]]) -> tuple[list[DicomJson], bool]:
        """One QIDO request: the rows, and whether the server says the answer was truncated."""
        query = urlencode(params)
        self.queries.append(f"{path}?{query}" if query else path)
        request = self._client.build_request(
            "GET",
            f"{self._base}{path}",
            params=list(params),
            headers={"Accept": ACCEPT, "Accept-Encoding": "gzip, deflate"},
        )
        response = await send(self._client, request, service=SERVICE, policy=self._policy)
        # A Warning header (RFC 7234 code 299) is how QIDO-RS servers report truncated results.
        truncated = "warning" in response.headers
        if response.status_code == 204 or not response.content.strip():
            return [], truncated
        body = json_body(response, SERVICE)
        if not isinstance(body, list):
            raise FatalUpstreamError(
                f"{SERVICE} {where(request)} did not answer with a DICOM JSON array",
                service=SERVICE,
            )
        return body, truncated

    async def _paged(
        self, path: str, fields: Sequence[str], filters: Mapping[str, str], uid_tag: str
    ) -> AsyncIterator[list[DicomJson]]:
        """Pages of rows, following limit/offset until the server has no more.

        Copes with servers that ignore ``limit`` (a page longer than asked ends the walk), that
        ignore ``offset`` (a page of nothing new ends it), and that cap results silently but say
        so in a Warning header (paging goes on while the header is there).
        """
        base_params = [("includefield", f) for f in fields] + sorted(filters.items())
        offset = 0
        seen: set[str] = set()
        while True:
            params = [*base_params, ("limit", str(self.page_size)), ("offset", str(offset))]
            rows, truncated = await self._get(path, params)
            fresh = []
            for row in rows:
                uid = raw_uid(row, uid_tag)
                if uid is not None and uid in seen:
                    continue
                if uid is not None:
                    seen.add(uid)
                fresh.append(row)
            if fresh:
                yield fresh
            if rows and not fresh:
                logger.warning(
                    "%s%s: the server repeated a page (it seems to ignore offset); studies past "
                    "offset %d may be missing: raise BRIDGE_QIDO_PAGE_SIZE or check the archive",
                    self._base,
                    path,
                    offset,
                )
            if not rows or not fresh or len(rows) > self.page_size:
                return
            if len(rows) < self.page_size and not truncated:
                return
            offset += len(rows)

    async def reachable(self) -> bool:
        """Whether the archive answers a one-row study query at all (after a study's call failed)."""
        try:
            await self._get("/studies", [("includefield", "0020000D"), ("limit", "1")])
        except UpstreamError:
            return False
        return True

    def iter_studies(self, filters: Mapping[str, str] | None = None) -> AsyncIterator[list[DicomJson]]:
        """Pages of study-level rows (raw DICOM JSON), each study once."""
        return self._paged("/studies", STUDY_FIELDS, filters or {}, "0020000D")

    async def search_instances(self, study_uid: str, limit: int | None = None) -> list[InstanceRecord]:
        """The study's instances (at most ``limit``: a guard against very large studies)."""
        path = f"/studies/{quote(study_uid, safe='')}/instances"
        records: list[InstanceRecord] = []
        async for page in self._paged(path, INSTANCE_FIELDS, {}, "00080018"):
            records.extend(parse_instance(row) for row in page)
            if limit is not None and len(records) > limit:
                break
        return records

    async def instance_header(
        self, study_uid: str, instance: InstanceRecord | None = None
    ) -> DicomJson | None:
        """The WADO-RS metadata of one instance of the study (the first QIDO-RS gives), or None."""
        if instance is None:
            path = f"/studies/{quote(study_uid, safe='')}/instances"
            rows, _ = await self._get(path, [*(("includefield", f) for f in INSTANCE_FIELDS), ("limit", "1")])
            if not rows:
                return None
            instance = parse_instance(rows[0])
        path = (
            f"/studies/{quote(study_uid, safe='')}/series/{quote(instance.series_uid, safe='')}"
            f"/instances/{quote(instance.uid, safe='')}/metadata"
        )
        rows, _ = await self._get(path, [])
        return rows[0] if rows and isinstance(rows[0], dict) else None

    async def search_series(self, study_uid: str) -> list[SeriesRecord]:
        """Every series of one study; raises MappingError if a row cannot be parsed."""
        path = f"/studies/{quote(study_uid, safe='')}/series"
        records: list[SeriesRecord] = []
        async for page in self._paged(path, SERIES_FIELDS, {}, "0020000E"):
            records.extend(parse_series(row) for row in page)
        return records
