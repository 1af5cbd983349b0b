"""Process-wide Prometheus registry and the bridge's metrics (labels never carry patient data).

Metric objects are cheap, stateless-at-start counters registered in one private registry, so
``/metrics`` shows the bridge's own series and tests can read them; nothing here does I/O.
"""

from __future__ import annotations

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Histogram, generate_latest

REGISTRY = CollectorRegistry(auto_describe=True)

# HTTP API. ``route`` is the route template (e.g. /studies/{study_uid}/links), never the raw path.
HTTP_REQUESTS = Counter(
    "bridge_http_requests",
    "HTTP requests answered by the API, by method, route template and status code",
    ["method", "route", "status"],
    registry=REGISTRY,
)
HTTP_REQUEST_DURATION = Histogram(
    "bridge_http_request_duration_seconds",
    "Time to answer an API request, by method, route template and status code",
    ["method", "route", "status"],
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0),
    registry=REGISTRY,
)

# Resolver
RESOLVER_LOOKUPS = Counter(
    "bridge_resolver_lookups",
    "Study lookups by the resolver, by kind (id, uid, accession, reference) and cache result (hit, miss)",
    ["kind", "cache"],
    registry=REGISTRY,
)


def exposition() -> tuple[bytes, str]:
    """The registry in the Prometheus text format, and its content type."""
    return generate_latest(REGISTRY), CONTENT_TYPE_LATEST
