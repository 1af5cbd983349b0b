"""Orthanc's REST change feed (``/changes``): which studies became stable since a sequence number.

The checkpoint names the change it stopped at by its sequence number, date and resource id
(``"42 20261207T030424 b8864f84-..."``), so the next read can check that the feed is still the one
it came from: it asks from just before that change and expects it first. A feed that now ends below
the checkpoint (Orthanc restarted on an empty database), that no longer has it (changes cleared,
``DELETE /changes``), or has another change under its number (another database) has lost changes
the bridge never read: the batch says so (``gap``) and starts again at the feed's current end, and
the caller sweeps the archive for what was missed. A checkpoint of the older form (the number
alone) is checked as far as it can be (the first two cases) and then replaced.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import httpx

from bridge.dicomweb.limits import DicomwebLimits
from bridge.dicomweb.results import ChangeBatch
from bridge.errors import FatalUpstreamError
from bridge.upstream.bounds import CallLimit
from bridge.upstream.errors import json_body
from bridge.upstream.retry import RetryPolicy, send

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
        """The current end of the feed, as a checkpoint (where a new one starts)."""
        body = json_body(await self._get("/changes", {"last": ""}), SERVICE)
        if not isinstance(body, dict):
            return "0"
        changes = body.get("Changes")
        if isinstance(changes, list) and changes and isinstance(changes[-1], dict):
            return str(_Mark.of(changes[-1]))
        return str(_Mark(_seq(body.get("Last")), None, None))

    async def changes(self, checkpoint: str | None) -> ChangeBatch:
        """Studies that became stable after ``checkpoint`` (from the feed's end when None)."""
        if checkpoint is None:
            return ChangeBatch([], await self.head(), False)
        mark = _Mark.parse(checkpoint)
        if mark is None:
            raise FatalUpstreamError(f"bad Orthanc change checkpoint {checkpoint!r}", service=SERVICE)
        # From just before the checkpoint's own change, so the answer shows it is still there.
        since = max(mark.seq - 1, 0)
        params = {"since": str(since), "limit": str(self._batch + (1 if mark.seq else 0))}
        body = json_body(await self._get("/changes", params), SERVICE)
        if not isinstance(body, dict) or not isinstance(body.get("Changes"), list):
            raise FatalUpstreamError("Orthanc /changes answered an unexpected body", service=SERVICE)
        changes = [c for c in body["Changes"] if isinstance(c, dict)]
        gap = mark.gap(changes, _seq(body.get("Last")))
        if gap is not None:
            return ChangeBatch([], await self.head(), False, gap=gap)
        new = [c for c in changes if _seq(c.get("Seq")) > mark.seq]
        uids: list[str] = []
        changed_at: dict[str, float] = {}
        for change in new:
            if change.get("ChangeType") not in STUDY_CHANGES:
                continue
            uid = await self._study_uid(str(change.get("ID", "")))
            if uid is not None and uid not in uids:
                uids.append(uid)
            when = _when(change.get("Date"))
            if uid is not None and when is not None:
                changed_at[uid] = when  # the latest StableStudy of the study: its last arrival
        after = _Mark.of(new[-1]) if new else mark
        return ChangeBatch(uids, str(after), not body.get("Done", True), changed_at=changed_at)

    async def _study_uid(self, orthanc_id: str) -> str | None:
        response = await self._get(f"/studies/{orthanc_id}")
        if response.status_code == 404:
            return None  # deleted since; reconciliation retires it
        body = json_body(response, SERVICE)
        tags = body.get("MainDicomTags", {}) if isinstance(body, dict) else {}
        uid = tags.get("StudyInstanceUID")
        return str(uid) if uid else None


def _when(value: Any) -> float | None:
    """An Orthanc change date (``20261207T030424``, UTC) as epoch seconds."""
    try:
        return datetime.strptime(str(value), "%Y%m%dT%H%M%S").replace(tzinfo=UTC).timestamp()
    except ValueError:
        return None


def _seq(value: Any) -> int:
    try:
        return int(value)
    except (TypeError, ValueError):
        return -1


@dataclass(frozen=True, slots=True)
class _Mark:
    """A change of the feed: its sequence number, and (when known) its date and resource id."""

    seq: int
    date: str | None
    resource: str | None

    @classmethod
    def of(cls, change: dict[str, Any]) -> _Mark:
        return cls(
            _seq(change.get("Seq")),
            str(change.get("Date") or "") or None,
            str(change.get("ID") or "") or None,
        )

    @classmethod
    def parse(cls, text: str) -> _Mark | None:
        parts = text.split()
        if not parts or not parts[0].isdigit() or len(parts) not in (1, 3):
            return None
        return cls(int(parts[0]), *(parts[1:] if len(parts) == 3 else (None, None)))

    def __str__(self) -> str:
        if self.date and self.resource:
            return f"{self.seq} {self.date} {self.resource}"
        return str(self.seq)

    def gap(self, changes: list[dict[str, Any]], last: int) -> str | None:
        """Why ``changes`` (asked from just before this mark) show a feed this mark is not from, if so."""
        if self.seq == 0:
            return None  # from the feed's very start: nothing can have been missed
        if not changes:
            if last < self.seq:
                return (
                    f"the Orthanc change feed ends at {last}, below the checkpoint {self.seq}: "
                    "Orthanc restarted on another (or an emptied) database"
                )
            return f"the Orthanc change feed no longer has change {self.seq} (cleared?)"
        first = changes[0]
        if _seq(first.get("Seq")) != self.seq:
            return (
                f"the Orthanc change feed skips from before {self.seq} to {_seq(first.get('Seq'))}: "
                "changes were cleared before the bridge read them"
            )
        if self.date is not None and (first.get("Date"), first.get("ID")) != (self.date, self.resource):
            return (
                f"change {self.seq} of the Orthanc change feed is not the one the checkpoint saw: "
                "the feed belongs to another Orthanc database"
            )
        return None
