"""Prometheus metrics in the text exposition format."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Depends, Security
from fastapi.responses import Response
from fastapi.security import HTTPAuthorizationCredentials

from bridge.api.deps import API_KEY_HEADER, BEARER_HEADER, ServicesDep, caller
from bridge.metrics import exposition


async def metrics_caller(
    s: ServicesDep,
    api_key: Annotated[str | None, Security(API_KEY_HEADER)],
    bearer: Annotated[HTTPAuthorizationCredentials | None, Security(BEARER_HEADER)],
) -> None:
    """The API's authentication, when BRIDGE_API_METRICS_AUTH puts /metrics behind it."""
    if s.settings.api_metrics_auth:
        await caller(s, api_key, bearer)


router = APIRouter(tags=["health"], dependencies=[Depends(metrics_caller)])


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
