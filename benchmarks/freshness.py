"""Freshness: from a study stable in Orthanc to its ImagingStudy readable on the FHIR server, per path.

For each path (``push``: the shipped Lua script, docker/orthanc/bridge-push.lua; ``feed``: Orthanc's
``/changes`` each cycle; ``poll``: the QIDO-RS window each cycle) a fresh Orthanc and FHIR test
server are started with the real ``bridge run`` beside them. Studies (one series, one instance) are
stored over STOW-RS at a steady rate, then in a burst. A watcher polls Orthanc (when each study
became stable: ``IsStable``) and the FHIR server (when its ImagingStudy became readable) every
``--tick`` seconds, and samples the backlog (stored but not yet readable) and the push queue.
Printed per path and phase: p50 / p95 / max of stable -> readable and of stored -> readable, and the
backlog over time. The readings have the watcher's resolution (``--tick``): 0 means both were seen
in the same look; a negative figure means the study was readable before Orthanc called it stable
(the QIDO poll publishes what it finds, stable or not).

Run:  flock /tmp/bridge-bench.lock python -m benchmarks.freshness [--rate 1] [--steady 120]
        [--burst 500] [--interval 5] [--paths push feed poll]
"""

# ruff: noqa: T201 - benchmark scripts print their figures
from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import signal
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx

from benchmarks._common import DEFAULT_CACHE, PATIENT_SYSTEM, machine, print_block
from bridge.state.store import SqlStore
from tests.stack.fhir import FhirTestServer
from tests.stack.orthanc import OrthancServer, ensure_installed
from tests.stack.process import free_loopback_port
from tests.stack.samples import SeriesSpec, StudySpec, build_study, stow

API_KEY = "freshness-bench-key"
PATHS = ("push", "feed", "poll")


@dataclass
class Study:
    """One stored study and the moments the watcher saw it."""

    uid: str
    phase: str  # steady | burst
    stored: float  # STOW-RS answered (monotonic)
    stable: float | None = None
    readable: float | None = None


@dataclass
class Watch:
    """What the watcher saw: the studies, and (time, backlog, push queue) samples."""

    studies: dict[str, Study] = field(default_factory=dict)
    samples: list[tuple[float, int, int]] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)
    done: threading.Event = field(default_factory=threading.Event)


def bridge_env(path: str, orthanc: OrthancServer, fhir: str, state: Path, interval: float) -> dict[str, str]:
    """The settings of ``bridge run`` for one path."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("BRIDGE_")}
    env.update(
        {
            "BRIDGE_DICOMWEB_URL": orthanc.dicomweb_url,
            "BRIDGE_FHIR_URL": fhir,
            "BRIDGE_STATE_URL": f"sqlite:///{state}",
            "BRIDGE_PATIENT_IDENTIFIER_SYSTEM": PATIENT_SYSTEM,
            "BRIDGE_DICOM_TIMEZONE": "UTC",
            "BRIDGE_API_KEYS": API_KEY,
            "BRIDGE_LOG_LEVEL": "WARNING",
            "BRIDGE_RECONCILE_INTERVAL": "86400",
            # push: no cycle should matter, so the interval is long; feed and poll: the interval.
            "BRIDGE_SYNC_INTERVAL": "86400" if path == "push" else str(interval),
        }
    )
    if path == "feed":
        env.update({"BRIDGE_CHANGE_SOURCE": "orthanc", "BRIDGE_ORTHANC_URL": orthanc.base_url})
    return env


def watcher(orthanc: OrthancServer, fhir: str, state: Path, watch: Watch, tick: float) -> None:
    """Poll Orthanc, the FHIR server and the push queue until ``watch.done`` and all are readable."""
    store = SqlStore(f"sqlite:///{state}")
    try:
        with httpx.Client(timeout=60) as client:
            while True:
                now = time.monotonic()
                stable = {
                    s["MainDicomTags"].get("StudyInstanceUID")
                    for s in client.get(f"{orthanc.base_url}/studies", params={"expand": ""}).json()
                    if s.get("IsStable")
                }
                bundle = client.get(
                    f"{fhir}/ImagingStudy", params={"_count": "5000", "_elements": "identifier"}
                )
                readable = {
                    i["value"].removeprefix("urn:oid:")
                    for e in bundle.json().get("entry", [])
                    for i in e["resource"].get("identifier", [])
                    if i.get("system") == "urn:dicom:uid"
                }
                with watch.lock:
                    for uid, study in watch.studies.items():
                        if study.stable is None and uid in stable:
                            study.stable = now
                        if study.readable is None and uid in readable:
                            study.readable = now
                    backlog = sum(1 for s in watch.studies.values() if s.readable is None)
                    unstable = sum(1 for s in watch.studies.values() if s.stable is None)
                    # The poll path can publish before Orthanc calls a study stable: wait for both.
                    finished = watch.done.is_set() and backlog == 0 and unstable == 0
                watch.samples.append((now, backlog, store.push_queue()[0]))
                if finished:
                    return
                time.sleep(max(0.0, tick - (time.monotonic() - now)))
    finally:
        store.close()


def store_studies(
    orthanc: OrthancServer, watch: Watch, phase: str, count: int, every: float, tag: str
) -> None:
    """Store ``count`` studies, one every ``every`` seconds (0: as fast as STOW-RS takes them)."""
    with httpx.Client(timeout=120) as client:
        start = time.monotonic()
        for n in range(count):
            if every:
                time.sleep(max(0.0, start + n * every - time.monotonic()))
            spec = StudySpec(
                patient_id=f"{tag}{n:05d}",
                study_date=time.strftime("%Y%m%d", time.gmtime()),  # today's study, as a scanner's
                series=[SeriesSpec("CT", "one", "CHEST", instances=1)],
            )
            datasets = build_study(spec)
            try:
                stow(orthanc.dicomweb_url, datasets, client=client)
            except httpx.RemoteProtocolError:
                # Orthanc closes a kept-alive connection idle about a second: send again on a new one.
                stow(orthanc.dicomweb_url, datasets, client=client)
            assert spec.uid is not None
            with watch.lock:
                watch.studies[spec.uid] = Study(spec.uid, phase, time.monotonic())


@contextlib.contextmanager
def bridge_run(env: dict[str, str], port: int, log: Path) -> Iterator[subprocess.Popen[bytes]]:
    """The real ``bridge run`` on ``port``, stopped with SIGTERM on exit."""
    with log.open("w") as handle:
        process = subprocess.Popen(
            [sys.executable, "-m", "bridge", "run", "--port", str(port)],
            env=env,
            stdout=handle,
            stderr=handle,
        )
    try:
        yield process
    finally:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(60)
        except subprocess.TimeoutExpired:
            process.kill()


def wait_for_startup(state: Path, timeout: float = 120) -> None:
    """Until the bridge's start-up sweep and first cycle have run (the store records them)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with contextlib.suppress(Exception):
            store = SqlStore(f"sqlite:///{state}")
            try:
                if len([r for r in store.runs(10) if r.finished_at is not None]) >= 2:
                    return
            finally:
                store.close()
        time.sleep(0.5)
    raise RuntimeError("the bridge did not finish its start-up runs")


def one_path(
    path: str, args: argparse.Namespace, work: Path
) -> tuple[list[Study], list[tuple[float, int, int]]]:
    """Run one path; the studies as the watcher saw them, and the backlog samples."""
    port = free_loopback_port()
    state = work / f"state-{path}.db"
    push_to = (f"http://127.0.0.1:{port}", API_KEY) if path == "push" else None
    orthanc = OrthancServer(name=f"fresh-{path}", push_to=push_to, log_path=work / f"orthanc-{path}.log")
    with orthanc, FhirTestServer(log_path=work / f"fhir-{path}.log") as fhir:
        env = bridge_env(path, orthanc, fhir.base_url, state, args.interval)
        with bridge_run(env, port, work / f"bridge-{path}.log"):
            wait_for_startup(state)
            watch = Watch()
            thread = threading.Thread(target=watcher, args=(orthanc, fhir.base_url, state, watch, args.tick))
            thread.start()
            started = time.monotonic()
            try:
                store_studies(orthanc, watch, "steady", int(args.steady * args.rate), 1 / args.rate, "S")
                store_studies(orthanc, watch, "burst", args.burst, 0, "B")
            finally:
                watch.done.set()
                thread.join(args.drain)
            if thread.is_alive():
                print(f"  {path}: not everything was readable {args.drain:g} s after the last store")
    base = started
    return list(watch.studies.values()), [(t - base, b, q) for t, b, q in watch.samples]


def quantiles(values: list[float]) -> str:
    """p50 / p95 / max of ``values`` (nearest rank), or ``-``."""
    if not values:
        return "-"
    ordered = sorted(values)
    p95 = ordered[min(len(ordered) - 1, round(0.95 * (len(ordered) - 1)))]
    return f"{statistics.median(ordered):.2f} / {p95:.2f} / {ordered[-1]:.2f}"


def report(path: str, studies: list[Study], samples: list[tuple[float, int, int]], every: float) -> None:
    """Print one path's figures, per phase, and its backlog every ``every`` seconds."""
    for phase in ("steady", "burst"):
        chosen = [s for s in studies if s.phase == phase]
        done = [s for s in chosen if s.readable is not None]
        from_stable = [s.readable - s.stable for s in done if s.readable is not None and s.stable is not None]
        from_store = [s.readable - s.stored for s in done if s.readable is not None]
        print_block(
            f"{path}, {phase}",
            {
                "studies stored / readable": f"{len(chosen)} / {len(done)}",
                "stable -> readable s (p50 / p95 / max)": quantiles(from_stable),
                "stored -> readable s (p50 / p95 / max)": quantiles(from_store),
            },
        )
    line, next_at = [], 0.0
    for t, backlog, queue in samples:
        if t >= next_at:
            line.append(f"{t:.0f}s:{backlog}" + (f"/{queue}" if path == "push" else ""))
            next_at = t + every
    print(f"  backlog over time (t: stored-not-readable{'/push queue' if path == 'push' else ''}):")
    print("   ", " ".join(line))


def main(argv: list[str] | None = None) -> int:
    """Run each path in turn and print its figures."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--paths", nargs="+", choices=PATHS, default=list(PATHS))
    parser.add_argument("--rate", type=float, default=1.0, help="steady studies per second")
    parser.add_argument("--steady", type=float, default=120.0, help="seconds of the steady stream")
    parser.add_argument("--burst", type=int, default=500, help="studies stored at once after it")
    parser.add_argument("--interval", type=float, default=5.0, help="BRIDGE_SYNC_INTERVAL for feed and poll")
    parser.add_argument("--tick", type=float, default=0.25, help="the watcher's polling period, s")
    parser.add_argument("--drain", type=float, default=600.0, help="longest wait after the last store, s")
    parser.add_argument("--cache", type=Path, default=DEFAULT_CACHE, help="where logs and stores go")
    args = parser.parse_args(argv)
    ensure_installed()
    print_block("machine", machine())
    print_block(
        "settings",
        {
            "paths": args.paths,
            "steady": f"{args.rate:g} study/s for {args.steady:g} s",
            "burst": args.burst,
            "sync interval (feed, poll)": args.interval,
            "Orthanc StableAge": 1,
            "watcher tick s": args.tick,
        },
    )
    work = args.cache / "freshness-runs"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    for path in args.paths:
        studies, samples = one_path(path, args, work)
        report(path, studies, samples, every=max(5.0, args.steady / 12))
    return 0


if __name__ == "__main__":
    sys.exit(main())
