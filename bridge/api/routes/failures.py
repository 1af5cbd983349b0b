"""Parked studies: what the sync could not publish, and why (they leave the list once they pass)."""

from __future__ import annotations

from datetime import datetime
from typing import Any

import anyio
from fastapi import APIRouter, Depends
from pydantic import BaseModel, Field

from bridge.api.auth.caller import AuthenticatedRoute, unlimited_caller
from bridge.api.deps import ServicesDep
from bridge.api.errors import ERROR_RESPONSES
from bridge.errors import StoreError

router = APIRouter(
    tags=["sync"],
    dependencies=[Depends(unlimited_caller)],
    responses=ERROR_RESPONSES,
    route_class=AuthenticatedRoute,
)


class Failure(BaseModel):
    """One parked study. The reason names the request or the DICOM attribute, never patient data."""

    source: str
    study_uid: str
    kind: str = Field(description="mapping, patient, rejected or upstream")
    attribute: str | None = Field(description="The DICOM attribute at fault, when known")
    reason: str
    attempts: int
    first_failed_at: datetime
    last_failed_at: datetime


class Failures(BaseModel):
    """Every parked study of every source, oldest first; `bridge retry` re-syncs them."""

    count: int
    failures: list[Failure]


@router.get("/failures", response_model=Failures, summary="List the parked studies and why they failed")
async def failures(s: ServicesDep) -> Any:
    """The studies the sync parked, per source, with the reason and how often they failed."""
    if not s.runtimes:
        raise StoreError("the state store is not open")
    found: list[Failure] = []
    for runtime in s.runtimes:
        source = runtime.settings.source_name
        rows = await anyio.to_thread.run_sync(runtime.store.parked, source)
        found.extend(
            Failure(
                source=row.source,
                study_uid=row.study_uid,
                kind=row.kind,
                attribute=row.attribute,
                reason=row.reason,
                attempts=row.attempts,
                first_failed_at=row.first_failed_at,
                last_failed_at=row.last_failed_at,
            )
            for row in rows
        )
    return Failures(count=len(found), failures=found)
