"""The bridge's cookie names and how Cookie headers are read, below both the login routes and the front.

The front (bridge/gateway/front.py) writes the session cookie's name, and regular expressions that
read a Cookie header as `read` does, into nginx's configuration: the credential nginx files a grant
under must be the very one the bridge authenticated.

They depend on the settings alone (the public URL's scheme), so they live below both.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass

from bridge.config import Settings

COOKIE = "bridge_session"  # the session cookie's name on plain-http loopback (a developer's machine)
# Over https the cookies carry the __Host- prefix: the browser then takes them only from this very
# host, Secure, with Path=/ and no Domain, so a sibling host cannot plant a session or login cookie.
HOST_PREFIX = "__Host-"
VALUE = re.compile(r"[A-Za-z0-9_-]{1,128}")  # what secrets.token_urlsafe makes, nothing else
# A name's characters: printable ASCII. Anything else by a name (spaces, tabs, control characters)
# is dropped before names are compared, so an oddly written name is still seen as the one it spells.
NAME_CHARACTERS = frozenset(chr(code) for code in range(0x21, 0x7F))


def host_prefixed(settings: Settings) -> bool:
    """Whether the cookies carry the ``__Host-`` prefix: whenever the public URL is https."""
    url = settings.public_url
    return url is not None and url.scheme == "https"


def cookie_name(settings: Settings, base: str = COOKIE) -> str:
    """The name of a bridge cookie (the session's by default) under these settings."""
    return HOST_PREFIX + base if host_prefixed(settings) else base


def spellings(name: str) -> tuple[str, str]:
    """The two names of a bridge cookie: plain and ``__Host-`` prefixed, whichever ``name`` is."""
    base = name.removeprefix(HOST_PREFIX)
    return base, HOST_PREFIX + base


@dataclass(frozen=True, slots=True)
class CookieReading:
    """What a request's Cookie headers say of one cookie: its one sound value, or why they are refused."""

    value: str | None = None  # None: no such cookie (or refused)
    refused: str | None = None  # the reason, when the headers are refused


def read(headers: Iterable[str], name: str) -> CookieReading:
    """Cookie ``name`` in these Cookie header values (as received: each trimmed of outer spaces).

    Strict, and the same reading as the front's (bridge/gateway/front.py), so that what nginx keys a
    grant on and what the bridge authenticates are the same bytes. Refused:

    - a pair whose name spells either of the cookie's names (see `spellings`) with anything but
      printable ASCII in or around it, other than the one space a browser writes after ``;``, such
      as ``bridge_session =x`` or a tab before the name (where nginx would read no cookie, or another);
    - two pairs of that name, in one header or several;
    - a value the bridge never makes (quoted, padded, odd characters).
    """
    own = spellings(name)
    found: list[str] = []
    for header in headers:
        for index, pair in enumerate(header.split(";")):
            written, equals, value = pair.partition("=")
            if not equals:
                continue
            spelled = "".join(c for c in written if c in NAME_CHARACTERS)
            if spelled not in own:
                continue
            if written != spelled and not (index > 0 and written == " " + spelled):
                return CookieReading(
                    refused=f"the {spelled} cookie's name is written with spaces or control characters; "
                    "send it as a browser does (name=value; ...)"
                )
            if spelled == name:
                found.append(value)
    if not found:
        return CookieReading()
    if len(found) > 1:
        return CookieReading(refused=f"the request carries more than one {name} cookie; send one")
    if not VALUE.fullmatch(found[0]):
        return CookieReading(refused=f"the {name} cookie is not one the bridge set; log in again")
    return CookieReading(found[0])
