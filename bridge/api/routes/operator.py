"""The operator page: runs, lag, parked studies with their reasons, and retry buttons; every retry audited.

Who may use it (operator guide, "The operator page"): a caller with an API key; a signed-in user or
bearer JWT whose ``BRIDGE_OPERATOR_ROLE_CLAIM`` claim lists ``BRIDGE_OPERATOR_ROLE``; anyone when
authentication is off (the API then listens on loopback only). Never a caller limited to one patient.

A retry is a POST of a small form. A browser's cookie goes along with any site's form, so a POST
made with a session (or with no authentication at all) must come from this site: its ``Origin``
(or, without one, its ``Referer``) must be the bridge's own. API keys and bearer tokens are never
sent by a browser on its own, so their POSTs need no such check. Each retried study is one
AuditEvent (``operator-retry``), whoever asked and whatever came of it.
"""

from __future__ import annotations

import html
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Annotated
from urllib.parse import parse_qs, urlencode, urlsplit

import anyio.to_thread
from fastapi import APIRouter, Depends, Query, Request
from fastapi.responses import HTMLResponse, RedirectResponse, Response

from bridge.api.audit import note
from bridge.api.auth.caller import authenticate
from bridge.api.auth.security import Caller
from bridge.api.errors import AccessDeniedError
from bridge.api.routes.record import html_page
from bridge.api.services import mount_path, services_of
from bridge.audit.events import Outcome
from bridge.config import Settings
from bridge.errors import BridgeError, InvalidLookupError, StoreError
from bridge.mapping.uid import is_uid
from bridge.runtime import Runtime
from bridge.state.models import ParkedStudy, Run

logger = logging.getLogger(__name__)

PAGE = "/operator"
RETRY = "/operator/retry"
MAX_FORM_BYTES = 16 * 1024  # a retry form holds a source, a UID or a reason
MAX_RETRY = 1000  # studies one click retries (the rest stay parked for the next click or sync)
RECENT_RUNS = 20


def is_operator(who: Caller, settings: Settings) -> bool:
    """Whether ``who`` may see the operator page and retry parked studies."""
    if who.patient is not None:  # an EHR launch or a SMART app: one patient's data, nothing more
        return False
    if who.method in ("api-key", "anonymous"):  # anonymous: authentication is off (loopback only)
        return True
    return settings.operator.role is not None and settings.operator.role in who.roles


def refusal(settings: Settings) -> str:
    """Why a caller who is no operator is refused, naming what would let them in."""
    role = settings.operator.role
    if role is None:
        return "the operator page needs an API key, or BRIDGE_OPERATOR_ROLE set to a role the user holds"
    return (
        f"the operator page needs the role {role!r} in the {settings.operator.role_claim!r} claim "
        "(BRIDGE_OPERATOR_ROLE, BRIDGE_OPERATOR_ROLE_CLAIM) or an API key"
    )


async def operator(request: Request) -> Caller:
    """The caller, if an operator; else 403 naming the setting (401 first without credentials)."""
    who = await authenticate(request)
    settings = services_of(request).settings
    if not is_operator(who, settings):
        raise AccessDeniedError(refusal(settings))
    return who


OperatorDep = Annotated[Caller, Depends(operator)]
CallerDep = Annotated[Caller, Depends(authenticate)]
router = APIRouter(tags=["operator"], include_in_schema=False)


def _when(value: datetime | None) -> str:
    """A stored time in UTC, saying so (SQLite gives it back without its zone)."""
    if value is None:
        return "-"
    aware = value if value.tzinfo is not None else value.replace(tzinfo=UTC)
    return aware.astimezone(UTC).strftime("%Y-%m-%d %H:%M:%S UTC")


def _age(value: datetime | None, now: datetime) -> str:
    if value is None:
        return "never"
    aware = value if value.tzinfo is not None else value.replace(tzinfo=UTC)
    seconds = max(0, int((now - aware).total_seconds()))
    for size, unit in ((86400, "d"), (3600, "h"), (60, "min")):
        if seconds >= size:
            return f"{seconds // size} {unit} ago"
    return f"{seconds} s ago"


@dataclass(frozen=True, slots=True)
class SourceView:
    """What the page shows of one source."""

    name: str
    last_ok: datetime | None
    counts: dict[str, int]
    parked: list[ParkedStudy]


def _source_view(runtime: Runtime) -> SourceView:
    """One source's state, read from the store (blocking: run in a thread)."""
    name = runtime.settings.source_name
    store = runtime.store
    return SourceView(name, store.last_run(name, None), store.counts(name), store.parked(name))


def _runtimes(request: Request) -> list[Runtime]:
    runtimes = services_of(request).runtimes
    if not runtimes:
        raise StoreError("the state store is not open, or the sync side could not start")
    return runtimes


def _parked_table(base: str, view: SourceView) -> str:
    """The source's parked studies grouped by reason: a retry button per reason and per study."""
    groups: dict[str, list[ParkedStudy]] = {}
    for row in view.parked:
        groups.setdefault(row.reason, []).append(row)
    if not groups:
        return '<p class="muted">No parked studies.</p>'
    source = html.escape(view.name, quote=True)
    parts = []
    for reason, rows in sorted(groups.items(), key=lambda g: -len(g[1])):
        first = rows[0]
        attribute = f" ({first.attribute})" if first.attribute else ""
        parts.append(
            '<section class="reason">'
            f'<h3><span class="kind">{html.escape(first.kind)}</span>{html.escape(attribute)}: '
            f'<span class="reason-text">{html.escape(reason)}</span> '
            f'<span class="muted">({len(rows)} {"study" if len(rows) == 1 else "studies"})</span></h3>'
            f'<form method="post" action="{base}{RETRY}"><input type="hidden" name="source" value="{source}">'
            f'<input type="hidden" name="reason" value="{html.escape(reason, quote=True)}">'
            f'<button type="submit" class="retry-reason">Retry all {len(rows)}</button></form>'
            '<table class="parked"><thead><tr><th>Study Instance UID</th><th>Attempts</th>'
            "<th>First failed</th><th>Last failed</th><th></th></tr></thead><tbody>"
            + "".join(
                f'<tr class="parked-study" data-study-uid="{html.escape(row.study_uid, quote=True)}">'
                f'<td class="uid">{html.escape(row.study_uid)}</td><td>{row.attempts}</td>'
                f"<td>{_when(row.first_failed_at)}</td><td>{_when(row.last_failed_at)}</td>"
                f'<td><form method="post" action="{base}{RETRY}">'
                f'<input type="hidden" name="source" value="{source}">'
                f'<input type="hidden" name="study_uid" value="{html.escape(row.study_uid, quote=True)}">'
                '<button type="submit" class="retry-study">Retry</button></form></td></tr>'
                for row in rows
            )
            + "</tbody></table></section>"
        )
    return "\n".join(parts)


def _runs_table(runs: Sequence[Run]) -> str:
    rows = "".join(
        f'<tr class="run"><td>{run.id}</td><td>{html.escape(run.source)}</td><td>{html.escape(run.kind)}</td>'
        f'<td class="status">{html.escape(run.status)}</td><td>{_when(run.started_at)}</td>'
        f"<td>{_when(run.finished_at)}</td><td>{run.seen}</td><td>{run.created}</td><td>{run.updated}</td>"
        f"<td>{run.unchanged}</td><td>{run.parked}</td></tr>"
        for run in runs
    )
    return (
        '<table class="runs"><thead><tr><th>Run</th><th>Source</th><th>Kind</th><th>Status</th>'
        "<th>Started</th><th>Finished</th><th>Seen</th><th>Created</th><th>Updated</th><th>Unchanged</th><th>Parked</th>"
        f"</tr></thead><tbody>{rows}</tbody></table>"
        if rows
        else '<p class="muted">No runs yet.</p>'
    )


def _refused_page(request: Request, who: Caller, settings: Settings) -> HTMLResponse:
    """403 for a signed-in person who is no operator: which role it takes, and who they are signed in as."""
    why = refusal(settings)
    body = (
        "<h1>Operator page: not for this account</h1>"
        f'<p class="refusal">{html.escape(why[:1].upper() + why[1:])}.</p>'
        "<p>Ask the bridge's administrator for that role, or sign in with an account that holds it.</p>"
    )
    return html_page("Operator page: not allowed", body, 403, request=request, who=who)


@router.get(PAGE, response_class=HTMLResponse)
async def operator_page(
    request: Request,
    who: CallerDep,
    retried: Annotated[int | None, Query(ge=0)] = None,
    passed: Annotated[int | None, Query(ge=0)] = None,
    still: Annotated[int | None, Query(ge=0)] = None,
) -> HTMLResponse:
    """Each source's last successful run and its age (the lag), counts, parked studies; recent runs.

    A caller who is no operator gets 403: a page saying which role it takes for a browser, an
    OperationOutcome for a program.
    """
    settings = services_of(request).settings
    if not is_operator(who, settings):
        if "text/html" in request.headers.get("accept", ""):
            return _refused_page(request, who, settings)
        raise AccessDeniedError(refusal(settings))
    runtimes = _runtimes(request)
    views = [await anyio.to_thread.run_sync(_source_view, r) for r in runtimes]
    runs = await anyio.to_thread.run_sync(runtimes[0].store.runs, RECENT_RUNS)
    now = datetime.now(UTC)
    base = html.escape(mount_path(request))
    done = (
        f'<p class="done" role="status">Retried {retried} {"study" if retried == 1 else "studies"}: '
        f"{passed or 0} published, {still or 0} still parked.</p>"
        if retried is not None
        else ""
    )
    sources = "\n".join(
        f'<section class="source" data-source="{html.escape(v.name, quote=True)}">'
        f"<h2>{html.escape(v.name)}</h2>"
        f'<p class="lag">Last successful run: <strong>{_age(v.last_ok, now)}</strong> '
        f'<span class="muted">({_when(v.last_ok)})</span>; {v.counts.get("published", 0)} published, '
        f'{v.counts.get("gone", 0)} gone from the archive, <strong class="parked-count">'
        f"{v.counts.get('parked', 0)} parked</strong>.</p>"
        f"{_parked_table(base, v)}</section>"
        for v in views
    )
    body = (
        f"<h1>Operator</h1>{done}\n{sources}\n<h2>Recent runs</h2>\n{_runs_table(runs)}"
        '<p class="muted">Times in UTC. "Retry" syncs the study again now with the current settings; '
        "one that passes leaves the list.</p>"
    )
    return html_page("Operator", body, request=request, who=who)


def _same_origin(request: Request, settings: Settings) -> bool:
    """Whether a POST comes from a page of this site (its Origin, else its Referer)."""
    given = request.headers.get("origin") or request.headers.get("referer")
    if not given or given == "null":
        return False
    seen = urlsplit(given)
    origin = f"{seen.scheme}://{seen.netloc}".lower()
    own = {f"{request.url.scheme}://{request.headers.get('host', '')}".lower()}
    if settings.public_url is not None:
        public = urlsplit(str(settings.public_url))
        own.add(f"{public.scheme}://{public.netloc}".lower())
    return origin in own


async def _form(request: Request) -> dict[str, str]:
    """The POSTed form (application/x-www-form-urlencoded), bounded; one value per field."""
    body = b""
    async for chunk in request.stream():
        body += chunk
        if len(body) > MAX_FORM_BYTES:
            raise InvalidLookupError(f"the form is larger than {MAX_FORM_BYTES} bytes")
    try:
        fields = parse_qs(body.decode("utf-8"), max_num_fields=10, strict_parsing=False)
    except (UnicodeDecodeError, ValueError):
        raise InvalidLookupError("the form is not URL-encoded UTF-8") from None
    return {name: values[0] for name, values in fields.items() if values}


@router.post(RETRY)
async def retry(request: Request, who: OperatorDep) -> Response:
    """Sync again one parked study (``study_uid``) or every study parked for one ``reason``, of ``source``."""
    settings = services_of(request).settings
    if who.method not in ("api-key", "jwt") and not _same_origin(request, settings):
        note(request, who, "operator-retry", "refused", reason="cross-site request")
        raise AccessDeniedError("a retry must be posted from the operator page itself (same origin)")
    form = await _form(request)
    source, study_uid, reason = form.get("source"), form.get("study_uid"), form.get("reason")
    if not source or (study_uid is None) == (reason is None):
        raise InvalidLookupError("a retry names a source, and either a study_uid or a reason")
    runtime = next((r for r in _runtimes(request) if r.settings.source_name == source), None)
    if runtime is None:
        raise InvalidLookupError(f"no source is named {source!r}")
    parked = await anyio.to_thread.run_sync(runtime.store.parked, source)
    # A row parked before its UID could be read ("unknown:...") cannot be asked of the archive.
    chosen = [
        p.study_uid
        for p in parked
        if (p.study_uid == study_uid if study_uid is not None else p.reason == reason)
        and is_uid(p.study_uid)
    ][:MAX_RETRY]
    passed = still = 0
    if chosen:
        try:
            report = await runtime.new_worker().run_studies(chosen, kind="retry")
        except BridgeError as exc:  # the archive, FHIR server or store down: audited, then answered
            for uid in chosen:
                note(request, who, "operator-retry", "failed", study_uid=uid, reason=type(exc).__name__)
            raise
        # Parked again, or no longer in the archive (never published: it stays parked, to be
        # corrected there): either way not published.
        gone = set(report.not_found)
        again = {p.study_uid for p in report.parked} | gone
        for uid in chosen:
            outcome: Outcome = "failed" if uid in again else "success"
            why = ("not in the archive" if uid in gone else "still parked") if uid in again else None
            note(request, who, "operator-retry", outcome, study_uid=uid, reason=why)
        still = len(again & set(chosen))
        passed = len(chosen) - still
        logger.info("operator retry: %d studies of source %s, %d published", len(chosen), source, passed)
    query = urlencode({"retried": len(chosen), "passed": passed, "still": still})
    return RedirectResponse(
        f"{mount_path(request)}{PAGE}?{query}", status_code=303, headers={"Cache-Control": "no-store"}
    )
