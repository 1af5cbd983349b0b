"""The local stack for the demo: ``python -m tests.stack demo`` runs the bridge end to end.

It starts Orthanc (DICOMweb) and the FHIR test server on loopback, stores the sample studies,
runs ``bridge sync`` against them, prints the published ImagingStudy ids with a WADO-RS URL for
each, and keeps the servers up until Ctrl-C (``--exit`` stops them at once).
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
from pathlib import Path

import httpx

from tests.stack.fhir import FhirTestServer
from tests.stack.orthanc import OrthancServer, ensure_installed
from tests.stack.samples import load_demo

DEMO_ISSUERS = {
    "HOSP-A": "urn:oid:1.2.826.0.1.3680043.10.1001",
    "HOSP-B": "urn:oid:1.2.826.0.1.3680043.10.1002",
}


def _port(preferred: int) -> int | None:
    """``preferred`` if it is free on loopback, else None (let the server pick one)."""
    with socket.socket() as sock:
        try:
            sock.bind(("127.0.0.1", preferred))
        except OSError:
            return None
    return preferred


def demo(args: argparse.Namespace) -> int:
    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="bridge-demo-"))
    workdir.mkdir(parents=True, exist_ok=True)
    print(f"Installing Orthanc from Debian's packages if needed ...", flush=True)
    ensure_installed()
    orthanc = OrthancServer(name="bridge-demo", http_port=_port(8042), log_path=workdir / "orthanc.log")
    fhir = FhirTestServer(port=_port(8103), log_path=workdir / "fhir-server.log")
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
        )
        print("\n$ bridge sync", flush=True)
        code = subprocess.call([sys.executable, "-m", "bridge", "sync"], env=env)
        if code not in (0, 1):
            print(f"bridge sync failed with exit code {code}", file=sys.stderr)
            return code

        bundle = httpx.get(f"{fhir.base_url}/ImagingStudy", params={"_count": "100"}, timeout=30).json()
        endpoints = httpx.get(f"{fhir.base_url}/Endpoint", timeout=30).json()
        address = endpoints["entry"][0]["resource"]["address"]
        print("\nPublished ImagingStudy resources (open the URLs in a browser):")
        for entry in bundle.get("entry", []):
            study = entry["resource"]
            uid = study["identifier"][0]["value"].removeprefix("urn:oid:")
            print(f"  {fhir.base_url}/ImagingStudy/{study['id']}  {study.get('description', '')}")
            print(f"    WADO-RS metadata: {address}/studies/{uid}/metadata")
        print(f"\nState store: {workdir / 'bridge-state.db'}  (try: BRIDGE_STATE_URL=... bridge status)")
        if args.exit or not sys.stdin.isatty():
            return 0
        print("\nThe servers keep running; press Ctrl-C to stop them.", flush=True)
        try:
            signal.pause()
        except KeyboardInterrupt:
            pass
        return 0
    finally:
        fhir.stop()
        orthanc.stop()


def main() -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.stack")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("demo", help="start the stack, load samples, sync, print links")
    p.add_argument("--exit", action="store_true", help="stop the servers after printing")
    p.add_argument("--workdir", help="folder for logs and the state store (default: a temp dir)")
    p.set_defaults(func=demo)
    args = parser.parse_args()
    return int(args.func(args))


if __name__ == "__main__":
    sys.exit(main())
