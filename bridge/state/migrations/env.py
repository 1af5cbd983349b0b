"""Alembic environment: migrates the connection the bridge hands over, or BRIDGE_STATE_URL."""

from __future__ import annotations

import os

from alembic import context
from sqlalchemy import Connection, create_engine

from bridge.state.models import Base

config = context.config
target_metadata = Base.metadata


def _url() -> str:
    url = config.get_main_option("sqlalchemy.url") or os.environ.get("BRIDGE_STATE_URL")
    if not url:
        raise RuntimeError("set BRIDGE_STATE_URL (or sqlalchemy.url) to the state store to migrate")
    return url


def _configure(connection: Connection) -> None:
    context.configure(
        connection=connection,
        target_metadata=target_metadata,
        compare_type=True,
        # SQLite cannot alter most column properties in place; batch mode copies the table.
        render_as_batch=connection.dialect.name == "sqlite",
    )
    with context.begin_transaction():
        context.run_migrations()


def run() -> None:
    """Run the migrations online (on a live connection) or offline (printing SQL)."""
    if context.is_offline_mode():
        context.configure(url=_url(), target_metadata=target_metadata, literal_binds=True)
        with context.begin_transaction():
            context.run_migrations()
        return
    connection = config.attributes.get("connection")
    if connection is not None:
        # Given by bridge.state.migrate inside its own transaction; that caller commits.
        _configure(connection)
        return
    engine = create_engine(_url())
    try:
        with engine.begin() as own:
            _configure(own)
    finally:
        engine.dispose()


run()
