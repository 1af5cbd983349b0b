"""The FastAPI app factory: settings in, app out; clients and store live only inside its lifespan."""

from __future__ import annotations

import gc
import logging
from collections.abc import AsyncIterator, Sequence
from contextlib import AsyncExitStack, asynccontextmanager
from typing import Any

import anyio.to_thread
import httpx
from fastapi import APIRouter, FastAPI
from fastapi.middleware.cors import CORSMiddleware
from fastapi.telemetry import TelemetryConfig

from bridge import __version__
from bridge.api import errors
from bridge.api.deps import SECURITY_SCHEMES, Services
from bridge.api.exposure import needs_auth
from bridge.api.middleware import ObservabilityMiddleware
from bridge.api.ondemand import OnDemandGate
from bridge.api.readiness import ReadinessProbe
from bridge.api.routes import (
    docs,
    failures,
    gateway,
    health,
    iid,
    links,
    login,
    metrics,
    operator,
    record,
    sync,
    viewer,
)
from bridge.api.security import Authenticator
from bridge.api.session import StoreBackend
from bridge.audit.trail import AuditTrail, running
from bridge.config import Settings, UpstreamSettings, get_settings
from bridge.dicomweb.client import DicomwebClient
from bridge.errors import BridgeError, StoreError
from bridge.fhir.client import FhirClient
from bridge.http import RetryPolicy
from bridge.limits import fhir_limit
from bridge.resolve.resolver import Resolver, ResolverConfig
from bridge.runtime import configured_viewers, open_runtime, push_drainer
from bridge.state.store import SqlStore
from bridge.sync.policy import WriteStrategy
from bridge.upstream import Service, http_client

logger = logging.getLogger(__name__)

# Every router of the app. The on-demand sync route (POST /studies/{study_uid}/sync) joins here.
# A request is matched against the routes in this order, one pattern after the other: the busiest
# (a viewer's image requests, then lookups) come first. None of their paths overlap another's.
ROUTERS: list[APIRouter] = [
    gateway.router,  # /dicom-web, unless BRIDGE_GATEWAY is false
    gateway.front_router,  # the nginx front's grants, only with BRIDGE_GATEWAY_FRONT_SECRET
    links.router,
    viewer.router,
    health.router,
    metrics.router,
    sync.router,
    record.router,
    failures.router,
    iid.router,
    operator.router,
]

# A clinician is waiting: retry a failing FHIR request once, briefly, then answer 503.
API_RETRIES = 1
API_RETRY_MAX_WAIT = 1.0
API_MAX_CONNECTIONS = 64
NO_TELEMETRY: TelemetryConfig = {"tracing": False, "metrics": False, "logs": False, "operation_spans": False}


def _client(
    settings: Settings,
    upstream: UpstreamSettings | None,
    service: Service | None,
    transport: httpx.AsyncBaseTransport | None,
) -> httpx.AsyncClient:
    """A client for one upstream (or a plain one), with the API's pool size (or the test transport)."""
    limits = httpx.Limits(max_connections=API_MAX_CONNECTIONS, max_keepalive_connections=API_MAX_CONNECTIONS)
    return http_client(settings, upstream, service, limits=limits, transport=transport)


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


def create_app(
    settings: Settings,
    *,
    routers: Sequence[APIRouter] = ROUTERS,
    transport: httpx.AsyncBaseTransport | None = None,
    run_scheduler: bool = False,
) -> FastAPI:
    """The API for ``settings``; configuration problems raise ConfigurationError here, at start-up.

    ``transport`` replaces the network for the app's outgoing HTTP (tests pass a MockTransport).
    ``run_scheduler`` also runs the scheduled sync worker in the app's lifespan (``bridge run``).
    """
    viewers = configured_viewers(settings)
    services = Services(settings=settings, authenticator=Authenticator(settings), viewers=viewers)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        # httpx logs full URLs at INFO, and query strings can carry identifiers.
        logging.getLogger("httpx").setLevel(logging.WARNING)
        async with AsyncExitStack() as stack:
            archive_settings = settings.each_source()[0].dicomweb
            fhir_http = await stack.enter_async_context(_client(settings, settings.fhir, "fhir", transport))
            dicomweb_http = await stack.enter_async_context(
                _client(settings, archive_settings, "dicomweb", transport)
            )
            policy = RetryPolicy(
                retries=min(settings.http.retries, API_RETRIES),
                max_wait=min(settings.http.retry_max_wait, API_RETRY_MAX_WAIT),
            )
            fhir = FhirClient(fhir_http, settings.fhir.base, policy=policy, limit=fhir_limit(settings))
            store: SqlStore | None
            try:
                store = await anyio.to_thread.run_sync(SqlStore, settings.state_url)
            except StoreError as exc:
                # Resolution does not need the store; /readyz reports it until a restart.
                logger.warning("state store not open: %s", exc)
                store = None
            if store is not None:
                stack.callback(store.close)
            if services.authenticator.jwks is not None:
                # its own plain client: the FHIR client carries the FHIR server's credentials
                services.authenticator.jwks.client = await stack.enter_async_context(
                    _client(settings, None, None, transport)
                )
            if getattr(app.state, "sessions", None) is not None:
                if store is not None:  # shared by every replica
                    app.state.sessions.backend = StoreBackend(store)
                else:
                    logger.warning("browser sessions kept in memory: this replica alone knows them")
            if getattr(app.state, "oidc", None):  # browser login: identity providers, EHRs
                oidc_http = await stack.enter_async_context(_client(settings, None, None, transport))
                for registration in app.state.oidc.values():
                    registration.http = oidc_http
            services.resolver = Resolver(fhir, resolver_config(settings))
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
            try:  # the sync side, per source: on-demand syncs, and the scheduler under `bridge run`
                for each in settings.each_source():
                    services.runtimes.append(await stack.enter_async_context(open_runtime(settings, each)))
            except BridgeError as exc:
                if run_scheduler:
                    raise
                logger.warning("on-demand sync unavailable: %s", exc)
            if run_scheduler:
                for runtime in services.runtimes:
                    scheduler = runtime.scheduler()
                    await scheduler.start()
                    stack.push_async_callback(scheduler.shutdown)
                if services.runtimes:
                    drainer = push_drainer(services.runtimes)
                    drainer.start()
                    services.drainer = drainer
                    stack.push_async_callback(drainer.stop)
            services.readiness = ReadinessProbe(
                FhirClient(fhir_http, settings.fhir.base, policy=RetryPolicy(retries=0)),
                DicomwebClient(dicomweb_http, archive_settings.base, policy=RetryPolicy(retries=0)),
                store,
            )
            # What start-up made lives as long as the process: leave it out of the cyclic GC's full
            # collections, which otherwise stop every thread (the event loop, /healthz) for ~100 ms
            # each time a large answer's many new objects set one off.
            gc.freeze()
            try:
                yield
            finally:
                services.resolver = None
                services.readiness = None

    protect_docs = needs_auth(settings.api.docs_auth, settings)
    app = FastAPI(
        title="FHIR–DICOMweb bridge resolver",
        version=__version__,
        description=(
            "Turns a FHIR ImagingStudy (by id, reference, Study Instance UID or accession number) into "
            "the WADO-RS URLs a program needs and the viewer URL a clinician clicks. Errors are FHIR "
            "OperationOutcomes. Only Endpoints of type dicom-wado-rs under the configured DICOMweb "
            "bases are used."
        ),
        lifespan=lifespan,
        # No slash redirects: they are built from the request's Host header, which a caller chooses.
        redirect_slashes=False,
        # The bridge exports Prometheus metrics, not OpenTelemetry. Left on, FastAPI asks OpenTelemetry
        # on every request whether a provider is configured (reading os.environ): 7 % of a cached lookup.
        telemetry=NO_TELEMETRY,
        # routes/docs.py serves the documentation with Swagger UI and ReDoc from the package, not a
        # CDN, and, with authentication configured, the schema too, behind it.
        docs_url=None,
        redoc_url=None,
        openapi_url=None if protect_docs else docs.OPENAPI,
    )
    _name_security_schemes(app)
    app.state.services = services
    app.state.transport = transport  # routers that open their own clients use it too
    app.state.sync_gate = OnDemandGate[Any](settings.api.sync_rate)
    errors.install(app)
    for router in routers:
        if router is gateway.router and not settings.gateway.enabled:
            continue
        if router is gateway.front_router and settings.gateway.secret is None:
            continue
        app.include_router(router)
    login.install(app, services)
    docs.install(app, protect=protect_docs)
    if settings.cors_origins:
        app.add_middleware(
            CORSMiddleware,
            allow_origins=list(settings.cors_origins),
            allow_methods=["GET"],
            allow_headers=["Authorization", "X-API-Key"],
            allow_credentials=False,
            max_age=600,
        )
    app.add_middleware(ObservabilityMiddleware)  # added last: outermost
    return app


def _name_security_schemes(app: FastAPI) -> None:
    """Put the security schemes in the schema's components; AuthenticatedRoute's operations name them."""
    generate = app.openapi

    def openapi() -> dict[str, Any]:
        schema = generate()  # cached by FastAPI: the update below is made once per schema
        schema.setdefault("components", {}).setdefault("securitySchemes", {}).update(SECURITY_SCHEMES)
        return schema

    app.openapi = openapi  # type: ignore[method-assign]


def app_from_environment() -> FastAPI:
    """Factory for ``uvicorn --factory bridge.api.app:app_from_environment`` (settings from BRIDGE_*)."""
    return create_app(get_settings())
