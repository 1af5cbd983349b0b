"""The commands that report: ``check`` (the peers), ``status`` (the store) and ``version``."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated

import typer

from bridge import __version__
from bridge.cli.base import ExitCode, SourceOption, fail, load_settings, sources_of
from bridge.cli.consoles import err, out
from bridge.errors import StoreError


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

    from bridge.cli import render
    from bridge.cli.check import run_checks

    settings = load_settings()
    report = asyncio.run(run_checks(settings, sources_of(settings, source), sample))
    render.print_check(report, as_json)
    raise typer.Exit(int(report.worst))


def status(
    as_json: Annotated[bool, typer.Option("--json", help="Print as JSON.")] = False,
    runs: Annotated[int, typer.Option(min=1, max=100, help="How many recent runs to show.")] = 5,
    source: SourceOption = None,
) -> None:
    """Show what the state store knows, per source: health, counts, recent runs, parked studies.

    Reads only the state store (BRIDGE_STATE_URL): the archive's and FHIR server's URLs may be unset.
    """
    from datetime import UTC

    from bridge.cli import render
    from bridge.config import UNSET_URL
    from bridge.state.store import SqlStore

    settings = load_settings(store_only=True)
    try:
        store = SqlStore(settings.state_url)
    except StoreError as exc:
        raise fail(exc) from None
    from bridge.config.choices import ChangeSourceKind
    from bridge.sync.freshness import PATHS, POLL_KINDS, checkpoint_name, last_lag

    try:
        known = store.sources()
        # The configured sources too (one never synced is news), unless the archive is unset.
        unset = str(settings.dicomweb.url) == UNSET_URL and not settings.sources
        each = [] if unset else settings.each_source()
        configured = [s.name for s in each]
        feeds = {s.name for s in each if s.change_source is ChangeSourceKind.ORTHANC}
        if source is not None and source not in {*known, *configured}:
            err().print(
                f"[red]error:[/red] --source {source!r} is not one of: {', '.join([*configured, *known])}",
                highlight=False,
            )
            raise typer.Exit(ExitCode.CONFIGURATION)
        names = [source] if source else list(dict.fromkeys([*configured, *known]))
        pushes = store.push_queue()  # every source syncs each push
        sources = [
            render.SourceHealth(
                name=name,
                counts=store.counts(name),
                last_success=store.last_successful_run(name),
                last_run=next(iter(store.runs(1, source=name)), None),
                parked=store.parked(name),
                newest_published=store.newest_published(name),
                last_poll=store.last_successful_run(name, POLL_KINDS),
                lags={
                    path: kept
                    for path in PATHS
                    if (kept := last_lag(store.checkpoint(name, checkpoint_name(path)))) is not None
                },
                pushes=pushes,
                feed=name in feeds,
            )
            for name in names
        ]
        counts = store.counts(source)
        recent = store.runs(runs, source=source)
        parked = store.parked(source)
        withdrawn = store.withdrawn(source)
    except StoreError as exc:
        raise fail(exc) from None
    finally:
        store.close()
    label = source or (names[0] if len(names) == 1 else "all")
    data = render.status_dict(label, counts, recent, parked, sources, datetime.now(UTC), withdrawn)
    if as_json:
        out().print_json(data=data)
        return
    render.print_status(data)


def version() -> None:
    """Print the bridge's version."""
    out().print(__version__)
