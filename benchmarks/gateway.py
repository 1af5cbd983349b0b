"""The image gateway's overhead: `wrk` against the archive directly and through the bridge.

Starts the test stack (Orthanc + the Medplum-based FHIR server), stores and syncs the demo studies,
runs `bridge serve` with authentication on (an API key, sent on every request) and the audit trail
on (BRIDGE_AUDIT=fhir), and nginx twice: as the gateway's front (`bridge front-config`) and as a
bare proxy of the archive (what any proxy hop costs). For each request kind it drives, with the same
requests cycling through every demo study: Orthanc's DICOMweb directly ("direct"), the bare proxy
("proxy"), `bridge serve`'s own /dicom-web ("gateway") and the front ("front"):

- metadata: WADO-RS study metadata (application/dicom+json) of the tiny demo studies;
- instance: WADO-RS one instance (multipart/related; type="application/dicom"), the demo's 64x64 ones;
- ct-metadata: the WADO-RS metadata of a realistic CT study: --ct-instances slices of 512x512
  16-bit pixels, each carrying the full header of a real GE CT scan (pydicom's CT_small.dcm:
  about 250 attributes, private ones included) with its own UIDs and position;
- ct-slice: one full-size instance of that study (about 520 KiB), what a viewer fetches per slice.

Each pair runs at 1 connection (the latency a viewer's single request sees) and at --connections.
Run:  python -m benchmarks.gateway [--duration 10] [--connections 8] [--ct-instances 150] [--kinds ...]
Installs Debian's wrk and nginx when missing (apt-get, as root). Prints p50/p99 latency and
throughput per kind and load, each target's ratio to direct at p50, the settings and the machine.
"""

# ruff: noqa: T201 - a script: printing the figures is its job
from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import subprocess
import sys
from pathlib import Path

import httpx
import pydicom
from pydicom.data import get_testdata_file

from benchmarks._common import cpu_model
from benchmarks.resolver import Serve, _parse_wrk, demo_stack, ensure_wrk
from bridge.gateway.front import ANSWER_BUFFERS, TEMP_PATHS
from tests.stack.front import Nginx, NginxFront
from tests.stack.samples import SeriesSpec, StudySpec, build_study, stow

API_KEY = "bench-key-5e0c2a"
FRONT_SECRET = "bench-front-secret-0c1d2e3f4a5b6c7d8e9f"
ACCEPT = {
    "metadata": "application/dicom+json",
    "instance": 'multipart/related; type="application/dicom"',
    "ct-metadata": "application/dicom+json",
    "ct-slice": 'multipart/related; type="application/dicom"',
}
CT_SIZE = 512
STOW_BATCH = 25


class BareProxy(Nginx):
    """nginx passing everything to the archive, no questions asked: what any proxy hop costs.

    The same buffers and upstream keep-alive as the front's retrieves (bridge/gateway/front.py).
    """

    def __init__(self, archive: str) -> None:
        super().__init__(name="bare-proxy")
        self.archive = httpx.URL(archive)

    def configure(self, config_path: Path, state: Path, worker_user: str | None) -> None:
        """A plain proxy_pass of every request to the archive."""
        user = f"user {worker_user};" if worker_user else ""
        temp = " ".join(f"{kind}_temp_path {state / kind};" for kind in TEMP_PATHS)
        config_path.write_text(
            f"daemon off; {user} worker_processes 1; pid {state / 'nginx.pid'}; error_log stderr crit;\n"
            "events { worker_connections 1024; }\n"
            f"http {{ access_log off; {temp}\n"
            f"  upstream archive {{ server {self.archive.host}:{self.archive.port}; keepalive 32; }}\n"
            f"  server {{ listen 127.0.0.1:{self.port};\n"
            "    location / { proxy_pass http://archive; proxy_http_version 1.1;\n"
            f'      proxy_set_header Connection ""; {" ".join(ANSWER_BUFFERS)} }} }} }}\n'
        )


def _script(paths: list[str], headers: dict[str, str], folder: Path, name: str) -> Path:
    script = folder / f"{name}.lua"
    entries = ",\n".join(json.dumps(p) for p in paths)
    header_lines = "\n".join(f"wrk.headers[{json.dumps(k)}] = {json.dumps(v)}" for k, v in headers.items())
    script.write_text(
        f"{header_lines}\npaths = {{\n{entries}\n}}\ncounter = 0\n"
        "request = function()\n"
        "  counter = counter + 1\n"
        '  return wrk.format("GET", paths[(counter % #paths) + 1])\n'
        "end\n"
    )
    return script


def _ct_study(dicomweb: str, instances: int) -> str:
    """Store a realistic CT study (a real scanner's header, 512x512 slices); its Study Instance UID."""
    real = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
    spec = StudySpec(
        patient_id="BENCH-CT",
        patient_name="Bench^Slices",
        description="CT CHEST",
        series=[SeriesSpec("CT", description="AXIAL 1.25MM", instances=instances)],
    )
    pixels = bytes(range(256)) * (CT_SIZE * CT_SIZE * 2 // 256)
    batch = []
    for index, ds in enumerate(build_study(spec)):
        for element in real:
            # the scanner's own attributes; identity (patient, UIDs) and pixels stay the study's
            if (
                element.tag not in ds
                and element.tag.group not in (0x0010,)
                and element.keyword != "PixelData"
            ):
                ds.add(copy.deepcopy(element))
        ds.Rows = ds.Columns = CT_SIZE
        ds.ImagePositionPatient = [-250.0, -250.0, -1.25 * index]
        ds.SliceLocation = -1.25 * index
        ds.PixelData = pixels
        batch.append(ds)
        if len(batch) == STOW_BATCH:
            stow(dicomweb, batch)
            batch = []
    stow(dicomweb, batch)
    return str(spec.uid)


def _instances(dicomweb: str, study_uids: list[str]) -> dict[str, str]:
    """One instance path (under the DICOMweb base) per study."""
    paths = {}
    for uid in study_uids:
        found = httpx.get(
            f"{dicomweb}/studies/{uid}/instances", headers={"Accept": "application/dicom+json"}, timeout=30
        ).json()
        row = found[0]
        series, sop = row["0020000E"]["Value"][0], row["00080018"]["Value"][0]
        paths[uid] = f"/studies/{uid}/series/{series}/instances/{sop}"
    return paths


def main() -> int:
    """Run the benchmark; 0 on success."""
    parser = argparse.ArgumentParser(prog="python -m benchmarks.gateway")
    parser.add_argument("--duration", type=int, default=10, help="seconds per wrk run")
    parser.add_argument("--connections", type=int, default=8)
    parser.add_argument("--ct-instances", type=int, default=150, help="slices of the realistic CT study")
    parser.add_argument("--kinds", nargs="+", choices=list(ACCEPT), default=list(ACCEPT))
    args = parser.parse_args()
    wrk = ensure_wrk()

    with demo_stack(
        "bridge-bench-gw",
        BRIDGE_API_KEYS=API_KEY,
        BRIDGE_AUDIT="fhir",
        BRIDGE_GATEWAY_FRONT_SECRET=FRONT_SECRET,
    ) as stack:
        orthanc, fhir, specs, workdir, env = stack.orthanc, stack.fhir, stack.specs, stack.workdir, stack.env
        ct_uid = _ct_study(orthanc.dicomweb_url, args.ct_instances)
        if not stack.sync():
            return 1
        uids = [str(s.uid) for s in specs if s.uid]
        published = {
            i["value"].removeprefix("urn:oid:")
            for e in httpx.get(f"{fhir.base_url}/ImagingStudy", params={"_count": "200"}, timeout=30)
            .json()
            .get("entry", [])
            for i in e["resource"].get("identifier", [])
            if i.get("system") == "urn:dicom:uid"
        }
        uids = [u for u in uids if u in published]
        if ct_uid not in published:
            print("the CT study was not published by the sync", file=sys.stderr)
            return 1
        instance_paths = _instances(orthanc.dicomweb_url, [*uids, ct_uid])
        every = {
            "metadata": [f"/studies/{u}/metadata" for u in uids],
            "instance": [instance_paths[u] for u in uids],
            "ct-metadata": [f"/studies/{ct_uid}/metadata"],
            "ct-slice": [instance_paths[ct_uid]],
        }
        kinds = {kind: every[kind] for kind in args.kinds}
        direct_prefix = httpx.URL(orthanc.dicomweb_url).path.rstrip("/")
        direct_root = str(httpx.URL(orthanc.dicomweb_url).copy_with(path="/"))
        print(f"machine: nproc={os.cpu_count()} cpu={cpu_model()!r} python={platform.python_version()}")
        print(
            f"{len(uids)} demo studies in rotation; bridge serve = 1 uvicorn worker; "
            f"wrk -t1 -d{args.duration}s"
        )
        header = ("kind", "conns", "target", "req/s", "p50 ms", "p99 ms", "non-2xx", "p50 ratio")
        print("{:11} {:>5} {:8} {:>8} {:>8} {:>8} {:>8} {:>9}".format(*header))
        server = Serve(env)
        front = NginxFront(env, server.url)
        bare = BareProxy(orthanc.dicomweb_url)
        try:
            front.start()
            bare.start()
            for kind, paths in kinds.items():
                for connections in (1, args.connections):
                    results = {}
                    for target, root, prefix, headers in (
                        ("direct", direct_root, direct_prefix, {"Accept": ACCEPT[kind]}),
                        ("proxy", bare.url + "/", direct_prefix, {"Accept": ACCEPT[kind]}),
                        (
                            "gateway",
                            server.url + "/",
                            "/dicom-web",
                            {"Accept": ACCEPT[kind], "X-API-Key": API_KEY},
                        ),
                        (
                            "front",
                            front.url + "/",
                            "/dicom-web",
                            {"Accept": ACCEPT[kind], "X-API-Key": API_KEY},
                        ),
                    ):
                        full = [prefix + p for p in paths]
                        for path in full:  # warm up: study look-ups, connection pools
                            httpx.get(root.rstrip("/") + path, headers=headers, timeout=30).raise_for_status()
                        script = _script(full, headers, workdir, f"{kind}-{target}")
                        run = subprocess.run(
                            [
                                wrk,
                                "-t1",
                                f"-c{connections}",
                                f"-d{args.duration}s",
                                "--latency",
                                "-s",
                                str(script),
                                root,
                            ],
                            capture_output=True,
                            text=True,
                            check=True,
                        )
                        results[target] = _parse_wrk(run.stdout)
                    for target, result in results.items():
                        ratio = result["p50_ms"] / results["direct"]["p50_ms"]
                        print(
                            f"{kind:11} {connections:5d} {target:8} {result['rps']:8.0f} "
                            f"{result['p50_ms']:8.2f} {result['p99_ms']:8.2f} {result['non_2xx']:8.0f} "
                            + (f"{ratio:9.2f}" if target != "direct" else "")
                        )
        finally:
            bare.stop()
            front.stop()
            server.stop()
        print(
            "settings: BRIDGE_API_KEYS (one key, checked per request), BRIDGE_AUDIT=fhir (one AuditEvent per "
            "caller, study and minute), BRIDGE_RESOLVER_CACHE_TTL=30 (the study's ImagingStudy and Endpoint "
            "are read once per 30 s), archive and FHIR server on loopback, no TLS"
        )
        return 0


if __name__ == "__main__":
    sys.exit(main())
