"""Start-up: `bridge --help`, and `bridge sync` from process start to its first archive request.

A tiny local HTTP server in this process plays both peers: the archive answers every QIDO with no
studies, and the FHIR server answers its capability statement, searches (empty) and writes (the
resource back, with an id and a version). It notes when the first archive request arrives; the
time from just before the process is started to that moment is the sync's start-up. The state
store is made (and migrated) by a warm-up run first, as an operator's store already is.

Each figure is the median of ``--runs`` runs, printed with its ratio to `python -c pass` measured
in the same run, so a loaded or slow machine moves both alike. A second floor, the import of the
libraries `bridge sync` cannot reach the archive without (the state store's SQLAlchemy with its
ORM and SQLite dialect, httpx with its transport httpcore, pydantic-settings and Typer), says how
much of the start-up is the bridge's own.
Figures: docs/performance.md.

    python -m benchmarks.startup [--runs 7]
"""

# ruff: noqa: T201 - benchmark scripts print their figures
from __future__ import annotations

import argparse
import http.server
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
BRIDGE = str(Path(sys.executable).with_name("bridge"))
# What `bridge sync` must import before its first archive request, whatever the bridge's own code does:
# httpx imports its transport (httpcore, with h11 and h2) only when a client is made, and SQLAlchemy
# its dialect (SQLite, the default store's) only when an engine is.
LIBRARIES = (
    "import sqlalchemy, sqlalchemy.orm, sqlalchemy.dialects.sqlite, httpx, httpcore, pydantic_settings, typer"
)
COMPILE_BRIDGE = (
    "import bridge, compileall, os; compileall.compile_dir(os.path.dirname(bridge.__file__), quiet=1)"
)


class Peers(http.server.ThreadingHTTPServer):
    """The stub archive and FHIR server; ``first_qido`` is when the first archive request arrived."""

    daemon_threads = True
    first_qido: float | None = None


class _Handler(http.server.BaseHTTPRequestHandler):
    server: Peers

    def _answer(self) -> None:
        length = int(self.headers.get("content-length") or 0)
        body = self.rfile.read(length) if length else b""
        if self.path.startswith("/dicom-web/"):
            if self.server.first_qido is None:
                self.server.first_qido = time.perf_counter()
            self._send([])
        elif self.path.startswith("/fhir/metadata"):
            self._send({"resourceType": "CapabilityStatement", "status": "active", "fhirVersion": "4.0.1"})
        elif self.command in ("PUT", "POST") and body:
            resource = json.loads(body)
            resource.setdefault("id", self.path.rstrip("/").rsplit("/", 1)[-1])
            resource["meta"] = {"versionId": "1"}
            self._send(resource, status=201)
        else:
            self._send({"resourceType": "Bundle", "type": "searchset", "total": 0, "entry": []})

    def _send(self, data: Any, status: int = 200) -> None:
        raw = json.dumps(data).encode()
        self.send_response(status)
        self.send_header("content-type", "application/fhir+json")
        self.send_header("content-length", str(len(raw)))
        self.end_headers()
        self.wfile.write(raw)

    do_GET = do_POST = do_PUT = _answer

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - the base class's name
        """Quiet: the benchmark prints only its figures."""


def _timed(command: list[str], env: dict[str, str]) -> float:
    started = time.perf_counter()
    subprocess.run(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, check=True)
    return time.perf_counter() - started


def _to_first_qido(peers: Peers, env: dict[str, str]) -> float:
    peers.first_qido = None
    started = time.perf_counter()
    result = subprocess.run([BRIDGE, "sync"], env=env, capture_output=True, text=True, check=False)
    if peers.first_qido is None:
        tail = result.stderr[-800:]
        raise SystemExit(f"bridge sync made no archive request (exit {result.returncode}): {tail}")
    return peers.first_qido - started


def main() -> None:
    """Measure, and print each median with its ratio to `python -c pass`."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=7)
    args = parser.parse_args()
    peers = Peers(("127.0.0.1", 0), _Handler)
    threading.Thread(target=peers.serve_forever, daemon=True).start()
    base = f"http://127.0.0.1:{peers.server_address[1]}"
    with tempfile.TemporaryDirectory() as folder:
        env = {k: v for k, v in os.environ.items() if not k.startswith("BRIDGE_")}
        env.update(
            BRIDGE_DICOMWEB_URL=f"{base}/dicom-web",
            BRIDGE_FHIR_URL=f"{base}/fhir",
            BRIDGE_STATE_URL=f"sqlite:///{folder}/state.db",
            BRIDGE_HTTP_RETRIES="0",
        )
        # Byte-compiled, as `pip install` leaves a package: an editable install under
        # PYTHONDONTWRITEBYTECODE would compile every bridge module from source on every start.
        subprocess.run([sys.executable, "-c", COMPILE_BRIDGE], env=env, check=True)
        _to_first_qido(peers, env)  # warm-up: makes and migrates the store, fills the OS caches
        figures: dict[str, list[float]] = {
            "python -c pass": [],
            "library floor": [],
            "bridge --help": [],
            "bridge sync": [],
        }
        for _ in range(args.runs):  # interleaved, so a drift in the machine's speed hits them all alike
            figures["python -c pass"].append(_timed([sys.executable, "-c", "pass"], env))
            figures["library floor"].append(_timed([sys.executable, "-c", LIBRARIES], env))
            figures["bridge --help"].append(_timed([BRIDGE, "--help"], env))
            figures["bridge sync"].append(_to_first_qido(peers, env))
    peers.shutdown()
    floor = statistics.median(figures["python -c pass"])
    libraries = statistics.median(figures["library floor"])
    print(f"{os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f}, Python {sys.version.split()[0]}")
    print(f"median of {args.runs} runs; bridge sync: process start to its first archive request")
    print(f"library floor: python -c '{LIBRARIES}'")
    for name, values in figures.items():
        median = statistics.median(values)
        print(
            f"{name:16} {median:6.3f} s  {median / floor:5.1f}x python -c pass  "
            f"{median / libraries:5.2f}x library floor  (min {min(values):.3f})"
        )


if __name__ == "__main__":
    main()
