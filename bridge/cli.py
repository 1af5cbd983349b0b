"""The ``bridge`` command: sync the archive once, and show what the store knows."""

from __future__ import annotations

import asyncio
import logging
import sys
import time
from enum import IntEnum
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.table import Table

from bridge import __version__
from bridge.config import Settings, load_settings
from bridge.errors import BridgeError, ConfigurationError, StoreError, UpstreamError
from bridge.runtime import open_runtime
from bridge.state.store import SqlStore
from bridge.sync.worker import RunReport

logger = logging.getLogger("bridge")


class ExitCode(IntEnum):
    """Process exit codes, documented in the README."""

    OK = 0
    PARKED = 1
    CONFIGURATION = 2
    UPSTREAM = 3
    STORE = 4


app = typer.Typer(
    name="bridge",
    help="FHIR–DICOMweb bridge: publish a DICOMweb archive's studies as FHIR R4 ImagingStudy.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
out = Console()
err = Console(stderr=True)


def _configure_logging(level: str) -> None:
    logging.basicConfig(
        level=level,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    logging.getLogger("httpx").setLevel(logging.WARNING)
    logging.getLogger("httpcore").setLevel(logging.WARNING)


def _settings() -> Settings:
    try:
        settings = load_settings()
    except ConfigurationError as exc:
        err.print(f"[red]configuration error:[/red] {exc}", highlight=False)
        raise typer.Exit(ExitCode.CONFIGURATION) from None
    _configure_logging(settings.log_level)
    return settings


def _fail(exc: BridgeError) -> typer.Exit:
    if isinstance(exc, ConfigurationError):
        err.print(f"[red]configuration error:[/red] {exc}", highlight=False)
        return typer.Exit(ExitCode.CONFIGURATION)
    if isinstance(exc, UpstreamError):
        err.print(
            f"[red]upstream error:[/red] {exc}\n"
            f"Check that the {'FHIR server' if exc.service == 'fhir' else 'DICOMweb archive'} "
            "is running and that its URL setting is right; nothing is lost, the next run resumes.",
            highlight=False,
        )
        return typer.Exit(ExitCode.UPSTREAM)
    if isinstance(exc, StoreError):
        err.print(f"[red]state store error:[/red] {exc}", highlight=False)
        return typer.Exit(ExitCode.STORE)
    err.print(f"[red]error:[/red] {exc}", highlight=False)
    return typer.Exit(ExitCode.UPSTREAM)


def _report_dict(report: RunReport, seconds: float) -> dict[str, Any]:
    c = report.counts
    return {
        "run": report.run_id,
        "status": report.status,
        "seen": c.seen,
        "created": c.created,
        "updated": c.updated,
        "unchanged": c.unchanged,
        "parked": c.parked,
        "fhir_writes": c.fhir_writes,
        "seconds": round(seconds, 3),
        "parked_studies": [
            {"study_uid": p.study_uid, "kind": p.kind, "attribute": p.attribute, "reason": p.reason}
            for p in report.parked
        ],
    }


@app.command()
def sync(
    as_json: Annotated[bool, typer.Option("--json", help="Print the summary as JSON.")] = False,
) -> None:
    """Sync every study in the archive once, then exit (1 if any study was parked)."""
    settings = _settings()

    async def run() -> RunReport:
        async with open_runtime(settings) as runtime:
            return await runtime.worker.run()

    started = time.perf_counter()
    try:
        report = asyncio.run(run())
    except BridgeError as exc:
        raise _fail(exc) from None
    summary = _report_dict(report, time.perf_counter() - started)
    if as_json:
        out.print_json(data=summary)
    else:
        out.print(
            f"source [bold]{settings.source_name}[/bold], run {report.run_id}: "
            f"seen {summary['seen']}, created {summary['created']}, "
            f"updated {summary['updated']}, unchanged {summary['unchanged']}, "
            f"parked {summary['parked']} ({summary['fhir_writes']} FHIR writes, "
            f"{summary['seconds']:.1f} s)",
            highlight=False,
        )
        for parked in report.parked:
            out.print(f"  parked {parked.study_uid}: {parked.reason}", highlight=False)
    raise typer.Exit(ExitCode.PARKED if report.counts.parked else ExitCode.OK)


def _iso(value: Any) -> str | None:
    return value.isoformat() if value is not None else None


@app.command()
def status(
    as_json: Annotated[bool, typer.Option("--json", help="Print as JSON.")] = False,
    runs: Annotated[int, typer.Option(min=1, max=100, help="How many recent runs to show.")] = 5,
) -> None:
    """Show what the state store knows: counts, recent runs, parked studies with reasons."""
    settings = _settings()
    try:
        store = SqlStore(settings.state_url)
    except StoreError as exc:
        raise _fail(exc) from None
    try:
        counts = store.counts(settings.source_name)
        recent = store.runs(runs)
        parked = store.parked(settings.source_name)
    except StoreError as exc:
        raise _fail(exc) from None
    finally:
        store.close()
    data: dict[str, Any] = {
        "source": settings.source_name,
        "published": counts["published"],
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
                "fhir_writes": r.fhir_writes,
                "qido_queries": len(r.qido_queries or []),
                "error": r.error,
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
    if as_json:
        out.print_json(data=data)
        return
    out.print(
        f"source [bold]{settings.source_name}[/bold]: {data['published']} studies published, "
        f"{data['parked']} parked",
        highlight=False,
    )
    table = Table("run", "status", "started", "seen", "created", "updated", "unchanged", "parked")
    for r in data["runs"]:
        table.add_row(
            str(r["id"]),
            r["status"],
            str(r["started_at"]),
            *(str(r[k]) for k in ("seen", "created", "updated", "unchanged", "parked")),
        )
    out.print(table)
    if data["parked_studies"]:
        parked_table = Table("study", "kind", "attribute", "attempts", "reason")
        for p in data["parked_studies"]:
            parked_table.add_row(
                p["study_uid"], p["kind"], p["attribute"] or "", str(p["attempts"]), p["reason"]
            )
        out.print(parked_table)


@app.command()
def version() -> None:
    """Print the bridge's version."""
    out.print(__version__)


def main() -> None:
    """Console-script entry point."""
    app()
