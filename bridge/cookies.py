"""The bridge's cookie names, below both the login routes that set them and the gateway front.

The front (bridge/gateway/front.py) writes the session cookie's name into nginx's configuration.

They depend on the settings alone (the public URL's scheme), so they live below both.
"""

from __future__ import annotations

from bridge.config import Settings

COOKIE = "bridge_session"  # the session cookie's name on plain-http loopback (a developer's machine)
# Over https the cookies carry the __Host- prefix: the browser then takes them only from this very
# host, Secure, with Path=/ and no Domain, so a sibling host cannot plant a session or login cookie.
HOST_PREFIX = "__Host-"


def host_prefixed(settings: Settings) -> bool:
    """Whether the cookies carry the ``__Host-`` prefix: whenever the public URL is https."""
    url = settings.public_url
    return url is not None and url.scheme == "https"


def cookie_name(settings: Settings, base: str = COOKIE) -> str:
    """The name of a bridge cookie (the session's by default) under these settings."""
    return HOST_PREFIX + base if host_prefixed(settings) else base
