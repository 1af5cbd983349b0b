"""The long-running commands: ``worker``, ``serve`` and ``run``, and the front's ``front-config``."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from bridge.cli.base import HostOption, PortOption, fail, load_settings, logger, sources_of
from bridge.errors import BridgeError

if TYPE_CHECKING:
    import asyncio


async def _until_signalled(stop: asyncio.Event) -> None:
    import asyncio
    import signal

    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    await stop.wait()


def worker() -> None:
    """Run the scheduled sync worker until SIGTERM/SIGINT (the study in flight finishes first)."""
    import asyncio
    from contextlib import AsyncExitStack

    settings = load_settings(batched_logs=True)  # a long run, stopped by a signal

    if settings.metrics.port is not None:
        from prometheus_client import start_http_server

        from bridge.metrics import REGISTRY

        start_http_server(settings.metrics.port, addr=settings.metrics.host, registry=REGISTRY)

    from bridge.runtime import open_runtimes, push_drainer

    async def run() -> None:
        async with AsyncExitStack() as stack:
            # every source's runtime over one store and one client per upstream
            runtimes = await stack.enter_async_context(open_runtimes(settings, sources_of(settings, None)))
            schedulers = [runtime.scheduler() for runtime in runtimes]
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
        raise fail(exc) from None


def serve(host: HostOption = "127.0.0.1", port: PortOption = 8000) -> None:
    """Serve the resolver API (links, viewer redirects, on-demand sync, health, metrics) until stopped."""
    _serve(host, port, run_scheduler=False)


def run(host: HostOption = "127.0.0.1", port: PortOption = 8000) -> None:
    """Run the resolver API and the scheduled sync worker in one process, until stopped."""
    _serve(host, port, run_scheduler=True)


def _serve(host: str, port: int, *, run_scheduler: bool) -> None:
    import signal

    import uvicorn

    from bridge.api.app import create_app
    from bridge.api.exposure import check_listen_address
    from bridge.logs import write_then_end

    settings = load_settings(batched_logs=True)  # a line per request, in batches
    try:
        check_listen_address(host, settings)
        api = create_app(settings, run_scheduler=run_scheduler)
    except BridgeError as exc:
        raise fail(exc) from None
    # uvicorn ends a SIGTERM by raising it again under the handler it found: this one writes the
    # batched log lines first (a server's last lines, "scheduler stopped" among them).
    signal.signal(signal.SIGTERM, write_then_end)
    # uvicorn's access log prints raw paths and query strings; the app logs route templates instead.
    # X-Forwarded-For / -Proto are the app's to believe (bridge/api/forwarded.py: the front's secret or
    # BRIDGE_TRUSTED_PROXIES), never uvicorn's: its default believes any local process, which could
    # then write the audit trail's client address.
    uvicorn.run(
        api,
        host=host,
        port=port,
        log_config=None,
        access_log=False,
        server_header=False,
        proxy_headers=False,
    )


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

    settings = load_settings()
    options = FrontOptions(listen, bridge, state_dir, certificate, certificate_key, workers, user)
    try:
        text = nginx_config(settings, options)
    except BridgeError as exc:
        raise fail(exc) from None
    if output is None:
        sys.stdout.write(text)
        return
    output.touch(mode=0o600, exist_ok=True)
    output.chmod(0o600)
    output.write_text(text, encoding="utf-8")
