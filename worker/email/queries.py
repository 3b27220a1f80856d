"""``crm.query_threads``, ``crm.get_thread``, ``crm.search_contacts``: answered from the
database, with client security applied before anything is grouped, counted or listed.

A thread is made only of the messages the user may see: its dates, count, direction,
subject, participants and clients come from those alone.
"""
from __future__ import annotations

import collections
import json

import sqlalchemy as sa

from worker.tables import contact_terms, contacts, email_links, email_participants, emails, meetings
from worker.email.addresses import fold
from worker import cursors
from worker.errors import InvalidArgument
from worker.query import MAX_LIMIT, bounded_int, token_list
from worker.visibility import own_clients, visible_condition, visible_parts
from worker.records import item_json, iso_seconds, parse_time, positive_int, to_seconds

def _limit(value) -> int:
    return bounded_int("limit", value, 1, MAX_LIMIT)


def _client_filter(value):
    return token_list("client_ids", value, positive_int)


def _optional_seconds(field, value):
    return None if value is None else to_seconds(parse_time(field, value))


def _fingerprint(*parts) -> bytes:
    """What a cursor is bound to: the query's name and arguments but its page."""
    return json.dumps(parts, sort_keys=True, default=str).encode()


def is_message(m=meetings.c) -> tuple:
    """The conditions that make a meeting row a stored message of email insight: of type
    ``email``, joined to its ``emails`` row, and not owned by a meeting record that replaced
    the email (that record decides alone what the meeting is: threads, thread reports and
    contacts' last email leave it)."""
    return (m.type == "email", emails.c.meeting_id == m.id, sa.not_(emails.c.by_record))


def _visible(installation_id: int, user_id: int, *conds, subject: bool = True):
    """Subquery ``seen(thread_id, id, meeting_s, status[, subject])``: the user's visible
    messages — those of the user's own clients and those seen beyond them, each part read
    through its own index — narrowed by ``conds``.  A message is a meeting of type
    ``email`` whose row is still the email's (is_message): a ``crm.ingest_meetings`` record
    that replaced one leaves the threads; and the type bounds the index range to the
    emails of the user's clients instead of all their meetings."""
    m = meetings.c
    columns = (emails.c.thread_id, m.id, m.meeting_s, m.status) + ((m.subject,) if subject else ())
    return sa.union_all(*visible_parts(installation_id, user_id, columns, *is_message(m), *conds)).subquery("seen")


def _visible_messages(conn, installation_id: int, user_id: int, thread_ids=None):
    """The user's visible messages (of the threads ``thread_ids``, or all) in thread and
    date order."""
    conds = () if thread_ids is None else (emails.c.installation_id == installation_id,
                                            emails.c.thread_id.in_(sorted(thread_ids)))
    seen = _visible(installation_id, user_id, *conds)
    return conn.execute(sa.select(seen).order_by(seen.c.thread_id, seen.c.meeting_s, seen.c.id)).all()


def _linked_to(installation_id: int, client_ids, contact_source_id):
    """Subquery: the messages linked to one of ``client_ids`` / through the contact."""
    q = sa.select(email_links.c.meeting_id).where(email_links.c.installation_id == installation_id)
    if client_ids is not None:
        q = q.where(email_links.c.client_id.in_(client_ids))
    if contact_source_id is not None:
        q = q.join(contacts, contacts.c.id == email_links.c.contact_id).where(
            contacts.c.installation_id == installation_id, contacts.c.source_id == contact_source_id)
    return q


def _thread_page(conn, installation_id: int, user_id: int, linked, awaiting_reply, date_from, date_to, desc: bool,
                 after, limit: int):
    """The page of threads, grouped, filtered, counted and sorted by the database: only
    the page's threads and the total come back, not every visible message.  Returns
    (total, [(last_at, thread_id)]) with up to ``limit + 1`` threads."""
    seen = _visible(installation_id, user_id, subject=False)  # narrow rows: the database sorts them all
    flag = (sa.case((seen.c.id.in_(linked), 1), else_=0) if linked is not None else sa.literal(1)).label("linked")
    w = sa.select(seen.c.thread_id, seen.c.meeting_s, seen.c.status, flag,
                  sa.func.row_number().over(partition_by=seen.c.thread_id,
                                            order_by=(seen.c.meeting_s, seen.c.id)).label("rn"),
                  sa.func.count().over(partition_by=seen.c.thread_id).label("n")).subquery("w")
    g = (sa.select(w.c.thread_id, sa.func.max(w.c.meeting_s).label("last_at"),
                   sa.func.max(sa.case((w.c.rn == w.c.n, w.c.status))).label("last_direction"),
                   sa.func.max(w.c.linked).label("linked"))
         .group_by(w.c.thread_id)).subquery("g")
    conds = [g.c.linked == 1]
    if date_from is not None:
        conds.append(g.c.last_at >= date_from)
    if date_to is not None:
        conds.append(g.c.last_at < date_to)
    if awaiting_reply is not None:
        conds.append(g.c.last_direction == "inbound" if awaiting_reply else g.c.last_direction != "inbound")
    f = sa.select(g.c.last_at, g.c.thread_id, sa.func.count().over().label("total")).where(*conds).subquery("f")
    q = sa.select(f.c.last_at, f.c.thread_id, f.c.total)
    if after is not None:
        a, t = int(after[0]), str(after[1])
        q = q.where(sa.or_(f.c.last_at < a, sa.and_(f.c.last_at == a, f.c.thread_id < t)) if desc else
                    sa.or_(f.c.last_at > a, sa.and_(f.c.last_at == a, f.c.thread_id > t)))
    order = (f.c.last_at.desc(), f.c.thread_id.desc()) if desc else (f.c.last_at, f.c.thread_id)
    rows = conn.execute(q.order_by(*order).limit(limit + 1)).all()
    if rows:
        return rows[0].total, [(r.last_at, r.thread_id) for r in rows]
    if after is None:
        return 0, []
    # Past the last page: the total still counts every thread of the query.
    return conn.execute(sa.select(sa.func.count()).select_from(f)).scalar(), []


def _chunks(values, size=500):
    values = sorted(values)
    for start in range(0, len(values), size):
        yield values[start:start + size]


def summarize(messages) -> dict:
    """A thread's figures from its visible messages, in date order."""
    first, last = messages[0], messages[-1]
    awaiting = None
    if last.status == "inbound":
        for m in reversed(messages):
            if m.status == "outbound":
                break
            awaiting = m.meeting_s
    return {"subject": first.subject, "messages": len(messages), "first_at": first.meeting_s,
            "last_at": last.meeting_s, "last_direction": last.status, "awaiting_reply_since": awaiting}


def query_threads(ctx, installation_id, user_id, client_ids=None, contact_source_id=None, awaiting_reply=None,
                  date_from=None, date_to=None, order="desc", limit=20, cursor=None) -> dict:
    installation_id = positive_int("installation_id", installation_id)
    user_id = positive_int("user_id", user_id)
    client_ids = _client_filter(client_ids)
    if contact_source_id is not None and (not isinstance(contact_source_id, str) or not 0 < len(contact_source_id) <= 255):
        raise InvalidArgument("contact_source_id", "must be a string of 1 to 255 characters")
    if awaiting_reply is not None and not isinstance(awaiting_reply, bool):
        raise InvalidArgument("awaiting_reply", f"must be true, false or null, got {awaiting_reply!r:.40}")
    date_from, date_to = _optional_seconds("date_from", date_from), _optional_seconds("date_to", date_to)
    if order not in ("asc", "desc"):
        raise InvalidArgument("order", f"must be 'asc' or 'desc', got {order!r:.40}")
    limit = _limit(limit)
    secret = ctx.cursor_secret()
    fingerprint = _fingerprint("threads", installation_id, user_id, client_ids, contact_source_id, awaiting_reply,
                               date_from, date_to, order)
    after = cursors.decode_json(secret, fingerprint, cursor) if cursor is not None else None
    linked = _linked_to(installation_id, client_ids, contact_source_id) \
        if client_ids is not None or contact_source_id is not None else None
    with ctx.engine.connect() as conn:
        total, found = _thread_page(conn, installation_id, user_id, linked, awaiting_reply, date_from, date_to,
                                    order == "desc", after, limit)
        found, more = found[:limit], len(found) > limit
        by_thread = collections.defaultdict(list)
        for row in _visible_messages(conn, installation_id, user_id, {tid for _, tid in found}):
            by_thread[row.thread_id].append(row)
        # One snapshot (the connection's transaction) holds both reads: every thread found has its rows.
        page = [(last_at, tid, summarize(by_thread[tid]), by_thread[tid]) for last_at, tid in found if by_thread[tid]]
        items = _thread_items(conn, installation_id, page)
    next_cursor = cursors.encode_json(secret, fingerprint, [page[-1][0], page[-1][1]]) if more else None
    return {"total": total, "items": items, "next_cursor": next_cursor}


def _thread_items(conn, installation_id: int, page) -> list[dict]:
    ids = [r.id for _, _, _, rows in page for r in rows]
    participants, links = {}, collections.defaultdict(set)
    for part in _chunks(ids):
        participants.update(conn.execute(sa.select(emails.c.meeting_id, emails.c.participants)
                                         .where(emails.c.meeting_id.in_(part))).all())
        for meeting_id, client_id in conn.execute(sa.select(email_links.c.meeting_id, email_links.c.client_id)
                                                  .where(email_links.c.meeting_id.in_(part))):
            links[meeting_id].add(client_id)
    items = []
    for _, tid, s, rows in page:
        people, clients = {}, set()
        for r in rows:
            for _role, address, name in json.loads(participants.get(r.id, "[]")):
                if address not in people or (not people[address] and name):
                    people[address] = name
            clients |= links[r.id]
        items.append({
            "thread_id": tid, "subject": s["subject"], "messages": s["messages"],
            "first_at": iso_seconds(s["first_at"]), "last_at": iso_seconds(s["last_at"]),
            "last_direction": s["last_direction"],
            "awaiting_reply_since": iso_seconds(s["awaiting_reply_since"]) if s["awaiting_reply_since"] is not None else None,
            "participants": [{"address": a, "name": n or None} for a, n in people.items()],
            "client_ids": sorted(clients)})
    return items


def get_thread(ctx, installation_id, user_id, thread_id) -> dict:
    installation_id = positive_int("installation_id", installation_id)
    user_id = positive_int("user_id", user_id)
    if not isinstance(thread_id, str) or not 0 < len(thread_id) <= 64:
        raise InvalidArgument("thread_id", "must be a thread_id string")
    with ctx.engine.connect() as conn:
        rows = conn.execute(
            sa.select(meetings, emails.c.participants)
            .join(emails, emails.c.meeting_id == meetings.c.id)
            .where(emails.c.installation_id == installation_id, emails.c.thread_id == thread_id,
                   *is_message(), visible_condition(installation_id, user_id))
            .order_by(meetings.c.meeting_s, meetings.c.id)).all()
        links = collections.defaultdict(list)
        for part in _chunks([r.id for r in rows]):
            for link in conn.execute(
                    sa.select(email_links.c.meeting_id, email_links.c.client_id, contacts.c.source_id,
                              email_links.c.reason)
                    .outerjoin(contacts, contacts.c.id == email_links.c.contact_id)
                    .where(email_links.c.meeting_id.in_(part)).order_by(email_links.c.position)):
                links[link.meeting_id].append({"client_id": link.client_id, "contact_source_id": link.source_id,
                                               "reason": link.reason})
    messages = []
    for row in rows:
        item = json.loads(item_json(row))
        item["direction"] = row.status
        item["participants"] = [{"role": role, "address": a, "name": n or None}
                                for role, a, n in json.loads(row.participants)]
        item["links"] = links[row.id]
        messages.append(item)
    return {"thread_id": thread_id, "messages": messages}


def search_contacts(ctx, installation_id, user_id, q=None, client_ids=None, job_title=None, limit=20,
                    cursor=None) -> dict:
    installation_id = positive_int("installation_id", installation_id)
    user_id = positive_int("user_id", user_id)
    if q is not None and (not isinstance(q, str) or len(q) > 255):
        raise InvalidArgument("q", "must be a string of at most 255 characters")
    if job_title is not None and (not isinstance(job_title, str) or len(job_title) > 255):
        raise InvalidArgument("job_title", "must be a string of at most 255 characters")
    client_ids = _client_filter(client_ids)
    limit = _limit(limit)
    secret = ctx.cursor_secret()
    fingerprint = _fingerprint("contacts", installation_id, user_id, q, client_ids, job_title)
    after = cursors.decode_json(secret, fingerprint, cursor) if cursor is not None else None
    c = contacts.c
    # A contact is the user's when its client is (client security: worker/visibility.py).
    conds = [c.installation_id == installation_id, c.client_id.in_(own_clients(installation_id, user_id))]
    if client_ids is not None:
        conds.append(c.client_id.in_(client_ids))
    if job_title is not None:
        conds.append(c.job_key == fold(job_title.strip()))
    prefix = fold(q.strip()) if q is not None else ""
    if prefix:
        conds.append(c.id.in_(sa.select(contact_terms.c.contact_id).where(
            contact_terms.c.installation_id == installation_id,
            contact_terms.c.term.startswith(prefix, autoescape=True))))
    with ctx.engine.connect() as conn:
        total = conn.execute(sa.select(sa.func.count()).select_from(contacts).where(*conds)).scalar()
        if after is not None:
            conds.append(sa.or_(c.sort_name > after[0], sa.and_(c.sort_name == after[0], c.source_id > after[1])))
        rows = conn.execute(sa.select(c.id, c.source_id, c.name, c.sort_name, c.emails, c.client_id, c.job_title)
                            .where(*conds).order_by(c.sort_name, c.source_id).limit(limit + 1)).all()
        page, more = rows[:limit], len(rows) > limit
        last_at = _last_email_at(conn, installation_id, user_id, page)
    items = [{"source_id": r.source_id, "name": r.name, "emails": json.loads(r.emails), "client_id": r.client_id,
              "job_title": r.job_title,
              "last_email_at": iso_seconds(last_at[r.id]) if last_at.get(r.id) is not None else None} for r in page]
    next_cursor = cursors.encode_json(secret, fingerprint, [page[-1].sort_name, page[-1].source_id]) if more else None
    return {"total": total, "items": items, "next_cursor": next_cursor}


def _last_email_at(conn, installation_id: int, user_id: int, page) -> dict:
    """contact id -> the latest Date of a visible email one of its addresses takes part in."""
    owners = collections.defaultdict(set)
    for r in page:
        for address in json.loads(r.emails):
            owners[address].add(r.id)
    latest: dict = {}
    for part in _chunks(owners):
        for address, when in conn.execute(
                sa.select(email_participants.c.address, sa.func.max(meetings.c.meeting_s))
                .join(meetings, meetings.c.id == email_participants.c.meeting_id)
                .join(emails, emails.c.meeting_id == email_participants.c.meeting_id)
                .where(email_participants.c.installation_id == installation_id, email_participants.c.address.in_(part),
                       *is_message(), visible_condition(installation_id, user_id))
                .group_by(email_participants.c.address)):
            for contact in owners[address]:
                if latest.get(contact) is None or when > latest[contact]:
                    latest[contact] = when
    return latest
