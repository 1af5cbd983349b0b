"""The ``bridge`` command: sync, schedule, backfill, and show what the store knows."""

from __future__ import annotations

import logging
import sys
import time
from datetime import date, datetime
from enum import IntEnum
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from bridge import __version__
from bridge.cli import render
from bridge.errors import BridgeError, ConfigurationError, StoreError, UpstreamAuthError, UpstreamError

# A command imports what it uses, when it runs: `bridge --help` loads neither the settings nor the
# sync, the store or the web stack, and `bridge sync` never loads FastAPI.
if TYPE_CHECKING:
    import asyncio

    from bridge.config import Settings, SourceSettings
    from bridge.sync.preview import Preview
    from bridge.sync.report import RunReport

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
    # Plain help: typer's rich help shows every flag as "--json <bool>", as if it took a value.
    rich_markup_mode=None,
)
out, err = render.out, render.err


def _print_version(value: bool) -> None:
    if value:
        out.print(__version__, highlight=False)
        raise typer.Exit()


@app.callback()
def _root(
    version: Annotated[
        bool,
        typer.Option("--version", help="Print the version and exit.", is_eager=True, callback=_print_version),
    ] = False,
) -> None:
    """FHIR–DICOMweb bridge: publish a DICOMweb archive's studies as FHIR R4 ImagingStudy."""


def _configure_logging(level: str) -> None:
    if err.is_terminal:
        # On a terminal, through the console a progress display uses: log lines go above it.
        from rich.logging import RichHandler

        handler: logging.Handler = RichHandler(console=err, show_path=False, markup=False)
        handler.setFormatter(logging.Formatter("%(name)s: %(message)s"))
        logging.basicConfig(level=level, handlers=[handler])
    else:
        logging.basicConfig(
            level=level,
            format="%(asctime)s %(levelname)s %(name)s: %(message)s",
            stream=sys.stderr,
        )
    logging.getLogger("httpx").setLevel(logging.WARNING)
    logging.getLogger("httpcore").setLevel(logging.WARNING)
    # Alembic says at INFO what it inspects on every start; the store logs a migration it runs.
    logging.getLogger("alembic").setLevel(logging.WARNING)


def _settings(*, store_only: bool = False) -> Settings:
    """The settings, or exit 2 naming what is wrong (``store_only``: upstream URLs may be unset)."""
    from bridge.config import load_settings, load_store_settings

    try:
        settings = load_store_settings() if store_only else load_settings()
    except ConfigurationError as exc:
        err.print(f"[red]configuration error:[/red] {exc}", highlight=False)
        raise typer.Exit(ExitCode.CONFIGURATION) from None
    _configure_logging(settings.log_level)
    return settings


def _fail(exc: BridgeError) -> typer.Exit:
    if isinstance(exc, ConfigurationError):
        err.print(f"[red]configuration error:[/red] {exc}", highlight=False)
        return typer.Exit(ExitCode.CONFIGURATION)
    if isinstance(exc, UpstreamAuthError):
        upstream = "FHIR server" if exc.service == "fhir" else "DICOMweb archive"
        err.print(f"[red]{upstream} refused the connection:[/red] {exc}", highlight=False)
        return typer.Exit(ExitCode.UPSTREAM)
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


SourceOption = Annotated[
    str | None, typer.Option("--source", help="Only this source (a name in BRIDGE_SOURCES).")
]
ProgressOption = Annotated[
    float,
    typer.Option(
        "--progress-every",
        min=0.1,
        help="Without a terminal: seconds between progress lines (a terminal gets a live display).",
    ),
]


@app.command()
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
        err.print("[red]error:[/red] --study and --reconcile cannot be combined", highlight=False)
        raise typer.Exit(ExitCode.CONFIGURATION)
    _check_study_uids(study or [])
    settings = _settings()
    sources = _sources(settings, source)
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
        err.print(
            f"[red]not found:[/red] study {uid} is in no archive of "
            f"{', '.join(f'{s.name} ({s.dicomweb.base})' for s in sources)}: nothing was synced for it; "
            "check the UID, or BRIDGE_DICOMWEB_URL",
            highlight=False,
        )
    raise typer.Exit(max(*codes, ExitCode.PARKED if not_found else ExitCode.OK))


def _check_study_uids(uids: list[str]) -> None:
    from bridge.mapping.uid import is_uid

    for uid in uids:
        if not is_uid(uid):
            err.print(f"[red]error:[/red] --study {uid!r} is not a valid DICOM UID", highlight=False)
            raise typer.Exit(ExitCode.CONFIGURATION)


def _sources(settings: Settings, name: str | None) -> list[SourceSettings]:
    every = settings.each_source()
    if name is None:
        return every
    chosen = [s for s in every if s.name == name]
    if not chosen:
        err.print(
            f"[red]error:[/red] --source {name!r} is not one of: {', '.join(s.name for s in every)}",
            highlight=False,
        )
        raise typer.Exit(ExitCode.CONFIGURATION)
    return chosen


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
            return await runtime.worker.run()

    started = time.perf_counter()
    try:
        with RunProgress(source.name, err, every=progress_every) as progress:
            report = asyncio.run(run(progress))
    except BridgeError as exc:
        not_found.clear()  # unknown, not absent: the failure is the message
        return int(_fail(exc).exit_code)
    not_found.intersection_update(report.not_found)
    return _report_outcome(source, report, time.perf_counter() - started, as_json)


def _report_outcome(source: SourceSettings, report: RunReport, seconds: float, as_json: bool) -> int:
    """Print a run's summary (text or JSON); its exit code: 1 when studies were parked."""
    summary = render.report_dict(report, seconds)
    if as_json:
        out.print_json(data={"source": source.name, **summary})
    else:
        render.print_summary(source, report, summary)
    return ExitCode.PARKED if report.counts.parked else ExitCode.OK


def _dry_run(settings: Settings, source: SourceSettings, study_uids: list[str], as_json: bool) -> None:
    import asyncio

    from bridge.runtime import open_runtime

    async def run() -> list[Preview]:
        async with open_runtime(settings, source) as runtime:
            return await runtime.worker.preview(study_uids=study_uids)

    try:
        previews = asyncio.run(run())
    except BridgeError as exc:
        raise _fail(exc) from None
    render.print_previews(previews, as_json)


async def _until_signalled(stop: asyncio.Event) -> None:
    import asyncio
    import signal

    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    await stop.wait()


@app.command()
def check(
    as_json: Annotated[bool, typer.Option("--json", help="Print the findings as JSON.")] = False,
    sample: Annotated[
        int, typer.Option(min=1, max=1000, help="Studies sampled from each archive for its issuers.")
    ] = 200,
    source: SourceOption = None,
) -> None:
    """Try every configured peer once and say what to fix: archive, FHIR server, state store, viewers.

    Lists the Issuers of Patient ID of a sample of the archive's studies and the
    BRIDGE_PATIENT_ISSUER_SYSTEMS to fill in. Writes only each source's Endpoint, as a sync would
    first. Exit code as for sync: the worst finding's.
    """
    import asyncio

    from bridge.cli.check import run_checks

    settings = _settings()
    report = asyncio.run(run_checks(settings, _sources(settings, source), sample))
    render.print_check(report, as_json)
    raise typer.Exit(int(report.worst))


@app.command()
def worker() -> None:
    """Run the scheduled sync worker until SIGTERM/SIGINT (the study in flight finishes first)."""
    import asyncio
    from contextlib import AsyncExitStack

    settings = _settings()

    if settings.metrics_port is not None:
        from prometheus_client import start_http_server

        from bridge.metrics import REGISTRY

        start_http_server(settings.metrics_port, addr=settings.metrics_host, registry=REGISTRY)

    from bridge.runtime import open_runtime, push_drainer

    async def run() -> None:
        async with AsyncExitStack() as stack:
            schedulers, runtimes = [], []
            for each in _sources(settings, None):
                runtime = await stack.enter_async_context(open_runtime(settings, each))
                runtimes.append(runtime)
                schedulers.append(runtime.scheduler())
            for scheduler in schedulers:
                await scheduler.start()
            drainer = push_drainer(runtimes)  # pushed studies, synced between the cycles
            drainer.start()
            await _until_signalled(asyncio.Event())
            logger.info("stopping: finishing the studies in flight")
            await asyncio.gather(drainer.stop(), *(s.shutdown() for s in schedulers))

    try:
        asyncio.run(run())
    except BridgeError as exc:
        raise _fail(exc) from None


def _parse_day(value: str, option: str) -> date:
    try:
        return datetime.strptime(value.replace("-", ""), "%Y%m%d").date()
    except ValueError:
        err.print(f"[red]error:[/red] {option} {value!r} is not a date (YYYY-MM-DD)", highlight=False)
        raise typer.Exit(ExitCode.CONFIGURATION) from None


@app.command()
def backfill(
    from_: Annotated[str, typer.Option("--from", help="First StudyDate, YYYY-MM-DD.")],
    to: Annotated[str, typer.Option("--to", help="Last StudyDate, YYYY-MM-DD.")],
    slice_days: Annotated[int, typer.Option(min=1, max=366, help="Days per QIDO slice.")] = 1,
    source: SourceOption = None,
    progress_every: ProgressOption = 5.0,
) -> None:
    """First load of a large archive, in StudyDate slices; resumes where an interrupted one stopped."""
    settings = _settings()
    codes = [
        _backfill(settings, each, from_, to, slice_days, progress_every)
        for each in _sources(settings, source)
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
        err.print("[red]error:[/red] --from is after --to", highlight=False)
        raise typer.Exit(ExitCode.CONFIGURATION)
    name = plan.checkpoint_name(first, last)
    totals = {"seen": 0, "created": 0, "updated": 0, "unchanged": 0, "parked": 0}

    async def run() -> None:
        async with open_runtime(settings, source) as runtime:
            done = await asyncio.to_thread(runtime.store.checkpoint, source.name, name)
            slices = plan.slices(plan.resume_from(first, done), last, slice_days)
            if done is not None:
                out.print(f"resuming after {done}", highlight=False)
            with RunProgress(source.name, err, every=progress_every, slices=len(slices)) as progress:
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
        return int(_fail(exc).exit_code)
    out.print(
        f"source {source.name}: " + ", ".join(f"{k} {v}" for k, v in totals.items()),
        highlight=False,
    )
    return ExitCode.PARKED if totals["parked"] else ExitCode.OK


@app.command()
def status(
    as_json: Annotated[bool, typer.Option("--json", help="Print as JSON.")] = False,
    runs: Annotated[int, typer.Option(min=1, max=100, help="How many recent runs to show.")] = 5,
    source: SourceOption = None,
) -> None:
    """Show what the state store knows, per source: health, counts, recent runs, parked studies.

    Reads only the state store (BRIDGE_STATE_URL): the archive's and FHIR server's URLs may be unset.
    """
    from datetime import UTC

    from bridge.config import UNSET_URL
    from bridge.state.store import SqlStore

    settings = _settings(store_only=True)
    try:
        store = SqlStore(settings.state_url)
    except StoreError as exc:
        raise _fail(exc) from None
    from bridge.sync.freshness import PATHS, checkpoint_name, last_lag

    try:
        known = store.sources()
        # The configured sources too (one never synced is news), unless the archive is unset.
        unset = str(settings.dicomweb.url) == UNSET_URL and not settings.sources
        configured = [] if unset else [s.name for s in settings.each_source()]
        if source is not None and source not in {*known, *configured}:
            err.print(
                f"[red]error:[/red] --source {source!r} is not one of: {', '.join([*configured, *known])}",
                highlight=False,
            )
            raise typer.Exit(ExitCode.CONFIGURATION)
        names = [source] if source else list(dict.fromkeys([*configured, *known]))
        sources = [
            render.SourceHealth(
                name=name,
                counts=store.counts(name),
                last_success=store.last_successful_run(name),
                last_run=next(iter(store.runs(1, source=name)), None),
                parked=store.parked(name),
                newest_published=store.newest_published(name),
            )
            for name in names
        ]
        counts = store.counts(source)
        recent = store.runs(runs, source=source)
        parked = store.parked(source)
        withdrawn = store.withdrawn(source)
        waiting, oldest = store.push_queue()
        lags = [
            {"source": name, "path": path, **kept}
            for name in names
            for path in PATHS
            if (kept := last_lag(store.checkpoint(name, checkpoint_name(path)))) is not None
        ]
    except StoreError as exc:
        raise _fail(exc) from None
    finally:
        store.close()
    label = source or (names[0] if len(names) == 1 else "all")
    data = render.status_dict(label, counts, recent, parked, sources, datetime.now(UTC), withdrawn)
    data["freshness"] = render.freshness_dict(waiting, oldest, lags, time.time())
    if as_json:
        out.print_json(data=data)
        return
    render.print_status(data)


@app.command()
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
    settings = _settings()
    _check_study_uids(study or [])
    if accept_demographics and not study:
        err.print(
            "[red]error:[/red] --accept-demographics needs --study UID: an override is given study by study",
            highlight=False,
        )
        raise typer.Exit(ExitCode.CONFIGURATION)
    codes = [
        _retry_source(settings, each, study or [], as_json, accept=accept_demographics)
        for each in _sources(settings, source)
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
        return int(_fail(exc).exit_code)
    if unqueryable:
        err.print(
            f"source {source.name}: {unqueryable} parked studies have no valid Study Instance UID and "
            "cannot be asked for by UID: correct the UID in the archive; every full `bridge sync` "
            "checks them again",
            highlight=False,
        )
    if report is None:
        if as_json:
            out.print_json(data={"source": source.name, "retried": 0, "not_retriable": unqueryable})
        else:
            out.print(f"source {source.name}: no parked study to retry", highlight=False)
        return ExitCode.PARKED if unqueryable else ExitCode.OK
    code = _report_outcome(source, report, time.perf_counter() - started, as_json)
    return max(code, ExitCode.PARKED) if unqueryable else code


HostOption = Annotated[str, typer.Option(help="Address to listen on.")]
PortOption = Annotated[int, typer.Option(min=1, max=65535, help="TCP port to listen on.")]


@app.command()
def serve(host: HostOption = "127.0.0.1", port: PortOption = 8000) -> None:
    """Serve the resolver API (links, viewer redirects, on-demand sync, health, metrics) until stopped."""
    _serve(host, port, run_scheduler=False)


@app.command()
def run(host: HostOption = "127.0.0.1", port: PortOption = 8000) -> None:
    """Run the resolver API and the scheduled sync worker in one process, until stopped."""
    _serve(host, port, run_scheduler=True)


def _serve(host: str, port: int, *, run_scheduler: bool) -> None:
    import uvicorn

    from bridge.api.app import create_app
    from bridge.api.exposure import check_listen_address

    settings = _settings()
    try:
        check_listen_address(host, settings)
        api = create_app(settings, run_scheduler=run_scheduler)
    except BridgeError as exc:
        raise _fail(exc) from None
    # uvicorn's access log prints raw paths and query strings; the app logs route templates instead.
    # X-Forwarded-For / -Proto only from the proxies the operator names (BRIDGE_TRUSTED_PROXIES), never
    # uvicorn's default of 127.0.0.1: any local process could write the audit trail's client address.
    trusted = list(settings.trusted_proxies)
    uvicorn.run(
        api,
        host=host,
        port=port,
        log_config=None,
        access_log=False,
        server_header=False,
        proxy_headers=bool(trusted),
        forwarded_allow_ips=trusted or None,
    )


@app.command("front-config")
def front_config(
    output: Annotated[
        Path | None, typer.Option(help="Write it to this file (mode 0600, it holds a secret); else stdout.")
    ] = None,
    listen: Annotated[str, typer.Option(help="Where the front listens: host:port.")] = "127.0.0.1:8080",
    bridge: Annotated[str, typer.Option(help="Where bridge serve listens, as the front reaches it.")] = (
        "http://127.0.0.1:8000"
    ),
    state_dir: Annotated[
        Path, typer.Option(help="nginx's pid file, temporary files and grant cache; writable by its workers.")
    ] = Path("/var/lib/bridge-front"),
    certificate: Annotated[Path | None, typer.Option(help="PEM certificate for https callers.")] = None,
    certificate_key: Annotated[Path | None, typer.Option(help="Its PEM key.")] = None,
    workers: Annotated[int, typer.Option(min=1, max=64, help="nginx worker processes.")] = 1,
    user: Annotated[str | None, typer.Option(help="The workers' user, when nginx starts as root.")] = None,
) -> None:
    """Write the nginx configuration of the image gateway's front (needs BRIDGE_GATEWAY_FRONT_SECRET).

    The front serves WADO-RS retrieves straight from the archive once the bridge has granted the
    caller the study, and hands every other request to bridge serve (docs/integrator-guide.md).
    """
    from bridge.gateway.front import FrontOptions, nginx_config

    settings = _settings()
    options = FrontOptions(listen, bridge, state_dir, certificate, certificate_key, workers, user)
    try:
        text = nginx_config(settings, options)
    except BridgeError as exc:
        raise _fail(exc) from None
    if output is None:
        sys.stdout.write(text)
        return
    output.touch(mode=0o600, exist_ok=True)
    output.chmod(0o600)
    output.write_text(text, encoding="utf-8")


@app.command()
def version() -> None:
    """Print the bridge's version."""
    out.print(__version__)


def main() -> None:
    """Console-script entry point."""
    app()
