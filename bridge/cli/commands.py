"""The ``bridge`` command: its subcommands, in the order ``bridge --help`` lists them.

Each lives in the module of its concern (syncing, reports, serving) and imports what it uses when
it runs; base.py holds what they share.
"""

from __future__ import annotations

from bridge.cli import reports, serving, syncing
from bridge.cli.base import ExitCode, app

__all__ = ["ExitCode", "app", "main"]

app.command()(syncing.sync)
app.command()(reports.check)
app.command()(serving.worker)
app.command()(syncing.backfill)
app.command()(reports.status)
app.command()(syncing.retry)
app.command()(serving.serve)
app.command()(serving.run)
app.command("front-config")(serving.front_config)
app.command()(reports.version)


def main() -> None:
    """Console-script entry point."""
    app()
