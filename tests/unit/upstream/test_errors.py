"""How auth and TLS failures are classified: auth errors, never retried, naming the setting."""

from __future__ import annotations

import ssl

import httpx
import pytest

from bridge.errors import FatalUpstreamError, UpstreamAuthError
from bridge.upstream.errors import json_body
from bridge.upstream.retry import RetryPolicy
from tests.unit.upstream.fakes import Clock, Upstream, get

pytestmark = pytest.mark.anyio


@pytest.mark.parametrize("status", [401, 403])
async def test_401_and_403_are_auth_errors_that_are_not_retried(status: int) -> None:
    calls = 0

    def handler(request: httpx.Request) -> httpx.Response:
        nonlocal calls
        calls += 1
        return httpx.Response(status)

    with pytest.raises(UpstreamAuthError) as caught:
        await get(httpx.MockTransport(handler), RetryPolicy(retries=3, sleep=Clock().sleep))
    assert calls == 1
    message = str(caught.value)
    assert message.startswith("dicomweb GET http://archive.test/dicom-web/studies answered")
    assert "BRIDGE_DICOMWEB_" in message and "SECRET-PID" not in message


async def test_an_untrusted_server_certificate_is_an_auth_error_naming_the_ca_setting() -> None:
    failure = ssl.SSLCertVerificationError(1, "certificate verify failed")
    failure.verify_message = "unable to get local issuer certificate"
    error = httpx.ConnectError("TLS failed")
    error.__cause__ = failure
    upstream = Upstream(error=error)
    with pytest.raises(UpstreamAuthError, match="BRIDGE_DICOMWEB_CA_BUNDLE") as caught:
        await get(upstream, RetryPolicy(retries=3, sleep=Clock().sleep))
    assert upstream.calls == 1
    assert "unable to get local issuer certificate" in str(caught.value)


def test_a_body_nested_too_deep_for_json_loads_is_not_json_and_not_a_crash() -> None:
    request = httpx.Request("GET", "http://archive.test/dicom-web/studies?PatientID=SECRET")
    response = httpx.Response(200, content=b"[" * 100_000, request=request)
    with pytest.raises(FatalUpstreamError, match="not JSON") as caught:
        json_body(response, "dicomweb")
    assert "SECRET" not in str(caught.value)
