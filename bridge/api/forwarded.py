"""The caller's address and scheme behind a proxy: X-Forwarded-For / -Proto, believed from proven proxies.

The audit trail's network address and the on-demand sync's rate limit use the request's client
address. Behind the nginx front or a load balancer that address is the proxy's, and the caller's is
in ``X-Forwarded-For``; but any caller can write that header, so it is believed only from

- the nginx front: every request it hands the bridge carries the front's shared secret
  (bridge/gateway/front.py), compared here in constant time; a local process without the secret is
  a caller like any other;
- the proxies the operator names in ``BRIDGE_TRUSTED_PROXIES`` (addresses or networks).

From such a request the caller is the right-most ``X-Forwarded-For`` address that is not itself a
named proxy (the front writes its caller's address last): a load balancer in front of the front is
believed only if named. ``bridge serve`` turns uvicorn's own handling of these headers off, so this
is the one place that decides.
"""

from __future__ import annotations

import hmac
import ipaddress
from collections.abc import Sequence

from starlette.types import ASGIApp, Receive, Scope, Send

from bridge.gateway.front import SECRET_HEADER

_SECRET = SECRET_HEADER.encode("ascii")
_FOR = b"x-forwarded-for"
_PROTO = b"x-forwarded-proto"
_SCHEMES = {"http": {"http": "http", "https": "https"}, "websocket": {"http": "ws", "https": "wss"}}

Network = ipaddress.IPv4Network | ipaddress.IPv6Network


class ForwardedHeaders:
    """Sets the request's client address and scheme from a believed proxy's X-Forwarded-For / -Proto."""

    def __init__(self, app: ASGIApp, *, proxies: Sequence[str], front_secret: str | None) -> None:
        self.app = app
        self._networks: tuple[Network, ...] = tuple(ipaddress.ip_network(p, strict=False) for p in proxies)
        self._secret = front_secret.encode("utf-8") if front_secret else None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        """Pass the request on, with the caller's address and scheme if a believed proxy gave them."""
        if scope["type"] in _SCHEMES:
            self._apply(scope)
        await self.app(scope, receive, send)

    def _apply(self, scope: Scope) -> None:
        headers: list[tuple[bytes, bytes]] = scope.get("headers") or []
        if not self._believed(scope, headers):
            return
        addresses = [
            entry.strip()
            for name, value in headers
            if name == _FOR
            for entry in value.decode("latin-1").split(",")
        ]
        client = self._caller(addresses)
        if client is not None:
            scope["client"] = (client, 0)
        protos = [value.decode("latin-1") for name, value in headers if name == _PROTO]
        if protos:
            scheme = _SCHEMES[scope["type"]].get(protos[-1].split(",")[-1].strip().lower())
            if scheme is not None:
                scope["scheme"] = scheme

    def _believed(self, scope: Scope, headers: list[tuple[bytes, bytes]]) -> bool:
        """Whether the request comes from the front (its secret) or a named proxy."""
        if self._secret is not None:
            given = [value for name, value in headers if name == _SECRET]
            if len(given) == 1 and hmac.compare_digest(given[0], self._secret):
                return True
        client = scope.get("client")
        return client is not None and self._named(client[0])

    def _named(self, address: str) -> bool:
        try:
            parsed = ipaddress.ip_address(address)
        except ValueError:
            return False
        return any(parsed in network for network in self._networks)

    def _caller(self, addresses: list[str]) -> str | None:
        """The right-most address that is not a named proxy (the left-most if all are); None if none.

        An entry that is not an IP address ends the walk: what lies left of it is no proxy's.
        """
        found: str | None = None
        for entry in reversed(addresses):
            try:
                found = str(ipaddress.ip_address(entry))
            except ValueError:
                break
            if not self._named(found):
                break
        return found
