"""Wiring: builds the HTTP clients, store and worker from the settings, and closes them."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Mapping, Sequence
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass, field
from functools import partial
from typing import TYPE_CHECKING

import httpx

from bridge.config import Settings, SourceSettings
from bridge.dicomweb.client import DicomwebClient
from bridge.dicomweb.limits import DicomwebLimits
from bridge.dicomweb.orthanc import OrthancChangeFeed
from bridge.errors import UpstreamError
from bridge.fhir.client import FhirClient, fhir_limit
from bridge.mapping.context import MappingContext
from bridge.mapping.tables import BUNDLED_MAPPINGS, load_tables
from bridge.state.store import SqlStore
from bridge.sync.changes import ChangeSource, FeedChangeSource, QidoWindowSource
from bridge.sync.freshness import measured
from bridge.sync.link import Linker
from bridge.sync.policy import ChangeSourceKind, DosePolicy, MissingModality
from bridge.sync.publisher import Publisher
from bridge.sync.pushes import PushDrainer
from bridge.sync.worker import SyncWorker
from bridge.upstream.client import http_client, retry_policy
from bridge.upstream.retry import RetryPolicy

if TYPE_CHECKING:
    from bridge.sync.scheduler import SyncScheduler


def mapping_context(settings: Settings, source: SourceSettings) -> MappingContext:
    """The mapping's inputs for one source (tables loaded and validated here)."""
    return MappingContext(
        source_name=source.name,
        public_base=source.dicomweb.public_base,
        tables=load_tables(settings.mappings_dir or BUNDLED_MAPPINGS),
        patient_system=source.patient_identifier_system,
        patient_issuer_systems=dict(source.patient_issuer_systems),
        unmapped_issuer=source.unmapped_issuer,
        missing_modality=None if source.missing_modality is MissingModality.PARK else "OT",
        accession_system=source.accession_identifier_system,
        accession_issuer_systems=dict(source.accession_issuer_systems),
        endpoint_system=settings.endpoint_identifier_system,
        timezone=source.dicom_timezone,
        include_instances=source.include_instances,
        max_instances=source.max_instances,
        dose_observations=source.dose is DosePolicy.OBSERVATION,
    )


@dataclass
class Runtime:
    """Everything a sync needs, open."""

    settings: Settings
    source: SourceSettings
    ctx: MappingContext
    store: SqlStore
    dicomweb: DicomwebClient
    fhir: FhirClient
    changes: ChangeSource
    worker: SyncWorker = field(init=False)  # the scheduled one; see new_worker

    def new_worker(self, concurrency: int = 1) -> SyncWorker:
        """A worker with a Publisher of its own, sharing the clients and the store.

        The scheduled worker is one; an on-demand sync takes another, so its counters and
        Patient links never mix with those of a cycle running at the same time.
        """
        s, source = self.settings, self.source
        linker = Linker(
            self.fhir,
            self.ctx,
            patient_policy=source.patient_policy,
            order_policy=s.order_policy,
            write_strategy=s.write_strategy,
            demographics=s.demographics_check,
            store=self.store,
        )
        publisher = Publisher(
            self.fhir,
            self.store,
            self.ctx,
            write_strategy=s.write_strategy,
            batch_size=s.fhir.batch_size,
            server=s.fhir.base,
        )
        return SyncWorker(
            self.dicomweb,
            linker,
            publisher,
            self.store,
            self.ctx,
            concurrency=concurrency,
            delete_policy=source.delete_policy,
            delete_max_fraction=s.delete_max_fraction,
            read_instance_header=source.read_instance_header,
            merge_check_interval=s.sync.merge_check_interval,
        )

    def scheduler(self) -> SyncScheduler:
        """The scheduler of incremental cycles and reconciliation sweeps, per the settings."""
        from bridge.sync.scheduler import SyncScheduler, trigger  # APScheduler: `bridge worker` only

        s = self.settings
        return SyncScheduler(
            self.worker,
            self.changes,
            self.store,
            self.source.name,
            incremental=trigger(s.sync.interval, s.sync.cron),
            reconcile=trigger(s.reconcile.interval, s.reconcile.cron),
        )


# A drain syncs up to this many pages of waiting pushes in one run: within a run, one page is
# written while the next is read and prepared (as a full sync's pages are), where a run per page
# left the archive idle during every page's writes and the FHIR server idle during every read.
PUSH_PAGES_PER_RUN = 5


def push_drainer(runtimes: Sequence[Runtime]) -> PushDrainer:
    """The drainer of the push queue: pushed studies are synced in pages, several a run, in every source."""
    settings = runtimes[0].settings

    async def sync(pushed: Mapping[str, float]) -> bool:
        uids = list(pushed)
        for runtime in runtimes:
            worker = runtime.new_worker(concurrency=settings.sync.concurrency)
            run = partial(worker.run_studies, uids, kind="push", per_page=runtime.source.qido_page_size)
            report = await measured(runtime.store, runtime.source.name, "push", pushed, run)
            if report.status == "failed":
                return False
        return True

    async def reachable() -> bool:
        for runtime in runtimes:
            if not await runtime.dicomweb.reachable():
                return False
            try:
                await runtime.fhir.capabilities()
            except UpstreamError:
                return False
        return True

    return PushDrainer(
        runtimes[0].store,
        sync,
        reachable=reachable,
        poll=settings.push.poll,
        page=PUSH_PAGES_PER_RUN * min(r.source.qido_page_size for r in runtimes),
        concurrency=settings.sync.concurrency,
    )


def change_source(
    source: SourceSettings,
    client: httpx.AsyncClient,
    store: SqlStore,
    policy: RetryPolicy,
    limits: DicomwebLimits,
) -> ChangeSource:
    """The incremental change source a source's settings choose (``limits``: the archive's bounds)."""
    if source.change_source is ChangeSourceKind.ORTHANC and source.orthanc_url is not None:
        feed = OrthancChangeFeed(client, str(source.orthanc_url), policy=policy, limit=limits.page())
        return FeedChangeSource(feed, store, source.name, per_page=source.qido_page_size)
    return QidoWindowSource(source.poll_window_days)


@dataclass
class SourceClients:
    """One source's archive client, open (its raw HTTP client and retry policy too, shared by its feed)."""

    source: SourceSettings
    dicomweb: DicomwebClient
    http: httpx.AsyncClient
    policy: RetryPolicy  # the archive's, with its circuit breaker


@dataclass
class Connections:
    """One client per upstream, open: the FHIR server's, and each source's archive's (in source order).

    Everything that talks to an upstream in one process (the sync, the resolver, the gateway, the
    record pages, readiness, ``bridge check``) borrows these, so each upstream has one connection
    pool, one credential (one token fetched and renewed) and one circuit breaker.
    """

    settings: Settings
    fhir: FhirClient  # the sync's: the full retry policy
    fhir_http: httpx.AsyncClient
    sources: list[SourceClients]

    def of(self, source: SourceSettings) -> SourceClients:
        """The clients of ``source`` (by name)."""
        return next(each for each in self.sources if each.source.name == source.name)


def pool_size(settings: Settings) -> int:
    """Connections a sync keeps per upstream: two per study in flight, and a few for the rest."""
    return settings.sync.concurrency * 2 + 4


@asynccontextmanager
async def open_connections(
    settings: Settings,
    sources: Sequence[SourceSettings] | None = None,
    *,
    max_connections: int | None = None,
    transport: httpx.AsyncBaseTransport | None = None,
) -> AsyncIterator[Connections]:
    """Open the FHIR server's client and one client per source's archive (default: every source).

    ``max_connections`` sizes each pool (default: a sync's); ``transport`` replaces the network
    (tests), each upstream's credentials still applying. Everything is closed on exit.
    """
    # httpx logs full URLs at INFO, and query strings can carry patient identifiers.
    logging.getLogger("httpx").setLevel(logging.WARNING)
    chosen = list(settings.each_source() if sources is None else sources)
    size = max_connections or pool_size(settings)
    limits = httpx.Limits(max_connections=size, max_keepalive_connections=size)
    # the sources' syncs may run at once, and all write to the one FHIR server
    fhir_size = max_connections or size * len(chosen)
    fhir_limits = httpx.Limits(max_connections=fhir_size, max_keepalive_connections=fhir_size)
    async with AsyncExitStack() as stack:
        fhir_http = await stack.enter_async_context(
            http_client(settings, settings.fhir, "fhir", limits=fhir_limits, transport=transport)
        )
        fhir = FhirClient(
            fhir_http, settings.fhir.base, policy=retry_policy(settings, "fhir"), limit=fhir_limit(settings)
        )
        opened = []
        for source in chosen:
            http = await stack.enter_async_context(
                http_client(settings, source.dicomweb, "dicomweb", limits=limits, transport=transport)
            )
            policy = retry_policy(settings, "dicomweb")  # each upstream has its own circuit breaker
            dicomweb = DicomwebClient(
                http,
                source.dicomweb.base,
                policy=policy,
                page_size=source.qido_page_size,
                limits=DicomwebLimits.from_settings(source.dicomweb, settings),
                series_query=source.dicomweb.series_query,
                series_list_size=source.dicomweb.series_list_size,
                series_page_size=source.dicomweb.series_page_size,
            )
            opened.append(SourceClients(source, dicomweb, http, policy))
        yield Connections(settings, fhir, fhir_http, opened)


def build_runtime(
    settings: Settings,
    clients: SourceClients,
    fhir: FhirClient,
    store: SqlStore,
    ctx: MappingContext | None = None,
) -> Runtime:
    """The runtime of one source over clients and a store opened elsewhere (which close them)."""
    source = clients.source
    ctx = ctx or mapping_context(settings, source)
    changes = change_source(source, clients.http, store, clients.policy, clients.dicomweb.limits)
    runtime = Runtime(settings, source, ctx, store, clients.dicomweb, fhir, changes)
    runtime.worker = runtime.new_worker(settings.sync.concurrency)
    return runtime


@asynccontextmanager
async def open_runtimes(
    settings: Settings, sources: Sequence[SourceSettings] | None = None
) -> AsyncIterator[list[Runtime]]:
    """Open one store and one client per upstream, and a runtime per source over them (default: every source).

    The sources share the FHIR server's client and the store; each has its own archive client.
    Everything is closed on exit.
    """
    chosen = list(settings.each_source() if sources is None else sources)
    contexts = [mapping_context(settings, source) for source in chosen]  # bad tables fail before connecting
    store = SqlStore(settings.state_url)
    try:
        async with open_connections(settings, chosen) as connections:
            yield [
                build_runtime(settings, clients, connections.fhir, store, ctx)
                for clients, ctx in zip(connections.sources, contexts, strict=True)
            ]
    finally:
        store.close()


@asynccontextmanager
async def open_runtime(settings: Settings, source: SourceSettings | None = None) -> AsyncIterator[Runtime]:
    """Open clients and store for one source (by default the first); closes them on exit."""
    async with open_runtimes(settings, [source or settings.each_source()[0]]) as runtimes:
        yield runtimes[0]
