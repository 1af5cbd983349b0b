"""Prometheus metrics in the text exposition format."""

from __future__ import annotations

from fastapi import APIRouter
from fastapi.responses import Response

from bridge.metrics import exposition

router = APIRouter(tags=["health"])


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
