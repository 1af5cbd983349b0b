"""The files settings name (secrets, TLS PEM files, a signing key): read and checked at start-up.

Pure checks on local files, kept at the bottom layer so that the settings can stop start-up naming
a bad file without importing the HTTP side that later uses it
(bridge/upstream/credentials.py, bridge/upstream/tls.py).
"""

from __future__ import annotations

import ssl
from enum import StrEnum
from pathlib import Path
from typing import TYPE_CHECKING

from pydantic import SecretStr

if TYPE_CHECKING:  # cryptography is imported by the checks that use it: only a signing key needs it
    from cryptography.hazmat.primitives.asymmetric import ec, rsa

    PrivateKey = rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey


class SigningAlg(StrEnum):
    """Signature algorithms of SMART Backend Services client assertions."""

    RS384 = "RS384"
    ES384 = "ES384"


def secret_from_file(given: SecretStr | None, path: Path | None, name: str) -> SecretStr | None:
    """The secret in file ``path`` (setting ``{name}_FILE``); None without a file. Start-up errors name it."""
    if path is None:
        return None
    if given is not None:
        raise ValueError(f"set {name} or {name}_FILE, not both")
    try:
        text = path.read_text(encoding="utf-8").strip()
    except (OSError, UnicodeError) as exc:
        raise ValueError(f"{name}_FILE: cannot read {path} ({type(exc).__name__})") from None
    if not text:
        raise ValueError(f"{name}_FILE: {path} is empty")
    return SecretStr(text)


def check_files(*, ca_bundle: Path | None, client_cert: Path | None, client_key: Path | None) -> str | None:
    """What is wrong with the TLS files (a message without the setting's name), or None if usable."""
    if ca_bundle is not None:
        try:
            ssl.create_default_context(cafile=str(ca_bundle))
        except (OSError, ssl.SSLError) as exc:
            return f"CA_BUNDLE: cannot load {ca_bundle} as PEM certificates ({type(exc).__name__})"
    if client_key is not None and client_cert is None:
        return "CLIENT_KEY is set without CLIENT_CERT"
    if client_cert is not None:
        try:
            ssl.create_default_context().load_cert_chain(
                str(client_cert), str(client_key) if client_key is not None else None
            )
        except (OSError, ssl.SSLError) as exc:
            return (
                f"CLIENT_CERT: cannot load {client_cert} with its key as a PEM certificate chain "
                f"({type(exc).__name__})"
            )
    return None


def check_key(key: object, algorithm: str) -> None:
    """Raise ValueError unless ``key`` is a private key that can sign with ``algorithm``."""
    from cryptography.hazmat.primitives.asymmetric import ec, rsa

    if algorithm == SigningAlg.RS384:
        if not isinstance(key, rsa.RSAPrivateKey):
            raise ValueError("RS384 needs an RSA private key")
        if key.key_size < 2048:
            raise ValueError(f"the RSA key has {key.key_size} bits; RS384 needs at least 2048")
    elif algorithm == SigningAlg.ES384:
        if not isinstance(key, ec.EllipticCurvePrivateKey) or not isinstance(key.curve, ec.SECP384R1):
            raise ValueError("ES384 needs an EC private key on curve P-384")
    else:
        choices = ", ".join(SigningAlg)
        raise ValueError(f"unsupported signing algorithm {algorithm!r}; use one of {choices}")


def load_private_key(path: Path, algorithm: str) -> PrivateKey:
    """Load an unencrypted PEM private key and check it suits ``algorithm``; ValueError if not."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec, rsa

    try:
        data = path.read_bytes()
    except OSError as exc:
        raise ValueError(f"cannot read {path} ({type(exc).__name__})") from None
    try:
        key = serialization.load_pem_private_key(data, password=None)
    except (ValueError, TypeError) as exc:
        raise ValueError(f"{path} is not an unencrypted PEM private key ({type(exc).__name__})") from None
    check_key(key, algorithm)
    assert isinstance(key, rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey)
    return key
