"""Shared pieces of the sync benchmarks: the machine, the archive, the servers, and an HTTP meter.

Not a benchmark itself. The archive of N studies (three series, one small instance each) is
built with ``tests.stack.samples`` and stored over STOW-RS in batches into an Orthanc storage
folder kept under a cache directory, so later runs start Orthanc on the prepared folder instead
of storing everything again (a folder for N is topped up from the largest smaller one).
"""

# ruff: noqa: T201 - benchmark scripts print their figures
from __future__ import annotations

import concurrent.futures
import contextlib
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
from pydicom.uid import generate_uid

from benchmarks._meter import Meter, max_rss_mb  # noqa: F401 - re-exported
from tests.stack.fhir import FhirTestServer
from tests.stack.hapi import BENCHMARK_JVM_OPTIONS, HapiTestServer
from tests.stack.orthanc import OrthancServer, ensure_installed
from tests.stack.samples import SeriesSpec, StudySpec, build_study, stow

DEFAULT_CACHE = Path(os.environ.get("BRIDGE_BENCH_CACHE", "/tmp/bridge-bench"))
ROOT = Path(__file__).resolve().parent.parent
PATIENT_SYSTEM = "urn:oid:1.2.826.0.1.3680043.10.1000"
STUDIES_PER_STOW = 40
STUDIES_PER_PATIENT = 2  # baked into the prepared archive: change it and remove the cache


# ------------------------------------------------------------------------------------ machine
def cpu_model() -> str:
    """The CPU model from /proc/cpuinfo."""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown"


def machine() -> dict[str, Any]:
    """What the figures were measured on."""
    orthanc = "unknown"
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        orthanc = subprocess.run(
            ["dpkg-query", "-W", "-f=${Version}", "orthanc", "orthanc-dicomweb"],
            capture_output=True,
            text=True,
            check=False,
            timeout=10,
        ).stdout.replace("\n", " ")
    node = shutil.which("node")
    node_version = ""
    if node:
        node_version = subprocess.run([node, "--version"], capture_output=True, text=True, check=False).stdout
    mem = ""
    with contextlib.suppress(OSError):
        mem = Path("/proc/meminfo").read_text().splitlines()[0].split(":", 1)[1].strip()
    return {
        "nproc": os.cpu_count(),
        "cpu": cpu_model(),
        "memory": mem,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "orthanc+dicomweb (dpkg)": orthanc.strip(),
        "node": node_version.strip(),
    }


def print_block(title: str, values: dict[str, Any]) -> None:
    """Print a titled block of ``key: value`` lines."""
    print(f"\n== {title}")
    width = max((len(k) for k in values), default=0)
    for key, value in values.items():
        print(f"  {key:<{width}}  {value}")


# ------------------------------------------------------------------------------------ archive
def study_uid(index: int) -> str:
    """The fixed Study Instance UID of benchmark study ``index``."""
    return generate_uid(entropy_srcs=[f"fhir-dicomweb-bridge/benchmarks/study/{index}"])


def study_spec(
    index: int, studies_per_patient: int = STUDIES_PER_PATIENT, series: int = 3, instances: int = 1
) -> StudySpec:
    """Benchmark study ``index``: a CT study of ``series`` series of ``instances`` instances."""
    patient = index // studies_per_patient
    parts = ("CHEST", "ABDOMEN", "PELVIS", "HEAD")
    return StudySpec(
        uid=study_uid(index),
        patient_id=f"BENCH{patient:07d}",
        patient_name=f"Bench^Patient{patient}",
        birth_date=f"19{50 + patient % 50:02d}0{1 + patient % 9}15",
        sex="FM"[patient % 2],
        accession=f"ACC{index:08d}",
        study_date=f"20{10 + index % 15:02d}{1 + index % 12:02d}{1 + index % 28:02d}",
        study_time=f"{8 + index % 10:02d}{index % 60:02d}00",
        description="CT Chest Abdomen",
        study_id=str(index),
        series=[
            SeriesSpec("CT", f"Series {s + 1}", parts[s % len(parts)], instances=instances)
            for s in range(series)
        ],
    )


def _stow_batch(url: str, first: int, last: int, client: httpx.Client) -> None:
    datasets = []
    for index in range(first, last):
        datasets.extend(build_study(study_spec(index)))
    stow(url, datasets, client=client)


def _fill(orthanc: OrthancServer, have: int, want: int) -> None:
    """Store studies ``have .. want-1``: one thread builds, two send STOW batches."""
    started = time.monotonic()
    with (
        httpx.Client(timeout=300.0) as client,
        concurrent.futures.ThreadPoolExecutor(max_workers=2) as pool,
    ):
        pending: list[concurrent.futures.Future[None]] = []
        for first in range(have, want, STUDIES_PER_STOW):
            last = min(want, first + STUDIES_PER_STOW)
            pending.append(pool.submit(_stow_batch, orthanc.dicomweb_url, first, last, client))
            if len(pending) >= 4:
                pending.pop(0).result()
        for future in pending:
            future.result()
    print(f"  stored studies {have}..{want - 1} in {time.monotonic() - started:.0f} s", flush=True)


def archive_folder(cache: Path, n: int) -> Path:
    """The Orthanc storage folder holding benchmark studies 0..n-1."""
    return cache / f"orthanc-{n}"


@contextlib.contextmanager
def archive(n: int, cache: Path = DEFAULT_CACHE) -> Iterator[OrthancServer]:
    """A running Orthanc holding exactly benchmark studies 0..n-1 (prepared once, then reused)."""
    ensure_installed()
    folder = archive_folder(cache, n)
    if not folder.exists():
        smaller = sorted(
            (int(p.name.split("-")[1]), p)
            for p in cache.glob("orthanc-*")
            if p.name.split("-")[1].isdigit() and int(p.name.split("-")[1]) < n
        )
        if smaller:
            print(f"  copying the prepared archive of {smaller[-1][0]} studies", flush=True)
            shutil.copytree(smaller[-1][1], folder)
    folder.mkdir(parents=True, exist_ok=True)
    server = OrthancServer(name=f"bench-{n}", storage_dir=folder)
    server.start()
    try:
        have = server.study_count()
        if have > n:
            raise RuntimeError(f"{folder} holds {have} studies, more than {n}: remove it")
        if have < n:
            print(f"  preparing the archive: {n - have} studies to store", flush=True)
            _fill(server, have, n)
        yield server
    finally:
        server.stop()


FHIR_ENGINES = ("medplum", "hapi")


@contextlib.contextmanager
def fhir_server(engine: str = "medplum") -> Iterator[FhirTestServer | HapiTestServer]:
    """A fresh FHIR test server: Medplum's in-memory engine, or HAPI FHIR JPA on H2 (``hapi``)."""
    server: FhirTestServer | HapiTestServer
    if engine == "hapi":
        # The JIT at full strength (the tests' launcher trades it for a quicker start).
        server = HapiTestServer(jvm_options=BENCHMARK_JVM_OPTIONS)
    else:
        server = FhirTestServer()
    server.start()
    if isinstance(server, HapiTestServer):
        rss = (server.rss_bytes() or 0) / 2**20
        print(f"HAPI FHIR JPA started in {server.startup_seconds:.1f} s, RSS {rss:.0f} MiB", flush=True)
    try:
        yield server
    finally:
        server.stop()


def warm_qido(dicomweb_url: str, page_size: int = 100) -> int:
    """Walk the study-level QIDO once (Orthanc's caches warm for every side alike); returns the count."""
    seen = 0
    with httpx.Client(timeout=300.0) as client:
        while True:
            response = client.get(
                f"{dicomweb_url}/studies",
                params={"limit": str(page_size), "offset": str(seen)},
                headers={"Accept": "application/dicom+json"},
            )
            rows = response.json() if response.content.strip() else []
            seen += len(rows)
            if len(rows) < page_size:
                return seen


def run_child(
    args: list[str], env: dict[str, str], log: Path, prefix: list[str] | None = None
) -> dict[str, Any]:
    """Run ``python -m <args>`` in a child process; its last stdout line is a JSON result.

    The result gains ``child_max_rss_mb`` read from the child's own rusage (os.wait4), which the
    child does not measure itself, as a cross-check.
    """
    child_env = {k: v for k, v in os.environ.items() if not k.startswith("BRIDGE_")}
    child_env.update(env)
    # PYTHONPATH_EXTRA comes first: an A/B run can put a variant of the bridge (or a package) there.
    child_env["PYTHONPATH"] = os.pathsep.join(
        filter(None, [child_env.pop("PYTHONPATH_EXTRA", None), str(ROOT)])
    )
    with open(log, "ab") as err:
        process = subprocess.Popen(
            [*(prefix or []), sys.executable, "-m", *args],
            cwd=ROOT,
            env=child_env,
            stdout=subprocess.PIPE,
            stderr=err,
        )
        assert process.stdout is not None
        output = process.stdout.read()
        _, status, usage = os.wait4(process.pid, 0)
        process.returncode = os.waitstatus_to_exitcode(status)
    lines = [line for line in output.decode().splitlines() if line.startswith("{")]
    if not lines:
        raise RuntimeError(f"`{' '.join(args)}` failed (exit {process.returncode}); see {log}")
    result: dict[str, Any] = json.loads(lines[-1])
    result["child_max_rss_mb"] = round(usage.ru_maxrss / 1024, 1)
    result["cpu_s"] = round(usage.ru_utime + usage.ru_stime, 2)
    result["exit_code"] = process.returncode
    return result
