"""Email insight against real Redis and the real database: keys, duplicates across
mailboxes, threads in any arrival order, links and their changes, and client security
checked against a brute-force oracle for every query that shows email."""
from __future__ import annotations

import base64
import glob
import json
import os
import random
import sysconfig

import pytest
import sqlalchemy as sa
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.email_corpus import (CLIENTS, CONTACTS, I, USERS, b64, corpus, expected_threads, ingest_corpus,
                                setup_directory, visible)
from tests.helpers import assert_index_matches, assert_thread_state_matches, query
from worker.access import change
from worker.query import from_database, parse
from worker.tables import email_links, email_refs, emails, meeting_reach
from worker.email import directory, queries
from worker.email import ingest as email_ingest
from worker.email.threads import thread_id


def stored_state(engine):
    with engine.connect() as conn:
        threads = dict(conn.execute(sa.select(emails.c.message_key, emails.c.thread_id)).all())
        links = {}
        for key, client, reason in conn.execute(
                sa.select(emails.c.message_key, email_links.c.client_id, email_links.c.reason)
                .join(email_links, email_links.c.meeting_id == emails.c.meeting_id)
                .order_by(emails.c.message_key, email_links.c.position)):
            links.setdefault(key, []).append((client, reason))
    return threads, links


def test_keys_duplicates_across_mailboxes_and_counts(clean):
    ctx = clean
    setup_directory(ctx)
    messages = corpus()
    m = messages[0]
    first = email_ingest.ingest_emails(ctx, I, 1, [{"raw": b64(m.raw)}, {"raw": b64(m.raw)}])
    assert (first["accepted"], first["new"], first["duplicates"]) == (2, 1, 1)
    again = email_ingest.ingest_emails(ctx, I, 2, [{"raw": b64(m.raw)}])
    assert (again["new"], again["duplicates"]) == (0, 1)
    # Same Message-ID, another sender: another message, key#2.
    other = m.raw.replace(b"From: Person <", b"From: Someone <z", 1)
    assert email_ingest.ingest_emails(ctx, I, 1, [{"raw": b64(other)}])["new"] == 1
    with ctx.engine.connect() as conn:
        keys_ = sorted(conn.execute(sa.select(emails.c.message_key)).scalars())
    assert keys_ == [m.key, m.key + "#2"]
    # Both mailbox owners see the message, whatever their clients.
    for user in (1, 2):
        assert m.key in {i["source_id"] for i in query(ctx, installation_id=I, user_id=user)["items"]}
    assert_index_matches(ctx.engine, ctx.redis, I)
    assert_thread_state_matches(ctx.engine, I)


def test_any_arrival_order_gives_the_same_threads_and_links(engine, redis_client):
    from tests.conftest import make_context, wipe
    messages = corpus(seed=3, conversations=10)
    states = []
    for seed in range(4):
        wipe(engine, redis_client)
        ctx = make_context(engine, redis_client)
        setup_directory(ctx)
        ingest_corpus(ctx, messages, rng=random.Random(seed) if seed else None, chunk=3 + seed)
        states.append(stored_state(engine))
    assert all(s == states[0] for s in states[1:])
    threads, links = states[0]
    # The threads are the conversations: same thread id exactly within a conversation.
    by_conv = {}
    for m in messages:
        by_conv.setdefault(m.conversation, set()).add(threads[m.key])
    assert all(len(ids) == 1 for ids in by_conv.values())
    assert len({next(iter(ids)) for ids in by_conv.values()}) == len(by_conv)
    for m in messages:
        assert [c for c, _ in links.get(m.key, [])] == m.links, m.key


def test_a_reply_arriving_first_and_a_message_joining_two_threads_merge(clean):
    ctx = clean
    setup_directory(ctx)

    def msg(key, refs="", subject="S", date="Mon, 02 Jan 2023 10:00:00 +0000"):
        text = f"Message-ID: <{key}>\r\nFrom: a@c1.com\r\nTo: u1@ours.com\r\nSubject: {subject}\r\nDate: {date}\r\n"
        if refs:
            text += f"References: {refs}\r\n"
        return {"raw": b64((text + "\r\nx").encode())}
    email_ingest.ingest_emails(ctx, I, 1, [msg("c@x", "<a@x> <b@x>", subject="one")])  # reply first
    email_ingest.ingest_emails(ctx, I, 1, [msg("e@x", "<d@x>", subject="two")])
    threads, _ = stored_state(ctx.engine)
    assert threads["c@x"] != threads["e@x"]
    email_ingest.ingest_emails(ctx, I, 1, [msg("f@x", "<b@x> <d@x>", subject="three")])  # joins both
    email_ingest.ingest_emails(ctx, I, 1, [msg("a@x", subject="zero")])  # the root, last
    threads, _ = stored_state(ctx.engine)
    assert len({threads[k] for k in ("a@x", "c@x", "e@x", "f@x")}) == 1
    # Ghost ids are edges of the stored messages, not messages.
    with ctx.engine.connect() as conn:
        ghosts = set(conn.execute(sa.select(email_refs.c.ref_key)).scalars()) - set(threads)
    assert {"b@x", "d@x"} <= ghosts
    # The thread as a user sees it, and the same through the index of meetings.
    tid = threads["a@x"]
    thread = queries.get_thread(ctx, I, 1, tid)
    assert {m["source_id"] for m in thread["messages"]} == {"a@x", "c@x", "e@x", "f@x"}
    assert [m["id"] for m in thread["messages"]] == sorted(m["id"] for m in thread["messages"])  # one second: by id
    assert all(m["details"]["thread_id"] == tid for m in thread["messages"])
    items = query(ctx, installation_id=I, user_id=1)["items"]
    assert {i["details"]["thread_id"] for i in items} == {tid}


def _random_access(rng):
    return {u: set(rng.sample(sorted(CLIENTS) + [4, 5], rng.randint(0, 3))) for u in (1, 2, 3, 4)}


@pytest.mark.parametrize("seed", [11, 12])
def test_visibility_matches_the_oracle_in_every_query(clean, seed):
    """Random access lists, changed several times: every user's meetings, threads,
    single threads and contacts equal the brute force, with exact totals, from the index
    (precomputed and not) and from the database."""
    ctx = clean
    rng = random.Random(seed)
    setup_directory(ctx)
    messages = corpus(seed=seed)
    ingest_corpus(ctx, messages, rng=rng)
    by_key = {m.key: m for m in messages}
    for _round in range(3):
        access = _random_access(rng)
        for user, clients in access.items():
            change(ctx, I, user, sorted(clients), "set")
        assert_index_matches(ctx.engine, ctx.redis, I)
        assert_thread_state_matches(ctx.engine, I)
        for user, clients in access.items():
            want = sorted((m for m in messages if visible(m, clients, user)), key=lambda m: (m.date_s, m.key),
                          reverse=True)
            for views in (None, ()):
                got = query(ctx, views=views, installation_id=I, user_id=user, types=["email"], limit=200)
                assert got["total"] == len(want)
                assert sorted(i["source_id"] for i in got["items"]) == sorted(m.key for m in want)
            for client in (1, 2, 3):
                got = query(ctx, installation_id=I, user_id=user, client_ids=[client], limit=200)
                expect = [m for m in want if (m.links[:1] or [None])[0] == client]
                assert got["total"] == len(expect), (user, client)
            # The database fallback: the same total, and pages (by offset) that tile the list.
            with ctx.engine.connect() as conn:
                paged, total = [], None
                for offset in range(0, len(want) + 3, 3):
                    args = {"installation_id": I, "user_id": user, "types": ["email"], "limit": 3, "offset": offset}
                    total, _, items = from_database(conn, parse(args, ctx.cursor_secret()))
                    paged += [json.loads(i)["source_id"] for i in items[:3]]
            assert total == len(want) and paged == [m.key for m in want], user
            # Threads: figures from visible messages only.
            expect_threads = expected_threads(messages, clients, user)
            got = queries.query_threads(ctx, I, user, limit=200)
            assert got["total"] == len(expect_threads)
            for item in got["items"]:
                thread = queries.get_thread(ctx, I, user, item["thread_id"])
                keys_ = {m["source_id"] for m in thread["messages"]}
                conv = by_key[next(iter(keys_))].conversation
                e = expect_threads[conv]
                assert keys_ == e["keys"] and item["messages"] == e["messages"]
                assert item["awaiting_reply_since"] == (queries.iso_seconds(e["awaiting"]) if e["awaiting"] else None)
                assert item["last_at"] == queries.iso_seconds(e["last_at"])
            assert [i["last_at"] for i in got["items"]] == sorted((i["last_at"] for i in got["items"]), reverse=True)
            for awaiting in (True, False):
                part = queries.query_threads(ctx, I, user, awaiting_reply=awaiting, limit=200)
                assert part["total"] == sum((e["awaiting"] is not None) == awaiting for e in expect_threads.values())
            # Paged three at a time: the same threads in the same order, the same total on each page.
            paged, cursor = [], None
            while True:
                page = queries.query_threads(ctx, I, user, limit=3, cursor=cursor)
                assert page["total"] == got["total"]
                paged += page["items"]
                cursor = page["next_cursor"]
                if cursor is None:
                    break
            assert paged == got["items"]
            # Contacts: only those of clients the user may see.
            got = queries.search_contacts(ctx, I, user, limit=200)
            assert {c["source_id"] for c in got["items"]} == {s for s, (_, _, c, _) in CONTACTS.items() if c in clients}


def test_a_thread_page_is_served_again_until_something_it_shows_changes(clean):
    """query_threads keeps each page (worker/answer_cache.py) and serves it again, equal to
    the page computed now, while writes go to other clients; the copy is stale as soon as
    one of the user's clients, the user's mailbox or the user's access changes."""
    from worker import answer_cache, keys
    ctx = clean
    r = ctx.redis
    setup_directory(ctx)
    ingest_corpus(ctx, corpus(seed=3, conversations=8))
    change(ctx, I, 9, [1, 2], "set")
    first = queries.query_threads(ctx, I, 9, limit=200)
    stored = list(r.scan_iter(match=keys.answer_cache(I, 9, "*")))
    assert len(stored) == 1 and first["total"] > 0
    answer = stored[0].decode().rsplit(":", 1)[1]

    def current() -> bool:
        return int(answer_cache.check(ctx, I, 9, answer, ctx.mirror.token(I), "check")[0]) == 1

    def served_as_computed() -> dict:
        served = queries.query_threads(ctx, I, 9, limit=200)
        assert served == queries.query_threads(ctx, I, 9, limit=200, cache=False)
        return served

    def mail(n, sender, mailbox):
        raw = (f"Message-ID: <cache-{n}@x>\r\nFrom: {sender}\r\nTo: u1@ours.com\r\nSubject: cache {n}\r\n"
               f"Date: Tue, 14 Nov 2023 10:0{n}:00 +0000\r\n\r\nbody\r\n").encode()
        assert email_ingest.ingest_emails(ctx, I, mailbox, [{"raw": b64(raw)}])["new"] == 1
    assert current() and served_as_computed() == first
    mail(1, "c@c3.co.uk", 1)  # client 3's: not the user's
    assert current() and served_as_computed() == first
    mail(2, "a@c1.com", 1)  # client 1's
    assert not current()
    assert served_as_computed()["total"] == first["total"] + 1 and current()
    change(ctx, I, 9, [2], "revoke")
    assert not current()
    assert served_as_computed()["total"] < first["total"] + 1 and current()
    mail(3, "x@unknown.org", 9)  # no client: read from the user's own mailbox
    assert not current()
    assert "cache 3" in {t["subject"] for t in served_as_computed()["items"]}
    # Only first pages are kept: a page after a cursor is computed each time.
    second = queries.query_threads(ctx, I, 9, limit=2, cursor=queries.query_threads(ctx, I, 9, limit=2)["next_cursor"])
    assert second["items"] and len(list(r.scan_iter(match=keys.answer_cache(I, 9, "*")))) == 2


def test_threads_page_with_cursors_and_filters(clean):
    ctx = clean
    setup_directory(ctx)
    messages = corpus(seed=5, conversations=15)
    ingest_corpus(ctx, messages)
    change(ctx, I, 9, [1, 2, 3], "set")
    whole = queries.query_threads(ctx, I, 9, limit=200)
    seen, cursor = [], None
    while True:
        page = queries.query_threads(ctx, I, 9, limit=4, cursor=cursor)
        assert page["total"] == whole["total"]
        seen += [t["thread_id"] for t in page["items"]]
        cursor = page["next_cursor"]
        if cursor is None:
            break
    assert seen == [t["thread_id"] for t in whole["items"]]
    lasts = [t["last_at"] for t in whole["items"]]
    assert lasts == sorted(lasts, reverse=True)
    waiting = queries.query_threads(ctx, I, 9, awaiting_reply=True, limit=200)
    assert all(t["awaiting_reply_since"] for t in waiting["items"])
    k1 = queries.query_threads(ctx, I, 9, contact_source_id="k1", limit=200)
    assert all(any(a["address"] == "pat@gmail.com" for a in t["participants"]) for t in k1["items"])
    with pytest.raises(ValueError, match="^cursor"):
        queries.query_threads(ctx, I, 9, limit=5, cursor=page_cursor_of_other(ctx))


def page_cursor_of_other(ctx):
    return queries.query_threads(ctx, I, 9, order="asc", limit=1)["next_cursor"]


def test_links_follow_domain_and_contact_changes_everywhere(clean):
    ctx = clean
    setup_directory(ctx)
    raw = (b"Message-ID: <new@c5.com>\r\nFrom: Nia <nia@c5.com>\r\nTo: u1@ours.com\r\nSubject: hi\r\n"
           b"Date: Mon, 02 Jan 2023 10:00:00 +0000\r\n\r\nx")
    email_ingest.ingest_emails(ctx, I, 1, [{"raw": b64(raw)}])
    change(ctx, I, 2, [5], "set")
    change(ctx, I, 3, [6], "set")
    query(ctx, installation_id=I, user_id=2)  # user 2 now holds a precomputed view
    assert query(ctx, installation_id=I, user_id=2)["total"] == 0
    directory.upsert_clients(ctx, I, [{"client_id": 5, "name": "Five", "domains": ["c5.com"]}])
    got = query(ctx, installation_id=I, user_id=2)
    assert got["total"] == 1 and got["source"] == "precomputed" and got["items"][0]["client_id"] == 5
    assert queries.query_threads(ctx, I, 2)["total"] == 1
    # A contact with that address at another client: the link moves through the contact.
    directory.upsert_contacts(ctx, I, [{"source_id": "nia", "name": "Nia", "emails": ["nia@c5.com"], "client_id": 6}])
    assert query(ctx, installation_id=I, user_id=2)["total"] == 0
    assert queries.query_threads(ctx, I, 2)["total"] == 0
    got = query(ctx, installation_id=I, user_id=3)
    assert got["total"] == 1 and got["items"][0]["client_id"] == 6
    assert queries.search_contacts(ctx, I, 3, q="NI")["items"][0]["last_email_at"] == "2023-01-02T10:00:00Z"
    # The mailbox owner sees it throughout.
    assert query(ctx, installation_id=I, user_id=1)["total"] == 1
    # A user address makes its messages outbound.
    directory.upsert_users(ctx, I, [{"user_id": 7, "name": "Nia", "emails": ["nia@c5.com"]}])
    assert query(ctx, installation_id=I, user_id=1)["items"][0]["status"] == "outbound"
    assert_index_matches(ctx.engine, ctx.redis, I)
    assert_thread_state_matches(ctx.engine, I)


def test_revocation_hides_linked_email_but_not_the_own_mailbox(clean):
    ctx = clean
    setup_directory(ctx)
    messages = corpus(seed=2)
    ingest_corpus(ctx, messages)
    change(ctx, I, 1, [1, 2, 3], "set")
    before = query(ctx, installation_id=I, user_id=1, limit=200)["total"]
    change(ctx, I, 1, [1, 2, 3], "revoke")
    got = query(ctx, installation_id=I, user_id=1, limit=200)
    assert got["total"] == sum(1 for m in messages if 1 in m.mailboxes) <= before
    assert all(queries.get_thread(ctx, I, 1, t["thread_id"])["messages"] for t in
               queries.query_threads(ctx, I, 1, limit=200)["items"])
    assert_index_matches(ctx.engine, ctx.redis, I)
    assert_thread_state_matches(ctx.engine, I)


def _message(**headers):
    base = {"Message-ID": "<h@x>", "From": "a@c1.com", "To": "u1@ours.com", "Subject": "s",
            "Date": "Mon, 02 Jan 2023 10:00:00 +0000"}
    base.update(headers)
    return "".join(f"{k}: {v}\r\n" for k, v in base.items() if v is not None).encode() + b"\r\nbody"


def test_hostile_input_is_rejected_one_by_one_or_contained(clean):
    ctx = clean
    setup_directory(ctx)
    long_id = "<" + "x" * 2000 + "@y>"
    refs = " ".join(f"<r{i}@x>" for i in range(10_000))
    batch = [
        {"raw": "not base64 at all!"},
        {"raw": ""},
        {"raw": b64(b"x" * (11 * 1024 * 1024))},
        {"raw": b64(_message(**{"Message-ID": long_id}))},
        {"raw": b64(_message(**{"Message-ID": "<refs@x>", "References": refs}))},
        {"raw": b64(_message(**{"Message-ID": "<inj@x>", "From": "=?utf-8?q?Evil=0D=0ABcc=3A_x=40y=2Ez?= <a@c1.com>"}))},
        {"raw": b64(_message(**{"Message-ID": "<cs@x>", "Subject": "=?x-unknown?q?abc?=", "From": "=?bogus?b?!!?= <a@c1.com>"}))},
        {"raw": b64(_message(**{"Message-ID": "<nodate@x>", "Date": "yesterday"})), "received_at": "2024-05-01T00:00:00Z"},
        {"raw": b64(b"no headers here, just text")},
        {"raw": b64(_message()), "unknown": 1},
        "not an object",
    ]
    result = email_ingest.ingest_emails(ctx, I, 1, batch)
    errors = {r["index"]: r["error"] for r in result["rejected"]}
    assert set(errors) == {0, 1, 2, 8, 9, 10}
    assert "base64" in errors[0] and "empty" in errors[1] and "10 MiB" in errors[2] and "headers" in errors[8]
    assert result["accepted"] == 5
    threads, _ = stored_state(ctx.engine)
    assert any(k.startswith("sha256:") for k in threads)  # the 2,000-character id
    with ctx.engine.connect() as conn:
        assert conn.execute(sa.select(sa.func.count()).select_from(email_refs)).scalar() <= 100 + 4
    items = {i["source_id"]: i for i in query(ctx, installation_id=I, user_id=1, limit=200)["items"]}
    sender = items["inj@x"]["details"]["from"]
    assert sender["address"] == "a@c1.com" and sender["name"] == "Evil Bcc: x@y.z"  # a name, not a recipient
    assert [p["address"] for p in queries.get_thread(ctx, I, 1, items["inj@x"]["details"]["thread_id"])
            ["messages"][0]["participants"]] == ["a@c1.com", "u1@ours.com"]
    assert items["nodate@x"]["meeting_date"] == "2024-05-01T00:00:00Z"
    for bad in ({"installation_id": 0}, {"messages": "x"}, {"messages": [{}] * 501}):
        args = {"installation_id": I, "mailbox_user_id": 1, "messages": [], **bad}
        with pytest.raises(ValueError, match="^" + next(iter(bad))):
            email_ingest.ingest_emails(ctx, args["installation_id"], args["mailbox_user_id"], args["messages"])


def test_directory_rules(clean):
    ctx = clean
    got = directory.upsert_clients(ctx, I, [
        {"client_id": 1, "name": "A", "domains": ["Sub.Acme.com"]},
        {"client_id": 2, "name": "B", "domains": ["acme.com"]},
        {"client_id": 3, "name": "C", "domains": ["gmail.com"]},
        {"client_id": 4, "name": "", "domains": []}])
    errors = {r["index"]: r["error"] for r in got["rejected"]}
    assert errors[1] == "domains: acme.com belongs to client 1"
    assert "free-mail" in errors[2] and errors[3].startswith("name")
    assert got["accepted"] == 1
    again = directory.upsert_clients(ctx, I, [{"client_id": 1, "name": "A", "domains": ["acme.com"]}])
    assert (again["accepted"], again["updated"], again["unchanged"]) == (1, 0, 1)
    users = directory.upsert_users(ctx, I, [{"user_id": 1, "name": "U", "emails": ["U@Ours.com"]}])
    assert users["accepted"] == 1
    assert directory.upsert_users(ctx, I, [{"user_id": 1, "name": "U", "emails": ["u@ours.com"]}])["unchanged"] == 1


def test_contact_search_takes_names_as_people_type_them(clean):
    """Every word of the query starts a word of the name or an address, in any order,
    whatever the case and accents; a whole address matches too; other clients stay out."""
    ctx = clean
    directory.upsert_clients(ctx, I, [{"client_id": c, "name": f"C{c}", "domains": []} for c in (1, 2)])
    directory.upsert_contacts(ctx, I, [
        {"source_id": "k1", "name": "Sam Ödegaard", "emails": ["sam@acme.com"], "client_id": 1},
        {"source_id": "k2", "name": "Samuel Oden", "emails": ["s.oden@acme.com"], "client_id": 1},
        {"source_id": "k3", "name": "Contact 104", "emails": [], "client_id": 1},
        {"source_id": "k4", "name": "Mary-Jane O'Brien", "emails": ["mj@acme.com"], "client_id": 1},
        {"source_id": "k5", "name": "Contact 104", "emails": ["hidden@other.com"], "client_id": 2}])
    change(ctx, I, 7, [1], "set")

    def found(q):
        return [c["source_id"] for c in queries.search_contacts(ctx, I, 7, q=q, limit=50)["items"]]
    assert found("Contact 104") == found("104 contact") == found("  CONTACT   10 ") == ["k3"]
    assert found("SAM ÖDE") == found("sam ode") == found("Sam Ode") == ["k1", "k2"]
    assert found("sam ödeg") == found("SAM odegaard") == ["k1"]
    assert found("mary o'brien") == found("O'BRIEN Mary-Jane") == found("jane brien") == ["k4"]
    assert found("mj@acme.com") == found("MJ@Acme") == found("mary mj@") == ["k4"]
    assert found("s.oden@acme") == ["k2"]
    assert found("Sam Nobody") == found("mj@acme.com extra") == found("hidden") == []
    assert queries.search_contacts(ctx, I, 7, q="contact 104")["total"] == 1


def test_real_world_messages_from_the_python_corpus(clean):
    """CPython's own email test corpus: every message is stored or rejected alone with a
    reason; none fails the batch."""
    ctx = clean
    folder = os.path.join(sysconfig.get_paths()["stdlib"], "test", "test_email", "data")
    paths = sorted(glob.glob(os.path.join(folder, "msg_*.txt")))
    if not paths:
        pytest.skip("this Python ships without its email test corpus")
    batch = [{"raw": base64.urlsafe_b64encode(open(p, "rb").read()).decode()} for p in paths]
    result = email_ingest.ingest_emails(ctx, I, 1, batch)
    assert result["accepted"] + len(result["rejected"]) == len(paths)
    assert result["accepted"] >= len(paths) - 2
    assert query(ctx, installation_id=I, user_id=1, limit=200)["total"] == result["new"]
    assert_index_matches(ctx.engine, ctx.redis, I)
    assert_thread_state_matches(ctx.engine, I)


def test_email_tasks_through_a_worker(worker_env):
    """The seven tasks by name, as a web app without project code sends them."""
    _engine, _r, webapp = worker_env

    def call(name, queue, **kwargs):
        return webapp.send_task(name, kwargs=kwargs, queue=queue).get(timeout=30)
    assert call("crm.upsert_clients", "ingest", installation_id=I, clients=[
        {"client_id": c, "name": f"C{c}", "domains": d} for c, d in CLIENTS.items()])["accepted"] == len(CLIENTS)
    assert call("crm.upsert_users", "ingest", installation_id=I, users=[
        {"user_id": u, "name": f"U{u}", "emails": a} for u, a in USERS.items()])["accepted"] == len(USERS)
    assert call("crm.upsert_contacts", "ingest", installation_id=I, contacts=[
        {"source_id": k, "name": n, "emails": e, "client_id": c, "job_title": j}
        for k, (n, e, c, j) in CONTACTS.items()])["accepted"] == len(CONTACTS)
    messages = corpus(seed=4, conversations=3)
    for m in messages:
        m.mailboxes = [1]
    got = call("crm.ingest_emails", "ingest", installation_id=I, mailbox_user_id=1,
               messages=[{"raw": b64(m.raw)} for m in messages])
    assert got["new"] == len(messages)
    call("crm.set_user_clients", "ingest", installation_id=I, user_id=2, client_ids=[1])
    threads = call("crm.query_threads", "query", installation_id=I, user_id=2)
    expect = expected_threads([m for m in messages], {1}, 2)
    assert threads["total"] == len(expect)
    if threads["items"]:
        thread = call("crm.get_thread", "query", installation_id=I, user_id=2, thread_id=threads["items"][0]["thread_id"])
        assert thread["messages"] and all("links" in m for m in thread["messages"])
    assert call("crm.search_contacts", "query", installation_id=I, user_id=2, q="le")["total"] == 0  # k3 has no client
    call("crm.set_user_clients", "ingest", installation_id=I, user_id=2, client_ids=[2, 3])
    assert call("crm.search_contacts", "query", installation_id=I, user_id=2, q="ODE")["items"][0]["source_id"] == "k2"
    with pytest.raises(ValueError, match="^limit"):
        call("crm.query_threads", "query", installation_id=I, user_id=2, limit=0)


def test_rebuild_and_reconcile_restore_the_email_index(clean):
    """Rebuilt from the database, the index holds the same client, extra and mailbox
    sets; reconcile repairs a lost extra set."""
    from worker import keys
    from worker.maintenance import rebuild, reconcile
    ctx = clean
    setup_directory(ctx)
    ingest_corpus(ctx, corpus(seed=8))
    change(ctx, I, 1, [2], "set")
    change(ctx, I, 4, [1, 3], "set")
    before = {u: query(ctx, views=(), installation_id=I, user_id=u, limit=200)["total"] for u in (1, 2, 3, 4)}
    rebuild(ctx, I)
    assert_index_matches(ctx.engine, ctx.redis, I)
    assert_thread_state_matches(ctx.engine, I)
    assert {u: query(ctx, views=(), installation_id=I, user_id=u, limit=200)["total"] for u in (1, 2, 3, 4)} == before
    # A payload whose head lost its reach (drift) is repaired from the database.
    field = next(iter(ctx.redis.hkeys(keys.payloads(I))))
    value = ctx.redis.hget(keys.payloads(I), field)
    head, _, item = value.partition(b"|")
    ctx.redis.hset(keys.payloads(I), field, b" ".join(head.split(b" ")[:6]) + b"|" + item)
    assert reconcile(ctx, I)["meetings_repaired"] == 1
    assert_index_matches(ctx.engine, ctx.redis, I)
    assert_thread_state_matches(ctx.engine, I)


@settings(max_examples=25, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(seed=st.integers(0, 100_000), order=st.randoms(use_true_random=False), chunk=st.integers(1, 9))
def test_property_any_order_and_batching_gives_the_oracles_threads_and_links(engine, redis_client, seed, order,
                                                                             chunk):
    """Any permutation of the deliveries of a tangled corpus (replies before parents,
    ghosts, bridges, subjects, provider hints), in any batch sizes, stores the threads of
    an independent union-find and the links of the brute-force rule."""
    from tests.conftest import make_context, wipe
    from tests.email_corpus import oracle_partition, tangled
    messages = tangled(seed)
    wipe(engine, redis_client)
    ctx = make_context(engine, redis_client)
    setup_directory(ctx)
    deliveries = [(u, m) for m in messages for u in m.mailboxes]
    order.shuffle(deliveries)
    for start in range(0, len(deliveries), chunk):
        part = deliveries[start:start + chunk]
        for user in sorted({u for u, _ in part}):
            batch = [{"raw": b64(m.raw), **({"provider_thread_id": m.hints[u]} if u in m.hints else {})}
                     for u, m in part if u == user]
            assert email_ingest.ingest_emails(ctx, I, user, batch)["rejected"] == []
    threads, links = stored_state(engine)
    groups = {}
    for key, tid in threads.items():
        groups.setdefault(tid, set()).add(key)
    assert {frozenset(g) for g in groups.values()} == oracle_partition(messages)
    # A thread's id is derived from its smallest id, stored or ghost: the same in any order.
    with engine.connect() as conn:
        named = set(conn.execute(sa.select(email_refs.c.ref_key)).scalars())
    for tid, keys_ in groups.items():
        nodes = set(keys_) | {r for m in messages if m.key in keys_ for r in m.refs}
        assert tid == thread_id(I, min(n for n in nodes if " " not in n)), (tid, keys_)
        assert nodes - set(keys_) <= named
    for m in messages:
        assert [c for c, _ in links.get(m.key, [])] == m.links, m.key
    # Who else may see each email: its other linked clients and its mailboxes, never its
    # primary client (found through the meeting row itself).
    with engine.connect() as conn:
        ids = dict(conn.execute(sa.select(emails.c.message_key, emails.c.meeting_id)).all())
        reach = set(conn.execute(sa.select(meeting_reach.c.meeting_id, meeting_reach.c.client_id,
                                           meeting_reach.c.user_id)).all())
        reach = {tuple(r) for r in reach}
    expect = {(ids[m.key], c, 0) for m in messages for c in set(m.links[1:]) - set(m.links[:1])}
    expect |= {(ids[m.key], 0, u) for m in messages for u in m.mailboxes}
    assert reach == expect
    assert_index_matches(ctx.engine, ctx.redis, I)
    assert_thread_state_matches(ctx.engine, I)


def test_provider_thread_ids_join_headerless_messages_of_one_mailbox_only(clean):
    ctx = clean
    setup_directory(ctx)

    def msg(key, subject, hint=None, refs=""):
        text = (f"Message-ID: <{key}>\r\nFrom: a@c1.com\r\nTo: u1@ours.com\r\nSubject: {subject}\r\n"
                f"Date: Mon, 02 Jan 2023 10:00:00 +0000\r\n" + (f"References: {refs}\r\n" if refs else ""))
        return {"raw": b64((text + "\r\nx").encode()), **({"provider_thread_id": hint} if hint else {})}
    # Different subjects, one provider thread: one thread.
    email_ingest.ingest_emails(ctx, I, 1, [msg("p1@x", "Quote", "G7"), msg("p2@x", "Changed subject", "G7")])
    # The same provider id in another mailbox is another account's thread.
    email_ingest.ingest_emails(ctx, I, 2, [msg("p3@x", "Unrelated", "G7")])
    threads, _ = stored_state(ctx.engine)
    assert threads["p1@x"] == threads["p2@x"] != threads["p3@x"]
    # p3 read from user 1's mailbox in G7 too: the hint of that mailbox joins it.
    email_ingest.ingest_emails(ctx, I, 1, [msg("p3@x", "Unrelated", "G7")])
    threads, _ = stored_state(ctx.engine)
    assert threads["p1@x"] == threads["p3@x"]
    # A message with threading headers ignores the hint: headers decide.
    email_ingest.ingest_emails(ctx, I, 1, [msg("p4@x", "Quote", "G7", refs="<elsewhere@x>")])
    threads, _ = stored_state(ctx.engine)
    assert threads["p4@x"] != threads["p1@x"]
    # Once a stored message references p2, p2 leaves its weak thread for the reply's.
    email_ingest.ingest_emails(ctx, I, 1, [msg("p5@x", "Re: x", refs="<p2@x>")])
    threads, _ = stored_state(ctx.engine)
    assert threads["p2@x"] == threads["p5@x"] != threads["p1@x"]
    assert threads["p1@x"] == threads["p3@x"]
    assert_index_matches(ctx.engine, ctx.redis, I)
    assert_thread_state_matches(ctx.engine, I)


def _one_thread(ctx, message_id: str) -> str:
    """One inbound message of client 1 read from user 2's mailbox, user 1 holding client 1:
    the id of its thread, which user 1 sees with its one message."""
    setup_directory(ctx)
    change(ctx, I, 1, [1], "set")
    raw = (f"Message-ID: <{message_id}>\r\nFrom: a@c1.com\r\nTo: u1@ours.com\r\nSubject: Hello\r\n"
           "Date: Mon, 02 Jan 2023 10:00:00 +0000\r\n\r\nx").encode()
    email_ingest.ingest_emails(ctx, I, 2, [{"raw": b64(raw)}])
    listed = queries.query_threads(ctx, I, 1)
    assert listed["total"] == 1
    tid = listed["items"][0]["thread_id"]
    assert len(queries.get_thread(ctx, I, 1, tid)["messages"]) == 1
    return tid


def test_a_meeting_record_that_replaces_an_email_with_another_type_leaves_its_thread(clean):
    """A stored email is a meeting of type email: once a crm.ingest_meetings record of the
    same key replaces it with a call, thread lists, the thread and the thread reports
    leave it alike."""
    from tests.helpers import record
    from worker import reports
    from worker.ingest import ingest
    ctx = clean
    tid = _one_thread(ctx, "r1@x")
    with ctx.engine.connect() as conn:
        assert len(reports.compute(conn, I, 1, "awaiting_reply", reports.ALL, 1_900_000_000)[0]) == 1
    ingest(ctx, [record(installation_id=I, source_id="r1@x", client_id=1, type="call", status="done",
                        updated_at="2030-01-01T00:00:00Z")])
    assert queries.query_threads(ctx, I, 1)["total"] == 0
    assert queries.get_thread(ctx, I, 1, tid)["messages"] == []
    with ctx.engine.connect() as conn:
        assert reports.compute(conn, I, 1, "awaiting_reply", reports.ALL, 1_900_000_000)[0] == []
    # Still a meeting, now a call, for whoever may see client 1.
    assert [i["type"] for i in query(ctx, installation_id=I, user_id=1)["items"]] == ["call"]


def test_any_thread_id_a_caller_sends_is_an_answer_never_an_error(clean):
    """Thread ids are ASCII, compared byte for byte (migration 0011): an id in another
    script, with an emoji, or differing from a real one only in case or a trailing space
    finds nothing, and the task does not fail on it."""
    ctx = clean
    tid = _one_thread(ctx, "a1@x")
    for other in (tid.upper(), tid + " ", tid[:-1] + "é", "tü" + tid[2:], "t😀", "Ω" * 64):
        assert queries.get_thread(ctx, I, 1, other) == {"thread_id": other, "messages": []}, repr(other)
