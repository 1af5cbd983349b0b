"""The resolver: reads ImagingStudy and Endpoint from the FHIR server, behind a short TTL cache.

The FHIR server is the source of truth. The state store is not consulted: a stale row there
could name an ImagingStudy that has since moved or changed its endpoint, and the cache's TTL
already bounds how stale an answer can be.
"""

from __future__ import annotations

import asyncio
import logging
import re
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Hashable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Generic, Literal, TypeVar

from bridge.errors import (
    FatalUpstreamError,
    InvalidLookupError,
    NoUsableEndpointError,
    StudyNotFoundError,
    UpstreamLimitError,
)
from bridge.fhir.client import FhirClient
from bridge.mapping.context import DICOM_UID_SYSTEM, resource_id
from bridge.mapping.identifiers import escape_token, identifier_search
from bridge.mapping.uid import is_uid
from bridge.metrics import RESOLVER_LOOKUPS
from bridge.resolve.links import StudyLocation, check_fhir_id, locate, normalize_base
from bridge.resolve.published import FHIR_ID, endpoint_references, has_accession, is_tagged, study_uid_of

logger = logging.getLogger(__name__)

T = TypeVar("T")
_URI = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*:\S+$")
_SEARCH_COUNT = "20"
_INCLUDE_ENDPOINT = "ImagingStudy:endpoint"  # FHIR R4 search: the study's Endpoints in the same answer
# Up to this many series a study is located on the event loop: about 2 µs a series here, less
# than a worker thread's hop (and its fight for the interpreter lock) would cost. A larger one is
# located in a worker thread, so the loop keeps serving /healthz meanwhile (the links route builds
# a large page of links in a thread for the same reason, from the same threshold).
ON_LOOP_SERIES = 64
# What the serialised answers kept beside the cached studies may take of memory at most.
ANSWERS_MAX_BYTES = 64 * 1024 * 1024


class TtlCache(Generic[T]):
    """A small LRU cache whose entries expire; concurrent misses of one key share one load."""

    def __init__(self, ttl: float, size: int, clock: Callable[[], float] = time.monotonic) -> None:
        self.ttl = ttl
        self.size = size
        self._clock = clock
        self._entries: OrderedDict[Hashable, tuple[float, T]] = OrderedDict()
        self._loading: dict[Hashable, asyncio.Future[T]] = {}
        self.hits = 0
        self.misses = 0

    def get(self, key: Hashable) -> T | None:
        """The live value under ``key``, if any."""
        entry = self._entries.get(key)
        if entry is None:
            return None
        expires, value = entry
        if expires <= self._clock():
            del self._entries[key]
            return None
        self._entries.move_to_end(key)
        return value

    def put(self, key: Hashable, value: T) -> None:
        """Remember ``value`` for the TTL (no-op when the TTL is 0)."""
        if self.ttl <= 0:
            return
        self._entries[key] = (self._clock() + self.ttl, value)
        self._entries.move_to_end(key)
        while len(self._entries) > self.size:
            self._entries.popitem(last=False)

    def clear(self) -> None:
        """Forget everything."""
        self._entries.clear()

    async def get_or_load(self, key: Hashable, load: Callable[[], Awaitable[T]]) -> T:
        """The cached value, or ``load()``'s (shared with concurrent callers, cached on success)."""
        value = self.get(key)
        if value is not None:
            self.hits += 1
            return value
        pending = self._loading.get(key)
        if pending is not None:
            return await asyncio.shield(pending)
        self.misses += 1
        future: asyncio.Future[T] = asyncio.get_running_loop().create_future()
        self._loading[key] = future
        try:
            value = await load()
        except asyncio.CancelledError:
            future.cancel()
            raise
        except BaseException as exc:
            future.set_exception(exc)
            future.exception()  # retrieved: waiters re-raise it; nobody else needs to
            raise
        else:
            future.set_result(value)
            self.put(key, value)
            return value
        finally:
            del self._loading[key]


@dataclass(frozen=True)
class ResolverConfig:
    """What the resolver needs from the settings, as plain data."""

    fhir_base: str
    dicomweb_bases: tuple[str, ...]
    source_name: str
    deterministic_ids: bool = True
    accession_system: str | None = None
    accession_issuer_systems: Mapping[str, str] | None = None
    cache_ttl: float = 30.0
    cache_size: int = 10000

    def __post_init__(self) -> None:
        bases = tuple(b for b in (normalize_base(u) for u in self.dicomweb_bases) if b)
        object.__setattr__(self, "dicomweb_bases", tuple(dict.fromkeys(bases)))


class Answers:
    """Answers made from a located study (a links page's JSON), kept while that location is current.

    Keyed by what the answer depends on besides the study (a page's offset and size) and checked
    by the location's identity: a study loaded again (its TTL over, or changed on the server) is a
    new ``StudyLocation`` object, so its answers are made anew and never outlive the study's entry.
    Bounded by count and by bytes, the least recently used going first.
    """

    def __init__(self, size: int, max_bytes: int = ANSWERS_MAX_BYTES) -> None:
        self.size = size
        self.max_bytes = max_bytes
        self.bytes = 0
        self._entries: OrderedDict[Hashable, tuple[StudyLocation, bytes]] = OrderedDict()
        self._making: dict[Hashable, tuple[StudyLocation, asyncio.Task[bytes]]] = {}

    async def get_or_make(
        self, location: StudyLocation, key: Hashable, make: Callable[[], Awaitable[bytes]]
    ) -> bytes:
        """The answer kept for ``location`` under ``key``, else made once however many ask at once.

        Callers asking while it is made wait for that one making (a large study's page is CPU
        work in a worker thread: ten at once, each holding the interpreter in turn, held up the
        event loop, and /healthz with it, for over 100 ms). A caller that leaves does not stop it.
        """
        body = self.get(location, key)
        if body is not None:
            return body
        full = (location.fhir_id, key)
        pending = self._making.get(full)
        if pending is None or pending[0] is not location:
            task = asyncio.ensure_future(make())
            pending = self._making[full] = (location, task)

            def done(finished: asyncio.Task[bytes]) -> None:
                if self._making.get(full, (None, None))[1] is finished:
                    del self._making[full]
                if not finished.cancelled() and finished.exception() is None:
                    self.put(location, key, finished.result())

            task.add_done_callback(done)
        return await asyncio.shield(pending[1])

    def get(self, location: StudyLocation, key: Hashable) -> bytes | None:
        """The answer made for this very location under ``key``, if any."""
        full = (location.fhir_id, key)
        entry = self._entries.get(full)
        if entry is None or entry[0] is not location:
            return None
        self._entries.move_to_end(full)
        return entry[1]

    def put(self, location: StudyLocation, key: Hashable, answer: bytes) -> None:
        """Keep ``answer`` beside ``location``; nothing when it alone is over the byte budget."""
        if self.size <= 0 or len(answer) > self.max_bytes:
            return
        entries, full = self._entries, (location.fhir_id, key)
        old = entries.pop(full, None)
        if old is not None:
            self.bytes -= len(old[1])
        entries[full] = (location, answer)
        self.bytes += len(answer)
        while len(entries) > self.size or self.bytes > self.max_bytes:
            self.bytes -= len(entries.popitem(last=False)[1][1])


Endpoints = Mapping[str, dict[str, Any]]  # Endpoint resources by id


def _endpoints_in(included: Sequence[dict[str, Any]]) -> Endpoints:
    """The Endpoints among a search's included resources, by id."""
    return {
        r["id"]: r
        for r in included
        if r.get("resourceType") == "Endpoint" and isinstance(r.get("id"), str) and FHIR_ID.fullmatch(r["id"])
    }


class Resolver:
    """Turns FHIR ids, references, Study Instance UIDs and accession numbers into study locations."""

    def __init__(
        self, fhir: FhirClient, config: ResolverConfig, *, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.fhir = fhir
        self.config = config
        self.studies: TtlCache[StudyLocation] = TtlCache(config.cache_ttl, config.cache_size, clock)
        self.endpoints: TtlCache[dict[str, Any]] = TtlCache(config.cache_ttl, 256, clock)
        # Nothing cached (TTL 0): every lookup makes a new location, so no answer could be reused.
        self.answers = Answers(config.cache_size if config.cache_ttl > 0 else 0)
        self._hits: dict[str, Any] = {}  # the cache-hit series of RESOLVER_LOOKUPS, by kind
        self._fhir_base = normalize_base(config.fhir_base) or config.fhir_base.rstrip("/")
        self._include_refused = False  # the server answered _include with a 400: search without it

    # ---------------------------------------------------------- lookups
    async def by_id(self, fhir_id: str) -> StudyLocation:
        """The study of ImagingStudy/``fhir_id``."""
        check_fhir_id(fhir_id)
        return await self._lookup("id", ("id", fhir_id), lambda: self._load_by_id(fhir_id))

    async def by_study_uid(self, study_uid: str) -> StudyLocation:
        """The study whose ImagingStudy carries this Study Instance UID."""
        if not is_uid(study_uid):
            raise InvalidLookupError("a Study Instance UID is up to 64 digits and dots, e.g. 1.2.840.1234")
        return await self._lookup("uid", ("uid", study_uid), lambda: self._load_by_uid(study_uid))

    async def by_accession(self, accession: str, issuer: str | None = None) -> StudyLocation:
        """The one study with this accession number (in the issuer's system, when given)."""
        if not accession.strip():
            raise InvalidLookupError("the accession number is empty")
        system = self.accession_system(issuer) if issuer is not None else None
        return await self._lookup(
            "accession", ("acsn", system, accession), lambda: self._load_by_accession(accession, system)
        )

    async def by_reference(self, reference: str) -> StudyLocation:
        """The study of a FHIR reference (``ImagingStudy/id``) or an absolute ImagingStudy URL."""
        fhir_id = self.parse_reference(reference)
        return await self._lookup("reference", ("id", fhir_id), lambda: self._load_by_id(fhir_id))

    def cached(self, kind: Literal["id", "uid"], value: str) -> StudyLocation | None:
        """The cached study of ImagingStudy/``value`` (``id``) or Study Instance UID ``value`` (``uid``).

        Neither loads nor counts: a caller that serves it says so with ``count_hit``; one that
        does not leaves the lookup to ``by_id`` / ``by_study_uid``, which count it themselves.
        """
        return self.studies.get((kind, value))

    def count_hit(self, kind: Literal["id", "uid"]) -> None:
        """Count a lookup answered from ``cached``, as ``_lookup`` counts its own."""
        counter = self._hits.get(kind)
        if counter is None:  # a labelled series looked up once: the look-up costs more than the count
            counter = self._hits[kind] = RESOLVER_LOOKUPS.labels(kind, "hit")
        counter.inc()

    async def _lookup(
        self, kind: str, key: Hashable, load: Callable[[], Awaitable[StudyLocation]]
    ) -> StudyLocation:
        cached = self.studies.get(key)
        RESOLVER_LOOKUPS.labels(kind, "hit" if cached is not None else "miss").inc()
        if cached is not None:
            return cached
        return await self.studies.get_or_load(key, load)

    # ---------------------------------------------------------- parsing
    def parse_reference(self, reference: str) -> str:
        """The ImagingStudy id in a relative reference or an absolute URL on the FHIR server."""
        text = reference.strip()
        if "?" in text or "#" in text:
            raise InvalidLookupError("a reference has no query or fragment: ImagingStudy/{id}")
        if "://" in text:
            prefix, found, rest = text.rpartition("/ImagingStudy/")
            if not found or normalize_base(prefix) != self._fhir_base:
                raise InvalidLookupError(
                    "an absolute reference must be an ImagingStudy URL on the configured FHIR server"
                )
            text = "ImagingStudy/" + rest
        parts = text.strip("/").split("/")
        if len(parts) == 4 and parts[2] == "_history":
            parts = parts[:2]  # the current version is the truth; an old one may point elsewhere
        if len(parts) != 2 or parts[0] != "ImagingStudy":
            raise InvalidLookupError("a reference must be ImagingStudy/{id} or its absolute URL")
        if not FHIR_ID.fullmatch(parts[1]):
            raise InvalidLookupError("the reference's id is not a valid FHIR id")
        return parts[1]

    def accession_system(self, issuer: str) -> str:
        """The identifier system of an accession issuer: a configured issuer, an OID or a URI."""
        issuer = issuer.strip()
        mapped = (self.config.accession_issuer_systems or {}).get(issuer)
        if mapped is not None:
            return mapped
        if is_uid(issuer):
            return f"urn:oid:{issuer}"
        if _URI.fullmatch(issuer):
            return issuer
        raise InvalidLookupError(
            "issuer must be a configured issuer (BRIDGE_ACCESSION_ISSUER_SYSTEMS), an OID or a system URI"
        )

    # ---------------------------------------------------------- loading
    async def _load_by_id(self, fhir_id: str) -> StudyLocation:
        # A read, then the Endpoint's read (or the cache's copy), rather than one search by _id
        # with _include: on the Medplum test server that search scans every stored ImagingStudy
        # (10 ms at 3,000 against 1.5 ms for both reads), and under benchmarks/resolver.py it was
        # slower too (docs/performance.md, "Resolver hot path").
        resource = await self.fhir.read("ImagingStudy", fhir_id)
        if resource is None:
            raise StudyNotFoundError(f"no ImagingStudy/{fhir_id}")
        return await self._locate(resource, {})

    async def _load_by_uid(self, study_uid: str) -> StudyLocation:
        if self.config.deterministic_ids:
            # Where the bridge writes with client ids, the id follows from the UID: one read
            # instead of a search. The identifier is checked, so a mismatch only costs the search.
            guess = resource_id("ImagingStudy", self.config.source_name, study_uid)
            resource = await self.fhir.read("ImagingStudy", guess)
            if resource is not None and study_uid_of(resource) == study_uid:
                return await self._locate(resource, {})
        found, with_found = await self._search_with_endpoints(
            {"identifier": f"{DICOM_UID_SYSTEM}|urn:oid:{study_uid}", "_count": _SEARCH_COUNT}
        )
        matches = [r for r in found if study_uid_of(r) == study_uid]
        if not matches:
            raise StudyNotFoundError(f"no ImagingStudy for Study Instance UID {study_uid}")
        return await self._first_located(
            matches, f"Study Instance UID {study_uid}", with_found
        )

    async def _load_by_accession(self, accession: str, system: str | None) -> StudyLocation:
        if system:
            token = identifier_search({"system": system, "value": accession})
        else:
            token = escape_token(accession)  # any system
        found, included = await self._search_with_endpoints({"identifier": token, "_count": _SEARCH_COUNT})
        matches = [r for r in found if has_accession(r, accession, system)]
        if not matches:
            raise StudyNotFoundError("no ImagingStudy with this accession number")
        studies = {study_uid_of(r) for r in matches}
        if len(studies) > 1:
            raise NoUsableEndpointError(
                f"the accession number matches {len(studies)} different studies; "
                "give the issuer, or resolve by Study Instance UID"
            )
        return await self._first_located(matches, "the accession number", included)

    async def _search_with_endpoints(self, params: dict[str, str]) -> tuple[list[dict[str, Any]], Endpoints]:
        """ImagingStudies matching ``params``, with the Endpoints the server included alongside.

        Most servers ignore an ``_include`` they do not support; one that refuses it (400) is
        searched without it from then on, and the Endpoints are read.
        """
        if not self._include_refused:
            try:
                found, included = await self.fhir.search_including(
                    "ImagingStudy", {**params, "_include": _INCLUDE_ENDPOINT}
                )
                return found, _endpoints_in(included)
            except FatalUpstreamError as exc:
                if exc.status != 400 or isinstance(exc, UpstreamLimitError):
                    raise
                logger.warning("the FHIR server refused _include=%s: searching without it", _INCLUDE_ENDPOINT)
                self._include_refused = True
        return await self.fhir.search("ImagingStudy", params), {}

    async def _first_located(
        self, matches: Sequence[dict[str, Any]], what: str, included: Endpoints
    ) -> StudyLocation:
        # Several ImagingStudies for one study (several sources or writers): prefer this
        # bridge's own, then the lowest id, and take the first that has a usable endpoint.
        ordered = sorted(matches, key=lambda r: (not is_tagged(r, self.config.source_name), str(r.get("id"))))
        first_error: Exception | None = None
        for resource in ordered:
            try:
                return await self._locate(resource, included)
            except (NoUsableEndpointError, StudyNotFoundError) as exc:
                first_error = first_error or exc
        assert first_error is not None
        raise first_error

    async def _locate(self, resource: dict[str, Any], included: Endpoints) -> StudyLocation:
        refs = endpoint_references(resource)
        if len(refs) == 1:  # the usual case: no gather, no tasks
            endpoints = {refs[0]: await self._endpoint(resource, refs[0], included)}
        else:
            found = await asyncio.gather(*(self._endpoint(resource, r, included) for r in refs))
            endpoints = dict(zip(refs, found, strict=True))
        series = resource.get("series")
        if isinstance(series, list) and len(series) > ON_LOOP_SERIES:
            location = await asyncio.to_thread(locate, resource, endpoints, self.config.dicomweb_bases)
        else:
            location = locate(resource, endpoints, self.config.dicomweb_bases)
        # The same study answers its other keys too, for the rest of the TTL.
        self.studies.put(("id", location.fhir_id), location)
        return location

    async def _endpoint(
        self, resource: Mapping[str, Any], reference: str, included: Endpoints
    ) -> dict[str, Any] | None:
        """The Endpoint a reference names, from the configured FHIR server only.

        One the server included with the study (``included``, by id) is taken as read; any other
        is read, or taken from the cache.
        """
        if reference.startswith("#"):
            for contained in resource.get("contained") or []:
                if isinstance(contained, dict) and contained.get("id") == reference[1:]:
                    return contained
            return None
        text = reference
        if "://" in text:
            prefix = self.config.fhir_base.rstrip("/") + "/"
            if not text.startswith(prefix):
                return None  # never fetched: only the configured FHIR server is asked
            text = text[len(prefix) :]
        parts = text.split("/")
        if len(parts) != 2 or parts[0] != "Endpoint" or not FHIR_ID.fullmatch(parts[1]):
            return None
        endpoint_id = parts[1]
        found = included.get(endpoint_id)
        if found is not None:
            self.endpoints.put(endpoint_id, found)
            return found

        async def load() -> dict[str, Any]:
            read = await self.fhir.read("Endpoint", endpoint_id)
            return read if read is not None else {}

        endpoint = await self.endpoints.get_or_load(endpoint_id, load)
        return endpoint or None
