"""The commands that sync: ``sync`` (and its dry run), ``backfill`` and ``retry``."""

from __future__ import annotations

import time
from datetime import date, datetime
from typing import TYPE_CHECKING, Annotated

import typer

from bridge.cli.base import (
    ExitCode,
    ProgressOption,
    SourceOption,
    check_study_uids,
    fail,
    load_settings,
    report_outcome,
    sources_of,
)
from bridge.cli.consoles import err, out
from bridge.errors import BridgeError, ConfigurationError

if TYPE_CHECKING:
    from bridge.config import Settings, SourceSettings
    from bridge.sync.preview import Preview
    from bridge.sync.report import RunReport


def sync(
    as_json: Annotated[bool, typer.Option("--json", help="Print the summary as JSON.")] = False,
    study: Annotated[
        list[str] | None,
        typer.Option("--study", help="Sync only this Study Instance UID now (repeatable)."),
    ] = None,
    reconcile: Annotated[
        bool,
        typer.Option(
            "--reconcile",
            help="Also apply BRIDGE_DELETE_POLICY to published studies gone from the archive.",
        ),
    ] = False,
    dry_run: Annotated[
        bool,
        typer.Option(
            "--dry-run",
            help="Show per study what would be created or changed (element paths); write nothing.",
        ),
    ] = False,
    source: SourceOption = None,
    progress_every: ProgressOption = 5.0,
) -> None:
    """Sync every study in the archive once (or the --study ones), then exit (1 if any parked).

    With several sources (BRIDGE_SOURCES), each is synced in turn (or only --source NAME); the
    exit code is the worst of theirs.
    """
    if study and reconcile:
        err().print("[red]error:[/red] --study and --reconcile cannot be combined", highlight=False)
        raise typer.Exit(ExitCode.CONFIGURATION)
    check_study_uids(study or [])
    settings = load_settings()
    sources = sources_of(settings, source)
    if dry_run:
        for each in sources:
            _dry_run(settings, each, study or [], as_json)
        return
    # A --study UID that no source's archive holds is said so (exit 1), not passed over as "seen 0".
    not_found = set(study or [])
    codes = [
        _sync_source(settings, each, study or [], reconcile, as_json, not_found, progress_every)
        for each in sources
    ]
    for uid in sorted(not_found):
        err().print(
            f"[red]not found:[/red] study {uid} is in no archive of "
            f"{', '.join(f'{s.name} ({s.dicomweb.base})' for s in sources)}: nothing was synced for it; "
            "check the UID, or BRIDGE_DICOMWEB_URL",
            highlight=False,
        )
    raise typer.Exit(max(*codes, ExitCode.PARKED if not_found else ExitCode.OK))


def _sync_source(
    settings: Settings,
    source: SourceSettings,
    study: list[str],
    reconcile: bool,
    as_json: bool,
    not_found: set[str],
    progress_every: float = 5.0,
) -> int:
    """One source's sync; returns its exit code (upstream failures are reported, not raised).

    ``not_found``: the --study UIDs no archive has held so far; those this one holds leave it.
    """
    import asyncio

    from bridge.cli.progress import RunProgress
    from bridge.runtime import open_runtime

    async def run(progress: RunProgress) -> RunReport:
        async with open_runtime(settings, source) as runtime:
            runtime.worker.on_progress = progress.update
            if study:
                return await runtime.worker.run_studies(study)
            if reconcile:
                return await runtime.worker.run(kind="reconcile", reconcile=True)
            report = await runtime.worker.run()
            await runtime.worker.follow_merges()  # a run of its own (kind relink) when one is due
            return report

    started = time.perf_counter()
    try:
        with RunProgress(source.name, err(), every=progress_every) as progress:
            report = asyncio.run(run(progress))
    except BridgeError as exc:
        not_found.clear()  # unknown, not absent: the failure is the message
        return int(fail(exc).exit_code)
    not_found.intersection_update(report.not_found)
    return report_outcome(source, report, time.perf_counter() - started, as_json)


def _dry_run(settings: Settings, source: SourceSettings, study_uids: list[str], as_json: bool) -> None:
    import asyncio

    from bridge.cli import render
    from bridge.runtime import open_runtime

    async def run() -> list[Preview]:
        async with open_runtime(settings, source) as runtime:
            return await runtime.worker.preview(study_uids=study_uids)

    try:
        previews = asyncio.run(run())
    except BridgeError as exc:
        raise fail(exc) from None
    render.print_previews(previews, as_json)


def _parse_day(value: str, option: str) -> date:
    try:
        return datetime.strptime(value.replace("-", ""), "%Y%m%d").date()
    except ValueError:
        err().print(f"[red]error:[/red] {option} {value!r} is not a date (YYYY-MM-DD)", highlight=False)
        raise typer.Exit(ExitCode.CONFIGURATION) from None


def backfill(
    from_: Annotated[str, typer.Option("--from", help="First StudyDate, YYYY-MM-DD.")],
    to: Annotated[str, typer.Option("--to", help="Last StudyDate, YYYY-MM-DD.")],
    slice_days: Annotated[int, typer.Option(min=1, max=366, help="Days per QIDO slice.")] = 1,
    source: SourceOption = None,
    progress_every: ProgressOption = 5.0,
) -> None:
    """First load of a large archive, in StudyDate slices; resumes where an interrupted one stopped."""
    settings = load_settings()
    codes = [
        _backfill(settings, each, from_, to, slice_days, progress_every)
        for each in sources_of(settings, source)
    ]
    raise typer.Exit(max(codes))


def _backfill(
    settings: Settings, source: SourceSettings, from_: str, to: str, slice_days: int, progress_every: float
) -> int:
    import asyncio

    from bridge.cli.progress import RunProgress
    from bridge.runtime import open_runtime
    from bridge.sync import backfill as plan

    first, last = _parse_day(from_, "--from"), _parse_day(to, "--to")
    if first > last:
        err().print("[red]error:[/red] --from is after --to", highlight=False)
        raise typer.Exit(ExitCode.CONFIGURATION)
    name = plan.checkpoint_name(first, last)
    totals = {"seen": 0, "created": 0, "updated": 0, "unchanged": 0, "parked": 0}

    async def run() -> None:
        async with open_runtime(settings, source) as runtime:
            done = await asyncio.to_thread(runtime.store.checkpoint, source.name, name)
            slices = plan.slices(plan.resume_from(first, done), last, slice_days)
            if done is not None:
                out().print(f"resuming after {done}", highlight=False)
            with RunProgress(source.name, err(), every=progress_every, slices=len(slices)) as progress:
                runtime.worker.on_progress = progress.update
                for low, high in slices:
                    report = await runtime.worker.run(plan.study_dates(low, high), kind="backfill")
                    for key in totals:
                        totals[key] += getattr(report.counts, key)
                    await asyncio.to_thread(
                        runtime.store.save_checkpoint, source.name, name, plan.checkpoint_value(high)
                    )
                    progress.slice_done(f"to {high:%Y-%m-%d}")

    try:
        asyncio.run(run())
    except BridgeError as exc:
        return int(fail(exc).exit_code)
    out().print(
        f"source {source.name}: " + ", ".join(f"{k} {v}" for k, v in totals.items()),
        highlight=False,
    )
    return ExitCode.PARKED if totals["parked"] else ExitCode.OK


def retry(
    study: Annotated[
        list[str] | None,
        typer.Option("--study", help="Retry only this parked Study Instance UID (repeatable)."),
    ] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print the summary as JSON.")] = False,
    source: SourceOption = None,
    accept_demographics: Annotated[
        bool,
        typer.Option(
            "--accept-demographics",
            help="Accept the Patient link the demographics check parked the --study ones for, then retry.",
        ),
    ] = False,
) -> None:
    """Sync the parked studies again (all, or the --study ones); those that pass leave the list."""
    settings = load_settings()
    check_study_uids(study or [])
    if accept_demographics and not study:
        err().print(
            "[red]error:[/red] --accept-demographics needs --study UID: an override is given study by study",
            highlight=False,
        )
        raise typer.Exit(ExitCode.CONFIGURATION)
    codes = [
        _retry_source(settings, each, study or [], as_json, accept=accept_demographics)
        for each in sources_of(settings, source)
    ]
    raise typer.Exit(max(codes))


def _retry_source(
    settings: Settings, source: SourceSettings, study: list[str], as_json: bool, *, accept: bool = False
) -> int:
    """Retry one source's parked studies (or those of ``study`` parked there); its exit code."""
    import asyncio

    from bridge.mapping.uid import is_uid
    from bridge.runtime import open_runtime

    # Rows parked under a stand-in key ("invalid-uid:...", "unknown:...") name no UID the archive
    # can be asked for: they are counted and left to the next full sync, never dropped.
    unqueryable = 0

    async def run() -> RunReport | None:
        nonlocal unqueryable
        async with open_runtime(settings, source) as runtime:
            if accept:
                for uid in study:
                    # Accepted for the Patient the check compared the study with, and no other.
                    if not await asyncio.to_thread(runtime.store.accept_demographics, source.name, uid):
                        raise ConfigurationError(
                            f"--accept-demographics: study {uid} was not parked by the demographics "
                            f"check in source {source.name}; there is no Patient link to accept"
                        )
            parked = await asyncio.to_thread(runtime.store.parked, source.name)
            here = [p.study_uid for p in parked if is_uid(p.study_uid)]
            unqueryable = 0 if study else len(parked) - len(here)
            uids = [u for u in here if u in study] if study else here
            if not uids:
                return None
            return await runtime.worker.run_studies(uids, kind="retry")

    started = time.perf_counter()
    try:
        report = asyncio.run(run())
    except BridgeError as exc:
        return int(fail(exc).exit_code)
    if unqueryable:
        err().print(
            f"source {source.name}: {unqueryable} parked studies have no valid Study Instance UID and "
            "cannot be asked for by UID: correct the UID in the archive; every full `bridge sync` "
            "checks them again",
            highlight=False,
        )
    if report is None:
        if as_json:
            out().print_json(data={"source": source.name, "retried": 0, "not_retriable": unqueryable})
        else:
            out().print(f"source {source.name}: no parked study to retry", highlight=False)
        return ExitCode.PARKED if unqueryable else ExitCode.OK
    code = report_outcome(source, report, time.perf_counter() - started, as_json)
    return max(code, ExitCode.PARKED) if unqueryable else code
