"""A throw-away HAPI FHIR JPA server (R4) for the test suite: the second real FHIR engine.

The server is the small Maven project in ``tests/stack/hapi``: HAPI FHIR's JPA server (pinned
``ca.uhn.hapi.fhir`` artifacts from Maven Central) on Spring Boot, with an H2 database in a
temporary directory. :func:`ensure_built` packages it once into ``target/hapi-test-server.jar``
(``scripts/setup.sh`` calls it) and rebuilds only when its sources change: a digest of the POM and
the sources is kept beside the jar. The build runs Maven offline first and online when a
dependency is missing from the local repository.

The server listens on 127.0.0.1 only, under ``/fhir/R4``, and answers the same admin endpoints as
the Medplum test server (``tests/stack/fhir.py``): ``GET /__admin/health``, ``GET /__admin/stats``,
``POST /__admin/reset-stats`` and ``POST /__admin/clear`` (``$expunge`` of everything), so the
fixtures use either through one interface.

HAPI's behaviour is left at its defaults wherever it decides how the server answers a client:
server-assigned numeric ids, client ids that must hold a non-digit, weak ETags, referential
integrity on write, case-sensitive token search, paging (20 a page, at most 200).

Manual use::

    python -m tests.stack.hapi --port 8080
"""

from __future__ import annotations

import argparse
import hashlib
import os
import shutil
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

PROJECT_DIR = Path(__file__).resolve().parent / "hapi"
JAR = PROJECT_DIR / "target" / "hapi-test-server.jar"
DIGEST = PROJECT_DIR / "target" / "sources.sha256"
BASE_PATH = "/fhir/R4"
NEEDS = "the HAPI FHIR test server needs Java 17+ and Maven"  # said when a tool is missing
BUILD_TIMEOUT_SECONDS = 1200.0
# A JVM sized for a 2-core test machine: a bounded heap, the serial collector, and the quick
# (C1) compiler only, which starts HAPI faster; benchmarks use BENCHMARK_JVM_OPTIONS instead.
JVM_OPTIONS = ("-Xmx1g", "-XX:+UseSerialGC", "-XX:TieredStopAtLevel=1")
BENCHMARK_JVM_OPTIONS = ("-Xmx2g",)


def sources_digest(project_dir: Path = PROJECT_DIR) -> str:
    """A digest of everything the jar is built from (the POM and ``src/``)."""
    digest = hashlib.sha256()
    files = [project_dir / "pom.xml", *sorted(p for p in (project_dir / "src").rglob("*") if p.is_file())]
    for path in files:
        digest.update(str(path.relative_to(project_dir)).encode())
        digest.update(b"\0")
        digest.update(path.read_bytes())
        digest.update(b"\0")
    return digest.hexdigest()


def ensure_built(project_dir: Path = PROJECT_DIR) -> Path:
    """The runnable jar, built with Maven unless one built from the same sources is there."""
    jar = project_dir / "target" / JAR.name
    digest_file = project_dir / "target" / DIGEST.name
    wanted = sources_digest(project_dir)
    if jar.is_file() and digest_file.is_file() and digest_file.read_text().strip() == wanted:
        return jar
    mvn = require_tool("mvn", NEEDS)
    require_tool("java", NEEDS)
    failures: list[str] = []
    # Offline first: the usual case, with every dependency already in the local repository.
    for offline in (["-o"], []):
        command = [mvn, "-q", "-B", *offline, "package", "-DskipTests"]
        try:
            result = subprocess.run(
                command,
                cwd=project_dir,
                capture_output=True,
                text=True,
                check=False,
                timeout=BUILD_TIMEOUT_SECONDS,
            )
        except subprocess.TimeoutExpired:
            failures.append(f"`{' '.join(command[1:])}` timed out after {BUILD_TIMEOUT_SECONDS:.0f} s")
            continue
        if result.returncode == 0 and jar.is_file():
            digest_file.write_text(wanted + "\n")
            return jar
        tail = "\n".join((result.stdout + result.stderr).splitlines()[-LOG_TAIL_LINES:])
        failures.append(f"`mvn {' '.join(command[1:])}` failed with code {result.returncode}:\n{tail}")
    raise RuntimeError(f"could not build the HAPI FHIR test server in {project_dir}:\n" + "\n".join(failures))


class HapiTestServer(Launcher, AdminApi):
    """One JVM serving HAPI FHIR JPA (R4) on loopback, with a database that :meth:`stop` removes."""

    def __init__(
        self,
        port: int | None = None,
        log_path: Path | None = None,
        *,
        jvm_options: tuple[str, ...] = JVM_OPTIONS,
    ) -> None:
        """Describe the server; nothing runs until :meth:`start`.

        ``port`` defaults to a free loopback port. The server's output goes to ``log_path``, or to
        a temporary file that :meth:`stop` removes.
        """
        self.jvm_options = jvm_options
        self.port: int = port or 0
        self._requested_port = port
        self._requested_log_path = log_path
        self.log_path: Path | None = log_path
        self._owns_log = False
        self._data_dir: Path | None = None
        self._process: subprocess.Popen[bytes] | None = None
        self._log_file: Any = None
        self._client: httpx.Client | None = None
        self.startup_seconds: float | None = None

    @property
    def root_url(self) -> str:
        """``http://127.0.0.1:PORT``, where the admin endpoints live."""
        return f"http://127.0.0.1:{self.port}"

    @property
    def base_url(self) -> str:
        """The FHIR base, e.g. ``http://127.0.0.1:8080/fhir/R4``."""
        return f"{self.root_url}{BASE_PATH}"

    @property
    def running(self) -> bool:
        return self._process is not None and self._process.poll() is None

    @property
    def pid(self) -> int | None:
        return self._process.pid if self._process is not None else None

    def start(self, timeout: float = 600.0) -> None:
        """Build if needed, start the JVM and wait until the FHIR API answers.

        Raises RuntimeError, with the end of the server's log, when it exits or does not answer
        within ``timeout`` seconds (generous: on 2 busy cores HAPI took over 3 minutes to start).
        """
        if self.running:
            return
        java = require_tool("java", NEEDS)
        jar = ensure_built()
        if not self._requested_port:
            self.port = free_loopback_port()
        if self._requested_log_path is None:
            fd, name = tempfile.mkstemp(prefix="hapi-test-server-", suffix=".log")
            os.close(fd)
            self.log_path = Path(name)
            self._owns_log = True
        assert self.log_path is not None
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        self._data_dir = Path(tempfile.mkdtemp(prefix="hapi-test-db-"))
        self._log_file = open(self.log_path, "ab")  # noqa: SIM115 - closed in stop()
        started = time.monotonic()
        self._process = subprocess.Popen(
            [
                java,
                *self.jvm_options,
                "-jar",
                str(jar),
                f"--server.port={self.port}",
                f"--hapi.test.data-dir={self._data_dir}",
            ],
            cwd=self._data_dir,
            # The server exits by itself when this process dies without calling stop().
            env=dict(os.environ, HAPI_PARENT_PID=str(os.getpid())),
            stdin=subprocess.DEVNULL,
            stdout=self._log_file,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        self._track()
        self._client = httpx.Client(base_url=self.root_url, timeout=60.0)
        deadline = started + timeout
        while True:
            if self._process.poll() is not None:
                code = self._process.returncode
                tail = log_tail(self.log_path)
                self.stop()
                raise RuntimeError(
                    f"the HAPI FHIR test server exited with code {code} while starting:\n{tail}"
                )
            try:
                if self._client.get(f"{BASE_PATH}/metadata", timeout=5.0).status_code == 200:
                    self.startup_seconds = time.monotonic() - started
                    return
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                tail = log_tail(self.log_path)
                self.stop()
                raise RuntimeError(
                    f"the HAPI FHIR test server did not answer within {timeout:.0f} s:\n{tail}"
                )
            time.sleep(0.25)

    def _cleanup(self) -> None:
        """Drop the server's database."""
        if self._data_dir is not None:
            shutil.rmtree(self._data_dir, ignore_errors=True)
            self._data_dir = None

    def client_ids(self, strategy: str) -> None:
        """Which ids clients may choose: ``ALPHANUMERIC`` (HAPI's default), ``ANY`` or ``NOT_ALLOWED``."""
        self._admin().post(f"/__admin/client-ids/{strategy}").raise_for_status()

    def rss_bytes(self) -> int | None:
        """The JVM's resident memory, from /proc (None when not running or not on Linux)."""
        if not self.running or self.pid is None:
            return None
        try:
            for line in Path(f"/proc/{self.pid}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
        except OSError:
            return None
        return None


if __name__ == "__main__":
    stop_on_sigterm()
    parser = argparse.ArgumentParser(description="Run the HAPI FHIR JPA test server in the foreground.")
    parser.add_argument("--port", type=int, default=8080, help="loopback port (default 8080)")
    parser.add_argument("--log", type=Path, default=None, help="log file (default: a temporary file)")
    parser.add_argument("--build-only", action="store_true", help="build the jar if needed, then exit")
    args = parser.parse_args()
    if args.build_only:
        print(f"HAPI FHIR test server jar: {ensure_built()}", flush=True)
        raise SystemExit(0)
    server = HapiTestServer(port=args.port, log_path=args.log)
    server.start()
    rss = server.rss_bytes() or 0
    print(
        f"HAPI FHIR test server on {server.base_url} (log: {server.log_path}; "
        f"started in {server.startup_seconds:.1f} s, RSS {rss / 2**20:.0f} MiB); Ctrl-C stops it",
        flush=True,
    )
    try:
        while server.running:
            time.sleep(0.5)
    except KeyboardInterrupt:
        pass
    finally:
        server.stop()
