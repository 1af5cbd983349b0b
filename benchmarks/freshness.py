"""Freshness: from a study stable in Orthanc to its ImagingStudy readable on the FHIR server, per path.

For each path (``push``: the shipped Lua script, docker/orthanc/bridge-push.lua; ``feed``: Orthanc's
``/changes`` each cycle; ``poll``: the QIDO-RS window each cycle) a fresh Orthanc and FHIR test
server are started with the real ``bridge run`` beside them. Studies (one series, one instance) are
stored over STOW-RS at a steady rate, then in a burst (stored as fast as Orthanc takes them, several
studies per STOW-RS request). A watcher polls Orthanc (when each study became stable: ``IsStable``)
and the FHIR server (when its ImagingStudy became readable) every ``--tick`` seconds, and samples
the backlog (stored but not yet readable), the push queue and the bridge process's RSS.
Printed per path and phase: p50 / p95 / max of stable -> readable and of stored -> readable, and the
backlog over time. The readings have the watcher's resolution (``--tick``): 0 means both were seen
in the same look; a negative figure means the study was readable before Orthanc called it stable
(the QIDO poll publishes what it finds, stable or not).

Same-run baselines, since the machine is shared and absolute figures are noisy: the latencies are
also given as ratios, the feed's and the poll's to the sync interval, the push's to the archive's
own floor (how long a stored study takes to be listed by QIDO-RS, measured for each steady study);
the burst's drain rate (burst studies / first burst study stable -> last readable) to the rate of a
full ``bridge sync`` of the same archive into the same FHIR server emptied, with a fresh state
store (the run's own duration, from the store); the bridge's peak RSS during the burst to its RSS
at rest just before it (flat: a ratio near 1).

Run:  flock /tmp/bridge-bench.lock python -m benchmarks.freshness [--rate 1] [--steady 120]
        [--burst 500] [--interval 5] [--paths push feed poll] [--quick]
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
BURST_PER_STOW = 25
PATHS = ("push", "feed", "poll")


@dataclass
class Study:
    """One stored study and the moments the watcher saw it."""

    uid: str
    phase: str  # steady | burst
    stored: float  # STOW-RS answered (monotonic)
    stable: float | None = None
    readable: float | None = None
    listed: float | None = None  # seconds from stored to listed by QIDO-RS (steady studies only)


@dataclass
class Watch:
    """What the watcher saw: the studies, and (time, backlog, push queue) samples."""

    studies: dict[str, Study] = field(default_factory=dict)
    samples: list[tuple[float, int, int]] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)
    done: threading.Event = field(default_factory=threading.Event)
    pid: int | None = None  # the bridge process, whose RSS is sampled
    rss: list[tuple[float, float]] = field(default_factory=list)  # (time, MB)
    burst_at: float | None = None  # when the burst's storing began


def rss_mb(pid: int) -> float | None:
    """The process's resident set size now, in MB (None when it cannot be read)."""
    with contextlib.suppress(OSError, ValueError):
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return None


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
                rss = rss_mb(watch.pid) if watch.pid is not None else None
                if rss is not None:
                    watch.rss.append((now, rss))
                if finished:
                    return
                time.sleep(max(0.0, tick - (time.monotonic() - now)))
    finally:
        store.close()


def store_studies(
    orthanc: OrthancServer, watch: Watch, phase: str, count: int, every: float, tag: str
) -> None:
    """Store ``count`` studies, one every ``every`` seconds, each then looked up by QIDO-RS until listed.

    With ``every`` 0 (the burst) they are stored as fast as Orthanc takes them, ``BURST_PER_STOW``
    studies per STOW-RS request, and not looked up.
    """
    today = time.strftime("%Y%m%d", time.gmtime())  # today's studies, as a scanner's
    with httpx.Client(timeout=120) as client:
        start = time.monotonic()
        per_request = 1 if every else BURST_PER_STOW
        for first in range(0, count, per_request):
            if every:
                time.sleep(max(0.0, start + first * every - time.monotonic()))
            specs = [
                StudySpec(
                    patient_id=f"{tag}{n:05d}",
                    study_date=today,
                    series=[SeriesSpec("CT", "one", "CHEST", instances=1)],
                )
                for n in range(first, min(count, first + per_request))
            ]
            datasets = [ds for spec in specs for ds in build_study(spec)]
            try:
                stow(orthanc.dicomweb_url, datasets, client=client)
            except httpx.RemoteProtocolError:
                # Orthanc closes a kept-alive connection idle about a second: send again on a new one.
                stow(orthanc.dicomweb_url, datasets, client=client)
            stored = time.monotonic()
            with watch.lock:
                for spec in specs:
                    assert spec.uid is not None
                    watch.studies[spec.uid] = Study(spec.uid, phase, stored)
            if every:
                listed = qido_listed(client, orthanc, specs[0].uid or "", stored)
                with watch.lock:
                    watch.studies[specs[0].uid or ""].listed = listed


def qido_listed(client: httpx.Client, orthanc: OrthancServer, uid: str, stored: float) -> float | None:
    """Seconds from ``stored`` until QIDO-RS lists the study: the archive's own floor."""
    for _ in range(200):
        answer = client.get(
            f"{orthanc.dicomweb_url}/studies",
            params={"StudyInstanceUID": uid, "includefield": "0020000D"},
            headers={"Accept": "application/dicom+json"},
        )
        if answer.status_code == 200 and answer.content.strip() not in (b"", b"[]"):
            return time.monotonic() - stored
        time.sleep(0.005)
    return None


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


@dataclass
class PathRun:
    """One path's readings: the studies, the backlog samples, the RSS samples, the full-sync baseline."""

    studies: list[Study]
    samples: list[tuple[float, int, int]]  # (t from the first store, backlog, push queue)
    rss_rest: float | None
    rss_peak: float | None
    full_sync: tuple[int, float] | None  # (studies created, the run's own seconds)


def full_sync(
    orthanc: OrthancServer, fhir: FhirTestServer, work: Path, path: str, interval: float
) -> tuple[int, float]:
    """A full ``bridge sync`` of the same archive into the same FHIR server, emptied, fresh store."""
    fhir.clear()
    state = work / f"state-{path}-full.db"
    env = bridge_env("poll", orthanc, fhir.base_url, state, interval)
    with (work / f"full-sync-{path}.log").open("w") as log:
        subprocess.run(
            [sys.executable, "-m", "bridge", "sync"], env=env, check=True, stdout=log, stderr=log
        )
    store = SqlStore(f"sqlite:///{state}")
    try:
        [run] = [r for r in store.runs(10) if r.kind == "full"][:1]
        assert run.finished_at is not None
        return run.created, (run.finished_at - run.started_at).total_seconds()
    finally:
        store.close()


def one_path(path: str, args: argparse.Namespace, work: Path) -> PathRun:
    """Run one path, then the full-sync baseline on the same archive and FHIR server."""
    port = free_loopback_port()
    state = work / f"state-{path}.db"
    push_to = (f"http://127.0.0.1:{port}", API_KEY) if path == "push" else None
    orthanc = OrthancServer(name=f"fresh-{path}", push_to=push_to, log_path=work / f"orthanc-{path}.log")
    with orthanc, FhirTestServer(log_path=work / f"fhir-{path}.log") as fhir:
        env = bridge_env(path, orthanc, fhir.base_url, state, args.interval)
        with bridge_run(env, port, work / f"bridge-{path}.log") as process:
            wait_for_startup(state)
            watch = Watch(pid=process.pid)
            thread = threading.Thread(target=watcher, args=(orthanc, fhir.base_url, state, watch, args.tick))
            thread.start()
            started = time.monotonic()
            try:
                store_studies(orthanc, watch, "steady", int(args.steady * args.rate), 1 / args.rate, "S")
                watch.burst_at = time.monotonic()
                store_studies(orthanc, watch, "burst", args.burst, 0, "B")
            finally:
                watch.done.set()
                thread.join(args.drain)
            if thread.is_alive():
                print(f"  {path}: not everything was readable {args.drain:g} s after the last store")
        burst_at = watch.burst_at or started
        rest = [mb for t, mb in watch.rss if burst_at - 10 <= t < burst_at]
        during = [mb for t, mb in watch.rss if t >= burst_at]
        baseline = full_sync(orthanc, fhir, work, path, args.interval) if args.burst else None
    return PathRun(
        list(watch.studies.values()),
        [(t - started, b, q) for t, b, q in watch.samples],
        max(rest) if rest else None,
        max(during) if during else None,
        baseline,
    )


def quantiles(values: list[float]) -> str:
    """p50 / p95 / max of ``values`` (nearest rank), or ``-``."""
    if not values:
        return "-"
    ordered = sorted(values)
    p95 = ordered[min(len(ordered) - 1, round(0.95 * (len(ordered) - 1)))]
    return f"{statistics.median(ordered):.2f} / {p95:.2f} / {ordered[-1]:.2f}"


def _p95(values: list[float]) -> float | None:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(0.95 * (len(ordered) - 1)))] if ordered else None


def report(path: str, run: PathRun, every: float, interval: float) -> None:
    """Print one path's figures, per phase, with their same-run ratios, and its backlog over time."""
    studies = run.studies
    floor = [s.listed for s in studies if s.listed is not None]
    for phase in ("steady", "burst"):
        chosen = [s for s in studies if s.phase == phase]
        done = [s for s in chosen if s.readable is not None]
        from_stable = [s.readable - s.stable for s in done if s.readable is not None and s.stable is not None]
        from_store = [s.readable - s.stored for s in done if s.readable is not None]
        figures: dict[str, object] = {
            "studies stored / readable": f"{len(chosen)} / {len(done)}",
            "stable -> readable s (p50 / p95 / max)": quantiles(from_stable),
            "stored -> readable s (p50 / p95 / max)": quantiles(from_store),
        }
        p95 = _p95(from_stable)
        if phase == "steady" and p95 is not None:
            if path == "push":
                floor95 = _p95(floor)
                figures["archive floor: stored -> listed by QIDO s (p50 / p95 / max)"] = quantiles(floor)
                if floor95:
                    figures["p95 stable -> readable / p95 archive floor"] = f"{p95 / floor95:.1f}"
            else:
                figures["p95 stable -> readable / sync interval"] = f"{p95 / interval:.2f}"
        if phase == "burst" and done:
            stables = [s.stable for s in chosen if s.stable is not None]
            last = max(s.readable for s in done if s.readable is not None)
            if stables and last > min(stables):
                rate = len(done) / (last - min(stables))
                figures["drain rate studies/s (first stable -> last readable)"] = f"{rate:.1f}"
                if max(stables) > min(stables):
                    # The archive's own pace bounds the drain: no study is pushed before it is stable.
                    archive = len(stables) / (max(stables) - min(stables))
                    figures["archive's pace studies/s (first stable -> last stable)"] = f"{archive:.1f}"
                    figures["readable after the last stable s"] = f"{last - max(stables):.1f}"
                if run.full_sync is not None and run.full_sync[1] > 0:
                    created, seconds = run.full_sync
                    full = created / seconds
                    figures["full bridge sync, same archive: studies, s, studies/s"] = (
                        f"{created}, {seconds:.1f}, {full:.1f}"
                    )
                    figures["drain rate / full-sync rate"] = f"{rate / full:.2f}"
            if run.rss_rest and run.rss_peak:
                figures["bridge RSS MB at rest / peak in the burst"] = (
                    f"{run.rss_rest:.0f} / {run.rss_peak:.0f}"
                )
                figures["peak / rest RSS"] = f"{run.rss_peak / run.rss_rest:.2f}"
        print_block(f"{path}, {phase}", figures)
    line, next_at = [], 0.0
    for t, backlog, queue in run.samples:
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
    parser.add_argument(
        "--quick", action="store_true", help="a small size to try it: 20 s steady, a burst of 50"
    )
    args = parser.parse_args(argv)
    if args.quick:
        args.steady, args.burst, args.drain = 20.0, 50, 120.0
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
        run = one_path(path, args, work)
        report(path, run, every=max(5.0, args.steady / 12), interval=args.interval)
    return 0


if __name__ == "__main__":
    sys.exit(main())
