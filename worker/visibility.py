"""Client security in SQL: which meetings a user may see.  Every statement that lists,
counts, groups or aggregates meetings for a user (the query fallback, threads, contacts,
reports, reconcile's view check) starts from these, and nowhere else is the rule written.

A user sees a meeting when its ``client_id`` is one of the user's clients; and an email
also when another client it links to is one of the user's, or when it was read from the
user's own mailbox (``meeting_reach`` holds those rows: worker/email/links.py).
"""
from __future__ import annotations

import sqlalchemy as sa

from worker.tables import meeting_reach, meetings, thread_reach, user_clients


def own_clients(installation_id: int, user_id: int):
    """Subquery: the client ids the user is assigned."""
    return sa.select(user_clients.c.client_id).where(
        user_clients.c.installation_id == installation_id, user_clients.c.user_id == user_id)


def reached_meetings(installation_id: int, user_id: int):
    """Subquery: the meetings (emails) the user sees besides their client's: another
    client they link to is the user's, or they were read from the user's own mailbox."""
    return sa.select(meeting_reach.c.meeting_id).where(
        meeting_reach.c.installation_id == installation_id,
        sa.or_(meeting_reach.c.client_id.in_(own_clients(installation_id, user_id)),
               meeting_reach.c.user_id == user_id))


def reached_rows(installation_id: int, user_id: int):
    """Derived table ``reached(meeting_id)``: the same meetings as reached_meetings, in a
    form a planner drives from (the user's mailbox rows, and the link rows of the user's
    clients, each through its index) instead of testing every email against it."""
    r, uc = meeting_reach.c, user_clients.c
    via_mailbox = sa.select(r.meeting_id).where(r.installation_id == installation_id, r.user_id == user_id)
    # From the user's clients to their rows (STRAIGHT_JOIN: MariaDB otherwise read every
    # reach row of the installation and probed the user's clients with each).
    via_clients = (sa.select(r.meeting_id)
                   .select_from(user_clients.join(meeting_reach, sa.and_(r.installation_id == uc.installation_id,
                                                                         r.client_id == uc.client_id)))
                   .where(uc.installation_id == installation_id, uc.user_id == user_id, r.client_id != 0)
                   .prefix_with("STRAIGHT_JOIN", dialect="mysql"))
    return sa.union(via_mailbox, via_clients).subquery("reached")


def seen_beyond(installation_id: int, user_id: int, columns, *conds, hint: str | None = None):
    """SELECT ``columns`` of the meetings the user sees beyond their own clients (reached
    through another linked client or their mailbox), driven from the reached rows.
    ``hint``: an optimizer hint comment (MySQL dialects), placed first after SELECT."""
    reached = reached_rows(installation_id, user_id)
    # STRAIGHT_JOIN (MySQL, MariaDB, TiDB): the planner otherwise may scan every meeting
    # of the installation against the derived table, as MariaDB 10.11 did where all of
    # them were emails; driving from the reached rows is never more work.
    stmt = (sa.select(*columns).select_from(reached.join(meetings, meetings.c.id == reached.c.meeting_id))
            .where(meetings.c.installation_id == installation_id,
                   meetings.c.client_id.notin_(own_clients(installation_id, user_id)), *conds))
    if hint:
        stmt = stmt.prefix_with(hint, dialect="mysql")
    return stmt.prefix_with("STRAIGHT_JOIN", dialect="mysql")


def visible_condition(installation_id: int, user_id: int):
    """Client security in SQL: the meetings the user may see — their client is the user's,
    or (emails) another client they link to is, or they were read from the user's own
    mailbox."""
    return sa.and_(meetings.c.installation_id == installation_id,
                   sa.or_(meetings.c.client_id.in_(own_clients(installation_id, user_id)),
                          meetings.c.id.in_(reached_meetings(installation_id, user_id))))


def visible_parts(installation_id: int, user_id: int, columns, *conds, hint: str | None = None):
    """The meetings the user may see as two disjoint SELECTs of ``columns`` that each use
    an index: those of the user's own clients (the (client, type, status, date) index),
    and those seen beyond them (driven from the user's reach rows, ``seen_beyond``).  One
    ``client_id IN … OR id IN …`` condition instead made MariaDB scan every meeting of the
    installation.  ``hint`` goes on both (seen_beyond)."""
    m = meetings.c
    mine = sa.select(*columns).where(m.installation_id == installation_id,
                                     m.client_id.in_(own_clients(installation_id, user_id)), *conds)
    if hint:
        mine = mine.prefix_with(hint, dialect="mysql")
    return mine, seen_beyond(installation_id, user_id, columns, *conds, hint=hint)


def threads_seen(installation_id: int, user_id: int):
    """Subquery ``seen_threads(thread_id, whole, last_s, awaiting)``: the threads of which the
    user may see a message — one of their clients is linked by a message, or a message
    was read from their mailbox (``thread_reach``) — and ``whole`` when one of those rows
    covers every message of the thread (the user sees the thread as ``threads`` keeps it).
    Read from the user's client rows and mailbox rows, each through its index."""
    tr, uc = thread_reach.c, user_clients.c
    columns = (tr.thread_id, tr.whole, tr.last_s, tr.awaiting)
    via_clients = (sa.select(*columns)
                   .select_from(user_clients.join(thread_reach, sa.and_(tr.installation_id == uc.installation_id,
                                                                        tr.client_id == uc.client_id)))
                   .where(uc.installation_id == installation_id, uc.user_id == user_id, tr.user_id == 0)
                   .prefix_with("STRAIGHT_JOIN", dialect="mysql"))
    via_mailbox = sa.select(*columns).where(tr.installation_id == installation_id, tr.user_id == user_id)
    rows = sa.union_all(via_clients, via_mailbox).subquery("reach_rows")
    whole = sa.func.max(sa.case((rows.c.whole, 1), else_=0))
    return (sa.select(rows.c.thread_id, whole.label("whole"), sa.func.max(rows.c.last_s).label("last_s"),
                      sa.func.max(sa.case((rows.c.awaiting, 1), else_=0)).label("awaiting"))
            .group_by(rows.c.thread_id)
            # MariaDB sorts a GROUP BY's groups unless told not to (about 15 % of this
            # statement for a user with 2,000 clients); nothing reads them in that order.
            .order_by(sa.null()).subquery("seen_threads"))
