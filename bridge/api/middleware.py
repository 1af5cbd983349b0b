"""Outermost ASGI middleware: request metrics and access log by route template, and a last-resort 500."""

from __future__ import annotations

import json
import logging
import time
from typing import Any

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from bridge.logs import info_line
from bridge.metrics import HTTP_REQUEST_DURATION, HTTP_REQUESTS

logger = logging.getLogger(__name__)
access_logger = logging.getLogger("bridge.api.access")

UNMATCHED = "unmatched"
OTHER = "other"
# Metric labels come from closed sets: a method outside these (any token is a valid method) is "other".
KNOWN_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})
NOSNIFF = (b"x-content-type-options", b"nosniff")
_INTERNAL = json.dumps(
    {
        "resourceType": "OperationOutcome",
        "issue": [{"severity": "error", "code": "exception", "diagnostics": "internal error"}],
    }
).encode()


# The metric series of each (method, route, status): looking them up by labels costs more than the
# rest of the bookkeeping. The key's parts come from closed sets, so this stays small.
_SERIES: dict[tuple[str, str, int], tuple[Any, Any]] = {}


def _series(method: str, route: str, status: int) -> tuple[Any, Any]:
    key = (method, route, status)
    found = _SERIES.get(key)
    if found is None:
        labels = (method, route, str(status))
        found = _SERIES[key] = (HTTP_REQUESTS.labels(*labels), HTTP_REQUEST_DURATION.labels(*labels))
    return found


def route_template(scope: Scope) -> str:
    """The matched route's path template (never the raw path, which carries ids and UIDs)."""
    route: Any = scope.get("route")
    path = getattr(route, "path", None)
    return path if isinstance(path, str) else UNMATCHED


def method_label(scope: Scope) -> str:
    """The request's method if it is a known one, else ``other``."""
    method = str(scope.get("method", ""))
    return method if method in KNOWN_METHODS else OTHER


class ObservabilityMiddleware:
    """Counts and times every request; turns an escaped exception into a bare 500, logged without trace."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        """Serve one ASGI connection through the app."""
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        status = 500
        answered = False

        async def send_and_note(message: Message) -> None:
            nonlocal status, answered
            if message["type"] == "http.response.start":
                status = int(message["status"])
                answered = True
                # no response is to be sniffed into something else (an HTML error page into a script)
                message = {**message, "headers": [*message.get("headers", []), NOSNIFF]}
            await send(message)

        try:
            await self.app(scope, receive, send_and_note)
        except Exception as exc:  # noqa: BLE001 - the last resort: no trace leaves the process
            status = 500
            logger.error(
                "unhandled %s answering %s %s", type(exc).__name__, method_label(scope), route_template(scope)
            )
            if not answered:
                await send(
                    {
                        "type": "http.response.start",
                        "status": 500,
                        "headers": [
                            (b"content-type", b"application/json"),
                            (b"content-length", str(len(_INTERNAL)).encode()),
                            NOSNIFF,
                        ],
                    }
                )
                await send({"type": "http.response.body", "body": _INTERNAL})
        finally:
            elapsed = time.perf_counter() - started
            route = route_template(scope)
            method = method_label(scope)
            count, duration = _series(method, route, status)
            count.inc()
            duration.observe(elapsed)
            if access_logger.isEnabledFor(logging.INFO):
                info_line(access_logger, f"{method} {route} {status} {elapsed * 1000:.1f} ms")
