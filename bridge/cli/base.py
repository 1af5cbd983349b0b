"""What every ``bridge`` command shares: the Typer app, exit codes, settings, logging, failures, options."""

from __future__ import annotations

import logging
import sys
from enum import IntEnum
from typing import TYPE_CHECKING, Annotated

import typer

from bridge import __version__
from bridge.cli.consoles import err, out
from bridge.errors import BridgeError, ConfigurationError, StoreError, UpstreamAuthError, UpstreamError

# A command imports what it uses, when it runs: `bridge --help` loads neither the settings nor the
# sync, the store, the web stack nor rich's consoles, and `bridge sync` never loads FastAPI.
if TYPE_CHECKING:

    from bridge.config import Settings, SourceSettings
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


def _print_version(value: bool) -> None:
    if value:
        out().print(__version__, highlight=False)
        raise typer.Exit()


@app.callback()
def _root(
    version: Annotated[
        bool,
        typer.Option("--version", help="Print the version and exit.", is_eager=True, callback=_print_version),
    ] = False,
) -> None:
    """FHIR–DICOMweb bridge: publish a DICOMweb archive's studies as FHIR R4 ImagingStudy."""


def configure_logging(level: str, *, batched: bool = False) -> None:
    """Log at ``level`` to standard error; httpx stays at WARNING (its URLs can carry PatientIDs).

    ``batched`` (the long-running commands, which stop on a signal and then write what waits): off
    a terminal, lines go out in batches, at most 0.2 s late (bridge/logs.py); a server logs a line
    per request. A one-shot command writes each line at once, so nothing waits when it is killed.
    """
    if err().is_terminal:
        # On a terminal, through the console a progress display uses: log lines go above it.
        from rich.logging import RichHandler

        handler: logging.Handler = RichHandler(console=err(), show_path=False, markup=False)
        handler.setFormatter(logging.Formatter("%(name)s: %(message)s"))
        logging.basicConfig(level=level, handlers=[handler])
    elif batched:
        from bridge.logs import BatchedLines

        logging.basicConfig(level=level, handlers=[BatchedLines(sys.stderr)])
    else:
        from bridge.logs import FORMAT

        logging.basicConfig(level=level, format=FORMAT, stream=sys.stderr)
    # No format shows the thread, process or multiprocessing name: not looked up for every record.
    logging.logThreads = False
    logging.logProcesses = False
    logging.logMultiprocessing = False
    logging.getLogger("httpx").setLevel(logging.WARNING)
    logging.getLogger("httpcore").setLevel(logging.WARNING)
    # Alembic says at INFO what it inspects on every start; the store logs a migration it runs.
    logging.getLogger("alembic").setLevel(logging.WARNING)


def load_settings(*, store_only: bool = False, batched_logs: bool = False) -> Settings:
    """The settings, or exit 2 naming what is wrong (``store_only``: upstream URLs may be unset).

    ``batched_logs``: see `configure_logging`.
    """
    from bridge.config import load_settings, load_store_settings

    try:
        settings = load_store_settings() if store_only else load_settings()
    except ConfigurationError as exc:
        err().print(f"[red]configuration error:[/red] {exc}", highlight=False)
        raise typer.Exit(ExitCode.CONFIGURATION) from None
    configure_logging(settings.log_level, batched=batched_logs)
    return settings


def fail(exc: BridgeError) -> typer.Exit:
    """Say what failed and what to do; the exit code for the failure's kind (see ExitCode)."""
    if isinstance(exc, ConfigurationError):
        err().print(f"[red]configuration error:[/red] {exc}", highlight=False)
        return typer.Exit(ExitCode.CONFIGURATION)
    if isinstance(exc, UpstreamAuthError):
        upstream = "FHIR server" if exc.service == "fhir" else "DICOMweb archive"
        err().print(f"[red]{upstream} refused the connection:[/red] {exc}", highlight=False)
        return typer.Exit(ExitCode.UPSTREAM)
    if isinstance(exc, UpstreamError):
        err().print(
            f"[red]upstream error:[/red] {exc}\n"
            f"Check that the {'FHIR server' if exc.service == 'fhir' else 'DICOMweb archive'} "
            "is running and that its URL setting is right; nothing is lost, the next run resumes.",
            highlight=False,
        )
        return typer.Exit(ExitCode.UPSTREAM)
    if isinstance(exc, StoreError):
        err().print(f"[red]state store error:[/red] {exc}", highlight=False)
        return typer.Exit(ExitCode.STORE)
    err().print(f"[red]error:[/red] {exc}", highlight=False)
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


def check_study_uids(uids: list[str]) -> None:
    """Exit 2 naming the first --study value that is not exactly a DICOM UID."""
    from bridge.mapping.uid import is_uid

    for uid in uids:
        if not is_uid(uid):
            err().print(f"[red]error:[/red] --study {uid!r} is not a valid DICOM UID", highlight=False)
            raise typer.Exit(ExitCode.CONFIGURATION)


def sources_of(settings: Settings, name: str | None) -> list[SourceSettings]:
    """The configured sources, or only the one --source names (exit 2 when none is named so)."""
    every = settings.each_source()
    if name is None:
        return every
    chosen = [s for s in every if s.name == name]
    if not chosen:
        err().print(
            f"[red]error:[/red] --source {name!r} is not one of: {', '.join(s.name for s in every)}",
            highlight=False,
        )
        raise typer.Exit(ExitCode.CONFIGURATION)
    return chosen


def report_outcome(source: SourceSettings, report: RunReport, seconds: float, as_json: bool) -> int:
    """Print a run's summary (text or JSON); its exit code: 1 when studies were parked."""
    from bridge.cli import render

    summary = render.report_dict(report, seconds)
    if as_json:
        out().print_json(data={"source": source.name, **summary})
    else:
        render.print_summary(source, report, summary)
    return ExitCode.PARKED if report.counts.parked else ExitCode.OK


HostOption = Annotated[str, typer.Option(help="Address to listen on.")]
PortOption = Annotated[int, typer.Option(min=1, max=65535, help="TCP port to listen on.")]
