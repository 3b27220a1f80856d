"""The source of truth: tables and engines for MariaDB/MySQL, TiDB and SQLite.

The schema itself is created and upgraded by the Alembic migrations in
``worker/migrations`` (``crm init``); the table objects here are what the code queries.
"""
from __future__ import annotations

import collections
import logging
import os
import time
from typing import Callable

import sqlalchemy as sa
from sqlalchemy.dialects import mysql

from worker.errors import is_transient

log = logging.getLogger(__name__)

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
    # Who else may see it, for the index: "<secondary clients>/<mailbox users>", comma
    # separated; null when only client_id makes it visible (see meeting_reach).
    sa.Column("reach", sa.Text),
    sa.UniqueConstraint("installation_id", "source_id", name="uq_meetings_source"),
    # The secured query: one range per (client, type, status), ordered by the sort key.
    sa.Index("ix_meetings_client_date", "installation_id", "client_id", "type", "status", "meeting_s", "id"),
    sa.Index("ix_meetings_client_updated", "installation_id", "client_id", "type", "status", "updated_s", "id"),
)

StoredRow = collections.namedtuple(
    "StoredRow", "id installation_id source_id client_id type status meeting_s updated_s updated_us subject details reach",
    defaults=(None,))
#: The columns of :data:`meetings` in :class:`StoredRow` order.
COLUMNS = [meetings.c[name] for name in StoredRow._fields]

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
    sa.Column("name", sa.String(255)),  # crm.upsert_users
    sa.Column("emails", sa.Text),       # crm.upsert_users: JSON list of addresses as given
)

#: Who besides ``meetings.client_id`` makes a meeting visible: one row per other linked
#: client (``user_id`` 0) and per mailbox it was read from (``client_id`` 0).  Emails only.
#: The primary client has no row (since migration 0005): the meetings of a user's own
#: clients are found through ``meetings``' own index, and a broad user's "seen beyond"
#: lookup would otherwise walk every one of them again.
meeting_reach = sa.Table(
    "meeting_reach", metadata,
    sa.Column("installation_id", BigInt, nullable=False),
    sa.Column("meeting_id", BigInt, primary_key=True, autoincrement=False),
    sa.Column("client_id", BigInt, primary_key=True, autoincrement=False),
    sa.Column("user_id", BigInt, primary_key=True, autoincrement=False),
    sa.Index("ix_meeting_reach_client", "installation_id", "client_id", "meeting_id"),
    sa.Index("ix_meeting_reach_user", "installation_id", "user_id", "meeting_id"),
)

#: Installations seen by ingestion or access changes.  ``generation`` is the token the
#: Redis index must carry to answer for the installation; every rebuild replaces it
#: (worker/mirror.py).
installations = sa.Table(
    "installations", metadata,
    sa.Column("id", BigInt, primary_key=True, autoincrement=False),
    sa.Column("generation", sa.String(32)),
)

#: One row per write (a task's chunk, an access change), in the transaction of its effect:
#: a redelivered task finds its writes here and applies none twice (``result`` is what the
#: write returned); and the index's recent write ids must all be here, or the database went
#: back in time (a restore) and the index no longer mirrors it.
applied_writes = sa.Table(
    "applied_writes", metadata,
    sa.Column("write_id", sa.String(100), primary_key=True),
    sa.Column("installation_id", BigInt, nullable=False),
    sa.Column("at_us", BigInt, nullable=False),
    sa.Column("result", sa.Text),
    sa.Index("ix_applied_writes_installation", "installation_id", "at_us"),
)

#: Service-wide values kept with the data, e.g. the cursor signing secret.
crm_meta = sa.Table(
    "crm_meta", metadata,
    sa.Column("name", sa.String(64), primary_key=True),
    sa.Column("value", sa.String(255), nullable=False),
)

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
            # A locking transaction (see locking()) takes the write lock at once: SQLite
            # has no row locks, so it excludes every other writer instead.
            conn.exec_driver_sql("BEGIN IMMEDIATE" if conn.get_execution_options().get("crm_locking") else "BEGIN")
        return engine

    engine = sa.create_engine(
        url, pool_pre_ping=True, pool_recycle=1800, pool_size=5, max_overflow=10,
        connect_args={"charset": "utf8mb4"},
        # Error messages must not carry record content into logs.
        hide_parameters=True,
    )

    @sa.event.listens_for(engine, "connect")
    def _mysql_session(dbapi_conn, _record):
        with dbapi_conn.cursor() as cur:
            cur.execute("SET SESSION time_zone = '+00:00'")
            cur.execute(f"SET SESSION innodb_lock_wait_timeout = {int(lock_wait_timeout)}")
    return engine


def locking(engine: sa.Engine) -> sa.Engine:
    """``engine`` for transactions that write the index from rows they lock: read committed
    on MySQL/TiDB (``SELECT … FOR UPDATE`` locks the rows read, no gaps), the write lock at
    BEGIN on SQLite."""
    if engine.dialect.name == "mysql":
        return engine.execution_options(isolation_level="READ COMMITTED")
    return engine.execution_options(crm_locking=True)


def run_transaction(engine: sa.Engine, work: Callable, attempts: int = 4, pause: float = 0.05,
                    retry_duplicates: bool = False):
    """Run ``work(conn)`` in a transaction; retry transient faults (deadlock, lock wait
    timeout, lost connection, TiDB write conflict) with exponential backoff, then give up
    by raising the last one.  ``retry_duplicates``: a duplicate key is a lost race with a
    concurrent insert of the same row, and the next try sees that row."""
    for attempt in range(attempts):
        try:
            with engine.begin() as conn:
                return work(conn)
        except Exception as exc:
            duplicate = retry_duplicates and isinstance(exc, sa.exc.IntegrityError)
            if not (duplicate or is_transient(exc)) or attempt == attempts - 1:
                raise
            log.warning("transient database fault, retry %d: %s", attempt + 1, exc.__class__.__name__)
            time.sleep(pause * (2 ** attempt))


def update_rows(conn, table: sa.Table, key: str, rows: list[dict], size: int = 200) -> None:
    """Set each row's other columns to its values, the row found by its ``key`` column: one
    ``UPDATE … SET c = CASE key WHEN … END … WHERE key IN (…)`` per ``size`` rows (a
    driver sends an executemany of UPDATEs one statement per row, one round trip each).
    The same SQL on MySQL/MariaDB, TiDB and SQLite."""
    if not rows:
        return
    columns = [c for c in rows[0] if c != key]
    # The statement is written out with plain parameters (each value through its column's
    # bind processing): building it from SQLAlchemy expressions cost more than running it.
    dialect = conn.dialect
    process = {c: table.c[c].type.bind_processor(dialect) for c in [key, *columns]}
    quote = dialect.identifier_preparer.quote
    for start in range(0, len(rows), size):
        part = rows[start:start + size]
        params = {}
        for n, r in enumerate(part):
            for i, c in enumerate([key, *columns]):
                value = r[c]
                params[f"p{n}_{i}"] = process[c](value) if process[c] and value is not None else value
        sets = ", ".join(
            f"{quote(c)} = CASE {quote(key)} " + " ".join(f"WHEN :p{n}_0 THEN :p{n}_{i}" for n in range(len(part)))
            + " END" for i, c in enumerate(columns, 1))
        keys_ = ", ".join(f":p{n}_0" for n in range(len(part)))
        conn.execute(sa.text(f"UPDATE {quote(table.name)} SET {sets} WHERE {quote(key)} IN ({keys_})"), params)
