"""The image gateway's nginx front on loopback, configured by `bridge front-config` (bridge/gateway/front.py).

Debian's nginx is installed with apt when missing, like Orthanc. The configuration is written by
the bridge's own command from the same settings (environment) the bridge under test runs with,
so the tests exercise what an operator would deploy.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from tests.stack.process import Launcher, apt_install, free_loopback_port, log_tail

APT_PACKAGE = "nginx"  # Debian's build has the auth_request module the front needs
WORKER_USER = ("nobody", "nogroup")  # nginx's workers when the tests run as root


def _nginx() -> str | None:
    """nginx's binary: on PATH, or where Debian puts it (/usr/sbin is not on every user's PATH)."""
    return shutil.which("nginx") or ("/usr/sbin/nginx" if os.path.exists("/usr/sbin/nginx") else None)


def ensure_installed() -> str:
    """The nginx binary; installed with apt when missing."""
    found = _nginx()
    if found:
        return found
    apt_install(APT_PACKAGE)
    found = _nginx()
    if found is None:
        raise RuntimeError("apt-get installed nginx but its binary was still not found")
    return found


class Nginx(Launcher):
    """One nginx in the foreground on a loopback port, with the configuration ``configure`` writes."""

    def __init__(self, *, port: int = 0, name: str = "nginx") -> None:
        self.name = name
        self._requested_port = port
        self.port = port
        self.workdir: Path | None = None
        self.config_path: Path | None = None
        self.log_path: Path | None = None
        self._process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def configure(self, config_path: Path, state: Path, worker_user: str | None) -> None:
        """Write the configuration to ``config_path``: listening on ``self.port``, its files in ``state``."""
        raise NotImplementedError

    def start(self, timeout: float = 30.0) -> None:
        binary = ensure_installed()
        self.workdir = Path(tempfile.mkdtemp(prefix=f"bridge-{self.name}-"))
        state = self.workdir / "state"
        state.mkdir()
        self.port = self._requested_port or free_loopback_port()
        self.config_path = self.workdir / "nginx.conf"
        self.log_path = self.workdir / "nginx.log"
        worker_user = None
        if os.geteuid() == 0:  # nginx's workers drop to this user; they write the state folder
            worker_user = " ".join(WORKER_USER)
            shutil.chown(state, *WORKER_USER)
            self.workdir.chmod(0o755)
        self.configure(self.config_path, state, worker_user)
        with open(self.log_path, "ab") as log:
            self._process = subprocess.Popen(
                [binary, "-e", "stderr", "-c", str(self.config_path)],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        self._track()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self._process.poll() is not None:
                raise RuntimeError(
                    f"nginx exited with code {self._process.returncode}; log:\n{log_tail(self.log_path)}"
                )
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=1).close()
                return
            except OSError:
                time.sleep(0.05)
        self.stop()
        raise RuntimeError(f"nginx did not listen on {self.url} within {timeout:.0f} s")

    def _cleanup(self) -> None:
        """Remove nginx's working folder."""
        if self.workdir is not None:
            shutil.rmtree(self.workdir, ignore_errors=True)
            self.workdir = None

class NginxFront(Nginx):
    """nginx in front of a running bridge API, with the configuration `bridge front-config` writes."""

    def __init__(
        self,
        env: dict[str, str],
        bridge_url: str,
        *,
        port: int = 0,
        name: str = "front",
        certificate: Path | None = None,
        certificate_key: Path | None = None,
    ) -> None:
        super().__init__(port=port, name=name)
        self.env = env  # the BRIDGE_* settings of the bridge behind it (BRIDGE_GATEWAY_FRONT_SECRET included)
        self.bridge_url = bridge_url
        self.certificate = certificate  # TLS for callers (--certificate, --certificate-key)
        self.certificate_key = certificate_key

    @property
    def url(self) -> str:
        scheme = "https" if self.certificate is not None else "http"
        return f"{scheme}://127.0.0.1:{self.port}"

    def configure(self, config_path: Path, state: Path, worker_user: str | None) -> None:
        command = [
            sys.executable, "-m", "bridge", "front-config",
            "--output", str(config_path),
            "--listen", f"127.0.0.1:{self.port}",
            "--bridge", self.bridge_url,
            "--state-dir", str(state),
        ]  # fmt: skip
        if worker_user is not None:
            command += ["--user", worker_user]
        if self.certificate is not None and self.certificate_key is not None:
            command += ["--certificate", str(self.certificate)]
            command += ["--certificate-key", str(self.certificate_key)]
        written = subprocess.run(command, env=self.env, capture_output=True, text=True, check=False)
        if written.returncode != 0:
            raise RuntimeError(f"bridge front-config failed ({written.returncode}): {written.stderr.strip()}")
