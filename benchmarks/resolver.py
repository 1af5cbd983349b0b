"""Resolver throughput and latency under load: `wrk` against `bridge serve`, cached and uncached.

Starts the test stack (Orthanc + the Medplum-based FHIR server), stores and syncs the demo studies,
then for each mode runs `bridge serve` on a free loopback port and drives it with wrk at 50
connections, cycling through every demo study:

- cached:   BRIDGE_RESOLVER_CACHE_TTL=30, so after the first lookup per study no FHIR request is made;
- uncached: BRIDGE_RESOLVER_CACHE_TTL=0, so every lookup reads the ImagingStudy and its Endpoint.

Each mode runs with authentication off and with it on (``--auth``): an API key in BRIDGE_API_KEYS,
sent by wrk as X-API-Key on every request.

First (``--versus-bare``), the yardstick of issue 24: cached links by Study UID from `bridge serve`
with default settings and INFO logging, against a bare Starlette app (benchmarks/_bare_app.py)
answering the same bytes under the same uvicorn settings, same wrk command, in turns; the ratio of
the two throughputs and the bridge's p99 are the figures (targets: >= 0.5x, p99 < 50 ms).

Run:  python -m benchmarks.resolver [--duration 10] [--connections 50] [--auth off api-key]
          [--versus-bare also|only|no] [--rounds 3]
Installs Debian's wrk when it is missing (apt-get, as root). Prints throughput and p50/p99 latency
per mode and lookup kind, the FHIR requests made, the settings, and the machine (nproc, CPU model).
"""

# ruff: noqa: T201 - a script: printing the figures is its job
from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import httpx

from benchmarks._common import cpu_model
from tests.stack.fhir import FhirTestServer
from tests.stack.orthanc import OrthancServer, ensure_installed
from tests.stack.process import apt_install
from tests.stack.samples import StudySpec, load_demo

ISSUERS = {"HOSP-A": "urn:oid:1.2.826.0.1.3680043.10.1001", "HOSP-B": "urn:oid:1.2.826.0.1.3680043.10.1002"}
_UNITS = {"us": 1e-3, "ms": 1.0, "s": 1e3}


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def ensure_wrk() -> str:
    """Debian's wrk, installed with apt-get when missing."""
    found = shutil.which("wrk")
    if found is None:
        apt_install("wrk")
        found = shutil.which("wrk")
    if found is None:
        raise RuntimeError("wrk is still missing after apt-get install wrk")
    return found


@dataclass
class DemoStack:
    """Orthanc holding the demo studies, the FHIR test server, and the bridge's settings for them."""

    orthanc: OrthancServer
    fhir: FhirTestServer
    specs: list[StudySpec]
    workdir: Path
    env: dict[str, str]  # the environment of a bridge process: BRIDGE_* for this stack only

    def sync(self) -> bool:
        """Run `bridge sync` once over the archive; False (its errors printed) when it failed."""
        command = [sys.executable, "-m", "bridge", "sync", "--json"]
        run = subprocess.run(command, env=self.env, capture_output=True)
        if run.returncode not in (0, 1):
            print(run.stderr.decode(), file=sys.stderr)
            return False
        return True


@contextmanager
def demo_stack(prefix: str, **settings: str) -> Iterator[DemoStack]:
    """Start Orthanc and the FHIR test server, store the demo studies; stopped and removed after."""
    workdir = Path(tempfile.mkdtemp(prefix=f"{prefix}-"))
    ensure_installed()
    orthanc = OrthancServer(name=prefix, log_path=workdir / "orthanc.log")
    fhir = FhirTestServer(log_path=workdir / "fhir-server.log")
    try:
        orthanc.start()
        fhir.start()
        specs = load_demo(orthanc.dicomweb_url)
        env = {k: v for k, v in os.environ.items() if not k.startswith("BRIDGE_")}
        env.update(
            BRIDGE_DICOMWEB_URL=orthanc.dicomweb_url,
            BRIDGE_FHIR_URL=fhir.base_url,
            BRIDGE_STATE_URL=f"sqlite:///{workdir / 'state.db'}",
            BRIDGE_SOURCE_NAME="bench-orthanc",
            BRIDGE_PATIENT_ISSUER_SYSTEMS=json.dumps(ISSUERS),
            BRIDGE_LOG_LEVEL="WARNING",
            **settings,
        )
        yield DemoStack(orthanc, fhir, specs, workdir, env)
    finally:
        fhir.stop()
        orthanc.stop()
        shutil.rmtree(workdir, ignore_errors=True)


API_KEY = "bench-key-7f3d91"
# issue 24: a cached links lookup within half of a bare Starlette app, p99 under 50 ms
TARGET_RATIO = 0.5
TARGET_P99_MS = 50.0
AUTH_MODES = ("off", "api-key")


def _wrk_script(paths: list[str], folder: Path, headers: dict[str, str] | None = None) -> Path:
    script = folder / "paths.lua"
    entries = ",\n".join(f'  "{p}"' for p in paths)
    header_lines = "".join(
        f"wrk.headers[{json.dumps(k)}] = {json.dumps(v)}\n" for k, v in (headers or {}).items()
    )
    script.write_text(
        header_lines + "paths = {\n" + entries + "\n}\n"
        "counter = 0\n"
        "request = function()\n"
        "  counter = counter + 1\n"
        '  return wrk.format("GET", paths[(counter % #paths) + 1])\n'
        "end\n"
    )
    return script


def _parse_wrk(output: str) -> dict[str, float]:
    def latency(label: str) -> float:
        match = re.search(rf"^\s*{label}%\s+([\d.]+)(us|ms|s)\s*$", output, re.MULTILINE)
        return float(match.group(1)) * _UNITS[match.group(2)] if match else float("nan")

    rps = re.search(r"Requests/sec:\s+([\d.]+)", output)
    total = re.search(r"(\d+) requests in", output)
    errors = re.search(r"Non-2xx or 3xx responses:\s+(\d+)", output)
    return {
        "rps": float(rps.group(1)) if rps else float("nan"),
        "p50_ms": latency("50"),
        "p99_ms": latency("99"),
        "requests": float(total.group(1)) if total else 0.0,
        "non_2xx": float(errors.group(1)) if errors else 0.0,
    }


class Serve:
    """`bridge serve` in a subprocess (or, with ``bare_bodies``, the bare Starlette app of _bare_app)."""

    def __init__(self, env: dict[str, str], bare_bodies: Path | None = None) -> None:
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        command = [sys.executable, "-m", "bridge", "serve", "--host", "127.0.0.1", "--port", str(self.port)]
        ready = "/readyz"
        if bare_bodies is not None:
            command = [sys.executable, "-m", "benchmarks._bare_app", str(self.port), str(bare_bodies)]
            ready = "/studies/0/links"  # any answer means it listens
        quiet = subprocess.DEVNULL
        self.process = subprocess.Popen(command, env=env, stdout=quiet, stderr=quiet)
        deadline = time.monotonic() + 30
        while True:
            try:
                if httpx.get(f"{self.url}{ready}", timeout=2).status_code in (200, 404):
                    return
            except httpx.TransportError:
                pass
            if self.process.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError("bridge serve did not become ready")
            time.sleep(0.2)

    def stop(self) -> None:
        """Stop the server."""
        self.process.terminate()
        try:
            self.process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()


def _cpu_seconds(pid: int) -> float:
    """The process's CPU time so far (user + system, all its threads), from /proc; NaN elsewhere."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return float("nan")
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _run_wrk_on(wrk: str, args: argparse.Namespace, script: Path, server: Serve) -> dict[str, float]:
    """``_run_wrk`` against ``server``, plus the server's CPU microseconds per request (``cpu_us``).

    CPU per request does not depend on how much of the machine wrk took in that run, as throughput
    does: the two servers' ratio of it is the steadier figure on a shared machine.
    """
    before = _cpu_seconds(server.process.pid)
    figures = _run_wrk(wrk, args, script, server.url)
    spent = _cpu_seconds(server.process.pid) - before
    figures["cpu_us"] = spent / figures["requests"] * 1e6 if figures["requests"] else float("nan")
    return figures


def _run_wrk(wrk: str, args: argparse.Namespace, script: Path, url: str) -> dict[str, float]:
    """One wrk run of ``script``'s paths against ``url``, parsed."""
    command = [wrk, f"-t{args.threads}", f"-c{args.connections}", f"-d{args.duration}s", "--latency"]
    run = subprocess.run([*command, "-s", str(script), url], capture_output=True, text=True, check=True)
    return _parse_wrk(run.stdout)


def _spy(args: argparse.Namespace, server: Serve, name: str) -> subprocess.Popen[bytes]:
    """py-spy recording ``server`` for one run's duration (collapsed stacks, in --profile-dir)."""
    args.profile_dir.mkdir(parents=True, exist_ok=True)
    out = args.profile_dir / f"{name}.pyspy.txt"
    print(f"  profile: {out}")
    spy = str(Path(sys.executable).with_name("py-spy"))
    command = [spy, "record", "--rate", "250", "--format", "raw", "--duration", str(args.duration)]
    command += ["--pid", str(server.process.pid), "-o", str(out)]
    return subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def versus_bare(args: argparse.Namespace, wrk: str, stack: DemoStack) -> bool:
    """Cached links by Study UID against a bare Starlette app answering the same bytes; True if on target.

    `bridge serve` runs with default settings and INFO logging (as an operator runs it); the bare
    app (benchmarks/_bare_app.py) under the same uvicorn settings. Both are driven by the same wrk
    command, one after the other, ``--rounds`` times: the ratio within a round is the figure, the
    absolute numbers move with the machine's load.
    """
    env = dict(stack.env, BRIDGE_LOG_LEVEL="INFO")
    paths = [f"/studies/{s.uid}/links" for s in stack.specs]
    script = _wrk_script(paths, stack.workdir)
    bridge = Serve(env)
    bare = None
    try:
        bodies = {}
        for spec, path in zip(stack.specs, paths, strict=True):
            answer = httpx.get(bridge.url + path, timeout=30)
            if answer.status_code != 200:
                raise RuntimeError(f"{path}: {answer.status_code} before the run")
            bodies[spec.uid] = answer.text
        bodies_file = stack.workdir / "bodies.json"
        bodies_file.write_text(json.dumps(bodies))
        bare = Serve(stack.env, bare_bodies=bodies_file)
        for path in paths:
            if httpx.get(bare.url + path, timeout=30).text != bodies[path.split("/")[2]]:
                raise RuntimeError(f"{path}: the bare app's body differs from the bridge's")
        print("cached GET /studies/{uid}/links: bridge serve (defaults, INFO logging), a bare Starlette app")
        print("{:6} {:>9} {:>8} {:>8} {:>9} {:>9} {:>8} {:>8} {:>7} {:>14}".format(
            "round", "bridge/s", "p50 ms", "p99 ms", "bare/s", "p50 ms", "p99 ms", "non-2xx", "ratio",
            "CPU us/request",
        ))  # fmt: skip
        ratios, p99s, cpu_ratios = [], [], []
        for number in range(1, args.rounds + 1):
            spy = _spy(args, bridge, f"serve-versus-bare-{number}") if args.profile is not None else None
            ours = _run_wrk_on(wrk, args, script, bridge)
            if spy is not None:
                spy.wait(timeout=60)
            theirs = _run_wrk_on(wrk, args, script, bare)
            ratio = ours["rps"] / theirs["rps"]
            ratios.append(ratio)
            p99s.append(ours["p99_ms"])
            cpu_ratios.append(theirs["cpu_us"] / ours["cpu_us"])
            print(
                f"{number:<6} {ours['rps']:9.0f} {ours['p50_ms']:8.2f} {ours['p99_ms']:8.2f} "
                f"{theirs['rps']:9.0f} {theirs['p50_ms']:8.2f} {theirs['p99_ms']:8.2f} "
                f"{ours['non_2xx'] + theirs['non_2xx']:8.0f} {ratio:7.2f} "
                f"{ours['cpu_us']:6.0f} / {theirs['cpu_us']:<5.0f}"
            )
        ratio, p99 = statistics.median(ratios), statistics.median(p99s)
        print(
            f"per second of its own CPU the bridge answers {statistics.median(cpu_ratios):.2f}x what the "
            "bare app does (median; the servers' CPU time, whatever wrk took of the machine)"
        )
        met = ratio >= TARGET_RATIO and p99 < TARGET_P99_MS
        print(
            f"median ratio {ratio:.2f}x of the bare app (target >= {TARGET_RATIO}x), bridge p99 {p99:.1f} ms "
            f"(target < {TARGET_P99_MS:.0f} ms): {'met' if met else 'NOT met'}"
        )
        return met
    finally:
        bridge.stop()
        if bare is not None:
            bare.stop()


def main() -> int:
    """Run the benchmark; 0 on success."""
    parser = argparse.ArgumentParser(prog="python -m benchmarks.resolver")
    parser.add_argument("--duration", type=int, default=10, help="seconds per wrk run")
    parser.add_argument("--connections", type=int, default=50)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument(
        "--auth",
        nargs="+",
        choices=AUTH_MODES,
        default=list(AUTH_MODES),
        help="authentication off, and/or on with an API key sent on every request (default: both)",
    )
    parser.add_argument(
        "--profile",
        nargs="*",
        choices=("cached", "uncached"),
        default=None,
        help="record `bridge serve` with py-spy (collapsed stacks) during each run of these modes "
        "(no mode named: the cached runs)",
    )
    parser.add_argument(
        "--profile-dir", type=Path, default=Path("/tmp/bridge-bench/resolver-profiles"), help="where they go"
    )
    parser.add_argument(
        "--versus-bare",
        choices=("also", "only", "no"),
        default="also",
        help="run cached links by Study UID against a bare Starlette app first (default), only that, or not",
    )
    parser.add_argument("--rounds", type=int, default=3, help="bridge/bare pairs of runs in that comparison")
    args = parser.parse_args()
    profiled = set() if args.profile is None else set(args.profile or ["cached"])
    wrk = ensure_wrk()
    # without a viewer's address the redirect is a 503: the viewer runs would time an error
    viewers = json.dumps({"ohif": "https://ohif.example.org/viewer"})
    with demo_stack("bridge-bench", BRIDGE_VIEWER_URLS=viewers) as stack:
        if not stack.sync():
            return 1
        fhir, specs, workdir, base_env = stack.fhir, stack.specs, stack.workdir, stack.env
        print(f"machine: nproc={os.cpu_count()} cpu={cpu_model()!r} python={platform.python_version()}")
        print(
            f"load: wrk -t{args.threads} -c{args.connections} -d{args.duration}s, "
            f"{len(specs)} demo studies in rotation; bridge serve = 1 uvicorn worker"
        )
        if args.versus_bare != "no":
            met = versus_bare(args, wrk, stack)
            if args.versus_bare == "only":
                return 0 if met else 3
        studies = httpx.get(f"{fhir.base_url}/ImagingStudy", params={"_count": "100"}, timeout=30).json()
        ids = [e["resource"]["id"] for e in studies.get("entry", [])]
        kinds = {
            "by-uid": [f"/studies/{s.uid}/links" for s in specs],
            "by-id": [f"/imaging-studies/{i}/links" for i in ids],
            "viewer": [f"/studies/{s.uid}/viewer" for s in specs],
        }
        header = ("auth", "mode", "lookup", "req/s", "p50 ms", "p99 ms", "requests", "non-2xx", "FHIR req")
        print("{:7} {:9} {:7} {:>9} {:>8} {:>8} {:>9} {:>11} {:>9}".format(*header))
        for auth, (mode, ttl) in [(a, m) for a in args.auth for m in (("cached", "30"), ("uncached", "0"))]:
            env = dict(base_env, BRIDGE_RESOLVER_CACHE_TTL=ttl)
            headers = {}
            if auth == "api-key":
                env["BRIDGE_API_KEYS"] = API_KEY
                headers["X-API-Key"] = API_KEY
            server = Serve(env)
            try:
                for kind, paths in kinds.items():
                    for path in paths:  # warm up: first lookups, connection pools
                        answer = httpx.get(server.url + path, headers=headers, timeout=30)
                        if answer.status_code >= 400:
                            raise RuntimeError(f"{path}: {answer.status_code} before the run")
                    fhir.reset_stats()
                    script = _wrk_script(paths, workdir, headers)
                    spy = None
                    if mode in profiled:
                        spy = _spy(args, server, f"serve-{auth}-{mode}-{kind}")
                    result = _run_wrk(wrk, args, script, server.url)
                    if spy is not None:
                        spy.wait(timeout=60)
                    fhir_requests = fhir.stats().get("requests", "?")
                    print(
                        f"{auth:7} {mode:9} {kind:7} {result['rps']:9.0f} {result['p50_ms']:8.2f} "
                        f"{result['p99_ms']:8.2f} {result['requests']:9.0f} {result['non_2xx']:11.0f} "
                        f"{fhir_requests!s:>9}"
                    )
            finally:
                server.stop()
        print(
            "settings: BRIDGE_RESOLVER_CACHE_TTL=30 (cached) / 0 (uncached), "
            "BRIDGE_RESOLVER_CACHE_SIZE=10000; with TTL 0 concurrent identical lookups still share one "
            "FHIR load; "
            "BRIDGE_WRITE_STRATEGY=client-id (Study UID lookups read the derived id, no search), "
            "auth off or BRIDGE_API_KEYS (one key, X-API-Key on every request), "
            "FHIR: Medplum in-memory test server on loopback"
        )
        return 0


if __name__ == "__main__":
    sys.exit(main())
