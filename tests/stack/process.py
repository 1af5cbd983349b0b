"""What every server launcher of the test stack shares: free ports, log tails, stopping."""

from __future__ import annotations

import signal
import socket
import subprocess
from pathlib import Path

LOG_TAIL_LINES = 40


def free_loopback_port() -> int:
    """Ask the kernel for a free TCP port on 127.0.0.1."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def log_tail(path: Path, lines: int = LOG_TAIL_LINES) -> str:
    """The end of a server's log, for the error raised when it fails to start."""
    try:
        text = path.read_text(encoding="utf-8", errors="replace")
    except OSError as exc:
        return f"(could not read {path}: {exc})"
    return "\n".join(text.splitlines()[-lines:])


def terminate(process: subprocess.Popen[bytes] | None, grace: float = 10.0) -> None:
    """Stop a server process: SIGTERM, then SIGKILL after ``grace`` seconds. None is a no-op."""
    if process is None or process.poll() is not None:
        return
    process.send_signal(signal.SIGTERM)
    try:
        process.wait(timeout=grace)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait(timeout=10)
