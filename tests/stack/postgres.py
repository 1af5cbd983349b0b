"""A throw-away PostgreSQL server for the test suite, and throw-away databases on it.

:class:`PostgresServer` runs Debian's PostgreSQL (the ``postgresql`` package, installed with apt
when missing) the way :mod:`tests.stack.orthanc` runs Orthanc: ``initdb`` into a temporary folder,
the server on a free loopback port with its socket in that folder, trust authentication for the
``postgres`` role, durability switched off (the data dies with the test run), stopped and removed
at the end. PostgreSQL refuses to run as root, so under root both run as the ``postgres`` system
user the package creates.

``BRIDGE_TEST_POSTGRES`` (an admin URL such as ``postgresql://postgres@127.0.0.1:5432/postgres``)
points the tests at an existing server instead, and nothing is started.

Each :func:`temporary_database` creates ``bridge_test_<random>`` and drops it afterwards
(``WITH (FORCE)``, so connections left by killed workers do not keep it alive).

Manual use::

    python -m tests.stack.postgres        # prints the admin URL, runs until Ctrl-C
"""

from __future__ import annotations

import glob
import os
import pwd
import shutil
import subprocess
import tempfile
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import psycopg

from tests.stack.process import Launcher, apt_install, free_loopback_port, log_tail, terminate

ENVIRONMENT_VARIABLE = "BRIDGE_TEST_POSTGRES"
SYSTEM_USER = "postgres"  # the Debian package's system account; servers started as root run as it
# The data is thrown away after the run, so nothing needs to reach the disk.
FAST_AND_FRAGILE = ("fsync=off", "synchronous_commit=off", "full_page_writes=off")


def find_bin_dir() -> Path | None:
    """The newest ``/usr/lib/postgresql/<version>/bin`` holding a server, or the one on PATH."""
    candidates = glob.glob("/usr/lib/postgresql/*/bin/postgres")
    if candidates:
        newest = max(candidates, key=lambda path: int(Path(path).parent.parent.name.split(".")[0]))
        return Path(newest).parent
    on_path = shutil.which("postgres")
    if on_path and shutil.which("initdb"):
        return Path(on_path).resolve().parent
    return None


def ensure_installed() -> Path:
    """The folder of ``initdb`` and ``postgres``, installing Debian's ``postgresql`` when missing."""
    found = find_bin_dir()
    if found is None:
        apt_install("postgresql")
        found = find_bin_dir()
    if found is None:
        raise RuntimeError("apt-get installed postgresql but no postgres server binary was found")
    return found


class PostgresServer(Launcher):
    """One PostgreSQL server on loopback, in its own temporary data folder."""

    def __init__(self, log_path: Path | None = None) -> None:
        """Describe the server; nothing runs until :meth:`start`."""
        self.port = 0
        self.log_path = log_path
        self._root: Path | None = None
        self._process: subprocess.Popen[bytes] | None = None

    @property
    def admin_url(self) -> str:
        """A libpq URL of the ``postgres`` database as the ``postgres`` superuser."""
        return f"postgresql://postgres@127.0.0.1:{self.port}/postgres"

    def start(self, timeout: float = 60.0) -> None:
        """Initialise a cluster in a temporary folder and start the server on a free port."""
        bin_dir = ensure_installed()
        user = SYSTEM_USER if os.geteuid() == 0 else None
        self._root = Path(tempfile.mkdtemp(prefix="bridge-postgres-"))
        data = self._root / "data"
        if self.log_path is None:
            self.log_path = self._root / "postgres.log"
        if user is not None:
            account = pwd.getpwnam(user)
            os.chown(self._root, account.pw_uid, account.pw_gid)
        init = subprocess.run(
            [str(bin_dir / "initdb"), "-D", str(data), "-U", "postgres", "--auth=trust", "-E", "UTF8",
             "--locale=C", "--no-sync"],
            capture_output=True, text=True, check=False, user=user, cwd=self._root, timeout=120,
        )  # fmt: skip
        if init.returncode != 0:
            raise RuntimeError(f"initdb failed with code {init.returncode}:\n{init.stdout}{init.stderr}")
        for _ in range(3):  # a port probed free may be taken before the server binds it
            self.port = free_loopback_port()
            command = [str(bin_dir / "postgres"), "-D", str(data)]
            for setting in (
                "listen_addresses=127.0.0.1",
                f"port={self.port}",
                f"unix_socket_directories={self._root}",
                "max_connections=200",
                *FAST_AND_FRAGILE,
            ):
                command += ["-c", setting]
            with open(self.log_path, "ab") as log:
                self._process = subprocess.Popen(
                    command,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    stdin=subprocess.DEVNULL,
                    user=user,
                    cwd=self._root,
                )
            if self._wait_ready(timeout):
                return
            terminate(self._process)
        self.stop()
        raise RuntimeError(f"PostgreSQL did not start; the end of its log:\n{log_tail(self.log_path)}")

    def _wait_ready(self, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            assert self._process is not None
            if self._process.poll() is not None:
                return False
            try:
                with psycopg.connect(self.admin_url, connect_timeout=2):
                    return True
            except psycopg.OperationalError:
                time.sleep(0.1)
        return False

    def _cleanup(self) -> None:
        """Remove the server's folder."""
        if self._root is not None:
            shutil.rmtree(self._root, ignore_errors=True)
            self._root = None

@contextmanager
def running_server(log_path: Path | None = None) -> Iterator[str]:
    """The admin URL of ``BRIDGE_TEST_POSTGRES`` when set, else of a server started for the block."""
    existing = os.environ.get(ENVIRONMENT_VARIABLE)
    if existing:
        yield existing
        return
    with PostgresServer(log_path) as server:
        yield server.admin_url


def sqlalchemy_url(server: str, database: str) -> str:
    """The SQLAlchemy URL of ``database`` on the server of the admin URL ``server``."""
    base = server.rsplit("/", 1)[0].replace("postgresql://", "postgresql+psycopg://", 1)
    return f"{base}/{database}"


@contextmanager
def temporary_database(server: str) -> Iterator[str]:
    """Create an empty database on ``server``; yields its SQLAlchemy URL; drops it on exit."""
    name = f"bridge_test_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(server, autocommit=True, connect_timeout=5) as admin:
        admin.execute(f'CREATE DATABASE "{name}"')
    try:
        yield sqlalchemy_url(server, name)
    finally:
        with psycopg.connect(server, autocommit=True, connect_timeout=5) as admin:
            admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


if __name__ == "__main__":
    with PostgresServer() as manual:
        print(manual.admin_url, flush=True)  # noqa: T201
        try:
            while True:
                time.sleep(3600)
        except KeyboardInterrupt:
            pass
