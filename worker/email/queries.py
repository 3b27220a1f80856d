"""``crm.query_threads``, ``crm.get_thread``, ``crm.search_contacts``: answered from the
database, with client security applied before anything is grouped, counted or listed.

A thread is made only of the messages the user may see: its dates, count, direction,
subject, participants and clients come from those alone.
"""
from __future__ import annotations

import collections
import dataclasses
import json

import sqlalchemy as sa

from worker import answer_cache, cursors
from worker.email.addresses import fold, name_terms
from worker.email import thread_state
from worker.email.thread_state import is_message
from worker.errors import InvalidArgument
from worker.query import MAX_LIMIT, bounded_int, token_list
from worker.records import item_json, iso_seconds, parse_time, positive_int, to_seconds
from worker.tables import contact_terms, contacts, email_links, email_participants, emails, meetings, threads
from worker.visibility import own_clients, threads_seen, visible_condition

def _limit(value) -> int:
    return bounded_int("limit", value, 1, MAX_LIMIT)


def _client_filter(value):
    return token_list("client_ids", value, positive_int)


def _optional_seconds(field, value):
    return None if value is None else to_seconds(parse_time(field, value))


def _fingerprint(*parts) -> bytes:
    """What a cursor is bound to: the query's name and arguments but its page."""
    return json.dumps(parts, sort_keys=True, default=str).encode()


def _linked_to(installation_id: int, client_ids, contact_source_id):
    """Subquery: the messages linked to one of ``client_ids`` / through the contact."""
    q = sa.select(email_links.c.meeting_id).where(email_links.c.installation_id == installation_id)
    if client_ids is not None:
        q = q.where(email_links.c.client_id.in_(client_ids))
    if contact_source_id is not None:
        q = q.join(contacts, contacts.c.id == email_links.c.contact_id).where(
            contacts.c.installation_id == installation_id, contacts.c.source_id == contact_source_id)
    return q


@dataclasses.dataclass
class _Filters:
    linked: object        # subquery of linked message ids, or None
    awaiting: bool | None
    date_from: int | None
    date_to: int | None
    desc: bool
    after: list | None    # the cursor's [last_at, thread_id]

    def past_cursor(self, last_at: int, thread_id: str) -> bool:
        if self.after is None:
            return True
        a, t = int(self.after[0]), str(self.after[1])
        return (last_at, thread_id) < (a, t) if self.desc else (last_at, thread_id) > (a, t)


def _listing(conn, installation_id: int, user_id: int, f: _Filters, limit: int):
    """One pass over the threads the user sees (seen_threads), in the database: the page of
    those seen whole, filtered and sorted from their kept state, with up to ``limit + 1``
    threads past the cursor; how many of them match; and the ids of the threads seen only
    in part.  Returns (total of whole, [(last_at, thread_id)], [partial thread id])."""
    seen = threads_seen(installation_id, user_id)
    match = [seen.c.whole == 1]
    if f.linked is not None:
        match.append(seen.c.thread_id.in_(sa.select(emails.c.thread_id).where(
            emails.c.installation_id == installation_id, emails.c.meeting_id.in_(f.linked))))
    if f.date_from is not None:
        match.append(seen.c.last_s >= f.date_from)
    if f.date_to is not None:
        match.append(seen.c.last_s < f.date_to)
    if f.awaiting is not None:
        match.append(seen.c.awaiting == (1 if f.awaiting else 0))
    shown = list(match)
    if f.after is not None:
        a, t = int(f.after[0]), str(f.after[1])
        shown.append(sa.or_(seen.c.last_s < a, sa.and_(seen.c.last_s == a, seen.c.thread_id < t)) if f.desc else
                     sa.or_(seen.c.last_s > a, sa.and_(seen.c.last_s == a, seen.c.thread_id > t)))
    direction = sa.desc if f.desc else sa.asc
    ranked = sa.select(
        seen.c.thread_id, seen.c.whole, seen.c.last_s,
        sa.func.sum(sa.case((sa.and_(*match), 1), else_=0)).over().label("total"),
        sa.func.row_number().over(order_by=(sa.case((sa.and_(*shown), 0), else_=1), direction(seen.c.last_s),
                                            direction(seen.c.thread_id))).label("rank"),
        sa.case((sa.and_(*shown), 1), else_=0).label("shown")).subquery("ranked")
    rows = conn.execute(sa.select(ranked).where(sa.or_(ranked.c.whole == 0, sa.and_(
        ranked.c.shown == 1, ranked.c.rank <= limit + 1))).order_by(ranked.c.rank)).all()
    total = int(rows[0].total) if rows else 0
    page = [(r.last_s, r.thread_id) for r in rows if r.whole == 1]
    return total, page, [r.thread_id for r in rows if r.whole == 0]


def _partial_threads(conn, installation_id: int, user_id: int, ids, f: _Filters) -> list[tuple[int, str, dict]]:
    """The threads ``ids``, which the user sees only in part, each summarized from the
    messages the user may see and from those alone, filtered: [(last_at, thread_id,
    summary)]."""
    if not ids:
        return []
    visible = thread_state.visible_part(conn, installation_id, user_id, ids)
    linked = None
    if f.linked is not None:
        candidates = sorted(m.id for messages in visible.values() for m in messages)
        linked = set()
        for start in range(0, len(candidates), 500):
            linked.update(conn.execute(f.linked.where(
                email_links.c.meeting_id.in_(candidates[start:start + 500]))).scalars())
    out = []
    for tid, messages in visible.items():
        if not messages or (linked is not None and not any(m.id in linked for m in messages)):
            continue
        s = thread_state.summary(messages)
        if (f.date_from is not None and s["last_s"] < f.date_from) or (f.date_to is not None and s["last_s"] >= f.date_to):
            continue
        if f.awaiting is not None and (s["awaiting_s"] is not None) != f.awaiting:
            continue
        out.append((s["last_s"], tid, s))
    return out


def query_threads(ctx, installation_id, user_id, client_ids=None, contact_source_id=None, awaiting_reply=None,
                  date_from=None, date_to=None, order="desc", limit=20, cursor=None, cache: bool = True) -> dict:
    """``crm.query_threads``: the threads the user sees whole come from their kept state
    (thread_state.py), listed by the database; those the user sees only in part are
    summarized from the user's visible messages; the two are merged into one page.  A
    first page (no cursor) is kept and served again while nothing it could include
    changed (worker/answer_cache.py); ``cache=False`` computes it."""
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
    f = _Filters(linked, awaiting_reply, date_from, date_to, order == "desc", after)
    tag = None
    if cache and cursor is None:  # the page a list shows first, and asks for again and again
        answer = answer_cache.digest(fingerprint.decode(), limit)
        copy, tag = answer_cache.read(ctx, installation_id, user_id, answer, ctx.mirror.token(installation_id))
        if copy is not None:
            return copy
    result = _threads_page(ctx, installation_id, user_id, f, limit, secret, fingerprint)
    if tag is not None:
        answer_cache.store(ctx, installation_id, user_id, answer, tag, result)
    return result


def _threads_page(ctx, installation_id: int, user_id: int, f: _Filters, limit: int, secret: bytes,
                  fingerprint: bytes) -> dict:
    """The page, computed: one snapshot (the connection's transaction) holds every read."""
    with ctx.engine.connect() as conn:
        whole_total, whole, partial_ids = _listing(conn, installation_id, user_id, f, limit)
        partial = _partial_threads(conn, installation_id, user_id, partial_ids, f)
        summaries = {tid: s for _, tid, s in partial}
        found = sorted(whole + [(last, tid) for last, tid, _ in partial if f.past_cursor(last, tid)],
                       reverse=f.desc)[:limit + 1]
        found, more = found[:limit], len(found) > limit
        kept = [tid for _, tid in found if tid not in summaries]
        for part in _chunks(kept):
            for row in conn.execute(sa.select(threads).where(threads.c.installation_id == installation_id,
                                                             threads.c.thread_id.in_(part))):
                summaries[row.thread_id] = thread_state.kept(row)
    items = [_thread_item(tid, summaries[tid]) for _, tid in found if tid in summaries]
    next_cursor = cursors.encode_json(secret, fingerprint, [found[-1][0], found[-1][1]]) if more else None
    return {"total": whole_total + len(partial), "items": items, "next_cursor": next_cursor}


def _chunks(values, size=500):
    values = sorted(values)
    for start in range(0, len(values), size):
        yield values[start:start + size]


def _thread_item(thread_id: str, s: dict) -> dict:
    return {"thread_id": thread_id, "subject": s["subject"], "messages": s["messages"],
            "first_at": iso_seconds(s["first_s"]), "last_at": iso_seconds(s["last_s"]),
            "last_direction": s["last_direction"],
            "awaiting_reply_since": iso_seconds(s["awaiting_s"]) if s["awaiting_s"] is not None else None,
            "participants": [{"address": a, "name": n or None} for a, n in s["participants"]],
            "client_ids": list(s["clients"])}


def get_thread(ctx, installation_id, user_id, thread_id) -> dict:
    installation_id = positive_int("installation_id", installation_id)
    user_id = positive_int("user_id", user_id)
    if not isinstance(thread_id, str) or not 0 < len(thread_id) <= 64:
        raise InvalidArgument("thread_id", "must be a thread_id string")
    if not (thread_id.isascii() and thread_id.isalnum()):
        # No thread has such an id (``t`` and hex digits); MySQL would refuse to compare
        # one outside ASCII, and would take one with trailing spaces for the same id.
        return {"thread_id": thread_id, "messages": []}
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
    if q is not None and q.strip():
        conds.append(_matching(installation_id, q))
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


#: Words of a contact query that must each match (more are ignored: a person types a name).
QUERY_WORDS = 8


def _matching(installation_id: int, q: str):
    """Contacts that ``q`` finds: every word of ``q`` starts a word of the contact's name
    or one of its addresses ("sam öde" finds Sam Ödegaard), or the whole of ``q`` starts
    an address ("sam@acme.co"); case and accents folded, words split as names are."""
    def starting(prefix: str):
        return contacts.c.id.in_(sa.select(contact_terms.c.contact_id).where(
            contact_terms.c.installation_id == installation_id,
            contact_terms.c.term.startswith(prefix[:255], autoescape=True)))
    whole = fold(q.strip())
    words = sorted(name_terms(q), key=len, reverse=True)[:QUERY_WORDS]
    if not words or words == [whole]:
        return starting(whole)
    return sa.or_(starting(whole), sa.and_(*(starting(w) for w in words)))


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
