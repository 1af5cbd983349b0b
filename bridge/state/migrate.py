"""Brings a state store's schema to this bridge's version with Alembic, adopting pre-Alembic stores.

Alembic is imported only when a store is not already at this bridge's head: importing it (and
reading the revision scripts) is about a quarter of a second, which every ``bridge sync`` paid.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import TYPE_CHECKING

from sqlalchemy import Connection, Engine, func, inspect, select, text
from sqlalchemy.exc import SQLAlchemyError

from bridge.errors import StoreError
from bridge.state.models import SCHEMA_VERSION

if TYPE_CHECKING:
    from alembic.config import Config

logger = logging.getLogger(__name__)

MIGRATIONS = Path(__file__).parent / "migrations"
# The newest revision under migrations/versions (a test checks it against Alembic's own head).
HEAD = "0009"
# The revision whose schema is what ``create_all`` made before migrations existed.
BASELINE = "0001"
# Key of the PostgreSQL advisory lock that lets one replica at a time migrate.
MIGRATION_LOCK = 0x62726964_67650001


def alembic_config(connection: Connection | None = None) -> Config:
    """An Alembic configuration for the bundled migrations (no alembic.ini needed)."""
    from alembic.config import Config

    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS))
    if connection is not None:
        config.attributes["connection"] = connection
    return config


def head_revision() -> str:
    """The newest revision this bridge knows."""
    from alembic.script import ScriptDirectory

    head = ScriptDirectory.from_config(alembic_config()).get_current_head()
    if head is None:  # pragma: no cover - the package always ships revisions
        raise StoreError("no migrations are bundled with this bridge")
    return head


def current_revision(connection: Connection) -> str | None:
    """The revision the store is at; None for an empty or pre-Alembic store."""
    from alembic.runtime.migration import MigrationContext

    return MigrationContext.configure(connection).get_current_revision()


def _schema_info_version(connection: Connection) -> int | None:
    row = connection.execute(text("SELECT version FROM schema_info WHERE id = 1")).first()
    return None if row is None else int(row[0])


def _adopt(connection: Connection) -> None:
    """Stamp a store made by ``create_all`` (bridge 0.1) at the baseline, keeping its rows."""
    version = _schema_info_version(connection)
    if version != 1:
        raise StoreError(
            f"the state store has bridge tables but schema_info version {version}, which no "
            "migration matches; restore it from a backup or point BRIDGE_STATE_URL at a new database"
        )
    from alembic import command

    logger.info("adopting a state store created without migrations (schema 1) as revision %s", BASELINE)
    command.stamp(alembic_config(connection), BASELINE)


def upgrade(connection: Connection) -> tuple[str | None, str]:
    """Migrate the store on ``connection`` to head inside the caller's transaction.

    Returns the revisions before and after. A store newer than this bridge is refused.
    """
    from alembic import command
    from alembic.script import ScriptDirectory
    from alembic.util.exc import CommandError

    tables = set(inspect(connection).get_table_names())
    before = current_revision(connection) if "alembic_version" in tables else None
    if before is None and "studies" in tables:
        _adopt(connection)
        before = BASELINE
    head = head_revision()
    if before is not None and before != head:
        known = {s.revision for s in ScriptDirectory.from_config(alembic_config()).walk_revisions()}
        if before not in known:
            raise StoreError(
                f"the state store is at migration {before}, newer than this bridge knows (head {head}); "
                "upgrade the bridge"
            )
    if before != head:
        logger.info("migrating the state store from %s to %s", before or "empty", head)
        try:
            command.upgrade(alembic_config(connection), "head")
        except CommandError as exc:
            raise StoreError(f"state store migration failed: {exc}") from exc
    version = _schema_info_version(connection)
    if version != SCHEMA_VERSION:
        raise StoreError(
            f"the state store is at schema {version} after migrating, expected {SCHEMA_VERSION}"
        )
    return before, head


def at_head(connection: Connection) -> bool:
    """Whether the store is already at this bridge's head revision and schema version (no Alembic)."""
    try:
        revision = connection.execute(text("SELECT version_num FROM alembic_version")).scalars().all()
        version = _schema_info_version(connection)
    except SQLAlchemyError:
        return False  # no such table yet (a new or pre-Alembic store): the full way decides
    return revision == [HEAD] and version == SCHEMA_VERSION


def upgrade_engine(engine: Engine) -> tuple[str | None, str]:
    """Migrate to head in one transaction; on PostgreSQL replicas take turns on an advisory lock."""
    with engine.connect() as connection:
        current = at_head(connection)
        connection.rollback()  # a failed look-up must not leave PostgreSQL's transaction aborted
    if current:
        return HEAD, HEAD
    with engine.begin() as connection:
        if connection.dialect.name == "postgresql":
            # Released at commit; a second replica waits here, then finds nothing left to do.
            connection.execute(select(func.pg_advisory_xact_lock(MIGRATION_LOCK)))
        return upgrade(connection)
