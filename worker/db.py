"""The source of truth: tables and engines for MariaDB/MySQL, TiDB and SQLite.

The schema itself is created and upgraded by the Alembic migrations in
``worker/migrations`` (``crm init``); the table objects here are what the code queries.
"""
from __future__ import annotations

import os
import threading

import sqlalchemy as sa
from sqlalchemy.dialects import mysql

metadata = sa.MetaData()


class Utf8Key(sa.TypeDecorator):
    """A text key compared byte for byte: VARBINARY on MySQL/TiDB, where every text
    collation treats trailing spaces (and, for most, letter case) as equal."""
    impl = sa.String(255)
    cache_ok = True

    def load_dialect_impl(self, dialect):
        if dialect.name == "mysql":
            return dialect.type_descriptor(mysql.VARBINARY(1020))
        return dialect.type_descriptor(sa.String(255))

    def process_bind_param(self, value, dialect):
        if value is not None and dialect.name == "mysql":
            return value.encode()
        return value

    def process_result_value(self, value, dialect):
        return value.decode() if isinstance(value, (bytes, bytearray)) else value


BigInt = sa.BigInteger().with_variant(sa.Integer(), "sqlite")
LongText = sa.Text().with_variant(mysql.MEDIUMTEXT(), "mysql")

#: One row per meeting.  ``id`` is derived from (installation_id, source_id), not
#: auto-incremented: the index is written from the batch itself, and TiDB spreads the
#: random keys over regions instead of appending to one hot region.
meetings = sa.Table(
    "meetings", metadata,
    sa.Column("id", BigInt, primary_key=True, autoincrement=False),
    sa.Column("installation_id", BigInt, nullable=False),
    sa.Column("source_id", Utf8Key(), nullable=False),
    sa.Column("client_id", BigInt, nullable=False),
    sa.Column("type", sa.String(32), nullable=False),
    sa.Column("status", sa.String(32), nullable=False),
    sa.Column("meeting_s", BigInt, nullable=False),   # whole seconds since the epoch, UTC
    sa.Column("updated_s", BigInt, nullable=False),   # whole seconds, the sort key of updated_at
    sa.Column("updated_us", BigInt, nullable=False),  # microseconds, orders versions
    sa.Column("subject", sa.String(998)),
    sa.Column("details", LongText),  # compact JSON text
    sa.UniqueConstraint("installation_id", "source_id", name="uq_meetings_source"),
    # The secured query: one range per (client, type, status), ordered by the sort key.
    sa.Index("ix_meetings_client_date", "installation_id", "client_id", "type", "status", "meeting_s", "id"),
    sa.Index("ix_meetings_client_updated", "installation_id", "client_id", "type", "status", "updated_s", "id"),
)

#: Which clients each user may see.
user_clients = sa.Table(
    "user_clients", metadata,
    sa.Column("installation_id", BigInt, primary_key=True, autoincrement=False),
    sa.Column("user_id", BigInt, primary_key=True, autoincrement=False),
    sa.Column("client_id", BigInt, primary_key=True, autoincrement=False),
    sa.Index("ix_user_clients_client", "installation_id", "client_id", "user_id"),
)

#: One row per user whose access was ever set: the lock that serializes access changes,
#: and the version that orders their copies in Redis.
users = sa.Table(
    "users", metadata,
    sa.Column("installation_id", BigInt, primary_key=True, autoincrement=False),
    sa.Column("user_id", BigInt, primary_key=True, autoincrement=False),
    sa.Column("access_version", BigInt, nullable=False),
)

#: Installations seen by ingestion or access changes.
installations = sa.Table(
    "installations", metadata,
    sa.Column("id", BigInt, primary_key=True, autoincrement=False),
)

#: Service-wide values kept with the data, e.g. the cursor signing secret.
crm_meta = sa.Table(
    "crm_meta", metadata,
    sa.Column("name", sa.String(64), primary_key=True),
    sa.Column("value", sa.String(255), nullable=False),
)

_engines: dict[str, sa.Engine] = {}
_lock = threading.Lock()


def make_engine(url: str, lock_wait_timeout: int = 10) -> sa.Engine:
    """A new engine for ``url`` with the session settings the service relies on."""
    if url.startswith("sqlite"):
        path = sa.engine.make_url(url).database
        if path and path != ":memory:":
            os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        engine = sa.create_engine(url, connect_args={"timeout": lock_wait_timeout})

        @sa.event.listens_for(engine, "connect")
        def _sqlite_pragmas(dbapi_conn, _record):
            # WAL lets queries read while a worker writes.
            dbapi_conn.execute("PRAGMA journal_mode=WAL")
            dbapi_conn.execute("PRAGMA synchronous=NORMAL")
            # The driver's own transaction handling breaks SAVEPOINT; SQLAlchemy's
            # documented remedy: the driver stays out, and "begin" below emits BEGIN.
            dbapi_conn.isolation_level = None

        @sa.event.listens_for(engine, "begin")
        def _sqlite_begin(conn):
            conn.exec_driver_sql("BEGIN")
        return engine

    engine = sa.create_engine(
        url, pool_pre_ping=True, pool_recycle=1800, pool_size=5, max_overflow=10,
        connect_args={"charset": "utf8mb4"},
    )

    @sa.event.listens_for(engine, "connect")
    def _mysql_session(dbapi_conn, _record):
        with dbapi_conn.cursor() as cur:
            cur.execute("SET SESSION time_zone = '+00:00'")
            cur.execute(f"SET SESSION innodb_lock_wait_timeout = {int(lock_wait_timeout)}")
    return engine


def get_engine(url: str | None = None) -> sa.Engine:
    """The process-wide engine for ``url`` (default: the configured database)."""
    from worker.settings import get_settings
    settings = get_settings()
    url = url or settings.database_url
    with _lock:
        engine = _engines.get(url)
        if engine is None:
            engine = _engines[url] = make_engine(url, settings.db_lock_wait_timeout)
        return engine


def dispose_engines() -> None:
    """Close every pooled connection (after fork, and in tests)."""
    with _lock:
        for engine in _engines.values():
            engine.dispose()
        _engines.clear()

