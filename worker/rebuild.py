"""Rebuilding an installation's index from the database: when an operator asks
(``crm.rebuild_index``), when reconcile or a query finds it not ready, and when the
first write of a new installation creates it (:func:`writer_token`).

A rebuild gives the installation a new generation (worker/mirror.py) and writes the
access lists and every meeting into the index, each batch under its rows' locks, then
publishes the generation.  It sits below the writers (ingestion, access changes, the
directory), since their first write to a new installation builds its index.
"""
from __future__ import annotations

import logging

import sqlalchemy as sa

from worker import metrics, redis_index
from worker.db import locking, run_transaction
from worker.mirror import (BATCH, IndexOwnedElsewhere, apply_locked, database_id, load_access_locked,
                           new_generation, publish, require_index, start_generation)
from worker.tables import COLUMNS, StoredRow, installations, meetings

log = logging.getLogger(__name__)


def writer_token(ctx, installation_id: int) -> str | None:
    """The token a writer of the installation writes the index with.  An installation
    the database does not know yet is recorded first, and when this call recorded it,
    its index is built (from whatever rows the database holds of it already: writers
    that acted on a token of an earlier life, a restore)."""
    mirror = ctx.mirror
    token = mirror.token(installation_id)
    if token is not None:
        return token

    def work(conn):
        if conn.execute(sa.select(installations.c.id).where(installations.c.id == installation_id)).first():
            return False
        try:
            with conn.begin_nested():
                conn.execute(installations.insert().values(id=installation_id, generation=new_generation()))
        except sa.exc.IntegrityError:
            return False
        return True
    if run_transaction(ctx.engine, work):
        try:
            rebuild_installation(ctx, installation_id, cause="new_installation")
        except IndexOwnedElsewhere as exc:
            log.warning("installation %d: %s", installation_id, exc)
    return mirror.refresh(installation_id)


def rebuild_installation(ctx, installation_id: int, cause: str = "requested") -> dict:
    """Give the installation a new generation and rebuild its index from the database.

    Queries answer from the database meanwhile.  Writers keep writing (they learn the new
    token when the index rejects their old one); every batch of rows and of access lists
    is read under its locks and written to the index before they are released, so a write
    that commits during the rebuild is either read by it or written after it, never lost
    and never undone.  A rebuild overtaken by a later one of the same installation (which
    gave it a newer generation) stops where it is and returns ``superseded``: only the
    latest generation is published."""
    require_index(ctx)
    metrics.count(ctx.redis, {f"rebuild:{cause}": 1})
    generation = new_generation()

    def work(conn):
        if conn.execute(sa.select(installations.c.id).where(installations.c.id == installation_id)).first():
            conn.execute(installations.update().where(installations.c.id == installation_id)
                         .values(generation=generation))
        else:
            conn.execute(installations.insert().values(id=installation_id, generation=generation))
        return database_id(conn)
    token = f"{run_transaction(ctx.engine, work)}:{generation}"
    count, users = 0, 0
    try:
        start_generation(ctx, installation_id, token, rebuilding=True)
        users = load_access_locked(ctx, installation_id, token)
        count = _load_meetings(ctx, installation_id, token)
        published = publish(ctx, installation_id, token)
    except redis_index.NotMirrored:
        published = False
    ctx.mirror.forget(installation_id)
    return {"meetings": count, "users": users, "published": published, "superseded": not published}


def _load_meetings(ctx, installation_id: int, token: str) -> int:
    """Write every meeting of the installation into the index, a batch at a time, each
    under its rows' locks; returns how many."""
    count, last = 0, -1
    while True:
        def batch(conn):
            rows = [StoredRow(*row) for row in conn.execute(
                sa.select(*COLUMNS).where(meetings.c.installation_id == installation_id, meetings.c.id > last)
                .order_by(meetings.c.id).limit(BATCH).with_for_update())]
            apply_locked(ctx, installation_id, token, rows)
            return rows
        rows = run_transaction(locking(ctx.engine), batch)
        if not rows:
            return count
        count += len(rows)
        last = rows[-1].id
