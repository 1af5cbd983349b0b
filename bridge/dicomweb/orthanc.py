"""Orthanc's REST change feed (``/changes``): which studies became stable since a sequence number."""

from __future__ import annotations

import httpx

from bridge.errors import FatalUpstreamError
from bridge.http import RetryPolicy, json_body, send
from bridge.limits import CallLimit, DicomwebLimits
from bridge.sync.changes import ChangeBatch

SERVICE = "dicomweb"
# Orthanc emits StableStudy once a study received no new instance for StableAge seconds, and
# again after any later arrival: the signal that a study is complete enough to publish.
STUDY_CHANGES = frozenset({"StableStudy"})


class OrthancChangeFeed:
    """Reads Orthanc's ``/changes`` through an ``httpx.AsyncClient`` given from outside."""

    name = "orthanc-changes"

    def __init__(
        self,
        client: httpx.AsyncClient,
        orthanc_url: str,
        *,
        policy: RetryPolicy | None = None,
        batch_size: int = 1000,
        limit: CallLimit | None = None,
    ) -> None:
        self._limit = limit or DicomwebLimits().page()
        self._client = client
        self._base = orthanc_url.rstrip("/")
        self._policy = policy or RetryPolicy()
        self._batch = batch_size

    async def _get(self, path: str, params: dict[str, str] | None = None) -> httpx.Response:
        request = self._client.build_request("GET", f"{self._base}{path}", params=params)
        return await send(
            self._client,
            request,
            service=SERVICE,
            policy=self._policy,
            ok=lambda r: r.is_success or r.status_code == 404,
            limit=self._limit,
        )

    async def head(self) -> str:
        """The current end of the feed (where a new checkpoint starts)."""
        body = json_body(await self._get("/changes", {"last": ""}), SERVICE)
        return str(body.get("Last", 0)) if isinstance(body, dict) else "0"

    async def changes(self, checkpoint: str | None) -> ChangeBatch:
        """Studies that became stable after ``checkpoint`` (from the feed's end when None)."""
        since = checkpoint if checkpoint is not None else await self.head()
        if not since.isdigit():
            raise FatalUpstreamError(f"bad Orthanc change checkpoint {since!r}", service=SERVICE)
        body = json_body(await self._get("/changes", {"since": since, "limit": str(self._batch)}), SERVICE)
        if not isinstance(body, dict) or not isinstance(body.get("Changes"), list):
            raise FatalUpstreamError("Orthanc /changes answered an unexpected body", service=SERVICE)
        uids: list[str] = []
        for change in body["Changes"]:
            if change.get("ChangeType") not in STUDY_CHANGES:
                continue
            uid = await self._study_uid(str(change.get("ID", "")))
            if uid is not None and uid not in uids:
                uids.append(uid)
        return ChangeBatch(uids, str(body.get("Last", since)), not body.get("Done", True))

    async def _study_uid(self, orthanc_id: str) -> str | None:
        response = await self._get(f"/studies/{orthanc_id}")
        if response.status_code == 404:
            return None  # deleted since; reconciliation retires it
        body = json_body(response, SERVICE)
        tags = body.get("MainDicomTags", {}) if isinstance(body, dict) else {}
        uid = tags.get("StudyInstanceUID")
        return str(uid) if uid else None
