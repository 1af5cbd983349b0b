"""How the ``bridge`` command shows things: run summaries, dry runs and the store's status."""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

from rich.markup import escape

from bridge.cli.consoles import out

if TYPE_CHECKING:
    from bridge.cli.check import Report
    from bridge.config import SourceSettings
    from bridge.sync.preview import Preview
    from bridge.sync.report import RunReport


def report_dict(report: RunReport, seconds: float) -> dict[str, Any]:
    """A run's summary as JSON-able data."""
    c = report.counts
    return {
        "run": report.run_id,
        "status": report.status,
        "seen": c.seen,
        "created": c.created,
        "updated": c.updated,
        "unchanged": c.unchanged,
        "parked": c.parked,
        "deleted": c.deleted,
        "claimed": c.claimed,
        "fhir_writes": c.fhir_writes,
        "fallbacks": c.fallbacks,
        "series_query": report.series_query,
        "seconds": round(seconds, 3),
        "parked_studies": [
            {"study_uid": p.study_uid, "kind": p.kind, "attribute": p.attribute, "reason": p.reason}
            for p in report.parked
        ],
        "deletions": report.deletions,
        "demographics_warnings": report.demographics_warnings,
        "relinked": report.relinked,
        "merge_relinks": report.merge_relinks,
        "patient_events": report.patient_events,
        "not_found": report.not_found,
        "error": report.error,
    }


def print_summary(source: SourceSettings, report: RunReport, summary: dict[str, Any]) -> None:
    """A run's summary as text."""
    out().print(
        f"source [bold]{source.name}[/bold], run {report.run_id}: "
        f"seen {summary['seen']}, created {summary['created']}, "
        f"updated {summary['updated']}, unchanged {summary['unchanged']}, "
        f"parked {summary['parked']}, gone {summary['deleted']} "
        f"({summary['fhir_writes']} FHIR writes, {summary['seconds']:.1f} s; "
        f"series asked {summary['series_query']})",
        highlight=False,
    )
    if report.counts.fallbacks:
        fallbacks = report.counts.fallbacks
        out().print(f"  fallbacks used: {fallbacks} (see the integrator guide)", highlight=False)
    for parked in report.parked:
        out().print(f"  parked {parked.study_uid}: {parked.reason}", highlight=False)
    for event in report.patient_events:
        out().print(f"  {event['study_uid']}: {_patient_event(event)}", highlight=False)
    for gone in report.deletions:
        out().print(f"  gone from the archive {gone['study_uid']}: {gone['action']}", highlight=False)
    for moved in report.relinked:
        out().print(f"  patient identity corrected {moved['study_uid']}: {moved['action']}", highlight=False)
    if report.error:
        out().print(f"  [yellow]{report.error}[/yellow]", highlight=False)


def print_previews(previews: Sequence[Preview], as_json: bool) -> None:
    """A dry run's findings, study by study."""
    rows = [
        {"study_uid": p.study_uid, "action": p.action, "changes": list(p.changes), "reason": p.reason}
        for p in previews
    ]
    if as_json:
        out().print_json(data={"dry_run": True, "studies": rows})
        return
    counts = {a: sum(1 for p in previews if p.action == a) for a in ("create", "update", "unchanged", "park")}
    out().print(
        "dry run, nothing written: " + ", ".join(f"{k} {v}" for k, v in counts.items()), highlight=False
    )
    for p in previews:
        if p.action == "unchanged":
            continue
        detail = ", ".join(p.changes) if p.changes else (p.reason or "")
        out().print(f"  {p.action:6} {p.study_uid}  {detail}", highlight=False)


def _aware(value: datetime | None) -> datetime | None:
    """A stored time with its zone: SQLite gives back the UTC times it holds without one."""
    if value is None:
        return None
    return value if value.tzinfo is not None else value.replace(tzinfo=UTC)


def _iso(value: datetime | None) -> str | None:
    aware = _aware(value)
    return aware.isoformat() if aware is not None else None


def _shown(iso: str | None) -> str:
    """An ISO time as the tables show it: to the second, with its zone."""
    if iso is None:
        return "-"
    value = datetime.fromisoformat(iso)
    return value.strftime("%Y-%m-%d %H:%M %Z") if value.tzinfo is UTC else value.isoformat(timespec="minutes")


def duration(seconds: float) -> str:
    """A duration as a person reads it: 45 s, 12 min, 3.5 h, 2.1 days."""
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 90 * 60:
        return f"{seconds / 60:.0f} min"
    if seconds < 36 * 3600:
        return f"{seconds / 3600:.1f} h"
    return f"{seconds / 86400:.1f} days"


@dataclass
class SourceHealth:
    """What the store tells of one source's health (``bridge status``)."""

    name: str
    counts: dict[str, int]
    last_success: Any  # a Run, or None
    last_run: Any  # a Run, or None
    parked: Sequence[Any]  # ParkedStudy rows
    newest_published: str | None  # the latest study start published (FHIR dateTime)
    last_poll: Any = None  # the last successful run that polled the archive (a Run), or None
    lags: dict[str, dict[str, float]] = field(default_factory=dict)  # path -> its last measured lag
    pushes: tuple[int, float | None] = (0, None)  # pushes waiting (every source syncs them), oldest's arrival
    feed: bool = False  # the source is configured to read a change feed


# What the poll's lag is: a poll has no archive time for a change to measure from.
POLL_LAG = (
    "the age of the last successful run that polled the archive (full, incremental, reconcile or "
    "feed-gap): a study stored since then waits for the next poll, unless a push or the change feed "
    "brings it sooner"
)


def _measured(kept: dict[str, float] | None, now: datetime) -> dict[str, Any] | None:
    if kept is None:
        return None
    return {
        "seconds": kept["seconds"],
        "studies": int(kept.get("studies", 0)),
        "measured_at": datetime.fromtimestamp(kept["at"], UTC).isoformat(),
        "age_seconds": round(max(0.0, now.timestamp() - kept["at"])),
    }


def _current_lag(source: SourceHealth, now: datetime) -> dict[str, Any]:
    """How late the published record can be, per path: the poll always; push and feed where used."""
    poll = source.last_poll
    poll_at = _aware(poll.finished_at) if poll is not None else None
    lag: dict[str, Any] = {
        "poll": {
            "seconds": None if poll_at is None else round((now - poll_at).total_seconds()),
            "measured_as": POLL_LAG,
            "run": None
            if poll is None or poll_at is None
            else {"id": poll.id, "kind": poll.kind, "finished_at": poll_at.isoformat()},
        }
    }
    waiting, oldest = source.pushes
    if waiting or "push" in source.lags:
        lag["push"] = {
            "waiting": waiting,
            # The oldest push not yet synced: how late the push path is right now.
            "oldest_waiting_seconds": None
            if oldest is None
            else round(max(0.0, now.timestamp() - oldest), 1),
            "last_measured": _measured(source.lags.get("push"), now),
        }
    if source.feed or "feed" in source.lags:
        lag["feed"] = {"last_measured": _measured(source.lags.get("feed"), now)}
    return lag


def _seconds(value: float) -> str:
    return f"{value:.3g} s" if value < 90 else duration(value)


def lag_text(lag: dict[str, Any]) -> str:
    """A source's current lag in a few words, path by path."""
    poll = lag["poll"]["seconds"]
    parts = [
        "poll never succeeded"
        if poll is None
        else f"poll up to {duration(poll)} (since the last successful poll)"
    ]
    for path in ("push", "feed"):
        if path not in lag:
            continue
        waiting, oldest = lag[path].get("waiting"), lag[path].get("oldest_waiting_seconds")
        last = lag[path]["last_measured"]
        if waiting and oldest is not None:  # the oldest waiting push: how late the path is right now
            since = (
                f"; last measured {_seconds(last['seconds'])}, {duration(last['age_seconds'])} ago"
                if last is not None
                else ""
            )
            parts.append(f"{path} {_seconds(oldest)} now ({waiting} waiting{since})")
        elif last is not None:
            parts.append(f"{path} {_seconds(last['seconds'])} (measured {duration(last['age_seconds'])} ago)")
        else:
            parts.append(f"{path} not measured yet")
    return ", ".join(parts)


def _health(source: SourceHealth, now: datetime) -> dict[str, Any]:
    by_reason: dict[tuple[str, str | None], list[Any]] = {}
    for p in source.parked:
        by_reason.setdefault((p.kind, p.attribute), []).append(p)
    success = source.last_success
    success_at = _aware(success.finished_at) if success is not None else None
    last = source.last_run
    if last is None:
        state = "never synced"
    elif last.status == "failed":
        state = "failing"
    elif last.status == "running":
        state = "running"
    elif source.counts.get("withdrawn"):
        state = "studies withdrawn from clinicians"
    elif source.counts["parked"]:
        state = "studies parked"
    else:
        state = "ok"
    return {
        "name": source.name,
        "health": state,
        **source.counts,
        "last_successful_run": None
        if success is None or success_at is None
        else {
            "id": success.id,
            "kind": success.kind,
            "finished_at": success_at.isoformat(),
            "age_seconds": round((now - success_at).total_seconds()),
        },
        "last_run": None
        if last is None
        else {"id": last.id, "kind": last.kind, "status": last.status, "started_at": _iso(last.started_at)},
        "parked_by_reason": [
            {
                "kind": kind,
                "attribute": attribute,
                "count": len(rows),
                "reason": rows[-1].reason,  # the latest: reasons of one kind differ only in detail
            }
            for (kind, attribute), rows in sorted(by_reason.items(), key=lambda item: -len(item[1]))
        ],
        "current_lag": _current_lag(source, now),
        # The store keeps what was published, not what the archive holds now: the live lag is the
        # bridge_sync_lag_seconds metric of a running worker.
        "newest_study_published": source.newest_published,
    }


def status_dict(
    chosen: str,
    counts: dict[str, int],
    recent: Sequence[Any],
    parked: Sequence[Any],
    sources: Sequence[SourceHealth] = (),
    now: datetime | None = None,
    withdrawn: Sequence[tuple[str, str, str]] = (),
) -> dict[str, Any]:
    """What ``bridge status`` shows, as JSON-able data; times in ISO 8601 with their zone."""
    now = now or datetime.now(UTC)
    return {
        "source": chosen,
        "now": now.isoformat(),
        "published": counts["published"],
        "gone": counts["gone"],
        "parked": counts["parked"],
        "withdrawn": counts.get("withdrawn", 0),
        # Published studies clinicians are refused until the archive is corrected (integrator guide).
        "withdrawn_studies": [
            {"source": source, "study_uid": uid, "reason": reason} for source, uid, reason in withdrawn
        ],
        "sources": [_health(s, now) for s in sources],
        "runs": [
            {
                "id": r.id,
                "source": r.source,
                "kind": r.kind,
                "status": r.status,
                "started_at": _iso(r.started_at),
                "finished_at": _iso(r.finished_at),
                "seen": r.seen,
                "created": r.created,
                "updated": r.updated,
                "unchanged": r.unchanged,
                "parked": r.parked,
                "claimed": r.claimed,
                "worker": r.worker,
                "fhir_writes": r.fhir_writes,
                "qido_queries": len(r.qido_queries or []),
                "series_query": r.series_query,
                "relinked": list(r.relinked or []),
                "error": r.error,
                "note": r.note,
            }
            for r in recent
        ],
        "parked_studies": [
            {
                "study_uid": p.study_uid,
                "source": p.source,
                "kind": p.kind,
                "attribute": p.attribute,
                "reason": p.reason,
                "attempts": p.attempts,
                "first_failed_at": _iso(p.first_failed_at),
                "last_failed_at": _iso(p.last_failed_at),
            }
            for p in parked
        ],
    }


def print_status(data: dict[str, Any]) -> None:
    """``bridge status`` as text: a health headline per source, then runs and parked studies."""
    from rich.box import SIMPLE_HEAD
    from rich.table import Table

    for health in data["sources"]:
        success = health["last_successful_run"]
        when = (
            f"last successful run {_shown(success['finished_at'])} ({duration(success['age_seconds'])} ago, "
            f"{success['kind']})"
            if success
            else "no successful run yet"
        )
        out().print(
            f"source [bold]{escape(health['name'])}[/bold]: {health['health']}; {when}; "
            f"lag: {lag_text(health['current_lag'])}; "
            f"{health['published']} studies published, {health['gone']} gone from the archive, "
            f"{health['parked']} parked"
            + (f", {health['withdrawn']} withdrawn from clinicians" if health.get("withdrawn") else ""),
            highlight=False,
        )
        for group in health["parked_by_reason"]:
            what = group["attribute"] or group["kind"]
            out().print(f"  {group['count']} parked ({what}): {escape(group['reason'])}", highlight=False)
        if health["newest_study_published"]:
            newest = health["newest_study_published"]
            out().print(f"  newest study published started {newest}", highlight=False)
    if not data["sources"]:
        out().print(
            f"source [bold]{escape(data['source'])}[/bold]: {data['published']} studies published, "
            f"{data['gone']} gone from the archive, {data['parked']} parked",
            highlight=False,
        )
    several = len({r["source"] for r in data["runs"]}) > 1  # a source column only when it tells
    columns = ["run", *(["source"] if several else []), "kind", "status", "started"]
    table = Table(
        *columns,
        "seen",
        "new",
        "updated",
        "same",
        "parked",
        "series",
        title="recent runs",
        box=SIMPLE_HEAD,
        pad_edge=False,
    )
    for r in data["runs"]:
        table.add_row(
            str(r["id"]),
            *([r["source"]] if several else []),
            r["kind"],
            r["status"],
            _shown(r["started_at"]),
            *(str(r[k]) for k in ("seen", "created", "updated", "unchanged", "parked")),
            r["series_query"] or "-",
        )
    out().print(table)
    for r in data["runs"]:
        if r["note"]:
            out().print(f"run {r['id']} ({r['kind']}): {r['note']}", highlight=False)
    if data["parked_studies"]:
        several = len({p["source"] for p in data["parked_studies"]}) > 1
        parked_columns = [
            "study",
            *(["source"] if several else []),
            "kind",
            "attribute",
            "attempts",
            "reason",
        ]
        parked_table = Table(*parked_columns, title="parked studies", box=SIMPLE_HEAD, pad_edge=False)
        for p in data["parked_studies"]:
            parked_table.add_row(
                p["study_uid"],
                *([p["source"]] if several else []),
                p["kind"],
                p["attribute"] or "",
                str(p["attempts"]),
                p["reason"],
            )
        out().print(parked_table)
    if data["withdrawn_studies"]:
        withdrawn_table = Table("withdrawn study", "source", "reason")
        for w in data["withdrawn_studies"]:
            withdrawn_table.add_row(w["study_uid"], w["source"], w["reason"])
        out().print(withdrawn_table)


def _patient_event(event: dict[str, str]) -> str:
    """One Patient-link event of a run as a line (FHIR ids and attribute names only)."""
    kind = event.get("event", "")
    if kind == "demographics-warning":
        return f"published, but {event.get('attributes')} disagree with {event.get('patient')} (warn)"
    if kind == "demographics-accepted":
        return f"published: the link to {event.get('patient')} was accepted despite {event.get('attributes')}"
    return f"linked to {event.get('to')}, which replaced {event.get('from')} (merged on the FHIR server)"


def print_check(report: Report, as_json: bool) -> None:
    """``bridge check``'s findings, peer by peer, in the order to fix them."""
    if as_json:
        out().print_json(
            data={
                "exit_code": int(report.worst),
                "findings": [f.as_dict() for f in report.findings],
                "patient_issuers": report.issuers,
                "patient_issuer_systems_to_set": report.issuer_settings,
            }
        )
        return
    peer = None
    for finding in report.findings:
        if finding.peer != peer:
            peer = finding.peer
            out().print(f"[bold]{peer}[/bold]", highlight=False)
        if finding.severity:
            mark = "[red]FIX [/red]" if finding.severity > 1 else "[yellow]FIX [/yellow]"
        else:
            mark = "[dim]note[/dim]" if finding.note else "[green]ok  [/green]"
        out().print(f"  {mark} {escape(finding.text)}", highlight=False)
    for source, wanted in report.issuer_settings.items():
        out().print(f"\nsource {source}: fill in the systems, then set", highlight=False)
        out().print(
            f"  BRIDGE_PATIENT_ISSUER_SYSTEMS='{escape(json.dumps(wanted))}'", highlight=False, soft_wrap=True
        )
    worst = int(report.worst)
    out().print(
        "\nall checks passed" if not worst else f"\nexit {worst}: fix the FIX lines above, first to last",
        highlight=False,
    )
