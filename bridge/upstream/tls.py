"""TLS for the upstream connections: verification on by default, a custom CA bundle, client certificates."""

from __future__ import annotations

import functools
import logging
import ssl
from pathlib import Path

import httpx

logger = logging.getLogger(__name__)


def ssl_context(
    *,
    verify: bool = True,
    ca_bundle: Path | None = None,
    client_cert: Path | None = None,
    client_key: Path | None = None,
    service: str = "upstream",
) -> ssl.SSLContext:
    """The SSLContext an upstream's client uses.

    ``ca_bundle`` replaces the default trust store (certifi's, as httpx uses) rather than adding to
    it, the usual meaning of a CA bundle setting. ``client_cert`` (PEM, optionally with the key in
    the same file) and ``client_key`` are presented for mutual TLS. ``verify=False`` turns
    verification off and says so in the log; it exists for test set-ups, never for production.

    Upstreams with the same TLS settings share one context: loading a trust store takes tens of
    milliseconds, paid once per process rather than once per client (clients are made at start).
    """
    if not verify:
        logger.warning("%s: TLS certificate verification is OFF; the connection can be intercepted", service)
    return _context(verify, ca_bundle if verify else None, client_cert, client_key)


@functools.lru_cache(maxsize=8)
def _context(
    verify: bool, ca_bundle: Path | None, client_cert: Path | None, client_key: Path | None
) -> ssl.SSLContext:
    if ca_bundle is not None:
        context = ssl.create_default_context(cafile=str(ca_bundle))
    else:
        context = httpx.create_ssl_context(verify=verify)
    if client_cert is not None:
        context.load_cert_chain(str(client_cert), str(client_key) if client_key is not None else None)
    return context
