"""A throw-away Orthanc (with its DICOMweb plugin) for the test suite.

The server is started from Debian's ``orthanc`` and ``orthanc-dicomweb`` packages with a
configuration file written by this module into a private storage folder, so it never reads
``/etc/orthanc`` and never involves systemd.  It listens on a free port; the DICOM (DIMSE)
listener is switched off unless asked for.

Limitation: Orthanc 1.10 has no option to choose the HTTP bind address; its embedded web
server listens on every interface.  ``RemoteAccessAllowed: false`` makes Orthanc refuse
every HTTP request that does not come from the loopback interface, which is what keeps the
test archive private.

Manual use::

    python -m tests.stack.orthanc --port 8042 [--demo]
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import shutil
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx

from tests.stack.process import Launcher, apt_install, free_loopback_port, log_tail

ORTHANC_BINARY_CANDIDATES = ("/usr/sbin/Orthanc", "/usr/bin/Orthanc")
DICOMWEB_PLUGIN_GLOBS = (
    "/usr/share/orthanc/plugins/libOrthancDicomWeb.so",
    "/usr/lib/orthanc/libOrthancDicomWeb.so*",
    "/usr/lib/*/orthanc/libOrthancDicomWeb.so*",
    "/usr/local/share/orthanc/plugins/libOrthancDicomWeb.so",
)
APT_PACKAGES = ("orthanc", "orthanc-dicomweb")
# The push script the repository ships for operators (docs/operator-guide.md, "Freshness").
PUSH_SCRIPT = Path(__file__).resolve().parents[2] / "docker" / "orthanc" / "bridge-push.lua"


def find_orthanc_binary() -> str | None:
    """Return the path of the Orthanc executable, or None when it is not installed."""
    on_path = shutil.which("Orthanc")
    if on_path:
        return on_path
    for candidate in ORTHANC_BINARY_CANDIDATES:
        if os.access(candidate, os.X_OK):
            return candidate
    return None


def find_dicomweb_plugin() -> str | None:
    """Return the path of the DICOMweb plugin shared library, or None."""
    for pattern in DICOMWEB_PLUGIN_GLOBS:
        for match in sorted(glob.glob(pattern)):
            if os.path.isfile(match):
                return match
    return None


def ensure_installed() -> None:
    """Install Orthanc and its DICOMweb plugin with apt when either is missing."""
    if find_orthanc_binary() and find_dicomweb_plugin():
        return
    apt_install(*APT_PACKAGES)
    if not (find_orthanc_binary() and find_dicomweb_plugin()):
        raise RuntimeError(
            "apt-get installed "
            + ", ".join(APT_PACKAGES)
            + " but the Orthanc binary or libOrthancDicomWeb.so was still not found"
        )


class OrthancServer(Launcher):
    """One Orthanc process with the DICOMweb plugin, on loopback, with its own storage."""

    _grace = 15.0  # Orthanc flushes its index on SIGTERM

    def __init__(
        self,
        name: str = "bridge-test",
        http_port: int | None = None,
        dicom_port: int | None = None,
        storage_dir: Path | None = None,
        log_path: Path | None = None,
        *,
        enable_dicom: bool = False,
        overwrite_instances: bool = True,
        default_encoding: str = "Utf8",
        extra_config: dict[str, Any] | None = None,
        basic_auth: tuple[str, str] | None = None,
        push_to: tuple[str, str | None] | None = None,
    ) -> None:
        """Describe the server; nothing runs until :meth:`start`.

        ``http_port``/``dicom_port`` default to free loopback ports and ``storage_dir`` to a
        temporary folder that :meth:`stop` removes.  The DICOM listener is only opened with
        ``enable_dicom=True`` (Orthanc binds it on every interface).  ``overwrite_instances``
        lets a test re-store a changed instance under the same SOP Instance UID.
        ``default_encoding`` is Orthanc's ``DefaultEncoding``; QIDO answers use it, so keep
        ``Utf8`` unless a test is about a Latin-1 archive.
        ``basic_auth`` (user, password) makes Orthanc require HTTP basic credentials (the test's
        own client sends them).  ``push_to`` (the bridge's URL, its API key) installs the shipped
        push script (docker/orthanc/bridge-push.lua) as an operator would.
        No TLS option: Debian's Orthanc 1.10.1 crashes (SIGSEGV) on the
        first HTTPS connection, so TLS tests put a TLS-terminating proxy in front of it.
        """
        self.basic_auth = basic_auth
        self.push_to = push_to
        self.name = name
        self._requested_http_port = http_port
        self._requested_dicom_port = dicom_port
        self.http_port: int = http_port or 0
        self.dicom_port: int = dicom_port or 0
        self._requested_storage_dir = storage_dir
        self._requested_log_path = log_path
        self.enable_dicom = enable_dicom
        self.overwrite_instances = overwrite_instances
        self.default_encoding = default_encoding
        self.extra_config: dict[str, Any] = dict(extra_config or {})
        self.storage_dir: Path | None = storage_dir
        self.log_path: Path | None = log_path
        self.config_path: Path | None = None
        self._owns_storage = False
        self._process: subprocess.Popen[bytes] | None = None
        self._log_file: Any = None
        self._client: httpx.Client | None = None

    # ------------------------------------------------------------------ URLs
    @property
    def base_url(self) -> str:
        """The REST root, e.g. ``http://127.0.0.1:8042``."""
        return f"http://127.0.0.1:{self.http_port}"

    @property
    def dicomweb_url(self) -> str:
        """The DICOMweb root (QIDO-RS, WADO-RS, STOW-RS), without a trailing slash."""
        return f"{self.base_url}/dicom-web"

    @property
    def running(self) -> bool:
        return self._process is not None and self._process.poll() is None

    # ---------------------------------------------------------------- config
    def build_config(self, plugin_path: str) -> dict[str, Any]:
        """The Orthanc configuration written to ``orthanc.json`` in the storage folder."""
        assert self.storage_dir is not None
        db_dir = str(self.storage_dir / "db")
        config: dict[str, Any] = {
            "Name": self.name,
            "HttpPort": self.http_port,
            "HttpServerEnabled": True,
            "RemoteAccessAllowed": False,
            "AuthenticationEnabled": False,
            "SslEnabled": False,
            "HttpCompressionEnabled": True,
            "HttpDescribeErrors": True,
            "KeepAlive": True,
            "TcpNoDelay": True,
            "HttpThreadsCount": 50,
            "HttpTimeout": 60,
            "WebDavEnabled": False,
            "ExecuteLuaEnabled": False,
            "RestApiWriteToFileSystemEnabled": False,
            "OrthancExplorerEnabled": True,
            "DicomServerEnabled": self.enable_dicom,
            "DicomPort": self.dicom_port,
            "DicomAet": "BRIDGETEST",
            "DicomCheckCalledAet": False,
            "DicomModalities": {},
            "OrthancPeers": {},
            "StorageDirectory": db_dir,
            "IndexDirectory": db_dir,
            "StorageCompression": False,
            "MaximumStorageSize": 0,
            "MaximumPatientCount": 0,
            "DefaultEncoding": self.default_encoding,
            "OverwriteInstances": self.overwrite_instances,
            "StableAge": 1,
            "ConcurrentJobs": 2,
            "JobsHistorySize": 10,
            "SaveJobs": False,
            "LimitFindResults": 0,
            "LimitFindInstances": 0,
            "StorageAccessOnFind": "Always",
            "SyncStorageArea": False,
            "LoadPrivateDictionary": True,
            "Plugins": [plugin_path],
            "DicomWeb": {
                "Enable": True,
                "Root": "/dicom-web/",
                "EnableWado": True,
                "WadoRoot": "/wado",
                "Ssl": False,
                "StudiesMetadata": "Full",
                "SeriesMetadata": "Full",
                "Servers": {},
            },
        }
        if self.push_to is not None:
            url, key = self.push_to
            config["LuaScripts"] = [str(PUSH_SCRIPT)]
            config["BridgePush"] = {"Url": url, **({"ApiKey": key} if key else {})}
        if self.basic_auth is not None:
            config["AuthenticationEnabled"] = True
            config["RegisteredUsers"] = {self.basic_auth[0]: self.basic_auth[1]}
        for key, value in self.extra_config.items():
            if isinstance(value, dict) and isinstance(config.get(key), dict):
                config[key] = {**config[key], **value}
            else:
                config[key] = value
        return config

    # ------------------------------------------------------------- lifecycle
    def start(self, timeout: float = 60.0) -> None:
        """Write the configuration, spawn Orthanc and wait until DICOMweb answers."""
        if self.running:
            return
        binary = find_orthanc_binary()
        plugin = find_dicomweb_plugin()
        if binary is None or plugin is None:
            raise RuntimeError(
                "Orthanc or libOrthancDicomWeb.so not found; call ensure_installed() or "
                "apt-get install -y " + " ".join(APT_PACKAGES)
            )
        if self.storage_dir is None:
            self.storage_dir = Path(tempfile.mkdtemp(prefix=f"orthanc-{self.name}-"))
            self._owns_storage = True
        self.storage_dir.mkdir(parents=True, exist_ok=True)
        if self.log_path is None:
            self.log_path = self.storage_dir / "orthanc.log"

        # Ports picked by us may be taken between probing and binding: retry with new ones.
        attempts = 1 if self._requested_http_port else 3
        last_error: RuntimeError | None = None
        for _ in range(attempts):
            self.http_port = self._requested_http_port or free_loopback_port()
            if self.enable_dicom:
                self.dicom_port = self._requested_dicom_port or free_loopback_port()
            else:
                self.dicom_port = self._requested_dicom_port or 0
            try:
                self._spawn(binary, plugin, timeout)
                return
            except RuntimeError as exc:
                last_error = exc
                self._stop_process()
        assert last_error is not None
        self._cleanup()
        raise last_error

    def _spawn(self, binary: str, plugin: str, timeout: float) -> None:
        assert self.storage_dir is not None and self.log_path is not None
        self.config_path = self.storage_dir / "orthanc.json"
        self.config_path.write_text(json.dumps(self.build_config(plugin), indent=2), encoding="utf-8")
        self._log_file = open(self.log_path, "ab")  # noqa: SIM115 - closed in _terminate
        self._process = subprocess.Popen(
            [binary, str(self.config_path)],
            stdin=subprocess.DEVNULL,
            stdout=self._log_file,
            stderr=subprocess.STDOUT,
            cwd=str(self.storage_dir),
            start_new_session=True,
        )
        self._track()
        self._client = httpx.Client(
            base_url=self.base_url,
            timeout=30.0,
            auth=self.basic_auth,
        )
        deadline = time.monotonic() + timeout
        last_problem = "no answer yet"
        while time.monotonic() < deadline:
            if self._process.poll() is not None:
                raise RuntimeError(
                    f"Orthanc exited with code {self._process.returncode} during start-up; "
                    f"log {self.log_path}:\n{log_tail(self.log_path)}"
                )
            try:
                system = self._client.get("/system", timeout=2.0)
                if system.status_code == 200:
                    studies = self._client.get(
                        "/dicom-web/studies",
                        headers={"Accept": "application/dicom+json"},
                        params={"limit": "1"},
                        timeout=2.0,
                    )
                    if studies.status_code in (200, 204):
                        return
                    last_problem = f"/dicom-web/studies answered {studies.status_code}"
                else:
                    last_problem = f"/system answered {system.status_code}"
            except httpx.TransportError as exc:
                last_problem = f"{type(exc).__name__}: {exc}"
            time.sleep(0.1)
        raise RuntimeError(
            f"Orthanc did not become ready on {self.base_url} within {timeout:.0f} s "
            f"({last_problem}); log {self.log_path}:\n{log_tail(self.log_path)}"
        )

    def _cleanup(self) -> None:
        """Remove a storage folder Orthanc was started on by this launcher."""
        if self._owns_storage and self.storage_dir is not None:
            shutil.rmtree(self.storage_dir, ignore_errors=True)
            self.storage_dir = None
            if self._requested_log_path is None:
                self.log_path = None
            self._owns_storage = False

    @property
    def client(self) -> httpx.Client:
        """An httpx client on the REST root (only while running)."""
        if self._client is None:
            raise RuntimeError("Orthanc is not running")
        return self._client

    def orthanc_study_id(self, study_uid: str) -> str | None:
        """Orthanc's own id of a study, or None when it is not stored."""
        response = self.client.post("/tools/lookup", content=study_uid.encode("ascii"))
        response.raise_for_status()
        for hit in response.json():
            if hit.get("Type") == "Study":
                return str(hit["ID"])
        return None

    def delete_study(self, study_uid: str) -> None:
        """Delete one study by Study Instance UID; a missing study is not an error."""
        orthanc_id = self.orthanc_study_id(study_uid)
        if orthanc_id is None:
            return
        response = self.client.delete(f"/studies/{orthanc_id}")
        if response.status_code != 404:
            response.raise_for_status()

    def clear(self) -> None:
        """Delete every stored study."""
        response = self.client.get("/studies")
        response.raise_for_status()
        for orthanc_id in response.json():
            deleted = self.client.delete(f"/studies/{orthanc_id}")
            if deleted.status_code != 404:
                deleted.raise_for_status()

    def study_count(self) -> int:
        response = self.client.get("/statistics")
        response.raise_for_status()
        return int(response.json()["CountStudies"])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Run a test Orthanc with DICOMweb in the foreground.")
    parser.add_argument("--port", type=int, default=None, help="HTTP port (default: a free one)")
    parser.add_argument("--dicom-port", type=int, default=None, help="open the DICOM listener on this port")
    parser.add_argument("--storage", type=Path, default=None, help="keep the data in this folder")
    parser.add_argument("--demo", action="store_true", help="store the demo studies after start-up")
    parser.add_argument("--install", action="store_true", help="apt-get install Orthanc when missing")
    args = parser.parse_args(argv)
    if args.install:
        ensure_installed()
    server = OrthancServer(
        http_port=args.port,
        dicom_port=args.dicom_port,
        storage_dir=args.storage,
        enable_dicom=args.dicom_port is not None,
    )
    server.start()
    try:
        if args.demo:
            from tests.stack.samples import load_demo

            specs = load_demo(server.dicomweb_url)
            print(f"stored {len(specs)} demo studies")
        print(f"Orthanc REST:  {server.base_url}/")
        print(f"DICOMweb root: {server.dicomweb_url}")
        print(f"log:           {server.log_path}")
        print("Ctrl-C to stop")
        while server.running:
            time.sleep(0.5)
    except KeyboardInterrupt:
        pass
    finally:
        server.stop()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
