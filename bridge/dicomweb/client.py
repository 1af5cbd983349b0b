"""The archive client: every call the bridge makes to a DICOMweb archive (QIDO-RS, WADO-RS)."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Mapping, Sequence
from dataclasses import dataclass
from urllib.parse import quote, urlencode

import httpx

from bridge.dicomweb.limits import DicomwebLimits
from bridge.dicomweb.query import SeriesQuery
from bridge.dicomweb.records import (
    INSTANCE_FIELDS,
    SERIES_FIELDS,
    STUDY_FIELDS,
    DicomJson,
    InstanceRecord,
    SeriesRecord,
    digest,
    parse_instance,
    parse_series,
    part10_patient_name,
    raw_uid,
)
from bridge.dicomweb.sweep import SeriesSweep
from bridge.errors import (
    ConfigurationError,
    FatalUpstreamError,
    MappingError,
    UpstreamError,
    UpstreamLimitError,
)
from bridge.sync.protocols import SeriesOutcome
from bridge.upstream.bounds import CallLimit
from bridge.upstream.errors import (
    TRANSPORT_ERRORS,
    auth_error,
    body_is_empty,
    error_for_exception,
    error_for_response,
    json_body,
    where,
)
from bridge.upstream.retry import RetryPolicy, send

logger = logging.getLogger(__name__)

SERVICE = "dicomweb"
ACCEPT = "application/dicom+json, application/json;q=0.9"
_IMAGE_TYPES = frozenset({"image/jpeg", "image/png", "image/gif"})
# Answers meaning "not this resource or not this way": try the next one.
_NOT_OFFERED = frozenset({400, 404, 406, 415, 501})
STUDY_UID = "0020000D"
SERIES_UID = "0020000E"
_FIRST_HEAD_BYTES = 16 * 1024  # a first look at a Part 10 file: most headers fit, pixels follow


def _boundary(content_type: str) -> bytes | None:
    """The multipart boundary of a Content-Type, or None for a single part."""
    if not content_type.lower().startswith("multipart/"):
        return None
    for param in content_type.split(";")[1:]:
        key, _, value = param.strip().partition("=")
        if key.lower() == "boundary" and value:
            return value.strip('"').encode("latin-1")
    return None


def _first_part(data: bytes, boundary: bytes | None) -> bytes:
    """The body of the first part of a multipart answer (the answer itself when not multipart)."""
    if boundary is None:
        return data
    start = data.find(b"--" + boundary)
    head_end = data.find(b"\r\n\r\n", start) if start >= 0 else -1
    if head_end < 0:
        return b""
    body = data[head_end + 4 :]
    end = body.find(b"\r\n--" + boundary)
    return body[:end] if end >= 0 else body


# Study attributes a QIDO-RS answer carries only when includefield asks for them (PS3.18 table
# 10.6.3-3 lists the default ones): StudyDescription, IssuerOfPatientID.
INCLUDEFIELD_ONLY = ("00081030", "00100021")


@dataclass(frozen=True)
class StudySample:
    """One page of study rows and what its answer told about the archive (``bridge check``)."""

    rows: list[DicomJson]
    gzip: bool  # the answer came gzip-compressed
    includefield: bool | None  # the rows carry includefield-only attributes; None without rows


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
        limits: DicomwebLimits | None = None,
        series_query: SeriesQuery = SeriesQuery.AUTO,
        series_list_size: int = 100,
        series_page_size: int = 1000,
    ) -> None:
        self._client = client
        self._base = base_url.rstrip("/")
        self._policy = policy or RetryPolicy()
        self.page_size = page_size
        self.limits = limits or DicomwebLimits()
        self.queries: list[str] = []
        self.series_query = series_query
        self.series_list_size = series_list_size
        self.series_page_size = series_page_size
        # Under ``auto``: None until the first list query tells; then whether list matching works.
        self.list_matching: bool | None = {
            SeriesQuery.LIST: True,
            SeriesQuery.PER_STUDY: False,
            SeriesQuery.PAGED: False,
        }.get(series_query)
        self._sweep: SeriesSweep | None = None

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
                ok=lambda r: r.is_success or r.status_code in _NOT_OFFERED,
                limit=self.limits.thumbnail(deadline),
            )
            media_type = answer.headers.get("content-type", "").split(";")[0].strip().lower()
            if answer.is_success and media_type in _IMAGE_TYPES:
                return answer.content, media_type
        return None

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
        limit = self.limits.metadata()
        found: list[tuple[str | None, str | None]] = []

        async def attempt() -> httpx.Response:
            # One try, within the metadata bounds; the retry policy retries transport errors and
            # 5xx, and gives up with UpstreamUnavailableError as for every other archive call.
            try:
                async with asyncio.timeout(limit.deadline):
                    response, name = await self._read_file_head(request, limit.max_bytes)
            except TimeoutError:
                raise UpstreamLimitError(
                    f"{SERVICE} {where(request)}: the instance file's header did not arrive within "
                    f"{limit.deadline:g} s ({limit.deadline_setting})",
                    service=SERVICE,
                    setting=limit.deadline_setting,
                ) from None
            except TRANSPORT_ERRORS as exc:
                raise error_for_exception(exc, request, SERVICE) from exc
            found[:] = [name]
            return response

        await self._policy.run(attempt)
        return found[0]

    async def _read_file_head(
        self, request: httpx.Request, max_bytes: int
    ) -> tuple[httpx.Response, tuple[str | None, str | None]]:
        """The answer, and the name read from its body only as far as the header goes."""
        response = await self._client.send(request, stream=True)
        try:
            if response.status_code in _NOT_OFFERED:
                return response, (None, f"the archive answered {response.status_code} to a Part 10 retrieve")
            if not response.is_success:
                await response.aread()  # an error answer is small; its text goes into the error
                if response.status_code in (401, 403):  # credentials: no study can pass
                    raise auth_error(response, SERVICE)
                raise error_for_response(response, SERVICE)
            boundary = _boundary(response.headers.get("content-type", ""))
            data = bytearray()
            next_try = _FIRST_HEAD_BYTES
            async for chunk in response.aiter_bytes():
                data.extend(chunk)
                if len(data) > max_bytes:
                    too_big = "the Part 10 header is larger than BRIDGE_DICOMWEB_MAX_METADATA_BYTES"
                    return response, (None, too_big)
                if len(data) >= next_try:
                    next_try = len(data) * 2
                    name = part10_patient_name(_first_part(bytes(data), boundary), complete=False)
                    if name is not None:
                        return response, name  # the rest of the file (pixels) is never read
            name = part10_patient_name(_first_part(bytes(data), boundary), complete=True)
            return response, name or (None, "the Part 10 header cannot be read")
        finally:
            await response.aclose()
    async def series_metadata(self, study_uid: str, series_uid: str) -> list[DicomJson]:
        """The WADO-RS metadata of every instance of one series (read for Key Object Selections only)."""
        path = f"/studies/{quote(study_uid, safe='')}/series/{quote(series_uid, safe='')}/metadata"
        rows, _ = await self._get(path, [], self.limits.metadata())
        return [row for row in rows if isinstance(row, dict)]

    async def search_series(self, study_uid: str) -> list[SeriesRecord]:
        """Every series of one study; raises MappingError if a row cannot be parsed.

        A study with more than ``BRIDGE_DICOMWEB_MAX_SERIES`` series raises UpstreamLimitError,
        which parks it.
        """
        path = f"/studies/{quote(study_uid, safe='')}/series"
        records: list[SeriesRecord] = []
        cap = self.limits.max_series
        async for page in self._paged(path, SERIES_FIELDS, {}, "0020000E", self.limits.series()):
            if len(records) + len(page) > cap:
                raise UpstreamLimitError(
                    f"study {study_uid} has more than {cap} series (BRIDGE_DICOMWEB_MAX_SERIES): "
                    "not published; raise the setting if the study is real",
                    service=SERVICE,
                    setting="BRIDGE_DICOMWEB_MAX_SERIES",
                )
            records.extend(parse_series(row) for row in page)
        return records

    async def search_series_many(self, study_uids: Sequence[str]) -> dict[str, SeriesOutcome]:
        """The series of several studies with as few queries as the archive allows, per study.

        Uses UID-list matching on StudyInstanceUID (``/series?StudyInstanceUID=a,b,...``, paged),
        ``series_list_size`` studies per query. The answer is checked, never trusted: under
        ``auto`` the first list query decides whether the archive matches lists at all (a row of
        a study not asked for, or no row for any asked study, means it does not, and from then
        on nothing is answered here). A study left out of the result (no row, or a row whose
        study cannot be told) is for the caller to fetch alone with :meth:`search_series`; a
        study with an unreadable row, or too many series, gets the error that parks it.
        """
        wanted = list(dict.fromkeys(study_uids))
        result: dict[str, SeriesOutcome] = {}
        if self._sweep is not None:
            found = await asyncio.to_thread(self._sweep.series_of, wanted)
            return {uid: self._series_outcome(uid, rows) for uid, rows in found.items()}
        if self.list_matching is False or len(wanted) < 2:
            return result
        for start in range(0, len(wanted), self.series_list_size):
            chunk = wanted[start : start + self.series_list_size]
            if len(chunk) < 2:
                break  # one study alone is asked the ordinary way
            try:
                answer = await self._series_list(chunk)
            except UpstreamError as exc:
                refused = (
                    isinstance(exc, FatalUpstreamError)
                    and not isinstance(exc, UpstreamLimitError)
                    and exc.status is not None
                    and 400 <= exc.status < 500
                )
                if refused:
                    # Refused (say, a URL too long or an unknown parameter): those studies go alone.
                    if self.list_matching is None:
                        self._no_list_matching(f"it answered the list query {exc.status}")
                    return result
                # Broken, stalled or too large: one bad study may have spoiled the whole list, so
                # its studies are asked alone (only the bad one then parks); it decides nothing.
                logger.warning(
                    "%s/series: the list query for %d studies failed (%s); asking them one by one",
                    self._base,
                    len(chunk),
                    type(exc).__name__,
                )
                continue
            if answer is None:
                return result
            result.update(answer)
        return result

    async def _series_list(self, uids: list[str]) -> dict[str, SeriesOutcome] | None:
        """One paged list query; None when it shows the archive does not match UID lists."""
        asked = set(uids)
        rows_by_study: dict[str, list[DicomJson]] = {}
        unattributed = 0
        filters = {"StudyInstanceUID": ",".join(uids)}
        fields = (STUDY_UID, *SERIES_FIELDS)
        async for page in self._paged(
            "/series", fields, filters, SERIES_UID, self.limits.series(), self.series_page_size
        ):
            for row in page:
                study = raw_uid(row, STUDY_UID)
                if study is None:
                    unattributed += 1
                elif study not in asked:
                    # The archive ignored or misread the list: nothing it answered can be used.
                    self._no_list_matching("it answered series of a study not asked for")
                    return None
                else:
                    rows_by_study.setdefault(study, []).append(row)
        if not rows_by_study and not unattributed:
            if self.list_matching is None:
                self._no_list_matching("it answered no series for any of the studies asked")
                return None
            return {}  # the studies are fetched alone, which tells what happened to them
        if self.list_matching is None:
            self.list_matching = True
            logger.info("%s matches StudyInstanceUID lists: series are asked for per page", self._base)
        if unattributed:
            # A row without its study cannot be placed: every study of the query is fetched alone.
            logger.warning(
                "%s/series: %d series rows without StudyInstanceUID; fetching those studies one by one",
                self._base,
                unattributed,
            )
            return {}
        return {uid: self._series_outcome(uid, rows) for uid, rows in rows_by_study.items()}

    def _series_outcome(self, study_uid: str, rows: list[DicomJson]) -> SeriesOutcome:
        cap = self.limits.max_series
        if len(rows) > cap:
            return UpstreamLimitError(
                f"study {study_uid} has more than {cap} series (BRIDGE_DICOMWEB_MAX_SERIES): "
                "not published; raise the setting if the study is real",
                service=SERVICE,
                setting="BRIDGE_DICOMWEB_MAX_SERIES",
            )
        try:
            return [parse_series(row) for row in rows]
        except MappingError as exc:
            return exc

    def _no_list_matching(self, why: str) -> None:
        if self.series_query is SeriesQuery.LIST:
            raise ConfigurationError(
                f"BRIDGE_DICOMWEB_SERIES_QUERY=list: {self._base}/series does not match "
                f"StudyInstanceUID lists ({why}); set it to auto or per-study"
            )
        self.list_matching = False
        logger.info("%s does not match StudyInstanceUID lists (%s): series asked per study", self._base, why)

    async def sweep_series(self, filters: Mapping[str, str] | None = None) -> bool:
        """Under ``paged``: walk the archive's series (``/series`` at the root), kept on disk by study.

        ``filters`` are the run's study-level matching keys (PS3.18 lets a root series search match
        on the study's attributes; an archive that ignores them answers more rows, which only cost
        disk). Returns whether a sweep is now there for :meth:`search_series_many` to answer from;
        :meth:`end_sweep` removes it. Memory holds one page (``series_page_size`` rows) at a time,
        and series already kept are recognised on disk, not in memory. A study the sweep missed
        (or saw partly, as pages shift while the archive changes) is left for the caller to check
        against the study's own counts and ask alone. An archive that refuses the root query, or
        answers rows without their Study Instance UID, cannot be swept: ConfigurationError names
        the setting.
        """
        self.end_sweep()
        if self.series_query is not SeriesQuery.PAGED:
            return False
        sweep = await asyncio.to_thread(SeriesSweep)
        try:
            await self._walk_series(sweep, filters or {})
        except BaseException:
            await asyncio.to_thread(sweep.close)
            raise
        self._sweep = sweep
        logger.info("%s/series swept: %d series kept on disk for this run", self._base, sweep.rows)
        return True

    def _endless_paging(self, path: str) -> UpstreamLimitError:
        """The error of a walk of ``path`` that still has rows after the most pages allowed."""
        return UpstreamLimitError(
            f"{SERVICE} {self._base}{path}: still more rows after {self.limits.max_pages} pages "
            "(BRIDGE_DICOMWEB_MAX_PAGES); the archive's paging does not end",
            service=SERVICE,
            setting="BRIDGE_DICOMWEB_MAX_PAGES",
        )

    async def _walk_series(self, sweep: SeriesSweep, filters: Mapping[str, str]) -> None:
        size = self.series_page_size
        base = [("includefield", f) for f in (STUDY_UID, *SERIES_FIELDS)] + sorted(filters.items())
        offset, pages, placed, unplaced = 0, 0, 0, 0
        while True:
            pages += 1
            if pages > self.limits.max_pages:
                raise self._endless_paging("/series")
            params = [*base, ("limit", str(size)), ("offset", str(offset))]
            try:
                rows, truncated = await self._get("/series", params, self.limits.series())
            except FatalUpstreamError as exc:
                if exc.status is not None and 400 <= exc.status < 500:
                    raise ConfigurationError(
                        f"BRIDGE_DICOMWEB_SERIES_QUERY=paged: {self._base}/series refused a series search "
                        f"at the archive's root ({exc.status}); set it to per-study"
                    ) from exc
                raise
            kept = []
            for row in rows:
                study = raw_uid(row, STUDY_UID)
                if study is None:
                    unplaced += 1
                else:
                    kept.append((study, raw_uid(row, SERIES_UID), row))
            placed += len(kept)
            added = await asyncio.to_thread(sweep.add, kept) if kept else 0
            if not rows or len(rows) > size or (kept and not added):
                break  # the end, a server that ignores limit, or one that repeats a page (ignores offset)
            if len(rows) < size and not truncated:
                break
            offset += len(rows)
        if unplaced and not placed:
            raise ConfigurationError(
                f"BRIDGE_DICOMWEB_SERIES_QUERY=paged: {self._base}/series answers series without their "
                "StudyInstanceUID, so they cannot be placed; set it to per-study"
            )
        if unplaced:
            logger.warning(
                "%s/series: %d series rows without StudyInstanceUID; their studies are asked one by one",
                self._base,
                unplaced,
            )

    def end_sweep(self) -> None:
        """Remove the run's sweep, if any (from then on series are asked per study)."""
        if self._sweep is not None:
            self._sweep.close()
            self._sweep = None

    @property
    def sweeping(self) -> bool:
        """Whether series are answered from a sweep (the caller checks each study's counts)."""
        return self._sweep is not None

    @property
    def series_query_used(self) -> str:
        """How series are being asked for: ``list``, ``per-study``, ``paged``, or ``undecided``."""
        if self.series_query is SeriesQuery.PAGED:
            return SeriesQuery.PAGED.value
        if self.list_matching is None:
            return "undecided"
        return SeriesQuery.LIST.value if self.list_matching else SeriesQuery.PER_STUDY.value


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
