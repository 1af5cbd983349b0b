"""Wiring: builds the HTTP clients, store and worker from the settings, and closes them."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass

import httpx

from bridge import __version__
from bridge.config import Settings
from bridge.dicomweb.client import DicomwebClient
from bridge.fhir.client import FhirClient
from bridge.http import RetryPolicy
from bridge.mapping.context import MappingContext
from bridge.mapping.tables import BUNDLED_MAPPINGS, load_tables
from bridge.state.store import SqlStore
from bridge.sync.publisher import Publisher
from bridge.sync.worker import SyncWorker

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
    )


def http_client(settings: Settings) -> httpx.AsyncClient:
    """An AsyncClient with the bridge's timeouts and pool limits."""
    limits = httpx.Limits(max_connections=settings.sync_concurrency * 2 + 4)
    return httpx.AsyncClient(
        timeout=httpx.Timeout(settings.http_timeout),
        limits=limits,
        headers={"User-Agent": USER_AGENT},
        follow_redirects=False,
    )


@dataclass
class Runtime:
    """Everything a sync needs, open."""

    settings: Settings
    ctx: MappingContext
    store: SqlStore
    dicomweb: DicomwebClient
    fhir: FhirClient
    publisher: Publisher
    worker: SyncWorker


@asynccontextmanager
async def open_runtime(settings: Settings) -> AsyncIterator[Runtime]:
    """Open clients and store for ``settings``; closes them on exit."""
    # httpx logs full URLs at INFO, and query strings can carry patient identifiers.
    logging.getLogger("httpx").setLevel(logging.WARNING)
    ctx = mapping_context(settings)
    policy = RetryPolicy(retries=settings.http_retries, max_wait=settings.http_retry_max_wait)
    store = SqlStore(settings.state_url)
    try:
        async with http_client(settings) as dicomweb_http, http_client(settings) as fhir_http:
            dicomweb = DicomwebClient(
                dicomweb_http, settings.dicomweb_base, policy=policy, page_size=settings.qido_page_size
            )
            fhir = FhirClient(fhir_http, settings.fhir_base, policy=policy)
            publisher = Publisher(
                fhir,
                store,
                ctx,
                patient_policy=settings.patient_policy,
                write_strategy=settings.write_strategy,
            )
            worker = SyncWorker(dicomweb, publisher, store, ctx, concurrency=settings.sync_concurrency)
            yield Runtime(settings, ctx, store, dicomweb, fhir, publisher, worker)
    finally:
        store.close()
