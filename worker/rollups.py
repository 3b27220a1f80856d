"""Daily activity rollups: how many meetings each (client, type, status) has per UTC day.

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

from worker.tables import meeting_days, meetings

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


def apply(conn, installation_id: int, removed=(), added=()) -> None:
    """Count ``removed`` rows out and ``added`` rows in, in the caller's transaction.
    Rows are written in key order: concurrent writers lock them in one order."""
    rows = [_row(installation_id, key, n) for key, n in sorted(deltas(removed, added).items()) if n]
    if rows:
        add_counts(conn, rows)


def _row(installation_id: int, key: tuple, count: int) -> dict:
    client_id, type_, status, day = key
    return {"installation_id": installation_id, "client_id": client_id, "type": type_, "status": status,
            "day": day, "week": week_of(day), "month": month_of(day), "count": count}


def add_counts(conn, rows: list[dict]) -> None:
    t = meeting_days
    if conn.dialect.name == "mysql":
        stmt = mysql.insert(t)
        stmt = stmt.on_duplicate_key_update(count=t.c["count"] + stmt.inserted["count"])
    else:
        stmt = sqlite.insert(t)
        stmt = stmt.on_conflict_do_update(
            index_elements=[t.c.installation_id, t.c.client_id, t.c.type, t.c.status, t.c.day],
            set_={"count": t.c["count"] + stmt.excluded["count"]})
    conn.execute(stmt, rows)


def recount(conn, installation_id: int, batch: int = 20_000) -> int:
    """Rebuild the installation's rollup from its rows (keyset pages, one transaction: the
    caller's); returns the number of rollup rows."""
    conn.execute(meeting_days.delete().where(meeting_days.c.installation_id == installation_id))
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
    return len(rows)
