"""Email trust, thought of as an attacker who can mail any user of an installation:

- no message content fails its batch (colliding keys: literal ``#n`` ids, deleted variants,
  ids equal to a meeting record's ``source_id``; anything else a message may hold);
- a forged copy (a known Message-ID, From and Date) never gains the original's
  visibility: copies merge only when key and content fingerprint agree;
- a meeting record that replaced an email is never turned back by email logic;
- and the neighbours found with them: one-day report ranges, write ids of another
  installation or task, rebuilds that overtake each other.

Each case runs through a real worker, by task name, as a web app sends it; the key
allocation also under hypothesis, against an oracle of what must be stored.
"""
from __future__ import annotations

import base64
import threading
import time

import pytest
import sqlalchemy as sa
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.conftest import make_context, wipe
from tests.helpers import assert_index_matches, assert_thread_state_matches, call, record
from worker.tables import email_mailboxes, emails, installations, meetings
from worker.email import directory
from worker.email import ingest as email_ingest
from worker.ingest import delete, ingest

I = 1
CLIENTS = [{"client_id": 1, "name": "Acme", "domains": ["acme.com"]},
           {"client_id": 2, "name": "Beta", "domains": ["beta.com"]},
           {"client_id": 3, "name": "Gamma", "domains": ["gamma.org"]}]
USERS = [{"user_id": u, "name": f"User {u}", "emails": [f"u{u}@ours.com"]} for u in (12, 13, 14)]
#: Users holding one client each, and none (they see only their own mailbox).
VIEWERS = {21: [1], 22: [2], 23: [3]}
DATE = "Mon, 02 Jan 2023 10:00:00 +0000"


def raw(message_id, sender, subject="s", date=DATE, to="u12@ours.com", body="hello", trace=(), cc=None,
        eol="\r\n") -> bytes:
    headers = list(trace)
    if message_id is not None:
        headers.append(f"Message-ID: <{message_id}>")
    headers.append(f"From: {sender}")
    headers.append(f"To: {to}")
    if cc is not None:
        headers.append(f"Cc: {cc}")
    if subject is not None:
        headers.append(f"Subject: {subject}")
    if date is not None:
        headers.append(f"Date: {date}")
    return (eol.join(headers) + eol + eol + body.replace("\n", eol)).encode()


def b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).decode().rstrip("=")


def msg(*args, **kwargs) -> dict:
    return {"raw": b64(raw(*args, **kwargs))}


def setup_world(webapp):
    assert call(webapp, "crm.upsert_clients", installation_id=I, clients=CLIENTS)["rejected"] == []
    assert call(webapp, "crm.upsert_users", installation_id=I, users=USERS)["rejected"] == []
    for user, clients in VIEWERS.items():
        call(webapp, "crm.set_user_clients", installation_id=I, user_id=user, client_ids=clients)


def stored_keys(engine) -> dict[str, str]:
    """message key -> subject key of every stored message."""
    with engine.connect() as conn:
        return dict(conn.execute(sa.select(emails.c.message_key, emails.c.subject_key)).all())


def seen_by(webapp, user) -> dict[str, dict]:
    page = call(webapp, "crm.query_meetings", installation_id=I, user_id=user, limit=200)
    assert page["total"] == len(page["items"])
    return {item["source_id"]: item for item in page["items"]}


# -- 1. no message content fails its batch ------------------------------------------------

@pytest.mark.parametrize("arrangement", ["one batch", "literal first", "literal last, separate batches"])
def test_a_literal_suffixed_id_never_collides_with_an_allocated_variant(worker_env, arrangement):
    engine, r, webapp = worker_env
    setup_world(webapp)
    p = msg("d@x", "p@acme.com", subject="from p")
    q = msg("d@x", "q@acme.com", subject="from q")
    literal = msg("d@x#2", "z@beta.com", subject="literal")
    batches = {"one batch": [[p, q, literal]], "literal first": [[literal], [p, q]],
               "literal last, separate batches": [[p], [q], [literal]]}[arrangement]
    for batch in batches:
        got = call(webapp, "crm.ingest_emails", installation_id=I, mailbox_user_id=12, messages=batch)
        assert got["rejected"] == [] and got["new"] == len(batch)
    keys = stored_keys(engine)
    assert sorted(keys.values()) == ["from p", "from q", "literal"]
    assert keys["d@x"] == "from p"
    # The literal id keeps its own key whenever it is free when it arrives.
    if arrangement != "literal last, separate batches":
        assert keys["d@x#2"] == "literal"
    assert_index_matches(engine, r, I)
    assert_thread_state_matches(engine, I)


def test_a_deleted_variants_key_is_never_given_again(worker_env):
    engine, r, webapp = worker_env
    setup_world(webapp)
    senders = ["p@acme.com", "q@acme.com", "s@acme.com"]
    call(webapp, "crm.ingest_emails", installation_id=I, mailbox_user_id=12,
         messages=[msg("v@x", s, subject=s) for s in senders])
    assert sorted(stored_keys(engine)) == ["v@x", "v@x#2", "v@x#3"]
    assert call(webapp, "crm.delete_meetings", installation_id=I, source_ids=["v@x#2"]) == {"deleted": 1}
    got = call(webapp, "crm.ingest_emails", installation_id=I, mailbox_user_id=12,
               messages=[msg("v@x", "t@acme.com", subject="fourth")])
    assert got["rejected"] == [] and got["new"] == 1
    keys = stored_keys(engine)
    assert keys == {"v@x": "p@acme.com", "v@x#3": "s@acme.com", "v@x#4": "fourth"}
    assert_index_matches(engine, r, I)
    assert_thread_state_matches(engine, I)


def test_an_email_whose_key_is_a_meeting_records_source_id_is_stored_beside_it(worker_env):
    engine, r, webapp = worker_env
    setup_world(webapp)
    call(webapp, "crm.ingest_meetings", records=[record(installation_id=I, source_id="k1@x", client_id=2,
                                                       type="call", status="done", subject="the call")])
    got = call(webapp, "crm.ingest_emails", installation_id=I, mailbox_user_id=12, messages=[
        msg("ok1@x", "p@acme.com"), msg("k1@x", "p@acme.com", subject="an email"), msg("ok2@x", "p@acme.com")])
    assert got == {"accepted": 3, "new": 3, "duplicates": 0, "rejected": []}
    # The record decides what the meeting is and who sees it.
    assert seen_by(webapp, 22)["k1@x"]["type"] == "call"
    assert "k1@x" not in seen_by(webapp, 21) and "k1@x" not in seen_by(webapp, 12)
    assert {"ok1@x", "ok2@x"} <= set(seen_by(webapp, 21))
    assert_index_matches(engine, r, I)
    assert_thread_state_matches(engine, I)


def test_a_message_that_cannot_be_stored_is_rejected_alone(clean):
    """Whatever makes one message's rows fail in the database (here: a unique key taken
    behind the service's back, as a concurrent writer or an unforeseen collision
    would) rejects that message alone, field first, never with SQL text."""
    from worker.records import meeting_id
    ctx = clean
    directory.upsert_clients(ctx, I, CLIENTS)
    with ctx.engine.begin() as conn:
        # A stray email row holding the id that "taken@x" derives, with no meeting behind
        # it: the store sees the id as free, and its insert of the message fails.
        conn.execute(emails.insert().values(meeting_id=meeting_id(I, "taken@x"), installation_id=I,
                                            message_key="stray@x", base_key="stray@x", from_address=None, date_s=0,
                                            thread_id="t", subject_key=None, threading=False, participants="[]"))
    got = email_ingest.ingest_emails(ctx, I, 12, [{"raw": b64(raw("a@x", "p@acme.com"))},
                                           {"raw": b64(raw("taken@x", "p@acme.com"))},
                                           {"raw": b64(raw("b@x", "p@acme.com"))}])
    assert got["accepted"] == 2 and got["new"] == 2
    assert [r["index"] for r in got["rejected"]] == [1]
    error = got["rejected"][0]["error"]
    assert error.startswith("raw: ") and "INSERT" not in error and "Duplicate" not in error
    assert set(stored_keys(ctx.engine)) == {"a@x", "b@x", "stray@x"}


# The property: adversarial ids, meeting records and deletes in any order and batching.

IDS = ["a@x", "a@x#2", "a@x#3", "a@x#2#2", "b@x"]
SENDERS = ["p@acme.com", "q@acme.com", "r@beta.com"]
Step = st.one_of(
    st.tuples(st.just("mail"), st.sampled_from([12, 13]),
              st.lists(st.tuples(st.sampled_from(IDS), st.sampled_from(SENDERS), st.integers(0, 2)),
                       min_size=1, max_size=6)),
    st.tuples(st.just("record"), st.sampled_from(IDS), st.integers(1, 3)),
    st.tuples(st.just("delete"), st.integers(0, 30)),
)


@settings(max_examples=40, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(steps=st.lists(Step, min_size=1, max_size=12))
def test_property_every_valid_message_is_stored_exactly_once(engine, redis_client, steps):
    """A message is (id, sender, body); the same one may be read from both mailboxes.  In
    any order and batching, with meeting records of the same ids and deletes in between:
    no call fails, nothing is rejected, and the store holds each message read since it
    was last deleted exactly once (records keep their own fields)."""
    wipe(engine, redis_client)
    ctx = make_context(engine, redis_client)
    directory.upsert_clients(ctx, I, CLIENTS)
    live = set()     # the messages that must be stored once each: (id, sender, body)
    records = {}     # source_id -> the record's client
    version = 0
    for step in steps:
        if step[0] == "mail":
            _, user, batch = step
            payload = [{"raw": b64(raw(i, s, subject=f"{i}|{s}|{b}", body=f"body {b}"))} for i, s, b in batch]
            got = email_ingest.ingest_emails(ctx, I, user, payload)
            assert got["rejected"] == [] and got["accepted"] == len(batch)
            live |= set(batch)
        elif step[0] == "record":
            _, source_id, client = step
            version += 1
            got = ingest(ctx, [record(installation_id=I, source_id=source_id, client_id=client, type="call",
                                      status="done", updated_at=f"2030-01-01T00:00:{version:02d}Z")])
            assert got["rejected"] == []
            records[source_id] = client
        else:
            with engine.connect() as conn:
                stored = sorted(conn.execute(sa.select(meetings.c.source_id)
                                             .where(meetings.c.installation_id == I)).scalars())
            if not stored:
                continue
            victim = stored[step[1] % len(stored)]
            with engine.connect() as conn:
                gone = conn.execute(sa.select(emails.c.subject_key).where(emails.c.message_key == victim)).scalar()
            assert delete(ctx, I, [victim])["deleted"] == 1
            records.pop(victim, None)
            # The store no longer holds that message (its rows went with the meeting).
            live = {m for m in live if f"{m[0]}|{m[1]}|{m[2]}" != gone} if gone else live
    with engine.connect() as conn:
        rows = conn.execute(sa.select(emails.c.message_key, emails.c.subject_key, emails.c.meeting_id)).all()
        by_source = {s: (c, t) for s, c, t in conn.execute(
            sa.select(meetings.c.source_id, meetings.c.client_id, meetings.c.type)
            .where(meetings.c.installation_id == I))}
        meeting_ids = dict(conn.execute(sa.select(meetings.c.source_id, meetings.c.id)).all())
    labels = [subject for _, subject, _ in rows]
    assert len(labels) == len(set(labels)), "a message stored twice"
    assert set(labels) == {f"{i}|{s}|{b}" for i, s, b in live}
    for key, _subject, meeting_id in rows:
        assert meeting_ids[key] == meeting_id  # each stored message is the meeting of its key
    for source_id, client in records.items():
        assert by_source[source_id] == (client, "call"), source_id
    assert_index_matches(engine, redis_client, I)
    assert_thread_state_matches(engine, I)


HEADERS = [b"From", b"To", b"Cc", b"Reply-To", b"Subject", b"Date", b"Message-ID", b"In-Reply-To", b"References",
           b"Received", b"X-Gmail-Labels", b"from", b"MESSAGE-ID", b"Content-Type"]
PIECES = [b"<", b">", b"@", b",", b";", b":", b'"', b"\\", b" ", b"\t", b"\r\n ", b"\n", b"\r", b"\x00", b"\xff",
          b"\xc3\xa9", b"=?utf-8?b?", b"=?bogus?q?", b"?=", b"a@acme.com", b"<d@x>", b"<d@x#2>", b"#2", b"Re: ",
          b"Mon, 02 Jan 2023 10:00:00 +0000", b"\xf0\x9f\x92\xa5", b"x" * 300, b"(comment)", b"group:;"]
value_st = st.lists(st.sampled_from(PIECES) | st.binary(max_size=12), max_size=12).map(b"".join)
raw_st = st.builds(
    lambda headers, body, eol: eol.join(name + b": " + value for name, value in headers) + eol + eol + body,
    st.lists(st.tuples(st.sampled_from(HEADERS), value_st), min_size=1, max_size=10),
    st.binary(max_size=60), st.sampled_from([b"\r\n", b"\n"]))


@settings(max_examples=60, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(deliveries=st.lists(st.tuples(st.sampled_from([12, 13]), st.lists(raw_st, min_size=1, max_size=5)),
                           min_size=1, max_size=4))
def test_property_no_message_content_fails_its_batch(engine, redis_client, deliveries):
    """Hostile bytes in every header a message has (8-bit bytes, NULs, broken encoded
    words, bare CR and LF, brackets, colliding ids) and in its body: each message is
    stored or rejected alone, field first; the call never fails; the index mirrors the
    database."""
    wipe(engine, redis_client)
    ctx = make_context(engine, redis_client)
    directory.upsert_clients(ctx, I, CLIENTS)
    for user, batch in deliveries:
        got = email_ingest.ingest_emails(ctx, I, user, [{"raw": b64(m)} for m in batch])
        assert got["accepted"] + len(got["rejected"]) == len(batch)
        assert got["new"] + got["duplicates"] == got["accepted"]
        for rejection in got["rejected"]:
            assert rejection["error"].split(":", 1)[0] in ("raw", "Message-ID"), rejection
    assert_index_matches(engine, redis_client, I)
    assert_thread_state_matches(engine, I)


# -- 2. a forged copy never gains the original's visibility --------------------------------

@pytest.mark.parametrize("forged_date", [None, DATE])
def test_a_forged_copy_never_gains_the_originals_visibility(worker_env, forged_date):
    engine, r, webapp = worker_env
    setup_world(webapp)
    original = msg("dup@t3", "p@nowhere.example", subject="gamma confidential", to="u13@ours.com",
                   body="the numbers")
    call(webapp, "crm.ingest_emails", installation_id=I, mailbox_user_id=13, messages=[original])
    forged = msg("dup@t3", "p@nowhere.example", subject="hello", date=forged_date, body="hi")
    got = call(webapp, "crm.ingest_emails", installation_id=I, mailbox_user_id=12, messages=[forged])
    assert (got["new"], got["duplicates"]) == (1, 0)
    mine = seen_by(webapp, 12)
    assert set(mine) == {"dup@t3#2"} and mine["dup@t3#2"]["subject"] == "hello"
    assert {i["subject"] for i in seen_by(webapp, 13).values()} == {"gamma confidential"}
    # Not through a thread either.
    threads = call(webapp, "crm.query_threads", installation_id=I, user_id=12)
    assert [t["subject"] for t in threads["items"]] == ["hello"]
    for t in threads["items"]:
        thread = call(webapp, "crm.get_thread", installation_id=I, user_id=12, thread_id=t["thread_id"])
        assert {m["subject"] for m in thread["messages"]} == {"hello"}
    assert_index_matches(engine, r, I)
    assert_thread_state_matches(engine, I)


#: One field of the fingerprint changed (or missing where the original has it).
CHANGES = {"subject": {"subject": "s2"}, "body": {"body": "b2"}, "to": {"to": "u13@ours.com"},
           "cc": {"cc": "d@acme.com"}, "date": {"date": "Tue, 03 Jan 2023 10:00:00 +0000"},
           "from": {"sender": "q@acme.com"}, "subject missing": {"subject": None}, "cc missing": {"cc": None},
           "date missing": {"date": None}}


@pytest.mark.parametrize("change", sorted(CHANGES))
def test_any_difference_in_the_fingerprint_makes_another_message(clean, change):
    ctx = clean
    directory.upsert_clients(ctx, I, CLIENTS)
    base = dict(message_id="f@x", sender="p@acme.com", subject="s", to="u12@ours.com", body="b", cc="c@acme.com")
    email_ingest.ingest_emails(ctx, I, 13, [{"raw": b64(raw(**base))}])
    got = email_ingest.ingest_emails(ctx, I, 12, [{"raw": b64(raw(**{**base, **CHANGES[change]}))}])
    assert (got["new"], got["duplicates"]) == (1, 0)
    assert sorted(stored_keys(ctx.engine)) == ["f@x", "f@x#2"]
    with ctx.engine.connect() as conn:
        mailboxes = sorted(conn.execute(sa.select(emails.c.message_key, email_mailboxes.c.user_id)
                                        .join(email_mailboxes, email_mailboxes.c.meeting_id == emails.c.meeting_id)))
    assert mailboxes == [("f@x", 13), ("f@x#2", 12)]


def test_a_message_stored_before_fingerprints_merges_only_with_its_own_mailboxes(clean):
    """Without a fingerprint, nothing proves that a copy read from a new mailbox is the
    same message: it is stored as another one (a duplicate at worst, never a leak).  A
    re-read from a mailbox that holds it already makes nothing visible to anyone new."""
    ctx = clean
    directory.upsert_clients(ctx, I, CLIENTS)
    original = {"raw": b64(raw("old@x", "p@nowhere.example", subject="secret", to="u13@ours.com"))}
    email_ingest.ingest_emails(ctx, I, 13, [original])
    with ctx.engine.begin() as conn:
        conn.execute(emails.update().values(fingerprint=None))
    assert email_ingest.ingest_emails(ctx, I, 13, [original])["duplicates"] == 1
    forged = {"raw": b64(raw("old@x", "p@nowhere.example", subject="hi", date=None))}
    assert email_ingest.ingest_emails(ctx, I, 12, [forged])["new"] == 1
    assert email_ingest.ingest_emails(ctx, I, 12, [original])["new"] == 1
    with ctx.engine.connect() as conn:
        held = sorted(conn.execute(sa.select(emails.c.message_key, email_mailboxes.c.user_id)
                                   .join(email_mailboxes, email_mailboxes.c.meeting_id == emails.c.meeting_id)))
    assert held == [("old@x", 13), ("old@x#2", 12), ("old@x#3", 12)]


def test_true_copies_from_several_mailboxes_still_merge(worker_env):
    """Real multi-recipient copies differ only in per-mailbox trace headers (and, read
    through another store, in line endings and header folding)."""
    engine, r, webapp = worker_env
    setup_world(webapp)
    common = dict(message_id="multi@acme.com", sender="Pat <p@acme.com>", subject="Quarterly plan",
                  to="u12@ours.com, u13@ours.com", cc="u14@ours.com", body="Dear all,\nthe plan.\n")
    copies = {
        12: raw(**common, trace=["Delivered-To: u12@ours.com",
                                 "Received: from mx1.ours.com by mail.ours.com; Mon, 02 Jan 2023 10:00:03 +0000",
                                 "X-Gmail-Labels: Inbox,Important"]),
        13: raw(**common, trace=["Delivered-To: u13@ours.com", "Return-Path: <p@acme.com>",
                                 "Received: from mx2.ours.com by mail.ours.com; Mon, 02 Jan 2023 10:00:09 +0000",
                                 "X-Gmail-Labels: Inbox"], eol="\n"),
        14: raw(**{**common, "to": "u12@ours.com,\r\n u13@ours.com"},
                trace=["Delivered-To: u14@ours.com", "X-Original-To: u14@ours.com"]),
    }
    results = [call(webapp, "crm.ingest_emails", installation_id=I, mailbox_user_id=u, messages=[{"raw": b64(c)}])
               for u, c in copies.items()]
    assert [(g["new"], g["duplicates"]) for g in results] == [(1, 0), (0, 1), (0, 1)]
    assert sorted(stored_keys(engine)) == ["multi@acme.com"]
    with engine.connect() as conn:
        assert sorted(conn.execute(sa.select(email_mailboxes.c.user_id)).scalars()) == [12, 13, 14]
    for user in (12, 13, 14, 21):
        assert set(seen_by(webapp, user)) == {"multi@acme.com"}
    assert_index_matches(engine, r, I)
    assert_thread_state_matches(engine, I)


# -- 3. a meeting record that replaced an email is never turned back -------------------------

def _assert_the_record_decides(webapp, engine, r, date="2024-05-01T09:00:00Z"):
    item = seen_by(webapp, 22).get("r1@x")
    assert item is not None, "the record's client lost its meeting"
    assert (item["client_id"], item["type"], item["status"], item["meeting_date"]) == (2, "call", "done", date)
    for user in (12, 13, 21, 23):
        assert "r1@x" not in seen_by(webapp, user), user
    assert_index_matches(engine, r, I)
    assert_thread_state_matches(engine, I)


def test_a_meeting_record_that_replaced_an_email_is_never_turned_back(worker_env):
    engine, r, webapp = worker_env
    setup_world(webapp)
    email = msg("r1@x", "p@acme.com", subject="about the deal")
    call(webapp, "crm.ingest_emails", installation_id=I, mailbox_user_id=12, messages=[email])
    assert seen_by(webapp, 21)["r1@x"]["type"] == "email"
    call(webapp, "crm.ingest_meetings", records=[record(
        installation_id=I, source_id="r1@x", client_id=2, type="call", status="done",
        meeting_date="2024-05-01T09:00:00Z", updated_at="2030-01-01T00:00:00Z")])
    _assert_the_record_decides(webapp, engine, r)
    # Every path that derives an email's fields again:
    call(webapp, "crm.upsert_contacts", installation_id=I, contacts=[
        {"source_id": "pc", "name": "P", "emails": ["p@acme.com"], "client_id": 1}])
    _assert_the_record_decides(webapp, engine, r)
    call(webapp, "crm.ingest_emails", installation_id=I, mailbox_user_id=12, messages=[email])
    _assert_the_record_decides(webapp, engine, r)
    got = call(webapp, "crm.ingest_emails", installation_id=I, mailbox_user_id=13, messages=[email])
    assert got["duplicates"] == 1
    _assert_the_record_decides(webapp, engine, r)
    call(webapp, "crm.upsert_users", installation_id=I, users=[
        {"user_id": 15, "name": "P", "emails": ["p@acme.com"]}])
    _assert_the_record_decides(webapp, engine, r)
    call(webapp, "crm.upsert_clients", installation_id=I, clients=[
        {"client_id": 1, "name": "Acme", "domains": []}, {"client_id": 3, "name": "Gamma", "domains": ["acme.com"]}])
    _assert_the_record_decides(webapp, engine, r)
    # A reply re-threads it; a parent arriving late does too.
    call(webapp, "crm.ingest_emails", installation_id=I, mailbox_user_id=12, messages=[
        {"raw": b64(raw("reply@x", "u12@ours.com", to="p@acme.com").replace(
            b"Subject:", b"In-Reply-To: <r1@x>\r\nReferences: <r0@x> <r1@x>\r\nSubject:"))},
        msg("r0@x", "u12@ours.com", to="p@acme.com")])
    _assert_the_record_decides(webapp, engine, r)
    # The thread it belonged to is made of emails alone.
    threads = call(webapp, "crm.query_threads", installation_id=I, user_id=12)["items"]
    assert threads and all(t["messages"] == 2 for t in threads)
    call(webapp, "crm.rebuild_index", installation_id=I)
    _assert_the_record_decides(webapp, engine, r)


def test_a_record_first_then_its_email_leaves_the_record_as_it_is(worker_env):
    engine, r, webapp = worker_env
    setup_world(webapp)
    call(webapp, "crm.ingest_meetings", records=[record(
        installation_id=I, source_id="r1@x", client_id=2, type="call", status="done",
        meeting_date="2024-05-01T09:00:00Z")])
    got = call(webapp, "crm.ingest_emails", installation_id=I, mailbox_user_id=12,
               messages=[msg("r1@x", "p@acme.com")])
    assert (got["new"], got["duplicates"]) == (1, 0)
    _assert_the_record_decides(webapp, engine, r)
    got = call(webapp, "crm.ingest_emails", installation_id=I, mailbox_user_id=13,
               messages=[msg("r1@x", "p@acme.com")])
    assert (got["new"], got["duplicates"]) == (0, 1)
    _assert_the_record_decides(webapp, engine, r)
    # Another message under that id is another message.
    got = call(webapp, "crm.ingest_emails", installation_id=I, mailbox_user_id=12,
               messages=[msg("r1@x", "q@acme.com", subject="other")])
    assert got["new"] == 1 and "r1@x#2" in seen_by(webapp, 21)
    _assert_the_record_decides(webapp, engine, r)


# -- 4. activity counts each meeting once, whatever the range ------------------------------

@pytest.mark.parametrize("date_from,date_to,count", [
    ("2024-03-05T01:00:00Z", "2024-03-05T20:00:00Z", 1),   # inside one day
    ("2024-03-05T10:00:00Z", "2024-03-05T10:00:01Z", 1),   # one second
    ("2024-03-05T10:00:01Z", "2024-03-05T10:00:02Z", 0),
    ("2024-03-04T12:00:00Z", "2024-03-06T00:00:00Z", 1),   # ends at midnight
    ("2024-03-05T00:00:00Z", "2024-03-06T00:00:00Z", 1),   # one whole day
    ("2024-03-05T00:00:00Z", "2024-03-05T10:00:00Z", 0),
])
def test_activity_counts_a_meeting_once_in_any_range(worker_env, date_from, date_to, count):
    _engine, _r, webapp = worker_env
    call(webapp, "crm.set_user_clients", installation_id=I, user_id=7, client_ids=[1])
    call(webapp, "crm.ingest_meetings", records=[record(installation_id=I, source_id="c", client_id=1, type="call",
                                                       meeting_date="2024-03-05T10:00:00Z")])
    params = {"date_from": date_from, "date_to": date_to}
    got = call(webapp, "crm.report", installation_id=I, user_id=7, name="activity", params=params)
    assert sum(row["count"] for row in got["rows"]) == count
    assert call(webapp, "crm.query_meetings", installation_id=I, user_id=7, date_from=date_from,
                date_to=date_to)["total"] == count


# -- 5. a task id is a write of its task and installation only ------------------------------

def test_a_task_id_used_by_another_installation_or_task_is_not_a_redelivery(worker_env):
    engine, r, webapp = worker_env
    from celery.result import AsyncResult

    def once(name, task_id, **kwargs):
        result = call(webapp, name, task_id=task_id, **kwargs)
        AsyncResult(task_id, app=webapp).forget()  # a caller reusing an id clears its old result
        return result
    assert once("crm.set_user_clients", "shared-id", installation_id=1, user_id=7, client_ids=[1]) == \
        {"user_id": 7, "clients": 1}
    # Installation 2, the same task id: a call of its own.
    assert once("crm.set_user_clients", "shared-id", installation_id=2, user_id=7, client_ids=[1, 2, 3]) == \
        {"user_id": 7, "clients": 3}
    # Another task, the same id and installation: applied too.
    assert once("crm.grant_clients", "shared-id", installation_id=1, user_id=7, client_ids=[5]) == \
        {"user_id": 7, "clients": 2}
    call(webapp, "crm.ingest_meetings", records=[record(installation_id=i, source_id="m", client_id=1)
                                                 for i in (1, 2)])
    assert once("crm.delete_meetings", "del-id", installation_id=1, source_ids=["m"]) == {"deleted": 1}
    assert once("crm.delete_meetings", "del-id", installation_id=2, source_ids=["m"]) == {"deleted": 1}
    assert once("crm.upsert_clients", "up-id", installation_id=1, clients=[CLIENTS[0]])["accepted"] == 1
    assert once("crm.upsert_clients", "up-id", installation_id=2, clients=[CLIENTS[0]])["accepted"] == 1
    from worker.tables import clients
    with engine.connect() as conn:
        assert sorted(conn.execute(sa.select(clients.c.installation_id)).scalars()) == [1, 2]
        assert conn.execute(sa.select(sa.func.count()).select_from(meetings)).scalar() == 0
    # The same call delivered again is still applied once.
    assert once("crm.grant_clients", "shared-id", installation_id=1, user_id=7, client_ids=[6]) == \
        {"user_id": 7, "clients": 2}
    for installation_id in (1, 2):
        assert_index_matches(engine, r, installation_id)


# -- 6. a rebuild overtaken by another ends normally -----------------------------------------

def test_rebuilds_sent_at_once_end_normally_and_the_latest_is_published(worker_env):
    engine, r, webapp = worker_env
    from tests.helpers import Oracle, ids_of, query
    from worker import keys
    records = [record(installation_id=I, source_id=f"m{n:05d}", client_id=1 + n % 7,
                      meeting_date=f"2024-01-{1 + n % 28:02d}T10:00:00Z") for n in range(3000)]
    oracle = Oracle()
    for start in range(0, len(records), 1000):
        call(webapp, "crm.ingest_meetings", records=records[start:start + 1000])
    oracle.ingest(records, 0)
    call(webapp, "crm.set_user_clients", installation_id=I, user_id=7, client_ids=[1, 2, 3])
    oracle.set_access(I, 7, [1, 2, 3], "set")
    pending = [webapp.send_task("crm.rebuild_index", kwargs={"installation_id": I}, queue="maintenance")
               for _ in range(6)]
    ids = ids_of(engine)
    # Queries stay exact while they run.
    done = threading.Event()
    answers = []
    asking = make_context(engine, r)

    def ask():
        while not done.is_set():
            answers.append(query(asking, installation_id=I, user_id=7, limit=5))
    asker = threading.Thread(target=ask)
    asker.start()
    try:
        results = [p.get(timeout=120) for p in pending]
    finally:
        done.set()
        asker.join()
    entries = [res["rebuilt"][str(I)] for res in results]
    # Each ends normally; whichever were overtaken say so (how many depends on how the
    # worker's threads interleave them), and the latest publishes.
    assert all(isinstance(e["superseded"], bool) for e in entries)
    assert any(not e["superseded"] for e in entries)
    total, page = oracle.answer(I, 7, limit=5, ids=ids)
    assert answers and all(a["total"] == total and [i["source_id"] for i in a["items"]] == page for a in answers)
    # A rebuild queued by an earlier query may still be running, and publish after the
    # six: the database's generation and the index's are compared as read together.
    deadline = time.monotonic() + 30
    while True:
        with engine.connect() as conn:
            generation = conn.execute(sa.select(installations.c.generation).where(installations.c.id == I)).scalar()
        ready, published = r.get(keys.ready(I)), r.get(keys.generation(I))
        if ready is not None and ready == published and ready.decode().endswith(":" + generation):
            break
        assert time.monotonic() < deadline, (ready, published, generation)
        time.sleep(0.05)
    assert_index_matches(engine, r, I)
    assert_thread_state_matches(engine, I)


@pytest.mark.mysql  # a row lock held by the test: SQLite has none
def test_a_rebuild_overtaken_midway_stops_and_says_so(clean):
    """Rebuild A waits on a user's row lock (a concurrent access change) after taking its
    generation; rebuild B takes a newer one meanwhile.  A ends normally as superseded,
    having removed nothing of B's; B publishes."""
    from worker import keys
    from worker.access import change as change_access
    from worker.tables import users
    from worker.rebuild import rebuild_installation
    ctx = clean
    change_access(ctx, I, 7, [1], "set")
    ingest(ctx, [record(installation_id=I, source_id=f"m{n}", client_id=1) for n in range(50)])
    gen = keys.generation(I)
    out = {}

    def run(name):
        out[name] = rebuild_installation(make_context(ctx.engine, ctx.redis), I)

    def wait_for_new_generation(old):
        deadline = time.monotonic() + 10
        while ctx.redis.get(gen) == old and time.monotonic() < deadline:
            time.sleep(0.01)
        assert ctx.redis.get(gen) != old
        return ctx.redis.get(gen)
    with ctx.engine.begin() as conn:
        conn.execute(sa.select(users.c.user_id).where(users.c.installation_id == I).with_for_update())
        first = threading.Thread(target=run, args=("a",))
        first.start()
        token_a = wait_for_new_generation(ctx.redis.get(gen))
        second = threading.Thread(target=run, args=("b",))
        second.start()
        token_b = wait_for_new_generation(token_a)
    first.join()
    second.join()
    assert out["a"]["superseded"] and not out["a"]["published"]
    assert not out["b"]["superseded"] and out["b"]["published"]
    assert ctx.redis.get(keys.ready(I)) == token_b
    assert_index_matches(ctx.engine, ctx.redis, I)
    assert_thread_state_matches(ctx.engine, I)
