"""Secure by default: the API serves patient data anonymously only on loopback, unless told otherwise."""

from __future__ import annotations

import logging

from bridge.config import Settings
from bridge.config.hosts import is_loopback
from bridge.errors import ConfigurationError

logger = logging.getLogger(__name__)

def auth_configured(settings: Settings) -> bool:
    """Whether callers of the API must authenticate (API keys, bearer JWTs or a browser login)."""
    return (
        bool(settings.api.keys)
        or settings.jwt.jwks_url is not None
        or settings.jwt.public_key is not None
        or settings.login_enabled
    )


def check_listen_address(host: str, settings: Settings) -> None:
    """ConfigurationError if serving on ``host`` would expose patient data to anyone who reaches it."""
    if is_loopback(host) or auth_configured(settings):
        return
    if settings.api.allow_anonymous:
        logger.warning(
            "serving the API on %s without authentication (BRIDGE_API_ALLOW_ANONYMOUS=true): whatever is "
            "in front of the bridge must authenticate callers",
            host,
        )
        return
    raise ConfigurationError(
        f"refusing to serve the API on {host} without authentication: anyone who reaches it could read "
        "patient data. Configure BRIDGE_API_KEYS or BRIDGE_JWT_JWKS_URL / BRIDGE_JWT_PUBLIC_KEY, listen on "
        "127.0.0.1, or set BRIDGE_API_ALLOW_ANONYMOUS=true if something in front of the bridge "
        "authenticates callers"
    )


def needs_auth(setting: bool | None, settings: Settings) -> bool:
    """Whether a route with an open-or-not setting (/metrics, /docs) requires authentication.

    Unset, it follows the rest of the API: required whenever authentication is configured.
    """
    return auth_configured(settings) if setting is None else setting
