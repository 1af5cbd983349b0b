"""How the ``bridge`` command shows things: run summaries, dry runs and the store's status."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

from rich.console import Console

if TYPE_CHECKING:
    from bridge.config import SourceSettings
    from bridge.sync.preview import Preview
    from bridge.sync.report import RunReport

out = Console()
err = Console(stderr=True)


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
        "error": report.error,
    }


def print_summary(source: SourceSettings, report: RunReport, summary: dict[str, Any]) -> None:
    """A run's summary as text."""
    out.print(
        f"source [bold]{source.name}[/bold], run {report.run_id}: "
        f"seen {summary['seen']}, created {summary['created']}, "
        f"updated {summary['updated']}, unchanged {summary['unchanged']}, "
        f"parked {summary['parked']}, gone {summary['deleted']} "
        f"({summary['fhir_writes']} FHIR writes, {summary['seconds']:.1f} s; "
        f"series asked {summary['series_query']})",
        highlight=False,
    )
    if report.counts.fallbacks:
        out.print(f"  fallbacks used: {report.counts.fallbacks} (see the integrator guide)", highlight=False)
    for parked in report.parked:
        out.print(f"  parked {parked.study_uid}: {parked.reason}", highlight=False)
    for gone in report.deletions:
        out.print(f"  gone from the archive {gone['study_uid']}: {gone['action']}", highlight=False)
    if report.error:
        out.print(f"  [yellow]{report.error}[/yellow]", highlight=False)


def print_previews(previews: Sequence[Preview], as_json: bool) -> None:
    """A dry run's findings, study by study."""
    rows = [
        {"study_uid": p.study_uid, "action": p.action, "changes": list(p.changes), "reason": p.reason}
        for p in previews
    ]
    if as_json:
        out.print_json(data={"dry_run": True, "studies": rows})
        return
    counts = {a: sum(1 for p in previews if p.action == a) for a in ("create", "update", "unchanged", "park")}
    out.print(
        "dry run, nothing written: " + ", ".join(f"{k} {v}" for k, v in counts.items()), highlight=False
    )
    for p in previews:
        if p.action == "unchanged":
            continue
        detail = ", ".join(p.changes) if p.changes else (p.reason or "")
        out.print(f"  {p.action:6} {p.study_uid}  {detail}", highlight=False)


def _iso(value: Any) -> str | None:
    return value.isoformat() if value is not None else None


def status_dict(
    chosen: str | None, counts: dict[str, int], recent: Sequence[Any], parked: Sequence[Any]
) -> dict[str, Any]:
    """What ``bridge status`` shows, as JSON-able data."""
    return {
        "source": chosen or "all",
        "published": counts["published"],
        "gone": counts["gone"],
        "parked": counts["parked"],
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
                "error": r.error,
                "note": r.note,
            }
            for r in recent
        ],
        "parked_studies": [
            {
                "study_uid": p.study_uid,
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


def freshness_dict(
    waiting: int, oldest: float | None, lags: Sequence[dict[str, Any]], now: float
) -> dict[str, Any]:
    """The current lag for ``bridge status``: the push queue now, and each path's last measured lag."""
    return {
        "pushes_waiting": waiting,
        # The oldest push not yet synced: how late the push path is right now.
        "oldest_push_seconds": round(now - oldest, 1) if oldest is not None else None,
        "last_lag": [
            {
                "source": lag["source"],
                "path": lag["path"],
                "seconds": lag["seconds"],
                "studies": int(lag.get("studies", 0)),
                "measured_at": datetime.fromtimestamp(lag["at"], UTC).isoformat(),
            }
            for lag in lags
        ],
    }


def print_status(data: dict[str, Any]) -> None:
    """``bridge status`` as text."""
    from rich.table import Table

    out.print(
        f"source [bold]{data['source']}[/bold]: {data['published']} studies published, "
        f"{data['gone']} gone from the archive, {data['parked']} parked",
        highlight=False,
    )
    table = Table("run", "status", "started", "seen", "created", "updated", "unchanged", "parked", "series")
    for r in data["runs"]:
        table.add_row(
            str(r["id"]),
            r["status"],
            str(r["started_at"]),
            *(str(r[k]) for k in ("seen", "created", "updated", "unchanged", "parked")),
            r["series_query"] or "-",
        )
    out.print(table)
    fresh = data.get("freshness")
    if fresh is not None:
        oldest = fresh["oldest_push_seconds"]
        line = f"pushes waiting: {fresh['pushes_waiting']}" + (
            f", oldest {oldest:g} s" if oldest is not None else ""
        )
        for lag in fresh["last_lag"]:
            line += (
                f"; last {lag['path']} lag ({lag['source']}): {lag['seconds']:g} s at {lag['measured_at']}"
            )
        out.print(line, highlight=False)
    for r in data["runs"]:
        if r["note"]:
            out.print(f"run {r['id']} ({r['kind']}): {r['note']}", highlight=False)
    if data["parked_studies"]:
        parked_table = Table("study", "kind", "attribute", "attempts", "reason")
        for p in data["parked_studies"]:
            parked_table.add_row(
                p["study_uid"], p["kind"], p["attribute"] or "", str(p["attempts"]), p["reason"]
            )
        out.print(parked_table)
