"""Bearer JWTs: checked only with their key's own algorithms, every failure a 401; JWKS fetched sparingly."""

from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path
from typing import Any

import httpx
import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa

from bridge.api.auth.security import JwksKeys, key_algorithms
from bridge.api.errors import AuthenticationError
from bridge.errors import ConfigurationError
from tests.unit.api.test_app import client, settings
from tests.unit.resolve.fake_fhir import JWKS_URL, FakeFhir, endpoint, imaging_study

pytestmark = pytest.mark.anyio

RSA = rsa.generate_private_key(public_exponent=65537, key_size=2048)
EC = ec.generate_private_key(ec.SECP256R1())
ED = ed25519.Ed25519PrivateKey.generate()


def pem(key: Any) -> str:
    return (
        key.public_key()
        .public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
        .decode()
    )


def token(key: Any, algorithm: str, **headers: Any) -> str:
    claims = {"sub": "ehr", "aud": "bridge", "exp": int(time.time()) + 300}
    return jwt.encode(claims, key, algorithm=algorithm, headers=headers or None)


@pytest.fixture
def fake() -> FakeFhir:
    server = FakeFhir()
    server.add(imaging_study(), endpoint())
    return server


def test_each_key_kind_verifies_only_its_own_algorithms() -> None:
    assert key_algorithms(RSA.public_key()) == {"RS256", "RS384", "RS512", "PS256", "PS384", "PS512"}
    assert key_algorithms(EC.public_key()) == {"ES256"}
    assert key_algorithms(ED.public_key()) == {"EdDSA"}
    assert key_algorithms(b"a shared secret") == frozenset()


async def test_a_token_signed_with_another_kind_of_key_is_401_not_500(tmp_path: Path, fake: FakeFhir) -> None:
    async with client(tmp_path, fake, jwt_public_key=pem(RSA), jwt_audience="bridge") as c:

        async def status(value: str) -> int:
            headers = {"Authorization": f"Bearer {value}"}
            return (await c.get("/imaging-studies/is1/links", headers=headers)).status_code

        assert await status(token(RSA, "RS256")) == 200
        assert await status(token(RSA, "PS256")) == 200
        assert await status(token(EC, "ES256")) == 401
        assert await status(token(ED, "EdDSA")) == 401
        forged = token(RSA, "RS256")
        head, body, _ = forged.split(".")
        assert await status(f"{head}.{body}.bm90LWEtc2lnbmF0dXJl") == 401
        assert await status(f"{head}.{body}.!!!") == 401


async def test_an_ec_key_refuses_rsa_tokens(tmp_path: Path, fake: FakeFhir) -> None:
    async with client(tmp_path, fake, jwt_public_key=pem(EC), jwt_audience="bridge") as c:
        for value, expected in (
            (token(EC, "ES256"), 200),
            (token(RSA, "RS256"), 401),
            (token(ED, "EdDSA"), 401),
        ):
            headers = {"Authorization": f"Bearer {value}"}
            assert (await c.get("/imaging-studies/is1/links", headers=headers)).status_code == expected


def test_a_key_that_verifies_none_of_the_algorithms_fails_at_start_up(tmp_path: Path) -> None:
    from bridge.api.app import create_app

    with pytest.raises(ConfigurationError, match="BRIDGE_JWT_ALGORITHMS"):
        create_app(
            settings(tmp_path, jwt_public_key=pem(EC), jwt_audience="bridge", jwt_algorithms=["RS256"])
        )


async def test_a_jwks_key_of_another_kind_is_401(tmp_path: Path, fake: FakeFhir) -> None:
    jwk = json.loads(jwt.algorithms.RSAAlgorithm.to_jwk(RSA.public_key()))
    fake.jwks = {"keys": [{**jwk, "kid": "k1"}]}
    async with client(tmp_path, fake, jwt_jwks_url=JWKS_URL, jwt_audience="bridge") as c:
        es = token(EC, "ES256", kid="k1")
        answer = await c.get("/imaging-studies/is1/links", headers={"Authorization": f"Bearer {es}"})
    assert answer.status_code == 401


class Idp:
    """A JWKS endpoint counting its fetches; ``status`` other than 200 makes it fail."""

    def __init__(self) -> None:
        self.fetches = 0
        self.status = 200
        jwk = json.loads(jwt.algorithms.RSAAlgorithm.to_jwk(RSA.public_key()))
        self.body = {"keys": [{**jwk, "kid": "k1"}]}

    async def __call__(self, request: httpx.Request) -> httpx.Response:
        self.fetches += 1
        await asyncio.sleep(0.01)
        if self.status != 200:
            return httpx.Response(self.status)
        return httpx.Response(200, json=self.body)


def keys(idp: Idp, clock: list[float]) -> JwksKeys:
    found = JwksKeys(JWKS_URL, clock=lambda: clock[0])
    found.client = httpx.AsyncClient(transport=httpx.MockTransport(idp))
    return found


async def test_forty_unknown_kids_fetch_the_set_once() -> None:
    idp, clock = Idp(), [1000.0]
    jwks = keys(idp, clock)

    async def attempt(kid: str) -> None:
        with pytest.raises(AuthenticationError):
            await jwks.key(kid)

    await asyncio.gather(*(attempt(f"unknown-{i}") for i in range(40)))
    for i in range(40):
        clock[0] += 0.5
        await attempt(f"later-{i}")
    print(f"\nJWKS fetches for 80 unknown kids: {idp.fetches}")
    assert idp.fetches <= 2
    assert (await jwks.key("k1")).key_id == "k1"


async def test_a_failing_idp_is_asked_again_only_after_a_growing_back_off() -> None:
    idp, clock = Idp(), [1000.0]
    idp.status = 503
    jwks = keys(idp, clock)
    for _ in range(30):
        with pytest.raises(AuthenticationError, match="JWKS unavailable"):
            await jwks.key("k1")
    assert idp.fetches == 1
    clock[0] += 5.1
    with pytest.raises(AuthenticationError):
        await jwks.key("k1")
    assert idp.fetches == 2
    clock[0] += 5.1  # the second wait is 10 s
    with pytest.raises(AuthenticationError):
        await jwks.key("k1")
    assert idp.fetches == 2
    idp.status = 200
    clock[0] += 5.0
    assert (await jwks.key("k1")).key_id == "k1"
    assert idp.fetches == 3


async def test_a_dripping_idp_is_given_up_at_the_jwks_deadline() -> None:
    from bridge.upstream.bounds import CallLimit

    async def drip() -> Any:
        while True:
            await asyncio.sleep(0.05)
            yield b" "

    async def handler(request: httpx.Request) -> httpx.Response:
        return httpx.Response(200, content=drip())

    jwks = JwksKeys(JWKS_URL, limit=CallLimit("JWKS", 1024, "size", 0.3, "deadline"))
    jwks.client = httpx.AsyncClient(transport=httpx.MockTransport(handler))
    started = time.monotonic()
    with pytest.raises(AuthenticationError, match="JWKS unavailable"):
        await jwks.key("k1")
    assert time.monotonic() - started < 2
