"""``crm.ingest_emails``: raw messages from one user's mailbox, stored once each.

Per chunk of messages, in one transaction under the installation's email lock: find each
message's stored copy by key (a same-id message with another From or Date is another
message, ``key#n``), store the new ones (message, participants, references, meeting row),
remember the mailbox, recompute the threads they touch, and derive links, direction and
visibility (links.py).  Then, under the rows' locks, the index receives every meeting row
the chunk changed (worker/mirror.py).  Each chunk is recorded as a write of its task: a
redelivered task applies none twice.
"""
from __future__ import annotations

import dataclasses
import json
import time

import sqlalchemy as sa

from worker import metrics
from worker.db import locking, run_transaction
from worker.email import threads
from worker.email.addresses import domain_of
from worker.email.links import Fresh, lock_installation, materialize
from worker.email.parse import Parsed, Unusable, decode_raw, parse
from worker.email.tables import email_mailboxes, email_participants, emails
from worker.errors import InvalidArgument
from worker.ingest import free_ids
from worker.mirror import new_write_id, once, sync_ids
from worker.records import parse_time, positive_int, to_seconds

MAX_MESSAGES = 500
CHUNK = 100
_OPTIONAL = {"provider_id", "provider_thread_id", "received_at"}


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


def _same_message(stored, m: Incoming) -> bool:
    return stored.from_address == m.parsed.from_address and (
        m.parsed.date_s is None or stored.date_s == m.date_s)


def _store_chunk(conn, installation_id: int, user_id: int, chunk: list[Incoming], now_us: int):
    """Returns ({"new", "duplicates"}, meeting ids whose rows changed)."""
    lock_installation(conn, installation_id)
    bases = sorted({m.parsed.base_key for m in chunk})
    variants: dict[str, list] = {}
    for row in conn.execute(sa.select(emails.c.meeting_id, emails.c.message_key, emails.c.base_key,
                                      emails.c.from_address, emails.c.date_s)
                            .where(emails.c.installation_id == installation_id, emails.c.base_key.in_(bases))
                            .order_by(emails.c.message_key)):
        variants.setdefault(row.base_key, []).append(row)
    new_count = duplicates = 0
    mailbox_rows, new_edges = [], []
    fresh = []  # (message, key) of the messages new to the store, in chunk order
    for m in chunk:
        p = m.parsed
        known = variants.setdefault(p.base_key, [])
        same = next((v for v in known if _same_message(v, m)), None)
        if same is not None:
            duplicates += 1
            mailbox_rows.append((same, m))
            continue
        new_count += 1
        variant = _Variant(0, p.base_key if not known else f"{p.base_key}#{len(known) + 1}", p.base_key,
                           p.from_address, m.date_s)
        known.append(variant)
        fresh.append((m, variant))
        mailbox_rows.append((variant, m))
    ids = free_ids(conn, installation_id, [v.message_key for _, v in fresh])
    meeting_rows, email_rows, participant_rows = [], [], []
    for (m, variant), target in zip(fresh, ids):
        p = m.parsed
        variant.meeting_id = target
        meeting_rows.append({"id": target, "installation_id": installation_id, "source_id": variant.message_key,
                             "client_id": 0, "type": "email", "status": "inbound", "meeting_s": m.date_s,
                             "updated_s": now_us // 1_000_000, "updated_us": now_us, "subject": p.subject,
                             "details": "{}", "reach": None})
        email_rows.append({"meeting_id": target, "installation_id": installation_id, "message_key": variant.message_key,
                           "base_key": p.base_key, "from_address": p.from_address, "date_s": m.date_s,
                           "thread_id": "", "subject_key": p.subject_key, "threading": bool(p.refs),
                           "participants": json.dumps([list(x) for x in p.participants], ensure_ascii=False)})
        participant_rows += [{"installation_id": installation_id, "meeting_id": target, "position": i, "role": role,
                              "address": address, "domain": domain_of(address)}
                             for i, (role, address, _name) in enumerate(p.participants)]
        weak = [] if p.refs else [n for n in (threads.subject_node(p.subject_key, p.participants, m.date_s),
                                             threads.provider_node(user_id, m.provider_thread_id)) if n]
        new_edges.append((target, variant.message_key, p.refs, weak))
    # The meeting rows are written by materialize, once their links and thread are known.
    for table, rows in ((emails, email_rows), (email_participants, participant_rows)):
        if rows:
            conn.execute(table.insert(), rows)
    key_of = {v.meeting_id: v.message_key for v, _ in mailbox_rows}
    mailbox_rows = [(v.meeting_id, m) for v, m in mailbox_rows]
    touched = {t for t, _ in mailbox_rows}
    present = set()
    ids = sorted({t for t, _ in mailbox_rows})
    for start in range(0, len(ids), 500):
        present.update(conn.execute(sa.select(email_mailboxes.c.meeting_id).where(
            email_mailboxes.c.meeting_id.in_(ids[start:start + 500]), email_mailboxes.c.user_id == user_id)).scalars())
    inserts = {}
    for target, m in mailbox_rows:
        if target not in present and target not in inserts:
            inserts[target] = {"installation_id": installation_id, "meeting_id": target, "user_id": user_id,
                               "provider_id": m.provider_id, "provider_thread_id": m.provider_thread_id}
    if inserts:
        conn.execute(email_mailboxes.insert(), list(inserts.values()))
    # A stored message read from one more mailbox takes that mailbox's provider thread hint.
    fresh_ids = {v.meeting_id for _, v in fresh}
    hints = [(target, key_of[target], threads.provider_node(user_id, row["provider_thread_id"]))
             for target, row in sorted(inserts.items()) if target not in fresh_ids and row["provider_thread_id"]]
    thread_of = {}
    if new_edges or hints:
        start = threads.link_new(conn, installation_id, new_edges, hints)
        thread_of = threads.recompute(conn, installation_id, start)
        touched |= set(thread_of)
    fresh_rows = {}
    for row, (m, variant) in zip(meeting_rows, fresh):
        fresh_rows[row["id"]] = Fresh(row, m.parsed.participants, m.parsed.from_address, thread_of[row["id"]], user_id)
    changed = materialize(conn, installation_id, touched, now_us, fresh=fresh_rows)
    return {"new": new_count, "duplicates": duplicates}, changed


@dataclasses.dataclass
class _Variant:
    meeting_id: int
    message_key: str
    base_key: str
    from_address: str | None
    date_s: int


def ingest_emails(ctx, installation_id, mailbox_user_id, messages, task_id: str | None = None,
                  now_us: int | None = None) -> dict:
    installation_id = positive_int("installation_id", installation_id)
    mailbox_user_id = positive_int("mailbox_user_id", mailbox_user_id)
    now_us = int(time.time() * 1_000_000) if now_us is None else now_us
    valid, rejected = read_messages(messages, now_us // 1_000_000)
    token = ctx.mirror.writer_token(installation_id)
    writer = locking(ctx.engine)
    base = new_write_id(task_id, "crm.ingest_emails", installation_id)
    counts = {"new": 0, "duplicates": 0}
    for n, start in enumerate(range(0, len(valid), CHUNK)):
        chunk = valid[start:start + CHUNK]
        write_id = f"{base}:e{n}"
        changed: list = []

        def write(conn):
            result, ids = _store_chunk(conn, installation_id, mailbox_user_id, chunk, now_us)
            changed[:] = ids
            return result
        result, applied = run_transaction(writer, lambda conn: once(conn, write_id, installation_id, write),
                                          retry_duplicates=True)
        for k in counts:
            counts[k] += result[k]
        if not applied:
            # A redelivery: stored already; make sure the index holds the rows as they are.
            with ctx.engine.connect() as conn:
                changed = list(conn.execute(sa.select(emails.c.meeting_id).where(
                    emails.c.installation_id == installation_id,
                    emails.c.base_key.in_(sorted({m.parsed.base_key for m in chunk})))).scalars())
        ctx.mirror.write(installation_id, lambda t: sync_ids(ctx, installation_id, t, changed, write_id), token)
    metrics.count(ctx.redis, {"email:accepted": len(valid), "email:rejected": len(rejected)})
    return {"accepted": len(valid), "new": counts["new"], "duplicates": counts["duplicates"], "rejected": rejected}
