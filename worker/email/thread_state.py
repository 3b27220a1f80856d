"""Each thread's state, kept in the transaction of every change to its messages (a new
message, a re-threading, a re-link, a direction that changed, a meeting record that
replaced an email, a delete): the figures a thread list and the thread reports show, and
who sees the whole thread.

A user who holds a client that every message of a thread links to, or whose mailbox
every message was read from, sees the whole thread (``thread_reach.whole``): their thread
list and reports take its state as it is.  Anyone else who sees part of a thread gets its
figures from the messages they may see, and from those alone (worker/email/queries.py,
worker/reports/threads.py): a thread seen only in part never shows state derived from a message
its reader may not see.

Callers hold the installation's email lock (worker/email/links.py lock_installation):
thread states are read and rewritten by one writer at a time.
"""
from __future__ import annotations

import collections
import dataclasses
import json

import sqlalchemy as sa

from worker.tables import (email_links, email_mailboxes, emails, meetings, thread_mailboxes, thread_pairs,
                           thread_reach, threads)
from worker.visibility import threads_seen, visible_condition


#: The tables of a thread's state.
TABLES = (threads, thread_pairs, thread_mailboxes, thread_reach)


def is_message(m=meetings.c) -> tuple:
    """The conditions that make a meeting row a stored message of a thread: of type
    ``email``, joined to its ``emails`` row, and not owned by a meeting record that replaced
    the email (that record decides alone what the meeting is: threads, thread reports and
    contacts' last email leave it)."""
    return (m.type == "email", emails.c.meeting_id == m.id, sa.not_(emails.c.by_record))


@dataclasses.dataclass
class Message:
    """What a thread's state is made of, of one message."""
    id: int
    meeting_s: int
    direction: str
    subject: str | None
    participants: list       # [(role, address, name)]
    clients: frozenset       # every client it links to
    mailboxes: frozenset     # the users it was read from


def summary(messages: list[Message]) -> dict:
    """A thread's figures from its messages (any subset a user sees), in (date, id)
    order: the columns of ``threads`` but its id."""
    messages = sorted(messages, key=lambda m: (m.meeting_s, m.id))
    first, last = messages[0], messages[-1]
    awaiting = None
    if last.direction == "inbound":
        for m in reversed(messages):
            if m.direction == "outbound":
                break
            awaiting = m.meeting_s
    people: dict = {}
    for m in messages:
        for _role, address, name in m.participants:
            if address not in people or (not people[address] and name):
                people[address] = name
    # Each inbound message with the next outbound one after it.
    pairs, reply = [], None
    for m in reversed(messages):
        if m.direction == "outbound":
            reply = m
        elif reply is not None:
            pairs.append([reply.meeting_s - m.meeting_s, sorted(reply.mailboxes)])
    pairs.reverse()
    boxes: dict = collections.defaultdict(lambda: [0, 0])
    for m in messages:
        for user in m.mailboxes:
            boxes[user][1 if m.direction == "outbound" else 0] += 1
    return {"messages": len(messages), "inbound": sum(m.direction == "inbound" for m in messages),
            "first_s": first.meeting_s, "last_s": last.meeting_s, "last_direction": last.direction,
            "awaiting_s": awaiting, "subject": first.subject,
            "participants": [[a, n] for a, n in people.items()],
            "clients": sorted(set().union(*(m.clients for m in messages))),
            "pairs": pairs, "mailboxes": {str(u): boxes[u] for u in sorted(boxes)}}


def reach_of(messages: list[Message]) -> list[tuple[int, int, bool]]:
    """[(client_id, user_id, whole)]: who sees the thread, and whether whole."""
    clients = set().union(*(m.clients for m in messages))
    users = set().union(*(m.mailboxes for m in messages))
    return ([(c, 0, all(c in m.clients for m in messages)) for c in sorted(clients)]
            + [(0, u, all(u in m.mailboxes for m in messages)) for u in sorted(users)])


def _chunks(values, size=500):
    values = sorted(values)
    for start in range(0, len(values), size):
        yield values[start:start + size]


def load(conn, installation_id: int, thread_ids, viewer: int | None = None) -> dict[str, list[Message]]:
    """The messages of the threads ``thread_ids`` that make their state; with ``viewer`` (a
    user id), only those that user may see (worker/visibility.py).  Two statements per 500
    threads: the messages, then their links and mailboxes together."""
    found: dict = collections.defaultdict(list)
    rows = []
    m = meetings.c
    for part in _chunks(set(thread_ids)):
        stmt = (sa.select(emails.c.thread_id, m.id, m.meeting_s, m.status, m.subject, emails.c.participants)
                .select_from(emails.join(meetings, m.id == emails.c.meeting_id))
                .where(emails.c.installation_id == installation_id, emails.c.thread_id.in_(part), *is_message()))
        if viewer is not None:
            stmt = stmt.where(visible_condition(installation_id, viewer))
        rows += conn.execute(stmt).all()
    links, boxes = collections.defaultdict(set), collections.defaultdict(set)
    found_in = {"l": links, "b": boxes}
    l, b = email_links.c, email_mailboxes.c
    for part in _chunks({r.id for r in rows}):
        for kind, meeting_id, value in conn.execute(sa.union_all(
                sa.select(sa.literal("l"), l.meeting_id, l.client_id).where(l.meeting_id.in_(part)),
                sa.select(sa.literal("b"), b.meeting_id, b.user_id).where(b.meeting_id.in_(part)))):
            found_in[kind][meeting_id].add(value)
    for r in rows:
        found[r.thread_id].append(Message(r.id, r.meeting_s, r.status, r.subject,
                                          [tuple(p) for p in json.loads(r.participants)],
                                          frozenset(links[r.id]), frozenset(boxes[r.id])))
    return found


def refresh(conn, installation_id: int, thread_ids) -> None:
    """Write the state of the threads ``thread_ids`` as their messages stand now (a
    thread left without messages loses its rows)."""
    thread_ids = sorted({t for t in thread_ids if t})
    if not thread_ids:
        return
    found = load(conn, installation_id, thread_ids)
    for part in _chunks(thread_ids):
        for table in TABLES:
            conn.execute(table.delete().where(table.c.installation_id == installation_id,
                                              table.c.thread_id.in_(part)))
    rows: dict = {table: [] for table in TABLES}
    for thread_id, messages in sorted(found.items()):
        for table, row in rows_of(installation_id, thread_id, messages):
            rows[table].append(row)
    for table, part in rows.items():
        for start in range(0, len(part), 500):
            conn.execute(table.insert(), part[start:start + 500])


def rows_of(installation_id: int, thread_id: str, messages: list[Message]):
    """(table, row) of the state of one thread: its ``threads`` row, its pairs, its
    mailbox counts, who sees it."""
    s = summary(messages)
    key = {"installation_id": installation_id, "thread_id": thread_id}
    yield threads, {**key, **{k: s[k] for k in ("messages", "inbound", "first_s", "last_s", "last_direction",
                                                 "awaiting_s", "subject")},
                    **{k: json.dumps(s[k], ensure_ascii=False, separators=(",", ":"))
                       for k in ("participants", "clients")}}
    for n, (wait, users) in enumerate(s["pairs"]):
        for i, user in enumerate(users or [0]):
            yield thread_pairs, {**key, "n": n, "user_id": user, "wait_s": wait, "first": i == 0}
    for user, (received, sent) in s["mailboxes"].items():
        yield thread_mailboxes, {**key, "user_id": int(user), "received": received, "sent": sent}
    for client, user, whole in reach_of(messages):
        yield thread_reach, {**key, "client_id": client, "user_id": user, "whole": whole, "last_s": s["last_s"],
                             "awaiting": s["awaiting_s"] is not None}


def threads_of(conn, meeting_ids) -> set[str]:
    """The threads of the stored messages ``meeting_ids``."""
    found = set()
    for part in _chunks(set(meeting_ids)):
        found.update(conn.execute(sa.select(emails.c.thread_id).where(emails.c.meeting_id.in_(part))).scalars())
    return found


# -- what one user sees of the threads ----------------------------------------------------

def kept(row) -> dict:
    """A ``threads`` row as its summary (the form :func:`summary` gives)."""
    return {"thread_id": row.thread_id, "messages": row.messages, "inbound": row.inbound, "first_s": row.first_s,
            "last_s": row.last_s, "last_direction": row.last_direction, "awaiting_s": row.awaiting_s,
            "subject": row.subject, "participants": json.loads(row.participants), "clients": json.loads(row.clients)}


def seen_in_part(conn, installation_id: int, user_id: int) -> dict[str, list[Message]]:
    """The threads the user sees only in part, each with the messages the user may see
    (and no other)."""
    seen = threads_seen(installation_id, user_id)
    ids = list(conn.execute(sa.select(seen.c.thread_id).where(seen.c.whole == 0)).scalars())
    return visible_part(conn, installation_id, user_id, ids)


def visible_part(conn, installation_id: int, user_id: int, thread_ids) -> dict[str, list[Message]]:
    """The messages of the threads ``thread_ids`` that the user may see, by thread."""
    return dict(load(conn, installation_id, thread_ids, viewer=user_id)) if thread_ids else {}
