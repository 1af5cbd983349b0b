"""The local stack for the demo: ``python -m tests.stack demo`` runs the bridge end to end.

It starts Orthanc (DICOMweb) and the FHIR test server on loopback, stores the sample studies,
runs ``bridge sync`` against them, prints the published ImagingStudy ids with a WADO-RS URL for
each, then starts the OHIF viewer (tests/stack/viewer.py) and the bridge's API (``bridge serve``)
and ends by printing the address of the record page: a patient's studies, each with an "Open
images" link through the resolver into the viewer. The servers stay up until Ctrl-C or SIGTERM,
with a terminal or without one (``--exit`` stops them at once).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

from tests.stack.fhir import FhirTestServer
from tests.stack.orthanc import OrthancServer, ensure_installed
from tests.stack.process import free_loopback_port
from tests.stack.samples import load_demo
from tests.stack.viewer import ViewerServer

DEMO_ISSUERS = {
    "HOSP-A": "urn:oid:1.2.826.0.1.3680043.10.1001",
    "HOSP-B": "urn:oid:1.2.826.0.1.3680043.10.1002",
}
DEMO_ACCESSION_ISSUERS = {
    "HOSP-A-RIS": "urn:oid:1.2.826.0.1.3680043.10.2001",
    "HOSP-B-RIS": "urn:oid:1.2.826.0.1.3680043.10.2002",
}


def _port(preferred: int) -> int | None:
    """``preferred`` if it is free on loopback, else None (let the server pick one)."""
    with socket.socket() as sock:
        try:
            sock.bind(("127.0.0.1", preferred))
        except OSError:
            return None
    return preferred


def _start_api(env: dict[str, str], port: int, log_path: Path) -> subprocess.Popen[bytes]:
    """``bridge serve`` on loopback, once it answers /healthz."""
    with open(log_path, "ab") as log:
        process = subprocess.Popen(
            [sys.executable, "-m", "bridge", "serve", "--host", "127.0.0.1", "--port", str(port)],
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and process.poll() is None:
        try:
            if httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=1).status_code == 200:
                return process
        except httpx.TransportError:
            pass
        time.sleep(0.2)
    process.terminate()
    raise RuntimeError(f"bridge serve did not start; see {log_path}")


def _record_patient(fhir_base: str) -> str | None:
    """The FHIR id of a demo patient with several studies (Doe^Jane), for the printed link."""
    bundle = httpx.get(f"{fhir_base}/Patient", params={"family": "Doe"}, timeout=30).json()
    for entry in bundle.get("entry", []):
        return str(entry["resource"]["id"])
    return None


def _stop_on_signals() -> None:
    """SIGINT and SIGTERM raise KeyboardInterrupt, so the servers started so far are stopped.

    A shell starts a background job with SIGINT ignored, and SIGTERM would end the process without
    its ``finally``, leaving Orthanc and the Node servers behind: both are set here.
    """

    def stop(_signum: int, _frame: object) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGINT, stop)
    signal.signal(signal.SIGTERM, stop)


def demo(args: argparse.Namespace) -> int:
    _stop_on_signals()
    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="bridge-demo-"))
    workdir.mkdir(parents=True, exist_ok=True)
    print("Installing Orthanc from Debian's packages if needed ...", flush=True)
    ensure_installed()
    orthanc = OrthancServer(name="bridge-demo", http_port=_port(8042), log_path=workdir / "orthanc.log")
    fhir = FhirTestServer(port=_port(8103), log_path=workdir / "fhir-server.log")
    viewer = ViewerServer(orthanc.dicomweb_url, port=_port(3000))
    api: subprocess.Popen[bytes] | None = None
    try:
        print("Starting Orthanc and the FHIR test server ...", flush=True)
        orthanc.start()
        fhir.start()
        print(f"  DICOMweb archive: {orthanc.dicomweb_url}")
        print(f"  FHIR server:      {fhir.base_url}")
        specs = load_demo(orthanc.dicomweb_url)
        print(f"Stored {len(specs)} sample studies over STOW-RS.", flush=True)

        env = {k: v for k, v in os.environ.items() if not k.startswith("BRIDGE_")}
        env.update(
            BRIDGE_DICOMWEB_URL=orthanc.dicomweb_url,
            BRIDGE_FHIR_URL=fhir.base_url,
            BRIDGE_STATE_URL=f"sqlite:///{workdir / 'bridge-state.db'}",
            BRIDGE_SOURCE_NAME="demo-orthanc",
            BRIDGE_PATIENT_ISSUER_SYSTEMS=json.dumps(DEMO_ISSUERS),
            BRIDGE_ACCESSION_ISSUER_SYSTEMS=json.dumps(DEMO_ACCESSION_ISSUERS),
            # Orthanc's QIDO-RS leaves sequences out (issuers of accession numbers, codes).
            BRIDGE_READ_INSTANCE_HEADER="true",
        )
        print("\n$ bridge sync", flush=True)
        code = subprocess.call([sys.executable, "-m", "bridge", "sync"], env=env)
        if code not in (0, 1):
            print(f"bridge sync failed with exit code {code}", file=sys.stderr)
            return code

        bundle = httpx.get(f"{fhir.base_url}/ImagingStudy", params={"_count": "100"}, timeout=30).json()
        endpoints = httpx.get(f"{fhir.base_url}/Endpoint", timeout=30).json()
        address = endpoints["entry"][0]["resource"]["address"]
        print("\nPublished ImagingStudy resources (FHIR JSON; open in a browser, or curl):")
        for entry in bundle.get("entry", []):
            study = entry["resource"]
            uid = study["identifier"][0]["value"].removeprefix("urn:oid:")
            print(f"  {fhir.base_url}/ImagingStudy/{study['id']}  {study.get('description', '')}")
            # A browser's Accept header makes Orthanc refuse WADO-RS: ask for DICOM JSON.
            print(f"    curl -H 'Accept: application/dicom+json' {address}/studies/{uid}/metadata")
        state_url = f"sqlite:///{workdir / 'bridge-state.db'}"
        print(
            f"\nState store: {workdir / 'bridge-state.db'}  (try: BRIDGE_STATE_URL={state_url} bridge status)"
        )

        print("\nStarting the OHIF viewer (npm ci of tests/stack/ohif on first use) ...", flush=True)
        viewer.start()
        print(f"  OHIF viewer:      {viewer.base_url}/  (DICOMweb proxied to {orthanc.dicomweb_url})")
        api_port = _port(8000) or free_loopback_port()
        env.update(BRIDGE_VIEWER_URLS=json.dumps({"ohif": viewer.base_url}), BRIDGE_DEFAULT_VIEWER="ohif")
        print(f"$ bridge serve --port {api_port}", flush=True)
        api = _start_api(env, api_port, workdir / "bridge-api.log")
        record = f"http://127.0.0.1:{api_port}/record"
        patient = _record_patient(fhir.base_url)
        print('\nOpen the record in a browser and click "Open images":')
        print(f"  {record}" + (f"/patients/{patient}" if patient else ""))
        print(f"  (every patient: {record})", flush=True)
        if args.exit:
            return 0
        # Up until stopped, with a terminal or without one (a CI job, `&`, nohup): the printed
        # links must keep answering. SIGTERM stops the servers as Ctrl-C does.
        print(f"\nThe servers keep running; press Ctrl-C (or: kill {os.getpid()}) to stop them.", flush=True)
        try:
            while True:
                signal.pause()
        except KeyboardInterrupt:
            print("Stopping the servers ...", flush=True)
        return 0
    finally:
        if api is not None:
            api.terminate()
            try:
                api.wait(timeout=10)
            except subprocess.TimeoutExpired:
                api.kill()
        viewer.stop()
        fhir.stop()
        orthanc.stop()


def main() -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.stack")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("demo", help="start the stack, load samples, sync, serve the record page and viewer")
    p.add_argument("--exit", action="store_true", help="stop the servers after printing")
    p.add_argument("--workdir", help="folder for logs and the state store (default: a temp dir)")
    p.set_defaults(func=demo)
    args = parser.parse_args()
    return int(args.func(args))


if __name__ == "__main__":
    sys.exit(main())
