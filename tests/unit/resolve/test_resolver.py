"""The resolver against an in-memory FHIR server: lookups, the TTL cache, what is never fetched."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import httpx
import pytest

from bridge.errors import (
    InvalidLookupError,
    NoUsableEndpointError,
    StudyNotFoundError,
    UpstreamUnavailableError,
)
from bridge.fhir.client import FhirClient
from bridge.mapping.context import resource_id
from bridge.resolve.links import StudyLocation
from bridge.resolve.resolver import ON_LOOP_SERIES, Answers, Resolver, ResolverConfig
from bridge.upstream.retry import RetryPolicy
from tests.unit.resolve.fake_fhir import (
    DICOMWEB_BASE,
    FHIR_BASE,
    STUDY_UID,
    FakeFhir,
    endpoint,
    imaging_study,
)

pytestmark = pytest.mark.anyio


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def fake() -> FakeFhir:
    server = FakeFhir()
    server.add(imaging_study(), endpoint())
    return server


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
async def resolver(fake: FakeFhir, clock: Clock) -> AsyncIterator[Resolver]:
    async with httpx.AsyncClient(transport=fake.transport()) as http:
        config = ResolverConfig(
            fhir_base=FHIR_BASE,
            dicomweb_bases=(DICOMWEB_BASE,),
            source_name="src",
            accession_issuer_systems={"HOSP-A-RIS": "urn:oid:1.2.3"},
            cache_ttl=30,
        )
        yield Resolver(FhirClient(http, FHIR_BASE, policy=RetryPolicy(retries=0)), config, clock=clock)


async def test_every_lookup_finds_the_same_study(resolver: Resolver) -> None:
    by_id = await resolver.by_id("is1")
    assert by_id.study_uid == STUDY_UID and by_id.base == DICOMWEB_BASE
    assert await resolver.by_study_uid(STUDY_UID) == by_id
    assert await resolver.by_accession("A1001") == by_id
    assert await resolver.by_reference("ImagingStudy/is1") == by_id
    assert await resolver.by_reference(f"{FHIR_BASE}/ImagingStudy/is1/_history/3") == by_id


async def test_cache_serves_repeats_until_the_ttl_passes(
    resolver: Resolver, fake: FakeFhir, clock: Clock
) -> None:
    await resolver.by_id("is1")
    await resolver.by_id("is1")
    assert fake.reads("ImagingStudy") == 1
    assert fake.reads("Endpoint") == 1
    clock.now += 31
    await resolver.by_id("is1")
    assert fake.reads("ImagingStudy") == 2


async def test_a_changed_endpoint_is_seen_after_the_ttl(
    resolver: Resolver, fake: FakeFhir, clock: Clock
) -> None:
    await resolver.by_id("is1")
    fake.add(endpoint(address="https://evil.example.com/x"))
    clock.now += 31
    with pytest.raises(NoUsableEndpointError):
        await resolver.by_id("is1")


async def test_study_uid_uses_the_deterministic_id_before_searching(
    resolver: Resolver, fake: FakeFhir
) -> None:
    own_id = resource_id("ImagingStudy", "src", STUDY_UID)
    fake.add(imaging_study(own_id))
    located = await resolver.by_study_uid(STUDY_UID)
    assert located.fhir_id == own_id
    assert fake.searches("ImagingStudy") == 0


async def test_a_deterministic_id_holding_another_study_is_not_trusted(
    resolver: Resolver, fake: FakeFhir
) -> None:
    fake.add(imaging_study(resource_id("ImagingStudy", "src", STUDY_UID), uid="1.2.3.4"))
    located = await resolver.by_study_uid(STUDY_UID)
    assert located.fhir_id == "is1"


async def test_accession_with_issuer_and_ambiguity(resolver: Resolver, fake: FakeFhir) -> None:
    fake.add(imaging_study("is2", "1.2.3.5", accession_system="urn:oid:1.2.3"))
    with pytest.raises(NoUsableEndpointError, match="2 different studies"):
        await resolver.by_accession("A1001")
    assert (await resolver.by_accession("A1001", "HOSP-A-RIS")).fhir_id == "is2"
    assert (await resolver.by_accession("A1001", "1.2.3")).fhir_id == "is2"
    with pytest.raises(StudyNotFoundError):
        await resolver.by_accession("A1001", "urn:oid:9.9")
    with pytest.raises(InvalidLookupError):
        await resolver.by_accession("A1001", "not a uri")


@pytest.mark.parametrize(
    "reference",
    [
        "Patient/p1",
        "ImagingStudy/",
        "ImagingStudy/a/b",
        "https://other.example.org/R4/ImagingStudy/is1",
        "ImagingStudy/is1?x=1",
        "ImagingStudy/" + "x" * 65,
    ],
)
async def test_bad_references_are_refused_without_a_request(
    resolver: Resolver, fake: FakeFhir, reference: str
) -> None:
    with pytest.raises(InvalidLookupError):
        await resolver.by_reference(reference)
    assert fake.requests == []


async def test_endpoint_on_another_fhir_server_is_never_fetched(resolver: Resolver, fake: FakeFhir) -> None:
    fake.add(imaging_study("is3", "1.2.3.6", endpoints=["https://elsewhere.example.org/Endpoint/x"]))
    with pytest.raises(NoUsableEndpointError):
        await resolver.by_id("is3")
    assert all(r.url.host == "fhir.example.org" for r in fake.requests)


async def test_unknown_and_malformed(resolver: Resolver) -> None:
    with pytest.raises(StudyNotFoundError):
        await resolver.by_id("nope")
    with pytest.raises(InvalidLookupError):
        await resolver.by_study_uid("1.2.abc")
    with pytest.raises(InvalidLookupError):
        await resolver.by_id("a b")


async def test_fhir_down_is_an_upstream_error_and_is_not_cached(resolver: Resolver, fake: FakeFhir) -> None:
    fake.down = True
    with pytest.raises(UpstreamUnavailableError):
        await resolver.by_id("is1")
    fake.down = False
    assert (await resolver.by_id("is1")).fhir_id == "is1"


@pytest.mark.parametrize("lookup", ["accession", "study-uid"])
async def test_a_search_takes_the_endpoint_it_included(
    resolver: Resolver, fake: FakeFhir, lookup: str
) -> None:
    # No deterministic id here (is1): a Study UID lookup reads the guessed id, then searches.
    if lookup == "accession":
        located = await resolver.by_accession("A1001")
    else:
        located = await resolver.by_study_uid(STUDY_UID)
    assert located.fhir_id == "is1" and located.base == DICOMWEB_BASE
    assert (fake.searches("ImagingStudy"), fake.reads("Endpoint")) == (1, 0)
    searches = [r for r in fake.requests if r.url.path.endswith("/ImagingStudy")]
    assert searches[0].url.params.get("_include") == "ImagingStudy:endpoint"


async def test_an_included_endpoint_is_cached_like_a_read_one(resolver: Resolver, fake: FakeFhir) -> None:
    fake.add(imaging_study("is2", "1.2.3.8", accession="A2002"))
    await resolver.by_accession("A1001")
    assert (await resolver.by_id("is2")).base == DICOMWEB_BASE
    assert fake.reads("Endpoint") == 0


async def test_a_server_that_ignores_include_gets_the_endpoint_read(
    resolver: Resolver, fake: FakeFhir
) -> None:
    fake.ignores_include = True
    located = await resolver.by_accession("A1001")
    assert located.base == DICOMWEB_BASE
    assert (fake.searches("ImagingStudy"), fake.reads("Endpoint")) == (1, 1)


async def test_a_server_that_refuses_include_is_searched_without_it_from_then_on(
    resolver: Resolver, fake: FakeFhir
) -> None:
    fake.refuses_include = True
    first = await resolver.by_accession("A1001")
    resolver.studies.clear()
    again = await resolver.by_accession("A1001")
    assert first.base == again.base == DICOMWEB_BASE
    includes = [r.url.params.get("_include") for r in fake.requests if r.url.path.endswith("/ImagingStudy")]
    assert includes == ["ImagingStudy:endpoint", None, None]  # refused once, then never asked again


async def test_only_the_endpoint_the_study_references_is_taken_from_an_include(
    resolver: Resolver, fake: FakeFhir
) -> None:
    evil = "https://evil.example.com/dicom-web"
    fake.ignores_include = True  # the real Endpoint/ep1 is not included: only these are
    fake.extra_included = [
        {"resource": endpoint("ep2", address=evil), "search": {"mode": "include"}},
        {
            "resource": {**endpoint("ep1", address=evil), "resourceType": "Device"},
            "search": {"mode": "include"},
        },
        {"resource": endpoint("ep1", address=evil), "search": {"mode": "match"}},
        {"resource": endpoint("ep1", address=evil)},  # no search mode: a match, not an include
    ]
    located = await resolver.by_accession("A1001")
    assert located.base == DICOMWEB_BASE
    assert fake.reads("Endpoint") == 1


async def test_an_included_endpoint_with_a_foreign_address_is_still_refused(
    resolver: Resolver, fake: FakeFhir
) -> None:
    fake.add(endpoint(address="https://evil.example.com/dicom-web"))
    with pytest.raises(NoUsableEndpointError):
        await resolver.by_accession("A1001")
    assert fake.reads("Endpoint") == 0


class CountingExecutor(ThreadPoolExecutor):
    """The loop's default executor (where asyncio.to_thread runs work), counting what it is given."""

    def __init__(self) -> None:
        super().__init__(max_workers=1)
        self.submitted = 0

    def submit(self, fn: Callable[..., Any], /, *args: Any, **kwargs: Any) -> Future[Any]:
        self.submitted += 1
        return super().submit(fn, *args, **kwargs)


@pytest.fixture
def executor() -> Iterator[CountingExecutor]:
    pool = CountingExecutor()
    yield pool
    pool.shutdown(wait=True)


def _series(count: int) -> list[dict[str, Any]]:
    return [
        {"uid": f"{STUDY_UID}.{n}", "number": n, "modality": {"code": "CT"}, "numberOfInstances": 1}
        for n in range(1, count + 1)
    ]


@pytest.mark.parametrize(("series", "hops"), [(3, 0), (ON_LOOP_SERIES, 0), (ON_LOOP_SERIES + 1, 1)])
async def test_only_a_large_study_is_located_in_a_worker_thread(
    resolver: Resolver, fake: FakeFhir, executor: CountingExecutor, series: int, hops: int
) -> None:
    asyncio.get_running_loop().set_default_executor(executor)
    fake.add(imaging_study("big", "1.2.3.7", series=_series(series)))
    located = await resolver.by_id("big")
    assert len(located.series) == series
    assert all(s.base == DICOMWEB_BASE for s in located.series)
    assert executor.submitted == hops


def _location(fhir_id: str = "is1") -> StudyLocation:
    return StudyLocation(fhir_id=fhir_id, study_uid="1.2.3", base="https://pacs.example.org/dicom-web")


def test_an_answer_is_served_only_for_the_very_location_it_was_made_from() -> None:
    answers = Answers(10)
    first = _location()
    answers.put(first, (0, 1000), b"first")
    assert answers.get(first, (0, 1000)) == b"first"
    assert answers.get(first, (0, 5)) is None  # another page
    # the same study loaded again (TTL over, or changed on the server): an equal but new location
    again = _location()
    assert again == first
    assert answers.get(again, (0, 1000)) is None


def test_answers_are_bounded_by_count_and_by_bytes() -> None:
    answers = Answers(2, max_bytes=10)
    a, b, c = _location("a"), _location("b"), _location("c")
    answers.put(a, 0, b"aaaa")
    answers.put(b, 0, b"bbbb")
    answers.put(c, 0, b"cccc")  # a third entry: the oldest goes
    assert (answers.get(a, 0), answers.get(b, 0), answers.get(c, 0)) == (None, b"bbbb", b"cccc")
    answers.put(a, 0, b"aaaaaaaa")  # over the 10 bytes with any other: the rest go
    assert (answers.get(b, 0), answers.get(c, 0), answers.get(a, 0)) == (None, None, b"aaaaaaaa")
    answers.put(b, 0, b"x" * 11)  # alone over the budget: not kept, and nothing else lost
    assert (answers.get(b, 0), answers.get(a, 0)) == (None, b"aaaaaaaa")
    assert answers.bytes == 8


def test_nothing_is_kept_when_the_resolver_caches_nothing() -> None:
    answers = Answers(0)
    location = _location()
    answers.put(location, 0, b"x")
    assert answers.get(location, 0) is None


async def test_callers_asking_at_once_for_an_answer_not_kept_share_one_making() -> None:
    answers = Answers(10)
    location = _location()
    made = 0
    gate = asyncio.Event()

    async def make() -> bytes:
        nonlocal made
        made += 1
        await gate.wait()
        return b"page"

    callers = [asyncio.ensure_future(answers.get_or_make(location, (0, 1000), make)) for _ in range(10)]
    await asyncio.sleep(0)
    callers[0].cancel()  # a caller that leaves does not stop the making for the others
    gate.set()
    results = await asyncio.gather(*callers[1:])
    assert made == 1 and results == [b"page"] * 9
    assert answers.get(location, (0, 1000)) == b"page"  # kept for the next caller
    assert await answers.get_or_make(location, (0, 1000), make) == b"page" and made == 1


async def test_a_making_that_fails_fails_every_waiting_caller_and_is_not_kept() -> None:
    answers = Answers(10)
    location = _location()
    attempts = 0

    async def make() -> bytes:
        nonlocal attempts
        attempts += 1
        await asyncio.sleep(0)
        if attempts == 1:
            raise RuntimeError("the page could not be made")
        return b"page"

    results = await asyncio.gather(
        *(answers.get_or_make(location, 0, make) for _ in range(3)), return_exceptions=True
    )
    assert attempts == 1 and all(isinstance(r, RuntimeError) for r in results)
    assert answers.get(location, 0) is None
    assert await answers.get_or_make(location, 0, make) == b"page" and attempts == 2  # made anew
