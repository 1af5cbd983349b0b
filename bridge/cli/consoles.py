"""The CLI's two consoles: results to standard output, errors, progress and log lines to standard error.

Made on first use, so that a command that prints nothing through rich never imports it.
"""

from __future__ import annotations

from functools import cache
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from rich.console import Console


@cache
def out() -> Console:
    """The console results are printed to (standard output), made on first use."""
    from rich.console import Console

    return Console()


@cache
def err() -> Console:
    """The console errors, progress and log lines go to (standard error), made on first use."""
    from rich.console import Console

    return Console(stderr=True)
