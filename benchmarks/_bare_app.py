"""Child process of benchmarks/resolver.py: a bare Starlette app answering the bridge's links bodies.

The yardstick for the bridge's own request path: the same uvicorn settings as `bridge serve` (one
worker, uvloop and httptools when installed, no access log, no server header), the same route
pattern, and for each Study Instance UID the very bytes the bridge answered for it, with its
content type. What the bridge spends beyond this app is FastAPI, middleware, auth, audit and links.

Run:  python -m benchmarks._bare_app PORT BODIES.json   (BODIES.json: {study_uid: body text})
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route


def app_for(bodies: dict[str, bytes]) -> Starlette:
    """The bare app: GET /studies/{study_uid}/links answers that study's stored body, else 404."""

    async def links(request: Request) -> Response:
        body = bodies.get(request.path_params["study_uid"])
        if body is None:
            return Response(b"{}", status_code=404, media_type="application/json")
        return Response(body, media_type="application/json")

    return Starlette(routes=[Route("/studies/{study_uid}/links", links)])


def main() -> int:
    """Serve until stopped."""
    port, path = int(sys.argv[1]), Path(sys.argv[2])
    bodies = {uid: text.encode() for uid, text in json.loads(path.read_text()).items()}
    uvicorn.run(
        app_for(bodies), host="127.0.0.1", port=port, log_config=None, access_log=False, server_header=False
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
