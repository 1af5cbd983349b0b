"""The OHIF viewer for the local stack: OHIF's prebuilt app served next to a proxy to the archive.

``tests/stack/ohif`` is a small npm project whose lockfile pins ``@ohif/app`` (the viewer's
published build; only its ``dist/`` is used, as is) and ``playwright-core`` (which drives
Debian's chromium in ``tests/browser``).  ``@ohif/app`` declares the libraries it was built
from as dependencies; the built app needs none of them, so the project's ``overrides`` point
each at an empty local package and ``npm ci`` installs only the two packages.

:class:`ViewerServer` runs one small ASGI app (Starlette under uvicorn, in a thread) on a free
loopback port that answers:

- ``/app-config.js``: generated from ``ohif/app-config.template.js``, with the DICOMweb data
  source at this same server's ``/dicom-web``;
- ``/dicom-web/...``: GET and HEAD forwarded to the archive's DICOMweb root, so the browser
  talks to one origin and the archive needs no CORS;
- everything else: the files of ``dist/``, and ``index.html`` for the app's own routes
  (``/viewer?StudyInstanceUIDs=...``), as OHIF's single-page router needs.

Nothing is logged per request: the query strings of QIDO can carry patient data.

Manual use::

    python -m tests.stack.viewer --dicomweb http://127.0.0.1:8042/dicom-web [--port 3000]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import shutil
import subprocess
import threading
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import httpx
import uvicorn
from starlette.applications import Starlette
from starlette.background import BackgroundTask
from starlette.datastructures import MutableHeaders
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import FileResponse, Response, StreamingResponse
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from tests.stack.process import LOG_TAIL_LINES, Launcher, apt_install, free_loopback_port

OHIF_DIR = Path(__file__).resolve().parent / "ohif"
DIST_DIR = OHIF_DIR / "node_modules" / "@ohif" / "app" / "dist"
CONFIG_TEMPLATE = OHIF_DIR / "app-config.template.js"
CONFIG_PLACEHOLDER = "__BRIDGE_DICOMWEB_ROOT__"
PROXY_PREFIX = "/dicom-web"
NPM_TIMEOUT_SECONDS = 600.0

# Request headers a browser sends that the archive may use; everything else stays here.
# The cookie carries the bridge's session when the proxy points at the bridge's image gateway (browsers
# send a host's cookies to every port of it); the archive ignores it.
FORWARDED_REQUEST_HEADERS = (
    "accept",
    "accept-encoding",
    "range",
    "if-none-match",
    "if-modified-since",
    "cookie",
)
# Response headers that describe the connection, not the content (RFC 9110 7.6.1), plus the length,
# which the proxy's chunked answer recomputes.
HOP_BY_HOP = frozenset(
    {
        "connection",
        "keep-alive",
        "proxy-authenticate",
        "proxy-authorization",
        "te",
        "trailer",
        "transfer-encoding",
        "upgrade",
        "content-length",
    }
)
# OHIF's volume rendering and some decoders use SharedArrayBuffer, which needs cross-origin isolation.
ISOLATION_HEADERS = {
    "Cross-Origin-Opener-Policy": "same-origin",
    "Cross-Origin-Embedder-Policy": "require-corp",
    "Cross-Origin-Resource-Policy": "same-origin",
}


def ensure_installed(project_dir: Path = OHIF_DIR) -> Path:
    """Install the npm project (``npm ci``, exact versions from its lockfile) unless already there.

    Returns OHIF's ``dist/`` folder.
    """
    marker = project_dir / "node_modules" / "@ohif" / "app" / "dist" / "index.html"
    driver = project_dir / "node_modules" / "playwright-core" / "package.json"
    if marker.is_file() and driver.is_file():
        return marker.parent
    npm = shutil.which("npm")
    if npm is None:
        raise RuntimeError("`npm` was not found on PATH; the OHIF viewer is installed from the npm registry")
    # --ignore-scripts: both packages are used as shipped, and nothing needs building or downloading.
    command = [npm, "ci", "--ignore-scripts", "--no-audit", "--no-fund", "--loglevel=error"]
    try:
        result = subprocess.run(
            command, cwd=project_dir, capture_output=True, text=True, check=False, timeout=NPM_TIMEOUT_SECONDS
        )
    except subprocess.TimeoutExpired as exc:
        raise RuntimeError(f"`npm ci` in {project_dir} timed out after {NPM_TIMEOUT_SECONDS:.0f} s") from exc
    if result.returncode != 0 or not marker.is_file():
        tail = "\n".join((result.stdout + result.stderr).splitlines()[-LOG_TAIL_LINES:])
        raise RuntimeError(f"`npm ci` in {project_dir} failed with code {result.returncode}:\n{tail}")
    return marker.parent


def render_app_config(dicomweb_root: str, template: Path = CONFIG_TEMPLATE) -> str:
    """OHIF's app-config.js with its data source at ``dicomweb_root`` (absolute, or a path on this origin)."""
    text = template.read_text(encoding="utf-8")
    if CONFIG_PLACEHOLDER not in text:
        raise RuntimeError(f"{template} lacks the placeholder {CONFIG_PLACEHOLDER}")
    return text.replace(CONFIG_PLACEHOLDER, json.dumps(dicomweb_root.rstrip("/")))


class SinglePageFiles(StaticFiles):
    """Files of a built single-page app; a missing extension-less path gets ``index.html``."""

    async def get_response(self, path: str, scope: Scope) -> Response:
        """The file at ``path``, else the app's page for one of its client-side routes."""
        try:
            return await super().get_response(path, scope)
        except HTTPException as exc:
            last = path.rsplit("/", 1)[-1]
            if exc.status_code != 404 or "." in last:
                raise  # a missing script or image stays a 404 rather than HTML in disguise
            return FileResponse(
                Path(str(self.directory)) / "index.html", headers={"Cache-Control": "no-cache"}
            )


class IsolationHeaders:
    """ASGI middleware adding the cross-origin isolation headers to every answer."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        async def send_with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = MutableHeaders(scope=message)
                for name, value in ISOLATION_HEADERS.items():
                    headers.setdefault(name, value)
            await send(message)

        await self.app(scope, receive, send_with_headers)


def build_app(
    dist_dir: Path, dicomweb_url: str, *, transport: httpx.AsyncBaseTransport | None = None
) -> Starlette:
    """The viewer's ASGI app: config, DICOMweb proxy to ``dicomweb_url``, then OHIF's files."""
    upstream = dicomweb_url.rstrip("/")
    config_js = render_app_config(PROXY_PREFIX)
    state: dict[str, httpx.AsyncClient] = {}

    @asynccontextmanager
    async def lifespan(_app: Starlette) -> AsyncIterator[None]:
        async with httpx.AsyncClient(
            transport=transport, timeout=httpx.Timeout(60.0), follow_redirects=False
        ) as client:
            state["client"] = client
            yield

    async def app_config(_request: Request) -> Response:
        return Response(config_js, media_type="text/javascript", headers={"Cache-Control": "no-store"})

    async def proxy(request: Request) -> Response:
        client = state["client"]
        path = request.path_params["path"]
        url = f"{upstream}/{path}"
        if request.url.query:
            url = f"{url}?{request.url.query}"
        headers = {k: v for k, v in request.headers.items() if k.lower() in FORWARDED_REQUEST_HEADERS}
        headers.setdefault("accept-encoding", "identity")  # else httpx offers gzip for the browser
        # The archive builds BulkDataURIs from the host it was asked for: name this server.
        headers["Forwarded"] = f"host={request.url.netloc};proto={request.url.scheme}"
        headers["X-Forwarded-Host"] = request.url.netloc
        headers["X-Forwarded-Proto"] = request.url.scheme
        try:
            answer = await client.send(
                client.build_request(request.method, url, headers=headers), stream=True
            )
        except httpx.HTTPError as exc:
            return Response(f"archive unreachable ({type(exc).__name__})\n", status_code=502)
        kept = {k: v for k, v in answer.headers.items() if k.lower() not in HOP_BY_HOP}
        return StreamingResponse(
            answer.aiter_raw(),
            status_code=answer.status_code,
            headers=kept,
            background=BackgroundTask(answer.aclose),
        )

    return Starlette(
        routes=[
            Route("/app-config.js", app_config, methods=["GET", "HEAD"]),
            Route(PROXY_PREFIX + "/{path:path}", proxy, methods=["GET", "HEAD"]),
            Mount("/", SinglePageFiles(directory=dist_dir, html=True)),
        ],
        middleware=[Middleware(IsolationHeaders)],
        lifespan=lifespan,
    )


class ThreadedServer(Launcher):
    """An ASGI app under uvicorn in a background thread, on a loopback port (free unless given)."""

    def __init__(self, app: ASGIApp, port: int | None = None, *, name: str = "asgi-server") -> None:
        self.app = app
        self.name = name
        self._requested_port = port
        self.port = port or 0
        self._server: uvicorn.Server | None = None
        self._thread: threading.Thread | None = None

    @property
    def base_url(self) -> str:
        """``http://127.0.0.1:PORT``."""
        return f"http://127.0.0.1:{self.port}"

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def start(self, timeout: float = 30.0) -> None:
        """Serve; returns once the app's lifespan has started and the port accepts connections."""
        if self.running:
            return
        self.port = self._requested_port or free_loopback_port()
        # No proxy headers at uvicorn, as `bridge serve` runs it: the app decides whose it believes.
        config = uvicorn.Config(
            self.app,
            host="127.0.0.1",
            port=self.port,
            log_level="warning",
            access_log=False,
            lifespan="on",
            proxy_headers=False,
        )
        server = uvicorn.Server(config)
        self._server = server
        self._thread = threading.Thread(
            target=lambda: asyncio.run(server.serve()), name=self.name, daemon=True
        )
        self._thread.start()
        deadline = time.monotonic() + timeout
        while not server.started:
            if not self._thread.is_alive():
                self.stop()
                raise RuntimeError(f"{self.name} on port {self.port} stopped while starting")
            if time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"{self.name} did not start within {timeout:.0f} s")
            time.sleep(0.05)

    def stop(self) -> None:
        """Stop serving (safe to call more than once)."""
        server, thread = self._server, self._thread
        self._server = self._thread = None
        if server is not None:
            server.should_exit = True
        if thread is not None:
            thread.join(timeout=10)


class ViewerServer(ThreadedServer):
    """OHIF on a loopback port, its DICOMweb data source proxied to ``dicomweb_url``."""

    def __init__(self, dicomweb_url: str, port: int | None = None) -> None:
        self.dicomweb_url = dicomweb_url
        super().__init__(_unbuilt, port, name="OHIF viewer server")

    def start(self, timeout: float = 30.0) -> None:
        """Install OHIF if needed (``npm ci``), then serve it; its study page is ``/viewer``."""
        if self.running:
            return
        self.app = build_app(ensure_installed(), self.dicomweb_url)
        super().start(timeout)


async def _unbuilt(scope: Scope, receive: Receive, send: Send) -> None:
    raise RuntimeError("the viewer app is built by ViewerServer.start()")


# ------------------------------------------------------------------ chromium

CHROMIUM_CANDIDATES = ("/usr/bin/chromium", "/usr/bin/chromium-browser")


def find_chromium() -> str | None:
    """Debian's chromium, if installed."""
    for candidate in CHROMIUM_CANDIDATES:
        if Path(candidate).is_file():
            return candidate
    return None


CLICKTHROUGH_SCRIPT = Path(__file__).resolve().parents[1] / "browser" / "clickthrough.mjs"
PAGE_SCRIPT = Path(__file__).resolve().parents[1] / "browser" / "page.mjs"


def run_clickthrough(options: dict[str, Any], shots: Path, timeout: float) -> dict[str, Any]:
    """Drive chromium with tests/browser/clickthrough.mjs; what it saw (asserted ``ok``).

    Its output is kept in ``shots`` beside the screenshots.
    """
    return _run_browser_script(CLICKTHROUGH_SCRIPT, options, shots, timeout)


def run_page(options: dict[str, Any], shots: Path, timeout: float) -> dict[str, Any]:
    """One page in chromium with tests/browser/page.mjs (open, wait, click); what it saw (asserted ``ok``)."""
    return _run_browser_script(PAGE_SCRIPT, options, shots, timeout)


def _run_browser_script(script: Path, options: dict[str, Any], shots: Path, timeout: float) -> dict[str, Any]:
    node = shutil.which("node")
    assert node is not None, f"the browser test needs Node.js ({script.name})"
    run = subprocess.run(
        [node, str(script), json.dumps(options)],
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )
    (shots / "browser-output.txt").write_text(run.stdout + run.stderr, encoding="utf-8")
    lines = run.stdout.strip().splitlines()
    assert lines, f"the browser script printed nothing; stderr:\n{run.stderr[-3000:]}"
    seen: dict[str, Any] = json.loads(lines[-1])
    assert seen["ok"], f"{script.name} failed: {seen.get('error')} (at {seen.get('page_url')}); see {shots}"
    return seen


def ensure_chromium() -> str:
    """Debian's chromium, installed with apt-get when missing (the tests never download a browser)."""
    found = find_chromium()
    if found:
        return found
    apt_install("chromium")
    found = find_chromium()
    if found is None:
        raise RuntimeError("apt-get installed chromium but no chromium executable was found")
    return found


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Serve the OHIF viewer for a local DICOMweb archive.")
    parser.add_argument("--dicomweb", required=True, help="the archive's DICOMweb root")
    parser.add_argument("--port", type=int, default=None, help="loopback port (default: a free one)")
    args = parser.parse_args(argv)
    with ViewerServer(args.dicomweb, port=args.port) as viewer:
        print(f"OHIF viewer: {viewer.base_url}/  (studies from {args.dicomweb}); Ctrl-C stops it", flush=True)
        try:
            while viewer.running:
                time.sleep(0.5)
        except KeyboardInterrupt:
            pass
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
