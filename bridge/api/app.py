"""The FastAPI app factory: settings in, app out; clients and store live only inside its lifespan."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import httpx
from fastapi import APIRouter, FastAPI
from fastapi.middleware.cors import CORSMiddleware
from fastapi.telemetry import TelemetryConfig

from bridge import __version__
from bridge.api import errors
from bridge.api.auth.caller import SECURITY_SCHEMES
from bridge.api.errors import AuthenticationError
from bridge.api.exposure import needs_auth
from bridge.api.forwarded import ForwardedHeaders
from bridge.api.middleware import ObservabilityMiddleware
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
from bridge.api.services import build_services, open_services
from bridge.config import Settings, get_settings

logger = logging.getLogger(__name__)

NO_TELEMETRY: TelemetryConfig = {"tracing": False, "metrics": False, "logs": False, "operation_spans": False}
DESCRIPTION = (
    "Turns a FHIR ImagingStudy (by id, reference, Study Instance UID or accession number) into the WADO-RS "
    "URLs a program needs and the viewer URL a clinician clicks. Errors are FHIR OperationOutcomes. Only "
    "Endpoints of type dicom-wado-rs under the configured DICOMweb bases are used."
)


def routers(settings: Settings) -> list[APIRouter]:
    """Every router of the app, in the order requests are matched; a feature that is off has none.

    The busiest (a viewer's image requests, then lookups) come first; none of their paths overlap
    another's.
    """
    wanted = [
        (gateway.router, settings.gateway.enabled),  # /dicom-web, unless BRIDGE_GATEWAY is false
        (gateway.front_router, settings.gateway.secret is not None),  # the nginx front's grants
        (links.router, True),
        (viewer.router, True),
        (health.router, True),
        (metrics.router, True),
        (sync.router, True),
        (record.router, True),
        (failures.router, True),
        (iid.router, True),
        (operator.router, True),
        (login.router, settings.login_enabled),  # browser login and EHR launch, when configured
        (docs.router_for(protect=needs_auth(settings.api.docs_auth, settings)), True),
    ]
    return [router for router, included in wanted if included]


def create_app(
    settings: Settings, *, transport: httpx.AsyncBaseTransport | None = None, run_scheduler: bool = False
) -> FastAPI:
    """The API for ``settings``; configuration problems raise ConfigurationError here, at start-up.

    ``transport`` replaces the network for the app's outgoing HTTP (tests pass a MockTransport).
    ``run_scheduler`` also runs the scheduled sync worker in the app's lifespan (``bridge run``).
    """
    services = build_services(settings)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        async with open_services(services, transport=transport, run_scheduler=run_scheduler):
            yield

    app = FastAPI(
        title="FHIR–DICOMweb bridge resolver",
        version=__version__,
        description=DESCRIPTION,
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
        openapi_url=None if needs_auth(settings.api.docs_auth, settings) else docs.OPENAPI,
    )
    _name_security_schemes(app)
    app.state.services = services  # the one thing on app.state: routes read it (api/services.py)
    errors.install(app)
    # a browser opening a page without credentials gets a page (login, or why there is none), not a 401
    app.add_exception_handler(AuthenticationError, login.authentication_error)
    for router in routers(settings):
        app.include_router(router)
    if settings.cors_origins:
        app.add_middleware(
            CORSMiddleware,
            allow_origins=list(settings.cors_origins),
            allow_methods=["GET"],
            allow_headers=["Authorization", "X-API-Key"],
            allow_credentials=False,
            max_age=600,
        )
    app.add_middleware(links.CachedLinksLane)  # cached lookups skip FastAPI's routing; inside the metrics
    app.add_middleware(ObservabilityMiddleware)
    secret = settings.gateway.secret
    if settings.trusted_proxies or secret is not None:  # added last: outermost, so every part sees the caller
        app.add_middleware(
            ForwardedHeaders,
            proxies=list(settings.trusted_proxies),
            front_secret=secret.get_secret_value() if secret is not None else None,
        )
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
