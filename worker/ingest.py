"""Ingestion: validated records into the database in small transactions, then into the
Redis index under the rows' locks (worker/mirror.py).

A record is the newest version of its ``(installation_id, source_id)``; an older or
identical version changes nothing, so out-of-order delivery is harmless.  Each chunk is
recorded as a write of its task (``applied_writes``), so a redelivered task applies no
chunk twice: not even after a later task deleted or changed what it wrote.
"""
from __future__ import annotations

import collections
import logging
import time

import sqlalchemy as sa

from worker import metrics, redis_index, rollups
from worker.db import locking, run_transaction, update_rows
from worker.tables import COLUMNS, PER_MESSAGE, StoredRow, email_links, emails, meeting_reach, meetings, retired_keys
from worker.errors import InvalidArgument
from worker.email import thread_state
from worker.email.links import lock_installation
from worker.mirror import sync_sources, sync_written
from worker.rebuild import writer_token
from worker.writes import new_write_id, once
from worker.records import MAX_BATCH, Meeting, free_ids, meeting_id, positive_int, validate

log = logging.getLogger(__name__)

def _row(m: Meeting) -> StoredRow:
    return StoredRow(m.id, m.installation_id, m.source_id, m.client_id, m.type, m.status,
                     m.meeting_s, m.updated_s, m.updated_us, m.subject, m.details)


def _write_chunk(conn, installation_id: int, chunk: list[Meeting], given: set[int]):
    """Upsert one chunk (one installation, sorted by source_id); return the rows as stored
    and the counts (updated, unchanged).

    A stream mostly brings new meetings, so the chunk is first inserted as it is, in one
    statement; only when a row of it exists already (or an id collides) does the chunk go
    the longer way of a locking read and per-row decisions."""
    for m in chunk:
        m.id = meeting_id(installation_id, m.source_id)
    if _insert_all(conn, chunk):
        rollups.apply(conn, installation_id, added=chunk)
        return [_row(m) for m in chunk], 0, 0
    by_source = {m.source_id: m for m in chunk}
    existing = {
        row.source_id: row for row in conn.execute(
            sa.select(*COLUMNS)
            .where(meetings.c.installation_id == installation_id, meetings.c.source_id.in_(list(by_source)))
            .order_by(meetings.c.source_id)
            .with_for_update())
    }
    inserts, updates, stored = [], [], []
    updated = unchanged = 0
    for m in chunk:
        old = existing.get(m.source_id)
        if old is None:
            inserts.append(m)
            continue
        m.id = old.id
        newer = m.updated_us > old.updated_us
        same = m.content() == (old.client_id, old.type, old.status, old.meeting_s, old.subject, old.details)
        # A version without updated_at takes the ingestion time; when it holds what is
        # stored already it is a redelivery, not a new version.
        if newer and not (same and id(m) not in given):
            updates.append(m)
            stored.append(_row(m))
            updated += 1
        else:
            stored.append(StoredRow(*old))
            unchanged += 1
    if inserts:
        _assign_ids(conn, inserts)
        conn.execute(meetings.insert(), [_row(m)._asdict() for m in inserts])
        stored += [_row(m) for m in inserts]
    if updates:
        _replace(conn, updates)
    rollups.apply(conn, installation_id, removed=[existing[m.source_id] for m in updates], added=inserts + updates)
    return stored, updated, unchanged


def _replace(conn, updates: list[Meeting]) -> None:
    """Write newer versions over stored meetings.  A meeting record replaces whatever an
    email of the same key stored: from now on the record alone decides the row and who
    sees it (email logic leaves a row its ``emails.by_record`` marks alone)."""
    update_rows(conn, meetings, "id",
                [{"id": m.id, "client_id": m.client_id, "type": m.type, "status": m.status,
                  "meeting_s": m.meeting_s, "updated_s": m.updated_s, "updated_us": m.updated_us,
                  "subject": m.subject, "details": m.details, "reach": None} for m in updates])
    ids = [m.id for m in updates]
    conn.execute(meeting_reach.delete().where(meeting_reach.c.meeting_id.in_(ids)))
    replaced = conn.execute(sa.select(emails.c.meeting_id).where(emails.c.meeting_id.in_(ids),
                                                                 sa.not_(emails.c.by_record))).scalars().all()
    if replaced:
        # Emails leave their threads: the thread states change, under the email lock.
        lock_installation(conn, updates[0].installation_id)
        conn.execute(email_links.delete().where(email_links.c.meeting_id.in_(replaced)))
        conn.execute(emails.update().where(emails.c.meeting_id.in_(replaced)).values(by_record=True))
        thread_state.refresh(conn, updates[0].installation_id, thread_state.threads_of(conn, replaced))


def _insert_all(conn, chunk: list[Meeting]) -> bool:
    """Insert the whole chunk as new rows; False, with nothing written, when one of them
    exists already (or an id collides).  In a savepoint: a driver may send the rows as
    several statements (SQLite does, row by row)."""
    try:
        with conn.begin_nested():
            conn.execute(meetings.insert(), [_row(m)._asdict() for m in chunk])
    except sa.exc.IntegrityError:
        return False
    return True


def _assign_ids(conn, new: list[Meeting]) -> None:
    """Give each new meeting its derived id (all of one installation)."""
    for m, id_ in zip(new, free_ids(conn, new[0].installation_id, [m.source_id for m in new])):
        m.id = id_


def retire_keys(conn, installation_id: int, ids: list[int]) -> None:
    """Remember the keys of the deleted messages ``ids``: no other message takes them."""
    gone = set(conn.execute(sa.select(emails.c.message_key).where(emails.c.meeting_id.in_(ids))).scalars())
    if not gone:
        return
    known = set(conn.execute(sa.select(retired_keys.c.message_key).where(
        retired_keys.c.installation_id == installation_id, retired_keys.c.message_key.in_(sorted(gone)))).scalars())
    if gone - known:
        conn.execute(retired_keys.insert(), [{"installation_id": installation_id, "message_key": k}
                                             for k in sorted(gone - known)])


def validate_batch(records) -> tuple[list[tuple[int, Meeting]], list[dict]]:
    if not isinstance(records, list):
        raise InvalidArgument("records", f"must be a list of meeting objects, got {type(records).__name__}")
    if len(records) > MAX_BATCH:
        raise InvalidArgument("records", f"holds {len(records)} records; at most {MAX_BATCH} per task")
    valid, rejected = [], []
    for index, record in enumerate(records):
        try:
            valid.append((index, validate(record)))
        except InvalidArgument as exc:
            source_id = record.get("source_id") if isinstance(record, dict) else None
            rejected.append({"index": index, "source_id": source_id if isinstance(source_id, str) else None,
                             "error": str(exc)})
    return valid, rejected


def ingest(ctx, records, chunk_size: int | None = None, now_us: int | None = None, task_id: str | None = None) -> dict:
    """``crm.ingest_meetings``: validate, upsert, index.  Returns the contract's counts.
    ``chunk_size``: rows per transaction (default CRM_INGEST_CHUNK); ``task_id`` names the
    task's writes, so that its redelivery applies none twice."""
    engine, chunk_size = ctx.engine, chunk_size or ctx.settings.ingest_chunk
    valid, rejected = validate_batch(records)
    now_us = int(time.time() * 1_000_000) if now_us is None else now_us
    given = set()
    for _, m in valid:
        if m.updated_us is None:
            m.updated_us = now_us
        else:
            given.add(id(m))
    # Within one batch the newest version of a source_id wins (the later one on a tie).
    newest: dict[tuple[int, str], Meeting] = {}
    for _, m in valid:
        key = (m.installation_id, m.source_id)
        if key not in newest or m.updated_us >= newest[key].updated_us:
            newest[key] = m
    unchanged = len(valid) - len(newest)
    updated = 0

    # Read committed takes no gap locks: concurrent batches insert side by side instead of
    # queueing behind each other's locking reads of keys that do not exist yet.
    writer = engine.execution_options(isolation_level="READ COMMITTED") if engine.dialect.name == "mysql" else engine
    mirror = ctx.mirror
    base = new_write_id(task_id, "crm.ingest_meetings", None)
    by_installation: dict[int, list[Meeting]] = collections.defaultdict(list)
    for m in newest.values():
        by_installation[m.installation_id].append(m)
    for installation_id, group in sorted(by_installation.items()):
        token = writer_token(ctx, installation_id)
        group.sort(key=lambda m: m.source_id)  # one lock order for every writer
        for n, start in enumerate(range(0, len(group), chunk_size)):
            chunk = group[start:start + chunk_size]
            write_id = f"{base}:{installation_id}:{n}"

            stored: list = []

            def write(conn):
                rows, n_updated, n_unchanged = _write_chunk(conn, installation_id, chunk, given)
                stored[:] = rows
                return [n_updated, n_unchanged]
            (n_updated, n_unchanged), applied = run_transaction(
                writer, lambda conn: once(conn, write_id, installation_id, write), retry_duplicates=True)
            updated += n_updated
            unchanged += n_unchanged
            if not applied:
                # A redelivery: the chunk is stored; its index write may not have happened.
                sources = [m.source_id for m in chunk]
                mirror.write(installation_id, lambda t: sync_sources(ctx, installation_id, t, sources, write_id), token)
            else:
                mirror.write(installation_id, lambda t: sync_written(ctx, installation_id, t, stored, write_id), token)
    metrics.count(ctx.redis, {"ingest:accepted": len(valid), "ingest:rejected": len(rejected)})
    return {"accepted": len(valid), "updated": updated, "unchanged": unchanged, "rejected": rejected}


def delete(ctx, installation_id, source_ids, chunk_size: int | None = None, task_id: str | None = None) -> dict:
    """``crm.delete_meetings``: under the rows' locks, gone from the index first, then from
    the database; each chunk recorded as a write of the task."""
    chunk_size = chunk_size or ctx.settings.ingest_chunk
    installation_id = positive_int("installation_id", installation_id)
    if not isinstance(source_ids, list) or not all(isinstance(s, str) for s in source_ids):
        raise InvalidArgument("source_ids", "must be a list of strings")
    if len(source_ids) > MAX_BATCH:
        raise InvalidArgument("source_ids", f"holds {len(source_ids)} ids; at most {MAX_BATCH} per task")
    mirror = ctx.mirror
    token = mirror.token(installation_id)
    if token is None:
        return {"deleted": 0}  # the database knows no meeting of this installation
    deleted = 0
    wanted = sorted(set(source_ids))
    base = new_write_id(task_id, "crm.delete_meetings", installation_id)
    for n, start in enumerate(range(0, len(wanted), chunk_size)):
        chunk = wanted[start:start + chunk_size]
        write_id = f"{base}:{n}"

        def remove(conn):
            gone = conn.execute(
                sa.select(meetings.c.id, meetings.c.client_id, meetings.c.type, meetings.c.status, meetings.c.meeting_s)
                .where(meetings.c.installation_id == installation_id, meetings.c.source_id.in_(chunk))
                .with_for_update()).all()
            ids = [row.id for row in gone]
            count = 0
            if ids:
                # Out of every query at once, before the rows go: a crash in between leaves
                # the rows in the database, and the redelivered task deletes them again.
                mirror.write(installation_id, lambda t: redis_index.delete_meetings(ctx, installation_id, ids, t),
                             token)
                count = conn.execute(meetings.delete().where(meetings.c.id.in_(ids))).rowcount
                rollups.apply(conn, installation_id, removed=gone)
                retire_keys(conn, installation_id, ids)
                left = thread_state.threads_of(conn, ids)
                if left:
                    lock_installation(conn, installation_id)  # thread states change
                # A deleted email goes with its rows; its thread keeps the ids it named.
                for table in (meeting_reach, *PER_MESSAGE):
                    conn.execute(table.delete().where(table.c.meeting_id.in_(ids)))
                thread_state.refresh(conn, installation_id, left)
            return count
        deleted += run_transaction(locking(ctx.engine), lambda conn: once(conn, write_id, installation_id, remove),
                                   retry_duplicates=True)[0]
    return {"deleted": deleted}
