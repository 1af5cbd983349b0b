"""Prometheus metrics in the text exposition format."""

from __future__ import annotations

from fastapi import APIRouter, Depends, Request
from fastapi.responses import Response

from bridge.api.auth.caller import AuthenticatedRoute, authenticate
from bridge.api.exposure import needs_auth
from bridge.api.services import services_of
from bridge.metrics import exposition


async def metrics_caller(request: Request) -> None:
    """The API's authentication, unless BRIDGE_API_METRICS_AUTH=false opens /metrics (exposure.needs_auth)."""
    settings = services_of(request).settings
    if needs_auth(settings.api.metrics_auth, settings):
        await authenticate(request)


router = APIRouter(tags=["health"], dependencies=[Depends(metrics_caller)], route_class=AuthenticatedRoute)


@router.get(
    "/metrics",
    summary="Prometheus metrics: requests and latencies by route and status",
    response_class=Response,
    responses={200: {"content": {"text/plain": {"schema": {"type": "string"}}}, "description": "Metrics"}},
)
async def metrics() -> Response:
    """The process's metrics; labels carry route templates, never ids, UIDs or patient data."""
    body, content_type = exposition()
    return Response(body, media_type=content_type)
