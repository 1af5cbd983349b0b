"""Wiring: builds the HTTP clients, store and worker from the settings, and closes them."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from functools import partial

import httpx

from bridge.config import Settings, SourceSettings
from bridge.dicomweb.client import DicomwebClient
from bridge.dicomweb.orthanc import OrthancChangeFeed
from bridge.fhir.client import FhirClient
from bridge.http import RetryPolicy
from bridge.limits import DicomwebLimits, fhir_limit
from bridge.mapping.context import MappingContext
from bridge.mapping.tables import BUNDLED_MAPPINGS, load_tables
from bridge.mapping.validate import load_models
from bridge.resolve.links import ViewerTemplate
from bridge.resolve.viewers import configure_viewers, load_viewer_table
from bridge.state.store import SqlStore
from bridge.sync.changes import ChangeSource, FeedChangeSource, QidoWindowSource
from bridge.sync.freshness import measured
from bridge.sync.link import Linker
from bridge.sync.policy import ChangeSourceKind, DosePolicy, MissingModality
from bridge.sync.publisher import Publisher
from bridge.sync.pushes import PushDrainer
from bridge.sync.scheduler import SyncScheduler, trigger
from bridge.sync.worker import SyncWorker
from bridge.upstream import http_client, retry_policy


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


def configured_viewers(settings: Settings) -> dict[str, ViewerTemplate]:
    """The viewers the settings offer (ConfigurationError naming the setting when they cannot)."""
    return configure_viewers(
        load_viewer_table(settings.mappings_dir) if settings.mappings_dir else load_viewer_table(),
        enabled=settings.viewers,
        default=settings.default_viewer,
        base_urls=settings.viewer_urls,
        templates=settings.viewer_templates,
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
        )

    def scheduler(self) -> SyncScheduler:
        """The scheduler of incremental cycles and reconciliation sweeps, per the settings."""
        s = self.settings
        return SyncScheduler(
            self.worker,
            self.changes,
            self.store,
            self.source.name,
            incremental=trigger(s.sync.interval, s.sync.cron),
            reconcile=trigger(s.reconcile.interval, s.reconcile.cron),
        )


def push_drainer(runtimes: Sequence[Runtime]) -> PushDrainer:
    """The drainer of the push queue: each pushed study is synced in every source, as on demand."""
    settings = runtimes[0].settings

    async def sync(study_uid: str, received: float) -> bool:
        done = True
        for runtime in runtimes:
            run = partial(runtime.new_worker().run_studies, [study_uid], kind="push")
            report = await measured(runtime.store, runtime.source.name, "push", {study_uid: received}, run)
            done = done and report.status != "failed"
        return done

    return PushDrainer(
        runtimes[0].store, sync, poll=settings.push.poll, concurrency=settings.sync.concurrency
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
        return FeedChangeSource(feed, store, source.name)
    return QidoWindowSource(source.poll_window_days)


@dataclass
class Clients:
    """The two upstreams' clients for one source, open (the archive's raw HTTP client too)."""

    dicomweb: DicomwebClient
    fhir: FhirClient
    dicomweb_http: httpx.AsyncClient
    dicomweb_policy: RetryPolicy  # the archive's, with its circuit breaker, shared by its feed


@asynccontextmanager
async def open_clients(settings: Settings, source: SourceSettings) -> AsyncIterator[Clients]:
    """Open the archive's and the FHIR server's clients for one source; closes them on exit."""
    # httpx logs full URLs at INFO, and query strings can carry patient identifiers.
    logging.getLogger("httpx").setLevel(logging.WARNING)
    limits = httpx.Limits(max_connections=settings.sync.concurrency * 2 + 4)
    policy = retry_policy(settings, "dicomweb")  # each upstream has its own circuit breaker
    fhir_policy = retry_policy(settings, "fhir")
    async with (
        http_client(settings, source.dicomweb, "dicomweb", limits=limits) as dicomweb_http,
        http_client(settings, settings.fhir, "fhir", limits=limits) as fhir_http,
    ):
        dicomweb = DicomwebClient(
            dicomweb_http,
            source.dicomweb.base,
            policy=policy,
            page_size=source.qido_page_size,
            limits=DicomwebLimits.from_settings(source.dicomweb, settings),
            series_query=source.dicomweb.series_query,
            series_list_size=source.dicomweb.series_list_size,
            series_page_size=source.dicomweb.series_page_size,
        )
        fhir = FhirClient(fhir_http, settings.fhir.base, policy=fhir_policy, limit=fhir_limit(settings))
        yield Clients(dicomweb, fhir, dicomweb_http, policy)


@asynccontextmanager
async def open_runtime(settings: Settings, source: SourceSettings | None = None) -> AsyncIterator[Runtime]:
    """Open clients and store for one source (by default the first); closes them on exit."""
    if source is None:
        source = settings.each_source()[0]
    ctx = mapping_context(settings, source)
    load_models()
    store = SqlStore(settings.state_url)
    try:
        async with open_clients(settings, source) as clients:
            changes = change_source(
                source, clients.dicomweb_http, store, clients.dicomweb_policy, clients.dicomweb.limits
            )
            runtime = Runtime(settings, source, ctx, store, clients.dicomweb, clients.fhir, changes)
            runtime.worker = runtime.new_worker(settings.sync.concurrency)
            yield runtime
    finally:
        store.close()
