"""Wiring: builds the HTTP clients, store and worker from the settings, and closes them."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field

import httpx

from bridge import __version__
from bridge.config import ChangeSourceKind, Settings
from bridge.dicomweb.client import DicomwebClient
from bridge.dicomweb.orthanc import OrthancChangeFeed
from bridge.fhir.client import FhirClient
from bridge.http import RetryPolicy
from bridge.limits import DicomwebLimits, fhir_limit
from bridge.mapping.context import MappingContext
from bridge.mapping.tables import BUNDLED_MAPPINGS, load_tables
from bridge.state.store import SqlStore
from bridge.sync.changes import ChangeSource, FeedChangeSource, QidoWindowSource
from bridge.sync.publisher import Publisher
from bridge.sync.scheduler import SyncScheduler, trigger
from bridge.sync.worker import SyncWorker
from bridge.upstream import Service, connection_options, retry_policy

USER_AGENT = f"fhir-dicomweb-bridge/{__version__}"


def mapping_context(settings: Settings) -> MappingContext:
    """The mapping's inputs from the settings (tables loaded and validated here)."""
    return MappingContext(
        source_name=settings.source_name,
        public_base=settings.public_base,
        tables=load_tables(settings.mappings_dir or BUNDLED_MAPPINGS),
        patient_system=settings.patient_identifier_system,
        patient_issuer_systems=dict(settings.patient_issuer_systems),
        accession_system=settings.accession_identifier_system,
        accession_issuer_systems=dict(settings.accession_issuer_systems),
        endpoint_system=settings.endpoint_identifier_system,
        timezone=settings.dicom_timezone,
        include_instances=settings.include_instances,
        max_instances=settings.max_instances,
    )


def http_client(settings: Settings, service: Service | None = None) -> httpx.AsyncClient:
    """An AsyncClient with the bridge's timeouts and pool limits; for an upstream, its TLS, HTTP/2, auth."""
    limits = httpx.Limits(max_connections=settings.sync_concurrency * 2 + 4)
    return httpx.AsyncClient(
        timeout=httpx.Timeout(settings.http_timeout),
        limits=limits,
        headers={"User-Agent": USER_AGENT},
        follow_redirects=False,
        **(connection_options(settings, service, limits) if service else {}),  # type: ignore[arg-type]
    )


@dataclass
class Runtime:
    """Everything a sync needs, open."""

    settings: Settings
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
        s = self.settings
        publisher = Publisher(
            self.fhir,
            self.store,
            self.ctx,
            patient_policy=s.patient_policy,
            write_strategy=s.write_strategy,
            order_policy=s.order_policy,
        )
        return SyncWorker(
            self.dicomweb,
            publisher,
            self.store,
            self.ctx,
            concurrency=concurrency,
            delete_policy=s.delete_policy,
            delete_max_fraction=s.delete_max_fraction,
            read_instance_header=s.read_instance_header,
        )

    def scheduler(self) -> SyncScheduler:
        """The scheduler of incremental cycles and reconciliation sweeps, per the settings."""
        s = self.settings
        return SyncScheduler(
            self.worker,
            self.changes,
            self.store,
            s.source_name,
            incremental=trigger(s.sync_interval, s.sync_cron),
            reconcile=trigger(s.reconcile_interval, s.reconcile_cron),
        )


def change_source(
    settings: Settings, client: httpx.AsyncClient, store: SqlStore, policy: RetryPolicy
) -> ChangeSource:
    """The incremental change source the settings choose."""
    if settings.change_source is ChangeSourceKind.ORTHANC and settings.orthanc_url is not None:
        limit = DicomwebLimits.from_settings(settings).page()
        feed = OrthancChangeFeed(client, str(settings.orthanc_url), policy=policy, limit=limit)
        return FeedChangeSource(feed, store, settings.source_name)
    return QidoWindowSource(settings.poll_window_days)


@asynccontextmanager
async def open_runtime(settings: Settings) -> AsyncIterator[Runtime]:
    """Open clients and store for ``settings``; closes them on exit."""
    # httpx logs full URLs at INFO, and query strings can carry patient identifiers.
    logging.getLogger("httpx").setLevel(logging.WARNING)
    ctx = mapping_context(settings)
    policy = retry_policy(settings, "dicomweb")  # each upstream has its own circuit breaker
    fhir_policy = retry_policy(settings, "fhir")
    store = SqlStore(settings.state_url)
    try:
        async with (
            http_client(settings, "dicomweb") as dicomweb_http,
            http_client(settings, "fhir") as fhir_http,
        ):
            dicomweb = DicomwebClient(
                dicomweb_http,
                settings.dicomweb_base,
                policy=policy,
                page_size=settings.qido_page_size,
                limits=DicomwebLimits.from_settings(settings),
            )
            fhir = FhirClient(fhir_http, settings.fhir_base, policy=fhir_policy, limit=fhir_limit(settings))
            changes = change_source(settings, dicomweb_http, store, policy)
            runtime = Runtime(settings, ctx, store, dicomweb, fhir, changes)
            runtime.worker = runtime.new_worker(settings.sync_concurrency)
            yield runtime
    finally:
        store.close()
