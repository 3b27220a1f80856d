"""``crm init``: create or upgrade the schema through Alembic, any number of times."""
from __future__ import annotations

import os
import secrets

import sqlalchemy as sa
from alembic import command
from alembic.config import Config

from worker.tables import crm_meta, metadata

MIGRATIONS = os.path.join(os.path.dirname(__file__), "migrations")


def data_tables() -> list:
    """Every table of the service's data (``crm_meta``, its identity and secret, aside)."""
    return [table for table in metadata.sorted_tables if table.name != "crm_meta"]


def create_database(url: str) -> None:
    """Create the MySQL/TiDB database named in ``url`` when it does not exist yet."""
    parsed = sa.engine.make_url(url)
    if parsed.get_backend_name() != "mysql" or not parsed.database:
        return
    server = sa.create_engine(parsed.set(database=""))
    try:
        with server.begin() as conn:
            name = parsed.database.replace("`", "``")
            conn.exec_driver_sql(f"CREATE DATABASE IF NOT EXISTS `{name}` CHARACTER SET utf8mb4")
    finally:
        server.dispose()


def upgrade(engine: sa.Engine) -> str:
    """Bring the schema to the newest revision; return that revision."""
    config = Config()
    config.set_main_option("script_location", MIGRATIONS)
    with engine.begin() as conn:
        config.attributes["connection"] = conn
        command.upgrade(config, "head")
    with engine.begin() as conn:
        # Values kept with the data: the secret that signs cursors, so every worker shares
        # it, and the database's identity, so an index can tell which database it mirrors.
        for name in ("cursor_secret", "database_id"):
            if conn.execute(sa.select(crm_meta.c.value).where(crm_meta.c.name == name)).first() is None:
                conn.execute(crm_meta.insert().values(name=name, value=secrets.token_hex(32 if name == "cursor_secret" else 16)))
        return conn.exec_driver_sql("SELECT version_num FROM alembic_version").scalar()

