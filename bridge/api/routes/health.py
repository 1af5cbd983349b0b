"""Liveness and readiness."""

from __future__ import annotations

from fastapi import APIRouter
from fastapi.responses import JSONResponse

from bridge.api.deps import ServicesDep
from bridge.api.errors import DEFAULT_RETRY_AFTER
from bridge.api.models import Health, Readiness

router = APIRouter(tags=["health"])


@router.get("/healthz", response_model=Health, summary="The process is alive")
async def healthz() -> Health:
    """Always 200 while the process serves requests; it checks nothing else."""
    return Health()


@router.get(
    "/readyz",
    response_model=Readiness,
    summary="The FHIR server and the archive answer, and the store is open",
    responses={503: {"model": Readiness, "description": "A dependency is not ready; see checks"}},
)
async def readyz(s: ServicesDep) -> JSONResponse:
    """200 when every dependency answers; 503 (with Retry-After) naming those that do not."""
    checks = await s.readiness.check() if s.readiness is not None else {"app": "starting"}
    ready = all(v == "ok" for v in checks.values())
    body = Readiness(status="ready" if ready else "not-ready", checks=checks)
    headers = {} if ready else {"Retry-After": str(DEFAULT_RETRY_AFTER)}
    return JSONResponse(body.model_dump(), status_code=200 if ready else 503, headers=headers)
