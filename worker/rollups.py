"""Activity rollups: how many meetings each (client, type, status) has per UTC day
(``meeting_days``), and each (client, type) per week and per month (``meeting_buckets``).

Every writer of ``meetings`` hands the rows it removed and added, in its own transaction,
to :func:`apply`: the rollup never disagrees with the rows, not even for a moment another
transaction could see.  ``crm.report`` reads the rollup for the clients a user is
assigned, and raw rows only for what the user sees beyond them (worker/reports/clients.py).
For emails the status is the direction (``inbound``/``outbound``).
"""
from __future__ import annotations

import collections
import datetime

import sqlalchemy as sa
from sqlalchemy.dialects import mysql, sqlite

from worker.tables import meeting_buckets, meeting_days, meetings

DAY = 86_400
EPOCH = datetime.date(1970, 1, 1)

#: What a writer knows of a meeting row it removes or adds.
Cell = collections.namedtuple("Cell", "client_id type status meeting_s")


def day_of(seconds: int) -> int:
    return seconds // DAY


def week_of(day: int) -> int:
    """The Monday on or before ``day`` (1970-01-01 was a Thursday)."""
    return day - (day + 3) % 7


def month_of(day: int) -> int:
    d = EPOCH + datetime.timedelta(days=day)
    return d.year * 100 + d.month


def date_of(day: int) -> datetime.date:
    return EPOCH + datetime.timedelta(days=day)


def cell(row) -> Cell:
    return Cell(row.client_id, row.type, row.status, row.meeting_s)


def deltas(removed, added) -> collections.Counter:
    delta: collections.Counter = collections.Counter()
    for c in removed:
        delta[(c.client_id, c.type, c.status, day_of(c.meeting_s))] -= 1
    for c in added:
        delta[(c.client_id, c.type, c.status, day_of(c.meeting_s))] += 1
    return delta


def bucket_deltas(days: collections.Counter) -> collections.Counter:
    """Per-day deltas summed per (kind, client, type, bucket): ``w`` weeks, ``m`` months."""
    out: collections.Counter = collections.Counter()
    for (client_id, type_, _status, day), n in days.items():
        out[("w", client_id, type_, week_of(day))] += n
        out[("m", client_id, type_, month_of(day))] += n
    return out


def apply(conn, installation_id: int, removed=(), added=()) -> None:
    """Count ``removed`` rows out and ``added`` rows in, in the caller's transaction: the
    days first, then the weeks and months.  Rows are written in key order: concurrent
    writers lock them in one order."""
    days = deltas(removed, added)
    rows = [_row(installation_id, key, n) for key, n in sorted(days.items()) if n]
    if rows:
        add_counts(conn, rows)
        add_bucket_counts(conn, [_bucket_row(installation_id, key, n)
                                 for key, n in sorted(bucket_deltas(days).items()) if n])


def _row(installation_id: int, key: tuple, count: int) -> dict:
    client_id, type_, status, day = key
    return {"installation_id": installation_id, "client_id": client_id, "type": type_, "status": status,
            "day": day, "week": week_of(day), "month": month_of(day), "count": count}


def _bucket_row(installation_id: int, key: tuple, count: int) -> dict:
    kind, client_id, type_, bucket = key
    return {"installation_id": installation_id, "kind": kind, "client_id": client_id, "type": type_,
            "bucket": bucket, "count": count}


def _upsert(conn, t, rows: list[dict]) -> None:
    """Add each row's count to the row of its key (inserted when missing)."""
    if not rows:
        return
    if conn.dialect.name == "mysql":
        stmt = mysql.insert(t)
        stmt = stmt.on_duplicate_key_update(count=t.c["count"] + stmt.inserted["count"])
    else:
        stmt = sqlite.insert(t)
        stmt = stmt.on_conflict_do_update(index_elements=list(t.primary_key.columns),
                                          set_={"count": t.c["count"] + stmt.excluded["count"]})
    conn.execute(stmt, rows)


def add_counts(conn, rows: list[dict]) -> None:
    _upsert(conn, meeting_days, rows)


def add_bucket_counts(conn, rows: list[dict]) -> None:
    _upsert(conn, meeting_buckets, rows)


def recount(conn, installation_id: int, batch: int = 20_000) -> int:
    """Rebuild the installation's rollup from its rows (keyset pages, one transaction: the
    caller's); returns the number of rollup rows."""
    conn.execute(meeting_days.delete().where(meeting_days.c.installation_id == installation_id))
    conn.execute(meeting_buckets.delete().where(meeting_buckets.c.installation_id == installation_id))
    counts: collections.Counter = collections.Counter()
    last = None
    m = meetings.c
    while True:
        q = sa.select(m.id, m.client_id, m.type, m.status, m.meeting_s).where(m.installation_id == installation_id)
        if last is not None:
            q = q.where(m.id > last)
        rows = conn.execute(q.order_by(m.id).limit(batch)).all()
        if not rows:
            break
        counts.update(deltas((), rows))
        last = rows[-1].id
    rows = [_row(installation_id, key, n) for key, n in sorted(counts.items())]
    for start in range(0, len(rows), 1000):
        conn.execute(meeting_days.insert(), rows[start:start + 1000])
    buckets = [_bucket_row(installation_id, key, n) for key, n in sorted(bucket_deltas(counts).items())]
    for start in range(0, len(buckets), 1000):
        conn.execute(meeting_buckets.insert(), buckets[start:start + 1000])
    return len(rows)
