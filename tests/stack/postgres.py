"""Throw-away PostgreSQL databases on the machine's server (127.0.0.1:5432, trust auth).

Each call of :func:`temporary_database` creates ``bridge_test_<random>`` and drops it afterwards
(``WITH (FORCE)``, so connections left by killed workers do not keep it alive).
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from contextlib import contextmanager

import psycopg

SERVER = os.environ.get("BRIDGE_TEST_POSTGRES", "postgresql://postgres@127.0.0.1:5432/test")


def _admin() -> psycopg.Connection[tuple[object, ...]]:
    return psycopg.connect(SERVER, autocommit=True, connect_timeout=5)


def sqlalchemy_url(database: str) -> str:
    """The SQLAlchemy URL of a database on the test server."""
    base = SERVER.rsplit("/", 1)[0].replace("postgresql://", "postgresql+psycopg://", 1)
    return f"{base}/{database}"


@contextmanager
def temporary_database() -> Iterator[str]:
    """Create an empty database; yields its SQLAlchemy URL; drops it on exit."""
    name = f"bridge_test_{uuid.uuid4().hex[:12]}"
    with _admin() as admin:
        admin.execute(f'CREATE DATABASE "{name}"')
    try:
        yield sqlalchemy_url(name)
    finally:
        with _admin() as admin:
            admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
