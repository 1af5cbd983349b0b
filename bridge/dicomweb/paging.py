"""QIDO-RS requests against one archive: one bounded exchange, and walks of pages with limit/offset.

The base of the archive client (bridge/dicomweb/client.py): every query goes through ``_exchange``
and is recorded in ``queries``; ``_paged`` walks a search to its end however the server pages.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Mapping, Sequence
from urllib.parse import urlencode

import httpx

from bridge.dicomweb.limits import DicomwebLimits
from bridge.errors import FatalUpstreamError, UpstreamLimitError
from bridge.mapping.records import DicomJson, digest, raw_uid
from bridge.upstream.bounds import CallLimit
from bridge.upstream.errors import body_is_empty, json_body, where
from bridge.upstream.retry import RetryPolicy, send

logger = logging.getLogger(__name__)

SERVICE = "dicomweb"
ACCEPT = "application/dicom+json, application/json;q=0.9"
# Answers meaning "not this resource or not this way": try the next one.
NOT_OFFERED = frozenset({400, 404, 406, 415, 501})
STUDY_UID = "0020000D"
SERIES_UID = "0020000E"


class QidoPaging:
    """QIDO-RS against one DICOMweb base URL, through an ``httpx.AsyncClient`` given from outside.

    Every query made is appended to ``queries`` (path and parameters, which never carry patient
    data here) so a run can be audited and repeated.
    """

    def __init__(
        self,
        client: httpx.AsyncClient,
        base_url: str,
        *,
        policy: RetryPolicy | None,
        page_size: int,
        limits: DicomwebLimits | None,
    ) -> None:
        self._client = client
        self._base = base_url.rstrip("/")
        self._policy = policy or RetryPolicy()
        self.page_size = page_size
        self.limits = limits or DicomwebLimits()
        self.queries: list[str] = []

    async def _get(
        self, path: str, params: Sequence[tuple[str, str]], limit: CallLimit | None = None
    ) -> tuple[list[DicomJson], bool]:
        """One QIDO request: the rows, and whether the server says the answer was truncated.

        The answer is bounded by ``limit`` (a study page's bounds by default).
        """
        rows, response = await self._exchange(path, params, limit)
        # A Warning header (RFC 7234 code 299) is how QIDO-RS servers report truncated results.
        return rows, "warning" in response.headers

    async def _exchange(
        self, path: str, params: Sequence[tuple[str, str]], limit: CallLimit | None = None
    ) -> tuple[list[DicomJson], httpx.Response]:
        """One QIDO request: the rows and the answer they came in (for its headers)."""
        query = urlencode(params)
        self.queries.append(f"{path}?{query}" if query else path)
        request = self._client.build_request(
            "GET",
            f"{self._base}{path}",
            params=list(params),
            headers={"Accept": ACCEPT, "Accept-Encoding": "gzip, deflate"},
        )
        response = await send(
            self._client,
            request,
            service=SERVICE,
            policy=self._policy,
            limit=limit or self.limits.page(),
            parse_json=True,  # parsed in steps once in, the bytes let go as they are parsed
        )
        if response.status_code == 204 or body_is_empty(response):
            return [], response
        body = json_body(response, SERVICE)
        if not isinstance(body, list):
            raise FatalUpstreamError(
                f"{SERVICE} {where(request)} did not answer with a DICOM JSON array",
                service=SERVICE,
            )
        return body, response


    async def _paged(
        self,
        path: str,
        fields: Sequence[str],
        filters: Mapping[str, str],
        uid_tag: str,
        limit: CallLimit | None = None,
        page_size: int | None = None,
    ) -> AsyncIterator[list[DicomJson]]:
        """Pages of rows, following limit/offset until the server has no more.

        Copes with servers that ignore ``limit`` (a page longer than asked ends the walk), that
        ignore ``offset`` (a page of nothing new ends it), and that cap results silently but say
        so in a Warning header (paging goes on while the header is there, at most
        ``BRIDGE_DICOMWEB_MAX_PAGES`` pages: past that the walk fails rather than run forever).
        """
        base_params = [("includefield", f) for f in fields] + sorted(filters.items())
        page_size = page_size or self.page_size
        offset = 0
        seen: set[tuple[str, str]] = set()
        pages = 0
        while True:
            pages += 1
            if pages > self.limits.max_pages:
                raise self._endless_paging(path)
            params = [*base_params, ("limit", str(page_size)), ("offset", str(offset))]
            rows, truncated = await self._get(path, params, limit)
            fresh = []
            for row in rows:
                key = _row_key(row, uid_tag)
                if key is not None and key in seen:
                    continue
                if key is not None:
                    seen.add(key)
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
            if not rows or not fresh or len(rows) > page_size:
                return
            if len(rows) < page_size and not truncated:
                return
            offset += len(rows)


    def _endless_paging(self, path: str) -> UpstreamLimitError:
        """The error of a walk of ``path`` that still has rows after the most pages allowed."""
        return UpstreamLimitError(
            f"{SERVICE} {self._base}{path}: still more rows after {self.limits.max_pages} pages "
            "(BRIDGE_DICOMWEB_MAX_PAGES); the archive's paging does not end",
            service=SERVICE,
            setting="BRIDGE_DICOMWEB_MAX_PAGES",
        )



def _row_key(row: DicomJson, uid_tag: str) -> tuple[str, str] | None:
    """What makes a row new on a walk: its UID, and the patient it names.

    An archive may list one Study Instance UID once per patient it holds it under (Orthanc keeps
    a second study when an instance arrives under a known Study UID and another PatientID).
    Those rows all reach the sync, which parks the conflict (bridge/sync/identity.py); only a row
    repeated as it was (offset paging shifting) is left out.
    """
    uid = raw_uid(row, uid_tag)
    if uid is None:
        return None
    patient = digest([row.get("00100020"), row.get("00100021")]) if isinstance(row, dict) else ""
    return uid, patient
