"""HTTP to the upstreams: errors mapped once, a circuit per upstream, one retry policy and ``send``.

Modules: ``errors`` (httpx outcomes to bridge errors), ``breaker`` (the circuit), ``retry`` (the
policy and ``send``). The names the clients use are importable from here.
"""

from bridge.http.breaker import CircuitBreaker, CircuitState
from bridge.http.errors import (
    RETRIABLE_STATUS,
    TRANSPORT_ERRORS,
    auth_error,
    body_is_empty,
    error_for_exception,
    error_for_response,
    json_body,
    parse_retry_after,
    refusal_detail,
    setting_prefix,
    where,
)
from bridge.http.retry import RetryPolicy, send

__all__ = [
    "RETRIABLE_STATUS",
    "TRANSPORT_ERRORS",
    "CircuitBreaker",
    "CircuitState",
    "RetryPolicy",
    "auth_error",
    "body_is_empty",
    "error_for_exception",
    "error_for_response",
    "json_body",
    "parse_retry_after",
    "refusal_detail",
    "send",
    "setting_prefix",
    "where",
]
