"""The ``bridge`` command: ``commands`` defines it, ``render`` shows its results."""

from bridge.cli.commands import app, main

__all__ = ["app", "main"]
