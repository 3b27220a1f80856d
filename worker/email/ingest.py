"""``crm.ingest_emails``: raw messages from one user's mailbox, stored once each.

Per chunk of messages, in one transaction under the installation's email lock:

1. **place** each message: a copy of a stored message (the same key *and* the same
   content fingerprint), or a new message under its own key, under the row of a meeting
   record that holds that key already, or under the first free ``key#n``;
2. **insert** the new messages' rows (message, participants);
3. **remember** the mailbox each one was read from;
4. **thread** the new ones and whatever they touch (threads.py);
5. **derive** links, direction and visibility of what changed (links.py);
6. keep the **state** of every thread they touch (thread_state.py).

Then, under the rows' locks, the index receives every meeting row the chunk changed
(worker/mirror.py).  Each chunk is recorded as a write of its task: a redelivered task
applies none twice.  A chunk that the database refuses is stored again one message at a
time: a message that cannot be stored is rejected alone, and the rest are stored.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import time

import sqlalchemy as sa

from worker import metrics
from worker.db import locking, run_transaction
from worker.tables import email_mailboxes, email_participants, email_refs, emails, meetings, retired_keys
from worker.email import thread_state, threads
from worker.email.addresses import domain_of
from worker.email.links import Fresh, lock_installation, materialize
from worker.email.parse import Parsed, Unusable, decode_raw, parse
from worker.errors import InvalidArgument
from worker.mirror import sync_ids
from worker.rebuild import writer_token
from worker.writes import new_write_id, once
from worker.records import MAX_SOURCE_ID, free_ids, parse_time, positive_int, to_seconds

log = logging.getLogger(__name__)

MAX_MESSAGES = 500
CHUNK = 100
_OPTIONAL = {"provider_id", "provider_thread_id", "received_at"}
#: Database errors that a message's own rows can cause (a key or a value the database
#: refuses); any other fault is the infrastructure's and fails or retries the task.
_REFUSED = (sa.exc.IntegrityError, sa.exc.DataError)


@dataclasses.dataclass
class Incoming:
    index: int
    parsed: Parsed
    date_s: int
    provider_id: str | None
    provider_thread_id: str | None


def _optional_text(message: dict, field: str) -> str | None:
    value = message.get(field)
    if value is None:
        return None
    if not isinstance(value, str) or len(value) > 255:
        raise InvalidArgument(field, "must be a string of at most 255 characters")
    return value


def read_messages(messages, now_s: int) -> tuple[list[Incoming], list[dict]]:
    if not isinstance(messages, list):
        raise InvalidArgument("messages", f"must be a list of message objects, got {type(messages).__name__}")
    if len(messages) > MAX_MESSAGES:
        raise InvalidArgument("messages", f"holds {len(messages)} messages; at most {MAX_MESSAGES} per task")
    valid, rejected = [], []
    for index, message in enumerate(messages):
        try:
            if not isinstance(message, dict):
                raise InvalidArgument("messages[]", f"must be an object, got {type(message).__name__}")
            unknown = set(message) - _OPTIONAL - {"raw"}
            if unknown:
                raise InvalidArgument(sorted(unknown)[0], "is not a field of a message")
            if "raw" not in message:
                raise InvalidArgument("raw", "is required")
            received = message.get("received_at")
            received_s = to_seconds(parse_time("received_at", received)) if received is not None else None
            provider_id = _optional_text(message, "provider_id")
            provider_thread_id = _optional_text(message, "provider_thread_id")
            parsed = parse(decode_raw(message["raw"]))
        except (InvalidArgument, Unusable) as exc:
            rejected.append({"index": index, "error": str(exc)})
            continue
        date_s = parsed.date_s if parsed.date_s is not None else (received_s if received_s is not None else now_s)
        valid.append(Incoming(index, parsed, date_s, provider_id, provider_thread_id))
    return valid, rejected


# -- 1. place: which stored message, or which key, each message is -------------------------

@dataclasses.dataclass
class Stored:
    """A stored message that an incoming one may be a copy of."""
    meeting_id: int
    message_key: str
    base_key: str
    from_address: str | None
    date_s: int
    fingerprint: str | None  # None: stored before fingerprints
    in_mailbox: bool = False  # already read from the mailbox being ingested


@dataclasses.dataclass
class Placed:
    """Where one incoming message goes: ``copy`` of a stored message, or new under
    ``key`` (on a record's meeting row ``record_id`` when a record holds the key)."""
    message: Incoming
    key: str
    copy: Stored | None = None
    record_id: int | None = None
    meeting_id: int = 0


def _is_copy(stored: Stored, m: Incoming) -> bool:
    """The same message: the same key and the same content.  A message stored before
    fingerprints were kept merges only with a re-read from a mailbox that holds it
    already, which makes nothing visible to anyone new."""
    if stored.fingerprint is not None:
        return stored.fingerprint == m.parsed.fingerprint
    return stored.in_mailbox and stored.from_address == m.parsed.from_address and (
        m.parsed.date_s is None or stored.date_s == m.date_s)


def _chunks(values, size=500):
    values = sorted(values)
    for start in range(0, len(values), size):
        yield values[start:start + size]


class _Keys:
    """The keys of one installation that a chunk's messages meet: stored messages by
    base key, the keys taken by stored messages and meeting records, and the keys that a
    new ``key#n`` may not take, read from the database as needed."""

    def __init__(self, conn, installation_id: int, user_id: int, chunk: list[Incoming]):
        self.conn, self.installation_id = conn, installation_id
        bases = {m.parsed.base_key for m in chunk}
        e = emails.c
        self.stored: dict[str, list[Stored]] = {b: [] for b in bases}
        self.email_keys: set[str] = set()
        for part in _chunks(bases):
            for row in conn.execute(sa.select(e.meeting_id, e.message_key, e.base_key, e.from_address, e.date_s,
                                              e.fingerprint)
                                    .where(e.installation_id == installation_id, e.base_key.in_(part))
                                    .order_by(e.message_key)):
                self.stored[row.base_key].append(Stored(*row))
            self.email_keys.update(conn.execute(sa.select(e.message_key).where(
                e.installation_id == installation_id, e.message_key.in_(part))).scalars())
        legacy = {s.meeting_id: s for found in self.stored.values() for s in found if s.fingerprint is None}
        for part in _chunks(legacy):
            for meeting_id in conn.execute(sa.select(email_mailboxes.c.meeting_id).where(
                    email_mailboxes.c.meeting_id.in_(part), email_mailboxes.c.user_id == user_id)).scalars():
                legacy[meeting_id].in_mailbox = True
        # Meeting rows under the chunk's keys (a record's, or a stored message's).
        self.meetings: dict[str, int] = {}
        for part in _chunks(bases):
            self.meetings.update(conn.execute(sa.select(meetings.c.source_id, meetings.c.id).where(
                meetings.c.installation_id == installation_id, meetings.c.source_id.in_(part))).all())
        # A message's own id is its key whenever that is free: no ``key#n`` takes the id
        # of another message of the chunk.
        self.reserved = set(bases)
        self._suffixed: dict[str, set[str]] = {}

    def place(self, m: Incoming) -> Placed:
        base = m.parsed.base_key
        known = self.stored[base]
        same = next((s for s in known if _is_copy(s, m)), None)
        if same is not None:
            return Placed(m, same.message_key, copy=same)
        if base not in self.email_keys:
            placed = Placed(m, base, record_id=self.meetings.get(base))
        else:
            placed = Placed(m, self._free_variant(base))
        self.email_keys.add(placed.key)
        known.append(Stored(0, placed.key, base, m.parsed.from_address, m.date_s, m.parsed.fingerprint, True))
        return placed

    def _free_variant(self, base: str) -> str:
        """The first ``base#n`` (n >= 2) that is not a stored message's key, a deleted
        message's, an id a stored message names, a meeting record's ``source_id``, or
        the id of another message of the chunk."""
        taken = self._suffixed.get(base)
        if taken is None:
            taken = set()
            prefix = base + "#"
            i = self.installation_id
            for column, where in ((emails.c.message_key, emails.c.installation_id == i),
                                  (meetings.c.source_id, meetings.c.installation_id == i),
                                  (retired_keys.c.message_key, retired_keys.c.installation_id == i),
                                  (email_refs.c.ref_key, email_refs.c.installation_id == i)):
                taken.update(self.conn.execute(sa.select(column).distinct().where(
                    where, column.startswith(prefix, autoescape=True))).scalars())
            self._suffixed[base] = taken
        n = 2
        while f"{base}#{n}" in taken or f"{base}#{n}" in self.reserved:
            n += 1
        key = f"{base}#{n}"
        if len(key) > MAX_SOURCE_ID:
            raise Unusable("Message-ID: too many other messages were stored under this id")
        taken.add(key)
        return key


def place(conn, installation_id: int, user_id: int, chunk: list[Incoming]) -> tuple[list[Placed], list[dict]]:
    """Each message of ``chunk`` placed, in chunk order (a later copy of an earlier new
    message is its copy); and those that cannot be placed, rejected."""
    book = _Keys(conn, installation_id, user_id, chunk)
    placed, rejected = [], []
    for m in chunk:
        try:
            placed.append(book.place(m))
        except Unusable as exc:
            rejected.append({"index": m.index, "error": str(exc)})
    new = [p for p in placed if p.copy is None and p.record_id is None]
    for p, target in zip(new, free_ids(conn, installation_id, [p.key for p in new])):
        p.meeting_id = target
    for p in placed:
        if p.record_id is not None:
            p.meeting_id = p.record_id
    # A copy of a message that is new in this chunk takes that message's meeting id.
    by_key = {p.key: p.meeting_id for p in placed if p.copy is None}
    for p in placed:
        if p.copy is not None:
            p.meeting_id = p.copy.meeting_id or by_key[p.key]
    return placed, rejected


# -- 2. insert, 3. remember the mailbox, 4. thread ----------------------------------------

def _insert(conn, installation_id: int, user_id: int, new: list[Placed]) -> list:
    """The rows of the messages new to the store (their meeting rows are written by
    materialize, once their links and thread are known; a record's row is left as it
    is).  Returns their thread edges."""
    email_rows, participant_rows, edges = [], [], []
    for p in new:
        m, parsed = p.message, p.message.parsed
        email_rows.append({"meeting_id": p.meeting_id, "installation_id": installation_id, "message_key": p.key,
                           "base_key": parsed.base_key, "from_address": parsed.from_address, "date_s": m.date_s,
                           "thread_id": "", "subject_key": parsed.subject_key, "threading": bool(parsed.refs),
                           "participants": json.dumps([list(x) for x in parsed.participants], ensure_ascii=False),
                           "fingerprint": parsed.fingerprint, "by_record": p.record_id is not None})
        participant_rows += [{"installation_id": installation_id, "meeting_id": p.meeting_id, "position": i,
                              "role": role, "address": address, "domain": domain_of(address)}
                             for i, (role, address, _name) in enumerate(parsed.participants)]
        weak = [] if parsed.refs else [n for n in (
            threads.subject_node(parsed.subject_key, parsed.participants, m.date_s),
            threads.provider_node(user_id, m.provider_thread_id)) if n]
        edges.append((p.meeting_id, p.key, parsed.refs, weak))
    for table, rows in ((emails, email_rows), (email_participants, participant_rows)):
        if rows:
            conn.execute(table.insert(), rows)
    return edges


def _remember_mailbox(conn, installation_id: int, user_id: int, placed: list[Placed]) -> list:
    """Record that each message was read from this mailbox.  Returns the provider thread
    hints ([(meeting_id, key, node)]) that stored messages take from it."""
    present = set()
    for part in _chunks({p.meeting_id for p in placed}):
        present.update(conn.execute(sa.select(email_mailboxes.c.meeting_id).where(
            email_mailboxes.c.meeting_id.in_(part), email_mailboxes.c.user_id == user_id)).scalars())
    inserts = {}
    for p in placed:
        if p.meeting_id not in present and p.meeting_id not in inserts:
            inserts[p.meeting_id] = (p, {"installation_id": installation_id, "meeting_id": p.meeting_id,
                                         "user_id": user_id, "provider_id": p.message.provider_id,
                                         "provider_thread_id": p.message.provider_thread_id})
    if inserts:
        conn.execute(email_mailboxes.insert(), [row for _, row in inserts.values()])
    # A stored message read from one more mailbox takes that mailbox's provider thread hint.
    return [(meeting_id, p.key, threads.provider_node(user_id, row["provider_thread_id"]))
            for meeting_id, (p, row) in sorted(inserts.items())
            if p.copy is not None and p.copy.meeting_id and row["provider_thread_id"]]


def _store_chunk(conn, installation_id: int, user_id: int, chunk: list[Incoming], now_us: int):
    """Returns ({"new", "duplicates", "rejected"}, meeting ids whose rows changed)."""
    lock_installation(conn, installation_id)
    placed, rejected = place(conn, installation_id, user_id, chunk)
    new = [p for p in placed if p.copy is None]
    edges = _insert(conn, installation_id, user_id, new)
    hints = _remember_mailbox(conn, installation_id, user_id, placed)
    thread_of, left = {}, set()
    if edges or hints:
        start = threads.link_new(conn, installation_id, edges, hints)
        thread_of, left = threads.recompute(conn, installation_id, start)
    # 5. derive: the new messages' meeting rows complete; the stored ones re-derived.
    fresh = {}
    for p in new:
        if p.record_id is None:
            row = {"id": p.meeting_id, "installation_id": installation_id, "source_id": p.key, "client_id": 0,
                   "type": "email", "status": "inbound", "meeting_s": p.message.date_s,
                   "updated_s": now_us // 1_000_000, "updated_us": now_us, "subject": p.message.parsed.subject,
                   "details": "{}", "reach": None}
            fresh[p.meeting_id] = Fresh(row, p.message.parsed.participants, p.message.parsed.from_address,
                                        thread_of[p.meeting_id], user_id)
    touched = {p.meeting_id for p in placed} | set(thread_of)
    changed = materialize(conn, installation_id, touched, now_us, fresh=fresh)
    # 6. the state of every thread the chunk touched (new messages, mailboxes, re-threading).
    thread_state.refresh(conn, installation_id, thread_state.threads_of(conn, touched) | left)
    return {"new": len(new), "duplicates": len(placed) - len(new), "rejected": rejected}, changed


def _store_or_isolate(store, installation_id: int, write_id: str, chunk: list[Incoming]) -> list[dict]:
    """``store(write_id, chunk)``; when the database refuses the chunk, each message is
    tried alone (write ids ``<write_id>.<k>``), so that only the one that cannot be stored
    is rejected.  Returns each write's result."""
    try:
        return [store(write_id, chunk)]
    except _REFUSED as exc:
        log.warning("installation %d: a chunk of %d messages was refused (%s); storing them one by one",
                    installation_id, len(chunk), exc.__class__.__name__)
    results = []
    for k, m in enumerate(chunk):
        try:
            results.append(store(f"{write_id}.{k}", [m]))
        except _REFUSED as alone:
            results.append({"new": 0, "duplicates": 0, "rejected": [{
                "index": m.index, "error": f"raw: the message could not be stored ({alone.__class__.__name__})"}]})
    return results


def _stored_ids(conn, installation_id: int, chunk: list[Incoming]) -> list[int]:
    """The meetings of the stored messages under the chunk's keys (for a redelivery)."""
    return list(conn.execute(sa.select(emails.c.meeting_id).where(
        emails.c.installation_id == installation_id,
        emails.c.base_key.in_(sorted({m.parsed.base_key for m in chunk})))).scalars())


def ingest_emails(ctx, installation_id, mailbox_user_id, messages, task_id: str | None = None,
                  now_us: int | None = None) -> dict:
    """``crm.ingest_emails``: read, place and store the messages in chunks of ``CHUNK``, each
    one write of the task; returns the contract's counts and rejections."""
    installation_id = positive_int("installation_id", installation_id)
    mailbox_user_id = positive_int("mailbox_user_id", mailbox_user_id)
    return store_messages(ctx, installation_id, mailbox_user_id, messages,
                          new_write_id(task_id, "crm.ingest_emails", installation_id), now_us)


def store_messages(ctx, installation_id: int, mailbox_user_id: int, messages, base_write_id: str,
                   now_us: int | None = None, in_transaction=None) -> dict:
    """Store ``messages`` (``crm.ingest_emails``'s form) read from ``mailbox_user_id``'s
    mailbox, in chunks of ``CHUNK``, each one write ``<base_write_id>:e<n>``.
    ``in_transaction(conn, part)``, when given, runs in the transaction of each stored part
    (a list of :class:`Incoming`, whose ``index`` is the position in ``messages``): the
    mailbox sync advances its checkpoint there.  Returns the contract's counts and
    rejections."""
    now_us = int(time.time() * 1_000_000) if now_us is None else now_us
    valid, rejected = read_messages(messages, now_us // 1_000_000)
    token = writer_token(ctx, installation_id)
    writer = locking(ctx.engine)
    counts = {"new": 0, "duplicates": 0}

    def store(write_id: str, part: list[Incoming]) -> dict:
        """Store ``part`` as one write; index what it changed."""
        changed: list = []

        def write(conn):
            result, ids = _store_chunk(conn, installation_id, mailbox_user_id, part, now_us)
            if in_transaction is not None:
                in_transaction(conn, part)
            changed[:] = ids
            return result
        result, applied = run_transaction(writer, lambda conn: once(conn, write_id, installation_id, write),
                                          retry_duplicates=True)
        if not applied:
            # A redelivery: stored already; make sure the index holds the rows as they are.
            with ctx.engine.connect() as conn:
                changed[:] = _stored_ids(conn, installation_id, part)
        ctx.mirror.write(installation_id, lambda t: sync_ids(ctx, installation_id, t, changed, write_id), token)
        return result

    for n, start in enumerate(range(0, len(valid), CHUNK)):
        chunk = valid[start:start + CHUNK]
        for result in _store_or_isolate(store, installation_id, f"{base_write_id}:e{n}", chunk):
            for k in counts:
                counts[k] += result[k]
            rejected += result.get("rejected", [])
    rejected.sort(key=lambda r: r["index"])
    accepted = len(messages) - len(rejected)
    metrics.count(ctx.redis, {"email:accepted": accepted, "email:rejected": len(rejected)})
    return {"accepted": accepted, "new": counts["new"], "duplicates": counts["duplicates"], "rejected": rejected}
