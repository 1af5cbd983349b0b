"""What every server launcher of the test stack shares: free ports, log tails, stopping."""

from __future__ import annotations

import atexit
import os
import shutil
import signal
import socket
import subprocess
from pathlib import Path
from types import TracebackType
from typing import Any, Self

import httpx

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


def apt_install(*packages: str) -> None:
    """Install Debian packages with apt-get (as root), or say how to when that is not possible."""
    if shutil.which("apt-get") is None or os.geteuid() != 0:
        names = " ".join(packages)
        raise RuntimeError(f"{names}: missing; install them with: sudo apt-get install -y {names}")
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    for command in (
        ["apt-get", "update"],
        ["apt-get", "install", "-y", "--no-install-recommends", *packages],
    ):
        result = subprocess.run(command, env=env, capture_output=True, text=True, check=False)
        if result.returncode != 0:
            tail = "\n".join((result.stdout + result.stderr).splitlines()[-LOG_TAIL_LINES:])
            raise RuntimeError(f"`{' '.join(command)}` failed with code {result.returncode}:\n{tail}")


def require_tool(name: str, needed_by: str) -> str:
    """The path of command ``name``; RuntimeError saying what needs it when it is not on PATH."""
    path = shutil.which(name)
    if path is None:
        raise RuntimeError(f"`{name}` was not found on PATH; {needed_by}")
    return path


class Launcher:
    """A test server started by ``start()`` and stopped by ``stop()``: a context manager too.

    A server that ``_track()`` registers when started is stopped at interpreter exit if still
    running; its ``stop()`` calls ``_untrack()``. A launcher of a server process keeps it in
    ``_process`` (with its admin ``_client``, ``_log_file`` and ``log_path``, removed when
    ``_owns_log``) and inherits ``stop()``; what else it leaves behind goes in ``_cleanup()``.
    """

    _process: subprocess.Popen[bytes] | None = None
    _client: httpx.Client | None = None
    _log_file: Any = None
    _owns_log: bool = False
    log_path: Path | None = None
    _grace: float = 10.0  # seconds between SIGTERM and SIGKILL

    def start(self) -> None:
        raise NotImplementedError

    def stop(self) -> None:
        """Stop the server (SIGTERM, then SIGKILL after the grace) and tidy up; safe to call twice."""
        self._stop_process()
        self._cleanup()

    def _stop_process(self) -> None:
        if self._client is not None:
            self._client.close()
            self._client = None
        self._untrack()
        process, self._process = self._process, None
        terminate(process, self._grace)
        if self._log_file is not None:
            self._log_file.close()
            self._log_file = None
        if self._owns_log and self.log_path is not None:
            self.log_path.unlink(missing_ok=True)
            self.log_path = None
            self._owns_log = False

    def _cleanup(self) -> None:
        """Remove what else the server left behind (a data folder, a configuration file)."""

    def _track(self) -> None:
        _RUNNING.add(self)

    def _untrack(self) -> None:
        _RUNNING.discard(self)

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()


_RUNNING: set[Launcher] = set()


@atexit.register
def _stop_leftovers() -> None:
    for server in list(_RUNNING):
        server.stop()


def stop_on_sigterm() -> None:
    """Make SIGTERM end a foreground server's main like Ctrl-C (its ``finally`` stops the server)."""

    def interrupt(signum: int, frame: object) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, interrupt)


class AdminApi:
    """The ``/__admin`` endpoints every test FHIR server answers alike, so fixtures use either engine.

    ``stats()`` gives counters since start or the last reset: ``requests`` (top-level FHIR HTTP
    requests; a batch or transaction is one), ``reads`` and ``searches`` (bundle entries included),
    ``writes`` (every create, update or delete handed to the storage, bundle entries and refused
    attempts included), ``by_method``, ``by_status``, ``writes_by_kind`` and ``bundle_entries``.
    A request is in them once its answer has reached the client: HAPI counts after answering, so
    there the stats and a reset first wait for the requests that arrived before them.
    """

    _client: httpx.Client | None
    running: bool

    def _admin(self) -> httpx.Client:
        if self._client is None or not self.running:
            raise RuntimeError(f"{type(self).__name__} is not running")
        return self._client

    def stats(self) -> dict[str, Any]:
        """Counters since start or the last reset (see the class docstring)."""
        response = self._admin().get("/__admin/stats")
        response.raise_for_status()
        result: dict[str, Any] = response.json()
        return result

    def reset_stats(self) -> None:
        """Zero every counter."""
        self._admin().post("/__admin/reset-stats").raise_for_status()

    def clear(self) -> None:
        """Drop every stored resource (and, on HAPI, every version and cached search); counters stay."""
        self._admin().post("/__admin/clear").raise_for_status()
