"""Whose X-Forwarded-For / -Proto the API believes (bridge/api/forwarded.py): the front's, named proxies'."""

from __future__ import annotations

from typing import Any

import pytest

from bridge.api.forwarded import ForwardedHeaders
from bridge.gateway.front import SECRET_HEADER

pytestmark = pytest.mark.anyio

SECRET = "front-secret-4b8f0e2a9c7d1e3f5a6b"
CALLER = "198.51.100.23"  # TEST-NET-2: the caller the proxy saw
FORGED = "203.0.113.7"  # TEST-NET-3: what a caller writes itself


async def _seen(
    headers: dict[str, str] | list[tuple[str, str]],
    *,
    client: str = "127.0.0.1",
    proxies: tuple[str, ...] = (),
    secret: str | None = SECRET,
) -> tuple[str, str]:
    """(client address, scheme) the app behind the middleware sees for a request."""
    seen: dict[str, Any] = {}

    async def app(scope: Any, receive: Any, send: Any) -> None:
        seen.update(scope)

    pairs = headers.items() if isinstance(headers, dict) else headers
    scope = {
        "type": "http",
        "scheme": "http",
        "client": (client, 50000),
        "headers": [(k.lower().encode("latin-1"), v.encode("latin-1")) for k, v in pairs],
    }
    await ForwardedHeaders(app, proxies=list(proxies), front_secret=secret)(scope, None, None)  # type: ignore[arg-type]
    return seen["client"][0], seen["scheme"]


async def test_a_local_callers_forwarded_headers_are_ignored_by_default() -> None:
    forged = {"X-Forwarded-For": FORGED, "X-Forwarded-Proto": "https"}
    assert await _seen(forged) == ("127.0.0.1", "http")
    assert await _seen(forged, secret=None) == ("127.0.0.1", "http")


async def test_the_fronts_requests_carry_its_secret_and_are_believed() -> None:
    front = {SECRET_HEADER: SECRET, "X-Forwarded-For": CALLER, "X-Forwarded-Proto": "https"}
    assert await _seen(front) == (CALLER, "https")


@pytest.mark.parametrize(
    "secret",
    [SECRET[:-1] + "x", SECRET[:-1], SECRET + "x", "", SECRET.upper()],
    ids=["one character off", "shorter", "longer", "empty", "other case"],
)
async def test_a_wrong_secret_is_a_caller_like_any_other(secret: str) -> None:
    assert await _seen({SECRET_HEADER: secret, "X-Forwarded-For": FORGED}) == ("127.0.0.1", "http")


async def test_two_secret_headers_are_not_the_fronts() -> None:
    twice = [(SECRET_HEADER, SECRET), (SECRET_HEADER, "guess"), ("X-Forwarded-For", FORGED)]
    assert await _seen(twice) == ("127.0.0.1", "http")


async def test_the_caller_is_the_address_the_front_added_not_what_the_caller_wrote_before_it() -> None:
    # nginx's $proxy_add_x_forwarded_for: the caller's own header, then the address nginx saw.
    front = {SECRET_HEADER: SECRET, "X-Forwarded-For": f"{FORGED}, {CALLER}"}
    assert await _seen(front) == (CALLER, "http")


async def test_a_named_load_balancer_before_the_front_is_looked_through() -> None:
    balancer = "10.0.0.5"
    front = {SECRET_HEADER: SECRET, "X-Forwarded-For": f"{FORGED}, {CALLER}, {balancer}"}
    assert (await _seen(front, proxies=("10.0.0.0/8",)))[0] == CALLER
    assert (await _seen(front))[0] == balancer  # unnamed: the balancer is the caller


async def test_a_named_proxy_is_believed_without_the_secret() -> None:
    headers = {"X-Forwarded-For": f"{FORGED}, {CALLER}", "X-Forwarded-Proto": "https"}
    assert await _seen(headers, client="10.1.2.3", proxies=("10.0.0.0/8",)) == (CALLER, "https")
    assert await _seen(headers, client="192.0.2.1", proxies=("10.0.0.0/8",)) == ("192.0.2.1", "http")


@pytest.mark.parametrize(
    ("forwarded", "address"),
    [
        ("not-an-address", "127.0.0.1"),  # nothing believable: the connecting address stays
        (f"{CALLER}, <script>", "127.0.0.1"),
        (f"<script>, {CALLER}", CALLER),
        ("", "127.0.0.1"),
        ("2001:db8::1", "2001:db8::1"),
    ],
)
async def test_only_an_ip_address_is_ever_taken_as_the_caller(forwarded: str, address: str) -> None:
    assert (await _seen({SECRET_HEADER: SECRET, "X-Forwarded-For": forwarded}))[0] == address


async def test_an_unknown_scheme_is_not_taken() -> None:
    front = {SECRET_HEADER: SECRET, "X-Forwarded-For": CALLER, "X-Forwarded-Proto": "gopher"}
    assert await _seen(front) == (CALLER, "http")
