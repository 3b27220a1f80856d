"""The source of truth's connections: engines for MariaDB/MySQL, TiDB and SQLite, their
session settings, transactions with retries, and batched row updates.  The tables are
defined in worker/tables.py.
"""
from __future__ import annotations

import logging
import os
import time
from typing import Callable

import sqlalchemy as sa

from worker.errors import is_transient

log = logging.getLogger(__name__)


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
            # GROUP_CONCAT packs many rows into one (worker/reports/clients.py); MySQL's
            # and TiDB's default cut it at 1,024 bytes.
            cur.execute("SET SESSION group_concat_max_len = 16777216")
            # MySQL's and TiDB's default mode: a grouped statement that MariaDB's looser
            # default accepts, and they refuse, fails here too (in the tests first).
            cur.execute("SET SESSION sql_mode = IF(FIND_IN_SET('ONLY_FULL_GROUP_BY', @@SESSION.sql_mode), "
                        "@@SESSION.sql_mode, CONCAT_WS(',', NULLIF(@@SESSION.sql_mode, ''), 'ONLY_FULL_GROUP_BY'))")
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


def tiflash_available(conn) -> bool:
    """True on TiDB when ``meetings`` has an available TiFlash (columnar) replica;
    ``SELECT VERSION()`` tells TiDB from MySQL/MariaDB.  False on SQLite."""
    if conn.dialect.name != "mysql":
        return False
    version = conn.execute(sa.text("SELECT VERSION()")).scalar() or ""
    if "TiDB" not in version:
        return False
    return bool(conn.execute(sa.text(
        "SELECT COUNT(*) FROM information_schema.tiflash_replica "
        "WHERE table_schema = DATABASE() AND table_name = 'meetings' AND available = 1")).scalar())
