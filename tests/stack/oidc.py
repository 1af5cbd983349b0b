"""A real OAuth2 / OpenID provider for the authentication tests (``oidc-provider`` from npm).

The provider is the small Node project in ``tests/stack/oidc``; its dependency is pinned by the
committed ``package-lock.json`` and installed with ``npm ci`` on first use. It listens on
127.0.0.1 only and keeps its tokens in memory. Clients are registered at start-up::

    with OidcProvider(clients=[secret_client("bridge", "s3cret", scope="system/*.*")]) as idp:
        idp.token_url, idp.introspection_url, idp.stats()

The FHIR test server checks tokens by introspection, as the registered client ``introspector``.
For browser logins, give ``users`` (login -> password) and a ``web_client``; as an EHR's SMART
authorization server, ``launches`` maps a launch value to the Patient id put in the token answer,
and ``idp.fhir_iss`` is the ``iss`` an EHR launch names.
"""

from __future__ import annotations

import json
import os
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx

from tests.stack.fhir import NEEDS, ensure_node_modules
from tests.stack.process import Launcher, free_loopback_port, log_tail, require_tool

PROVIDER_DIR = Path(__file__).resolve().parent / "oidc"
INTROSPECTOR_ID = "fhir-test-server"


def secret_client(client_id: str, secret: str, *, scope: str = "") -> dict[str, Any]:
    """A confidential client using client_secret_basic."""
    return {
        "client_id": client_id,
        "client_secret": secret,
        "grant_types": ["client_credentials"],
        "response_types": [],
        "redirect_uris": [],
        "token_endpoint_auth_method": "client_secret_basic",
        **({"scope": scope} if scope else {}),
    }


def web_client(
    client_id: str, secret: str, redirect_uri: str, *, post_logout_redirect_uri: str | None = None
) -> dict[str, Any]:
    """A confidential web client using the authorization code flow (with PKCE), client_secret_basic.

    With ``post_logout_redirect_uri``, the provider's logout (RP-Initiated Logout) may send the
    browser back there.
    """
    return {
        "client_id": client_id,
        "client_secret": secret,
        "grant_types": ["authorization_code"],
        "response_types": ["code"],
        "redirect_uris": [redirect_uri],
        "token_endpoint_auth_method": "client_secret_basic",
        **({"post_logout_redirect_uris": [post_logout_redirect_uri]} if post_logout_redirect_uri else {}),
    }


# Scopes of a browser login and of a SMART EHR launch, known to the provider.
LOGIN_SCOPES = ["openid", "profile", "fhirUser", "launch", "launch/patient", "patient/ImagingStudy.read"]


def jwt_client(client_id: str, public_jwk: dict[str, Any], alg: str, *, scope: str = "") -> dict[str, Any]:
    """A client authenticating with private_key_jwt (SMART Backend Services), its public key registered."""
    return {
        "client_id": client_id,
        "grant_types": ["client_credentials"],
        "response_types": [],
        "redirect_uris": [],
        "token_endpoint_auth_method": "private_key_jwt",
        "token_endpoint_auth_signing_alg": alg,
        "jwks": {"keys": [public_jwk]},
        **({"scope": scope} if scope else {}),
    }


class OidcProvider(Launcher):
    """One ``node provider.mjs`` process on a free loopback port."""

    def __init__(
        self,
        clients: list[dict[str, Any]],
        *,
        scopes: list[str] | None = None,
        ttl: dict[str, int] | None = None,
        introspector_secret: str = "introspector-secret",
        log_path: Path | None = None,
        users: dict[str, str] | None = None,
        launches: dict[str, str] | None = None,
        resource: dict[str, str] | None = None,
        patients: dict[str, Any] | None = None,
        scope_lists: list[str] | None = None,
    ) -> None:
        """``resource`` ({"audience", "scopes"}) makes access tokens JWTs for that audience;
        ``patients`` (client id -> Patient id) gives a client's tokens a ``patient`` claim, signed
        as given (of any JSON type); the clients in ``scope_lists`` get ``scope`` as a JSON list."""
        self.introspector_secret = introspector_secret
        self.clients = [*clients, secret_client(INTROSPECTOR_ID, introspector_secret)]
        self.scopes = scopes or []
        self.ttl = ttl or {}
        self.users = users or {}
        self.launches = launches or {}
        self.resource = resource
        self.patients = patients or {}
        self.scope_lists = scope_lists or []
        self.port = 0
        self.log_path = log_path
        self._owns_log = log_path is None
        self._config_path: Path | None = None
        self._process: subprocess.Popen[bytes] | None = None
        self._log_file: Any = None

    @property
    def issuer(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def fhir_iss(self) -> str:
        """The ``iss`` of an EHR launch: its smart-configuration is served below it."""
        return f"{self.issuer}/fhir"

    @property
    def jwks_url(self) -> str:
        return f"{self.issuer}/jwks"

    @property
    def token_url(self) -> str:
        return f"{self.issuer}/token"

    @property
    def introspection_url(self) -> str:
        return f"{self.issuer}/token/introspection"

    @property
    def running(self) -> bool:
        return self._process is not None and self._process.poll() is None

    def start(self, timeout: float = 60.0) -> None:
        node = require_tool("node", NEEDS)
        ensure_node_modules(PROVIDER_DIR, marker=Path("node_modules/oidc-provider/package.json"))
        self.port = free_loopback_port()
        fd, name = tempfile.mkstemp(prefix="oidc-config-", suffix=".json")
        with os.fdopen(fd, "w") as handle:
            json.dump(
                {
                    "clients": self.clients,
                    "scopes": self.scopes,
                    "ttl": self.ttl,
                    "introspector": INTROSPECTOR_ID,
                    "users": {
                        login: {"password": password, "fhirUser": f"Practitioner/{login}"}
                        for login, password in self.users.items()
                    },
                    "launches": self.launches,
                    "resource": self.resource,
                    "patients": self.patients,
                    "scopeLists": self.scope_lists,
                },
                handle,
            )
        self._config_path = Path(name)
        if self.log_path is None:
            fd, log_name = tempfile.mkstemp(prefix="oidc-provider-", suffix=".log")
            os.close(fd)
            self.log_path = Path(log_name)
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        self._log_file = open(self.log_path, "ab")  # noqa: SIM115 - closed in stop()
        env = dict(os.environ, PORT=str(self.port), OIDC_CONFIG=name, OIDC_PARENT_PID=str(os.getpid()))
        self._process = subprocess.Popen(
            [node, "provider.mjs"],
            cwd=PROVIDER_DIR,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=self._log_file,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        deadline = time.monotonic() + timeout
        while True:
            if self._process.poll() is not None:
                tail = log_tail(self.log_path)
                self.stop()
                raise RuntimeError(f"the OpenID provider exited while starting:\n{tail}")
            try:
                if httpx.get(f"{self.issuer}/.well-known/openid-configuration", timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                tail = log_tail(self.log_path)
                self.stop()
                raise RuntimeError(f"the OpenID provider did not answer within {timeout:.0f} s:\n{tail}")
            time.sleep(0.1)

    def _cleanup(self) -> None:
        """Remove the provider's configuration file."""
        if self._config_path is not None:
            self._config_path.unlink(missing_ok=True)
            self._config_path = None

    def stats(self) -> dict[str, Any]:
        """Token requests, tokens issued, refusals and introspections since start or reset."""
        response = httpx.get(f"{self.issuer}/__admin/stats", timeout=10)
        response.raise_for_status()
        result: dict[str, Any] = response.json()
        return result

    def reset_stats(self) -> None:
        httpx.post(f"{self.issuer}/__admin/reset-stats", timeout=10).raise_for_status()

    def fhir_server_env(self) -> dict[str, str]:
        """Environment for the FHIR test server to check bearer tokens against this provider."""
        return {
            "FHIR_AUTH_INTROSPECTION_URL": self.introspection_url,
            "FHIR_AUTH_INTROSPECTION_CLIENT_ID": INTROSPECTOR_ID,
            "FHIR_AUTH_INTROSPECTION_CLIENT_SECRET": self.introspector_secret,
        }
