"""The API's one container: every service the routes use, built from the settings and opened once.

``build_services`` makes what needs no connection (authentication, viewers, login's registrations);
``open_services`` (the app's lifespan) opens the rest over one composition root,
bridge/runtime.py:open_connections: one client per upstream and per source, which the sync, the
resolver, the gateway, the record pages and readiness all share.
"""

from __future__ import annotations

import gc
import logging
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass, field

import anyio.to_thread
import httpx
from fastapi import Request

from bridge.api.auth.oidc import OidcClient, oidc_client
from bridge.api.auth.security import Authenticator
from bridge.api.auth.session import SessionStore, StoreBackend
from bridge.api.ondemand import OnDemandGate
from bridge.api.readiness import ReadinessProbe
from bridge.audit.trail import AuditTrail, running
from bridge.config import Settings
from bridge.dicomweb.client import DicomwebClient
from bridge.errors import BridgeError, StoreError
from bridge.fhir.client import FhirClient, fhir_limit
from bridge.gateway.archives import Gateway, gateway_of
from bridge.mapping.validate import load_models
from bridge.resolve.links import ViewerTemplate
from bridge.resolve.resolver import Resolver, ResolverConfig
from bridge.resolve.viewers import configured_viewers
from bridge.runtime import (
    Connections,
    Runtime,
    build_runtime,
    open_connections,
    pool_size,
    push_drainer,
)
from bridge.state.store import SqlStore
from bridge.sync.policy import WriteStrategy
from bridge.sync.pushes import PushDrainer
from bridge.sync.report import RunReport
from bridge.upstream.client import http_client
from bridge.upstream.retry import RetryPolicy

logger = logging.getLogger(__name__)

# A clinician is waiting: retry a failing FHIR request once, briefly, then answer 503.
API_RETRIES = 1
API_RETRY_MAX_WAIT = 1.0
API_MAX_CONNECTIONS = 64


@dataclass
class Services:
    """What the routes use: built by create_app (``build_services``), opened by its lifespan."""

    settings: Settings
    authenticator: Authenticator
    viewers: dict[str, ViewerTemplate]
    sync_gate: OnDemandGate[list[RunReport]]  # on-demand syncs: coalesced, rate-limited per client
    sessions: SessionStore | None = None  # browser sessions, with login configured
    oidc: dict[str, OidcClient] = field(default_factory=dict)  # login's registrations, per way in
    connections: Connections | None = None  # one client per upstream and per source
    resolver: Resolver | None = None
    readiness: ReadinessProbe | None = None
    gateway: Gateway | None = None  # the archives, and which one serves a study (also the record's)
    pictures: dict[str, DicomwebClient] = field(default_factory=dict)  # per source: record thumbnails
    runtimes: list[Runtime] = field(default_factory=list)  # one per source
    audit: AuditTrail | None = None  # the access audit trail, open for the app's lifetime
    drainer: PushDrainer | None = None  # the push queue's drainer, under `bridge run`


def build_services(settings: Settings) -> Services:
    """What needs no connection; a bad setting raises ConfigurationError here, at start-up."""
    return Services(
        settings=settings,
        authenticator=Authenticator(settings),
        viewers=configured_viewers(settings),
        sync_gate=OnDemandGate(settings.api.sync_rate),
        # in memory until the lifespan opens the state store, which every replica shares
        sessions=SessionStore(settings.session.max_age, cache_ttl=settings.session.cache_ttl)
        if settings.login_enabled
        else None,
        # a registration per way in: the EHRs' authorization server may know the bridge by another id
        oidc={
            kind: oidc_client(settings, kind)
            for kind in ("login", "launch")
            if settings.login_enabled
            and (settings.oidc.issuer is not None if kind == "login" else bool(settings.smart_launch.issuers))
        },
    )


def resolver_config(settings: Settings) -> ResolverConfig:
    """The resolver's inputs from the settings."""
    return ResolverConfig(
        fhir_base=settings.fhir.base,
        dicomweb_bases=tuple(
            base
            for each in settings.each_source()
            for base in (each.dicomweb.public_base, each.dicomweb.base)
        ),
        source_name=settings.source_name,
        deterministic_ids=settings.write_strategy is WriteStrategy.CLIENT_ID,
        accession_system=settings.accession_identifier_system,
        accession_issuer_systems=dict(settings.accession_issuer_systems),
        cache_ttl=settings.resolver.cache_ttl,
        cache_size=settings.resolver.cache_size,
    )


@asynccontextmanager
async def open_services(
    services: Services, *, transport: httpx.AsyncBaseTransport | None = None, run_scheduler: bool = False
) -> AsyncIterator[None]:
    """Open every client, the store and the audit trail; with ``run_scheduler``, the scheduled sync too.

    ``transport`` replaces the network for every outgoing request (tests pass a MockTransport).
    """
    settings = services.settings
    async with AsyncExitStack() as stack:
        size = max(API_MAX_CONNECTIONS, pool_size(settings))
        conn = await stack.enter_async_context(
            open_connections(settings, max_connections=size, transport=transport)
        )
        services.connections = conn
        store = await _open_store(settings, required=run_scheduler)
        if store is not None:
            stack.callback(store.close)
        # Identity providers, EHRs and the JWT issuer's keys: one plain client, with no upstream's
        # credentials (the FHIR client carries the FHIR server's).
        limits = httpx.Limits(
            max_connections=API_MAX_CONNECTIONS, max_keepalive_connections=API_MAX_CONNECTIONS
        )
        plain = await stack.enter_async_context(http_client(settings, limits=limits, transport=transport))
        if services.authenticator.jwks is not None:
            services.authenticator.jwks.client = plain
        for registration in services.oidc.values():
            registration.http = plain
        if services.sessions is not None:
            if store is not None:  # shared by every replica
                services.sessions.backend = StoreBackend(store)
            else:
                logger.warning("browser sessions kept in memory: this replica alone knows them")
        policy = RetryPolicy(
            retries=min(settings.http.retries, API_RETRIES),
            max_wait=min(settings.http.retry_max_wait, API_RETRY_MAX_WAIT),
        )
        fhir = FhirClient(conn.fhir_http, settings.fhir.base, policy=policy, limit=fhir_limit(settings))
        services.resolver = Resolver(fhir, resolver_config(settings))
        services.gateway = gateway_of(settings, [each.http for each in conn.sources])
        # a picture on a page: fail fast rather than hold it
        services.pictures = {
            each.source.name: DicomwebClient(
                each.http,
                each.source.dicomweb.base,
                policy=RetryPolicy(retries=0),
                limits=each.dicomweb.limits,
            )
            for each in conn.sources
        }
        services.readiness = ReadinessProbe(
            FhirClient(conn.fhir_http, settings.fhir.base, policy=RetryPolicy(retries=0)),
            [(each.source.name, each.dicomweb) for each in conn.sources],  # ping is never retried
            store,
        )
        services.audit = await stack.enter_async_context(
            running(
                AuditTrail(
                    settings.audit.mode,
                    fhir=fhir,
                    store=store,
                    batch_size=settings.audit.batch_size,
                    window=settings.audit.window,
                ),
                settings.audit.flush_interval,
            )
        )
        await _open_sync(services, conn, store, stack, run_scheduler)
        # What start-up made lives as long as the process: leave it out of the cyclic GC's full
        # collections, which otherwise stop every thread (the event loop, /healthz) for ~100 ms
        # each time a large answer's many new objects set one off.
        gc.freeze()
        try:
            yield
        finally:
            services.resolver = services.readiness = services.gateway = services.connections = None
            services.pictures, services.runtimes = {}, []


async def _open_store(settings: Settings, *, required: bool) -> SqlStore | None:
    """The state store; None (with a warning) when it does not open and the app can do without it."""
    try:
        return await anyio.to_thread.run_sync(SqlStore, settings.state_url)
    except StoreError as exc:
        if required:
            raise
        # Resolution does not need the store; /readyz reports it until a restart.
        logger.warning("state store not open: %s", exc)
        return None


async def _open_sync(
    services: Services, conn: Connections, store: SqlStore | None, stack: AsyncExitStack, run_scheduler: bool
) -> None:
    """The sync side, per source: on-demand syncs, and the scheduler and push drainer under `bridge run`."""
    try:
        if store is None:
            raise StoreError("the state store is not open")
        services.runtimes = [
            build_runtime(services.settings, each, conn.fhir, store) for each in conn.sources
        ]
        load_models()  # now, not during the first on-demand sync
    except BridgeError as exc:
        if run_scheduler:
            raise
        logger.warning("on-demand sync unavailable: %s", exc)
        return
    if not run_scheduler:
        return
    for runtime in services.runtimes:
        scheduler = runtime.scheduler()
        await scheduler.start()
        stack.push_async_callback(scheduler.shutdown)
    if services.runtimes:
        drainer = push_drainer(services.runtimes)
        drainer.start()
        services.drainer = drainer
        stack.push_async_callback(drainer.stop)


# FastAPI solves every dependency of a request anew (cache keys, scopes, sub-dependencies), which
# for a cached lookup was most of the API's own time. So the per-request services are plain reads
# of ``request.app.state``, and each dependency takes the Request alone: one layer, no more.


def services_of(request: Request) -> Services:
    """The app's services (set up by create_app)."""
    found: Services = request.app.state.services
    return found


def mount_path(request: Request) -> str:
    """Where the app is mounted (``root_path``, no trailing slash), so links work behind a prefix."""
    return str(request.scope.get("root_path", "")).rstrip("/")
