"""On-demand sync: a PACS (or a person) asks for one study to be synced now."""

from __future__ import annotations

import asyncio
import time
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Header, Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel, Field

from bridge.api.auth.caller import AuthenticatedRoute, caller, unlimited_caller
from bridge.api.auth.security import Caller
from bridge.api.deps import ServicesDep, StudyUid
from bridge.api.errors import ERROR_RESPONSES, RateLimitedError
from bridge.errors import StudyNotFoundError, UpstreamUnavailableError
from bridge.sync.report import RunReport

router = APIRouter(
    tags=["sync"],
    dependencies=[Depends(unlimited_caller)],
    responses=ERROR_RESPONSES,
    route_class=AuthenticatedRoute,
)


class ParkedStudyOut(BaseModel):
    """A study the sync parked, and why."""

    study_uid: str
    kind: str
    attribute: str | None
    reason: str


# What a full queue asks the archive to wait before pushing again: about what a worker needs to
# sync a few hundred studies.
FULL_QUEUE_RETRY_AFTER = 30.0


class PushAccepted(BaseModel):
    """A push recorded in the queue (202): a worker syncs the study soon."""

    study_uid: str
    status: str = Field(description="queued, or coalesced with a push of the same study still waiting")


class SyncResult(BaseModel):
    """What an on-demand sync did."""

    runs: list[int] = Field(description="Ids of the run records in the state store (one per source)")
    status: str = Field(description="ok, parked or failed")
    created: int
    updated: int
    unchanged: int
    parked: int
    deleted: int = Field(description="1 when the study is gone from the archive and was retired")
    parked_studies: list[ParkedStudyOut]
    deletions: list[dict[str, str]]


@router.post(
    "/studies/{study_uid}/sync",
    response_model=SyncResult,
    responses={202: {"model": PushAccepted, "description": "Recorded; synced soon (Prefer: respond-async)"}},
    summary="Sync one study now (for a PACS to call when a study becomes stable)",
)
async def sync_study(
    study_uid: StudyUid,
    s: ServicesDep,
    request: Request,
    who: Annotated[Caller, Depends(caller)],
    prefer: Annotated[str | None, Header()] = None,
) -> Any:
    """Sync the study from the archive to the FHIR server, with the scheduled sync's rules.

    Every push is first recorded in the state store's push queue, so none is lost to a crash, a
    restart or an upstream outage: a worker (``bridge worker``, ``bridge run``) syncs what waits.
    With ``Prefer: respond-async`` (what an archive's trigger should send) the answer is 202 as
    soon as the push is recorded, and pushes of a study already waiting join it; a full queue
    (BRIDGE_PUSH_QUEUE_MAX) answers 429 with Retry-After. Without it the study is synced now and
    the result answered: a study the archive no longer has, but the bridge published, is retired
    per BRIDGE_DELETE_POLICY; one the bridge never saw answers 404. Requests for a study already
    being synced share that run; each client may start BRIDGE_API_SYNC_RATE runs a minute (429).
    """
    if not s.runtimes:
        raise UpstreamUnavailableError("the sync side could not be opened", service="fhir")
    store = s.runtimes[0].store
    accepted = time.time()
    queued = await asyncio.to_thread(store.queue_push, study_uid, accepted, s.settings.push.queue_max)
    if queued is None:
        raise RateLimitedError(
            f"the push queue is full ({s.settings.push.queue_max} studies wait, BRIDGE_PUSH_QUEUE_MAX); "
            "push again later, or add workers",
            retry_after=FULL_QUEUE_RETRY_AFTER,
        )
    if prefer is not None and "respond-async" in prefer.lower():
        if s.drainer is not None:
            s.drainer.wake()
        return JSONResponse(PushAccepted(study_uid=study_uid, status=queued).model_dump(), status_code=202)

    async def start() -> list[RunReport]:
        # Every source is asked: each publishes (or retires) its own copy of the study.
        return [await r.new_worker().run_studies([study_uid], kind="on-demand") for r in s.runtimes]

    gate = s.sync_gate
    client = f"{who.method}:{who.subject or ''}:{request.client.host if request.client else ''}"
    reports = await gate.run(study_uid, client, start)
    if not any(r.status == "failed" for r in reports):
        # Done now: the queue forgets it (unless it was pushed again since); a failed one waits.
        await asyncio.to_thread(store.finish_push, study_uid, accepted)
    acted = [r for r in reports if r.counts.seen or r.deletions]
    if not acted:
        raise StudyNotFoundError("no archive has a study with that Study Instance UID")

    def total(name: str) -> int:
        return sum(getattr(r.counts, name) for r in acted)

    return SyncResult(
        runs=[r.run_id for r in acted],
        status="failed"
        if any(r.status == "failed" for r in acted)
        else ("parked" if total("parked") else "ok"),
        created=total("created"),
        updated=total("updated"),
        unchanged=total("unchanged"),
        parked=total("parked"),
        deleted=total("deleted"),
        parked_studies=[
            ParkedStudyOut(study_uid=p.study_uid, kind=p.kind, attribute=p.attribute, reason=p.reason)
            for r in acted
            for p in r.parked
        ],
        deletions=[d for r in acted for d in r.deletions],
    )
