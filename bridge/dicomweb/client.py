"""The archive client: every call the bridge makes to a DICOMweb archive (QIDO-RS, WADO-RS).

Built in layers, a file per concern: ``paging`` (one bounded QIDO-RS exchange, walks of pages),
``series`` (how the series of studies are asked), ``studylists`` (a page of named
studies in one query), ``part10`` (a name read from an instance's file
header); this class adds the study and instance searches and the WADO-RS retrieves.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Mapping, Sequence
from dataclasses import dataclass
from urllib.parse import quote

from bridge.dicomweb.paging import NOT_OFFERED, SERVICE, STUDY_UID
from bridge.dicomweb.part10 import fetch_patient_name
from bridge.dicomweb.studylists import StudyLists
from bridge.errors import UpstreamError
from bridge.mapping.records import (
    INSTANCE_FIELDS,
    STUDY_FIELDS,
    DicomJson,
    InstanceRecord,
    parse_instance,
)
from bridge.upstream.retry import RetryPolicy, send

_IMAGE_TYPES = frozenset({"image/jpeg", "image/png", "image/gif"})

# Study attributes a QIDO-RS answer carries only when includefield asks for them (PS3.18 table
# 10.6.3-3 lists the default ones): StudyDescription, IssuerOfPatientID.
INCLUDEFIELD_ONLY = ("00081030", "00100021")


@dataclass(frozen=True)
class StudySample:
    """One page of study rows and what its answer told about the archive (``bridge check``)."""

    rows: list[DicomJson]
    gzip: bool  # the answer came gzip-compressed
    includefield: bool | None  # the rows carry includefield-only attributes; None without rows


class DicomwebClient(StudyLists):
    """QIDO-RS and WADO-RS against one DICOMweb base URL, through an ``httpx.AsyncClient`` given from outside.

    Every query made is appended to ``queries`` (path and parameters, which never carry patient
    data here) so a run can be audited and repeated. Constructed as ``SeriesSearch`` is: client,
    base URL, retry policy, page size, limits and the series query settings.
    """

    async def ping(self) -> None:
        """One QIDO-RS request for one study, never retried: raises unless the archive answers."""
        request = self._client.build_request(
            "GET",
            f"{self._base}/studies",
            params={"limit": "1", "includefield": STUDY_UID},
            headers={"Accept": "application/dicom+json"},
        )
        await send(
            self._client, request, service=SERVICE, policy=RetryPolicy(retries=0), limit=self.limits.page()
        )

    async def picture(
        self, urls: Sequence[str], *, viewport: str, deadline: float | None = None
    ) -> tuple[bytes, str] | None:
        """The first of ``urls`` (WADO-RS thumbnail or rendered resources) that answers an image.

        Each is asked once, with the one plain ``Accept: image/jpeg`` archives understand; an
        answer meaning "not this resource" moves on to the next. Returns the bytes and the media
        type, or None when none renders a picture. Each answer is bounded by the thumbnail limits
        (``deadline``: a tighter one for a person waiting).
        """
        for url in urls:
            # the comma stays literal: Orthanc does not decode %2C in viewport
            request = self._client.build_request(
                "GET", f"{url}?viewport={viewport}", headers={"Accept": "image/jpeg"}
            )
            answer = await send(
                self._client,
                request,
                service=SERVICE,
                policy=self._policy,
                ok=lambda r: r.is_success or r.status_code in NOT_OFFERED,
                limit=self.limits.thumbnail(deadline),
            )
            media_type = answer.headers.get("content-type", "").split(";")[0].strip().lower()
            if answer.is_success and media_type in _IMAGE_TYPES:
                return answer.content, media_type
        return None

    async def sample_studies(self, count: int) -> StudySample:
        """Up to ``count`` studies in one study-level query, and what its answer shows of the archive.

        For ``bridge check``: whether the answer came gzip-compressed (asked, as every query asks),
        and whether the rows carry attributes only ``includefield`` asks for.
        """
        params = [("includefield", f) for f in STUDY_FIELDS] + [("limit", str(count))]
        rows, response = await self._exchange("/studies", params)
        gzip = response.headers.get("content-encoding", "").lower() == "gzip"
        includefield = None if not rows else any(tag in row for row in rows for tag in INCLUDEFIELD_ONLY)
        return StudySample(rows=rows, gzip=gzip, includefield=includefield)

    async def reachable(self) -> bool:
        """Whether the archive answers a one-row study query at all (after a study's call failed)."""
        try:
            await self._get("/studies", [("includefield", "0020000D"), ("limit", "1")])
        except UpstreamError:
            return False
        return True

    def iter_studies(self, filters: Mapping[str, str] | None = None) -> AsyncIterator[list[DicomJson]]:
        """Pages of study-level rows (raw DICOM JSON): a Study UID once per patient it is listed under."""
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

    async def _first_instance(self, study_uid: str) -> InstanceRecord | None:
        """The first instance QIDO-RS gives for the study, or None when it has none."""
        path = f"/studies/{quote(study_uid, safe='')}/instances"
        rows, _ = await self._get(path, [*(("includefield", f) for f in INSTANCE_FIELDS), ("limit", "1")])
        return parse_instance(rows[0]) if rows else None

    async def instance_header(
        self, study_uid: str, instance: InstanceRecord | None = None
    ) -> DicomJson | None:
        """The WADO-RS metadata of one instance of the study (the first QIDO-RS gives), or None."""
        instance = instance or await self._first_instance(study_uid)
        if instance is None:
            return None
        path = (
            f"/studies/{quote(study_uid, safe='')}/series/{quote(instance.series_uid, safe='')}"
            f"/instances/{quote(instance.uid, safe='')}/metadata"
        )
        rows, _ = await self._get(path, [], self.limits.metadata())
        return rows[0] if rows and isinstance(rows[0], dict) else None

    async def patient_name_from_file(
        self, study_uid: str, instance: InstanceRecord | None = None
    ) -> tuple[str | None, str | None]:
        """PatientName decoded from one instance's Part 10 header (WADO-RS ``application/dicom``).

        For a study whose name the archive's JSON garbled: (name, None), or (None, why) when the
        file offers no good name. Bounded as a metadata answer (``BRIDGE_DICOMWEB_MAX_METADATA_BYTES``,
        ``BRIDGE_HTTP_DEADLINE``), and read only as far as the header: the connection is closed
        once the bytes reach past the name. A refusal or an over-size file is "no good source";
        an unreachable or failing archive raises, so the study is retried rather than published
        without a name it has.
        """
        instance = instance or await self._first_instance(study_uid)
        if instance is None:
            return None, "the study has no instance to read"
        path = (
            f"/studies/{quote(study_uid, safe='')}/series/{quote(instance.series_uid, safe='')}"
            f"/instances/{quote(instance.uid, safe='')}"
        )
        self.queries.append(path)
        request = self._client.build_request(
            "GET", f"{self._base}{path}", headers={"Accept": 'multipart/related; type="application/dicom"'}
        )
        return await fetch_patient_name(self._client, request, self.limits.metadata(), self._policy)

    async def series_metadata(self, study_uid: str, series_uid: str) -> list[DicomJson]:
        """The WADO-RS metadata of every instance of one series (read for Key Object Selections only)."""
        path = f"/studies/{quote(study_uid, safe='')}/series/{quote(series_uid, safe='')}/metadata"
        rows, _ = await self._get(path, [], self.limits.metadata())
        return [row for row in rows if isinstance(row, dict)]
