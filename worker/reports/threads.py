"""The thread reports: ``response_times``, ``awaiting_reply`` and ``workload``.

Without a narrowing they read the kept thread state (worker/email/thread_state.py) for
the threads the user sees whole and summarize the few threads seen in part from their
visible messages; with one, they pair the visible messages in range with window
functions (a running count of outbound messages per thread pairs each inbound message
with its reply)."""
from __future__ import annotations

import bisect
import collections
import json

import sqlalchemy as sa

from worker.email import thread_state
from worker.email.thread_state import is_message
from worker.reports.shared import ALL, HISTOGRAM, Params, packed_ints, percentile, unpack_ints, visible
from worker.records import iso_seconds
from worker.tables import email_links, email_mailboxes, emails, meetings, thread_mailboxes, thread_pairs
from worker.tables import threads as thread_table
from worker.visibility import threads_seen


def visible_messages(installation_id: int, user_id: int, p: Params = None, hint: str | None = None):
    """CTE ``v``: the visible stored messages, with their thread, and each message's
    ``outs_so_far`` (outbound messages of its thread up to and including it, in (date,
    id) order) and ``outs`` (outbound messages of its thread)."""
    m = meetings.c
    p = ALL if p is None else p
    rows = visible(installation_id, user_id, p,
                    (m.id, m.meeting_s, m.status, m.subject, emails.c.thread_id), *is_message(m), hint=hint)
    is_out = sa.case((rows.c.status == "outbound", 1), else_=0)
    in_thread = dict(partition_by=rows.c.thread_id)
    order = (rows.c.meeting_s, rows.c.id)
    return sa.select(rows.c.thread_id, rows.c.id, rows.c.meeting_s, rows.c.status, rows.c.subject,
                     sa.func.sum(is_out).over(**in_thread, order_by=order, rows=(None, 0)).label("outs_so_far"),
                     sa.func.sum(is_out).over(**in_thread).label("outs"),
                     sa.func.row_number().over(**in_thread, order_by=order).label("position")).cte("v")


def _pairs(v):
    """Each inbound message with the next outbound one of its thread: the outbound
    message whose running count of outbound messages is one more than the inbound's."""
    i, r = v.alias("i"), v.alias("r")
    return (sa.select(i.c.thread_id, i.c.id.label("inbound_id"), r.c.id.label("reply_id"),
                      (r.c.meeting_s - i.c.meeting_s).label("wait_s"))
            .select_from(i.join(r, sa.and_(r.c.thread_id == i.c.thread_id, r.c.status == "outbound",
                                           r.c.outs_so_far == i.c.outs_so_far + 1)))
            .where(i.c.status == "inbound"))


def _awaiting(v):
    """Threads whose last visible message is inbound: the inbound messages after the last
    outbound one (``outs_so_far == outs``), the first of them the start of the wait."""
    return (sa.select(v.c.thread_id, sa.func.min(v.c.meeting_s).label("since"))
            .where(v.c.status == "inbound", v.c.outs_so_far == v.c.outs)
            .group_by(v.c.thread_id))


def _seen(installation_id: int, user_id: int):
    """CTE ``seen``: the threads the user sees a message of, and whether whole
    (worker/visibility.py threads_seen): one grouping, read by both parts of a report's
    statement."""
    return sa.select(threads_seen(installation_id, user_id)).cte("seen")


def _on_thread(installation_id: int, table, seen):
    return sa.and_(table.c.installation_id == installation_id, table.c.thread_id == seen.c.thread_id)


def _from_seen(stmt):
    """Join from the user's threads to their rows, in that order (STRAIGHT_JOIN: MariaDB
    otherwise scanned every thread row of the installation, probing the user's set)."""
    return stmt.prefix_with("STRAIGHT_JOIN", dialect="mysql")


def _in_part(conn, installation_id: int, user_id: int, ids) -> list[dict]:
    """The summaries, for the user, of the threads ``ids``, which the user sees only in
    part, from their visible messages."""
    return [{"thread_id": tid, **thread_state.summary(messages)}
            for tid, messages in thread_state.visible_part(conn, installation_id, user_id, ids).items()]


def response_times(conn, installation_id: int, user_id: int, p: Params, now: int, hint: str | None = None) -> list[dict]:
    if p.narrowed:
        v = visible_messages(installation_id, user_id, p, hint)
        pairs = _pairs(v).cte("pairs")
        waits = sorted(conn.execute(sa.select(pairs.c.wait_s)).scalars())
        threads = conn.execute(sa.select(sa.func.count(sa.distinct(v.c.thread_id)))
                               .where(v.c.status == "inbound")).scalar() or 0
    else:
        seen, t, pr = _seen(installation_id, user_id), thread_table, thread_pairs
        # One statement, the user's threads read once: one row for the threads seen whole,
        # with their pairs' waits packed and their count (``first`` marks one row per
        # thread), and one per thread seen in part, with its id.
        in_part_id = sa.case((seen.c.whole == 0, t.c.thread_id))
        joined = (seen.join(t, _on_thread(installation_id, t, seen))
                  .outerjoin(pr, sa.and_(_on_thread(installation_id, pr, seen), pr.c.first, seen.c.whole == 1)))
        # max(): the group's own key, which ONLY_FULL_GROUP_BY (MySQL's and TiDB's default)
        # accepts where an expression repeated from GROUP BY is refused.
        rows = conn.execute(_from_seen(
            sa.select(sa.func.max(in_part_id), packed_ints(pr.c.wait_s), sa.func.count(pr.c.wait_s),
                      sa.func.sum(sa.case((sa.or_(pr.c.n.is_(None), pr.c.n == 0), 1), else_=0)))
            .select_from(joined).where(sa.or_(seen.c.whole == 0, t.c.inbound > 0)).group_by(in_part_id)))
        waits, threads, in_part = [], 0, set()
        for thread_id, packed, count, firsts in rows:
            if thread_id is not None:
                in_part.add(thread_id)
                continue
            threads += int(firsts)
            unpacked = unpack_ints(packed, count)
            if unpacked is None:  # cut: read one row per pair
                unpacked = conn.execute(_from_seen(sa.select(pr.c.wait_s).select_from(joined)
                                                   .where(seen.c.whole == 1, t.c.inbound > 0,
                                                          pr.c.wait_s.isnot(None)))).scalars().all()
            waits += unpacked
        part = [th for th in _in_part(conn, installation_id, user_id, in_part) if th["inbound"]]
        waits += [wait for th in part for wait, _ in th["pairs"]]
        waits.sort()
        threads += len(part)
    return [_summarize_waits(waits, threads)]


def _summarize_waits(waits: list, threads: int) -> dict:
    """response_times' row from the sorted waits: counts by bisection, not by a pass."""
    histogram, below = {}, 0
    for label, upper in HISTOGRAM:
        upto = len(waits) if upper is None else bisect.bisect_left(waits, upper)
        histogram[label], below = upto - below, upto
    return {"threads": threads, "answered": len(waits), "median_s": percentile(waits, 0.5),
            "p90_s": percentile(waits, 0.9),
            "within_1h_share": bisect.bisect_left(waits, 3_600) / len(waits) if waits else None,
            "histogram": histogram}


def awaiting_reply(conn, installation_id: int, user_id: int, p: Params, now: int, hint: str | None = None) -> list[dict]:
    if not p.narrowed:
        seen, t = _seen(installation_id, user_id), thread_table
        # ``seen.awaiting`` repeats the thread's state for the threads seen whole: only
        # those awaiting are joined to their kept row.
        rows = conn.execute(_from_seen(
            sa.select(seen.c.whole, t.c.thread_id, t.c.subject, t.c.awaiting_s, t.c.clients)
            .select_from(seen.join(t, sa.and_(_on_thread(installation_id, t, seen),
                                              sa.or_(seen.c.whole == 0, seen.c.awaiting == 1))))
            .where(sa.or_(seen.c.whole == 0, t.c.awaiting_s.isnot(None))))).all()
        waiting = [(since, tid, subject, json.loads(clients)) for whole, tid, subject, since, clients in rows if whole]
        waiting += [(th["awaiting_s"], th["thread_id"], th["subject"], th["clients"])
                    for th in _in_part(conn, installation_id, user_id, {r[1] for r in rows if not r[0]})
                    if th["awaiting_s"] is not None]
        return [{"thread_id": tid, "subject": subject, "awaiting_reply_since": iso_seconds(since),
                 "client_ids": list(clients)} for since, tid, subject, clients in sorted(waiting, key=lambda w: w[:2])]
    v = visible_messages(installation_id, user_id, p, hint)
    waiting = _awaiting(v).cte("waiting")
    threads = {}
    stmt = (sa.select(waiting.c.thread_id, waiting.c.since, v.c.subject)
            .join(v, sa.and_(v.c.thread_id == waiting.c.thread_id, v.c.position == 1)))
    for thread_id, since, subject in conn.execute(stmt):
        threads[thread_id] = {"thread_id": thread_id, "subject": subject, "awaiting_reply_since": since,
                              "client_ids": set()}
    stmt = (sa.select(v.c.thread_id, email_links.c.client_id)
            .join(waiting, waiting.c.thread_id == v.c.thread_id)
            .join(email_links, email_links.c.meeting_id == v.c.id)
            .distinct())
    for thread_id, client_id in conn.execute(stmt):
        threads[thread_id]["client_ids"].add(client_id)
    rows = sorted(threads.values(), key=lambda t: (t["awaiting_reply_since"], t["thread_id"]))
    return [{**t, "awaiting_reply_since": iso_seconds(t["awaiting_reply_since"]),
             "client_ids": sorted(t["client_ids"])} for t in rows]


def workload(conn, installation_id: int, user_id: int, p: Params, now: int, hint: str | None = None) -> list[dict]:
    figures: dict = collections.defaultdict(lambda: {"received": 0, "sent": 0, "awaiting": 0, "waits": []})
    if not p.narrowed:
        _workload_kept(conn, installation_id, user_id, figures)
    else:
        _workload_sql(conn, visible_messages(installation_id, user_id, p, hint), figures)
    return [{"user_id": u, "received": f["received"], "sent": f["sent"], "awaiting": f["awaiting"],
             "median_reply_s": percentile(sorted(f["waits"]), 0.5)}
            for u, f in sorted(figures.items()) if f["received"] or f["sent"]]


def _integer(total):
    """A SUM as an integer column (MySQL's is DECIMAL, which would make the whole column of
    a UNION so, and each of its values slow to read)."""
    return sa.cast(total, sa.BigInteger)


def _workload_kept(conn, installation_id: int, user_id: int, figures: dict) -> None:
    """workload from the kept thread state, in one statement: per mailbox, the counts of
    the threads the user sees whole, summed by the database; per mailbox, the waits of
    their pairs, packed (the medians are taken here, exact); and the ids of the threads
    seen in part, which are summarized from their visible messages."""
    seen, pr, mb = _seen(installation_id, user_id), thread_pairs, thread_mailboxes
    counts = _from_seen(
        sa.select(sa.literal("c").label("kind"), mb.c.user_id, _integer(sa.func.sum(mb.c.received)).label("a"),
                  _integer(sa.func.sum(mb.c.sent)).label("b"), _integer(sa.func.sum(seen.c.awaiting)).label("c"),
                  sa.null().label("thread_id"), sa.null().label("waits"))
        .select_from(seen.join(mb, _on_thread(installation_id, mb, seen)))
        .where(seen.c.whole == 1).group_by(mb.c.user_id))
    # The pairs of whole threads per mailbox (a reply read from several mailboxes counts
    # in each), and (no pair, whole 0) the threads seen in part, one row each: one
    # reading of ``seen`` for both.
    in_part_id = sa.case((seen.c.whole == 0, seen.c.thread_id))
    joined = seen.outerjoin(pr, sa.and_(_on_thread(installation_id, pr, seen), seen.c.whole == 1))
    waits = _from_seen(
        sa.select(sa.literal("w"), pr.c.user_id, sa.func.count(pr.c.wait_s), sa.null(), sa.null(),
                  sa.func.max(in_part_id), packed_ints(pr.c.wait_s))  # max(): see response_times
        .select_from(joined)
        .where(sa.or_(seen.c.whole == 0, pr.c.user_id.isnot(None)))
        .group_by(pr.c.user_id, in_part_id))
    in_part = []
    for kind, user, a, b, c, thread_id, packed in conn.execute(sa.union_all(counts, waits)):
        if kind == "c":
            f = figures[user]
            f["received"] += int(a)
            f["sent"] += int(b)
            f["awaiting"] += int(c)
        elif thread_id is not None:
            in_part.append(thread_id)
        else:
            unpacked = unpack_ints(packed, a)
            if unpacked is None:  # cut: read one row per pair
                unpacked = conn.execute(_from_seen(sa.select(pr.c.wait_s).select_from(joined)
                                                   .where(seen.c.whole == 1, pr.c.user_id == user))).scalars().all()
            figures[user]["waits"] += unpacked
    for th in _in_part(conn, installation_id, user_id, in_part):
        for user, (received, sent) in th["mailboxes"].items():
            f = figures[int(user)]
            f["received"] += received
            f["sent"] += sent
            f["awaiting"] += th["awaiting_s"] is not None
        for wait, users in th["pairs"]:
            for user in users:
                figures[user]["waits"].append(wait)


def _workload_sql(conn, v, figures: dict) -> None:
    box = email_mailboxes.c
    stmt = (sa.select(box.user_id, v.c.status, sa.func.count())
            .select_from(v.join(email_mailboxes, box.meeting_id == v.c.id))
            .group_by(box.user_id, v.c.status))
    for mailbox_user, status, n in conn.execute(stmt):
        figures[mailbox_user]["sent" if status == "outbound" else "received"] += n
    waiting = _awaiting(v).cte("waiting")
    stmt = (sa.select(box.user_id, sa.func.count(sa.distinct(v.c.thread_id)))
            .select_from(v.join(waiting, waiting.c.thread_id == v.c.thread_id)
                         .join(email_mailboxes, box.meeting_id == v.c.id))
            .group_by(box.user_id))
    for mailbox_user, n in conn.execute(stmt):
        figures[mailbox_user]["awaiting"] = n
    pairs = _pairs(v).cte("pairs")
    stmt = (sa.select(box.user_id, pairs.c.wait_s)
            .select_from(pairs.join(email_mailboxes, box.meeting_id == pairs.c.reply_id)))
    for mailbox_user, wait in conn.execute(stmt):
        figures[mailbox_user]["waits"].append(wait)
