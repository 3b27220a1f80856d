"""Mailbox sync against a real IMAP server: Debian's Dovecot, started with a throwaway
configuration (tests/imap_server.py).  Every sync is checked against an oracle of what
the folders hold: each message stored once, none lost, none twice."""
from __future__ import annotations

import itertools
import json
import logging
import os
import signal
import subprocess
import sys
import threading
import time

import pytest
import sqlalchemy as sa

from tests import imap_server
from tests.conftest import make_context
from tests.test_metrics import scrape
from worker.email.parse import MAX_RAW
from worker.mailbox import accounts, imap, secrets, sync
from worker.schema import data_tables
from worker.tables import email_mailboxes, emails, mailbox_folders, mailboxes

INSTALLATION = 1
_names = itertools.count(1)


@pytest.fixture(scope="module")
def dovecot():
    if not imap_server.available():
        pytest.skip("dovecot is not installed: apt-get install dovecot-imapd (.ci/run does)")
    server = imap_server.Dovecot(users=100).start()
    yield server
    server.stop()


@pytest.fixture
def ctx(clean):
    return make_context(clean.engine, clean.redis, sync_budget=600)


def new_user(dovecot) -> str:
    """A user of the server's own, fresh for the test."""
    return f"user{next(_names)}"


def message(n: int, tag: str, sent: bool = False, pad: int = 0) -> bytes:
    people = ("Alice <alice@ours.example>", f"Contact {n % 40} <c{n % 40}@acme.example>")
    sender, to = people[::-1] if not sent else people
    body = f"message {n} of {tag}\r\n" + ("x" * 76 + "\r\n") * (pad // 78)
    return (f"From: {sender}\r\nTo: {to}\r\nSubject: about {n}\r\nMessage-ID: <{tag}.{n}@acme.example>\r\n"
            f"Date: Mon, 1 Jun 2026 {n // 3600 % 24:02d}:{n // 60 % 60:02d}:{n % 60:02d} +0000\r\n\r\n{body}").encode()


def fill(client, folder: str, messages: list[bytes]) -> None:
    for start in range(0, len(messages), 500):
        client.multiappend(folder, messages[start:start + 500])


def held(dovecot, user: str, folders) -> list[str]:
    """The oracle: the Message-IDs the folders hold, as the server says."""
    c = dovecot.client(user)
    ids = []
    for folder in folders:
        c.select_folder(folder, readonly=True)
        uids = c.search("ALL")
        for data in c.fetch(uids, ["BODY.PEEK[HEADER.FIELDS (MESSAGE-ID)]"]).values():
            header = data[b"BODY[HEADER.FIELDS (MESSAGE-ID)]"].decode()
            ids.append(header.split("<", 1)[1].split(">", 1)[0])
    c.logout()
    return ids


def stored(engine, user_id: int) -> list[str]:
    """The message keys stored as read from the user's mailbox."""
    with engine.connect() as conn:
        return list(conn.execute(sa.select(emails.c.message_key).join(
            email_mailboxes, email_mailboxes.c.meeting_id == emails.c.meeting_id).where(
            email_mailboxes.c.user_id == user_id)).scalars())


def assert_synced(engine, dovecot, user: str, user_id: int, folders) -> None:
    expected = held(dovecot, user, folders)
    got = stored(engine, user_id)
    assert len(got) == len(set(got)), "a message is stored twice"
    assert not [k for k in got if "#" in k], "a copy became a second message"
    assert sorted(got) == sorted(set(expected)), "the stored messages differ from what the folders hold"


def add_mailbox(ctx, dovecot, user: str, user_id: int, **fields) -> dict:
    row = {"user_id": user_id, "host": "127.0.0.1", "port": dovecot.port, "security": "none",
           "username": user, "password": dovecot.users[user], **fields}
    result = accounts.upsert_mailboxes(ctx, INSTALLATION, [row])
    assert result["rejected"] == [], result
    return result


def folder_row(engine, user_id: int, folder: str):
    with engine.connect() as conn:
        return conn.execute(sa.select(mailbox_folders).where(mailbox_folders.c.user_id == user_id,
                                                             mailbox_folders.c.folder == folder)).first()


def time_passes(engine, user_id: int) -> None:
    """The backoff is over (as if its time had passed)."""
    with engine.begin() as conn:
        conn.execute(mailboxes.update().where(mailboxes.c.user_id == user_id).values(next_attempt_s=0))


def totals(result: dict) -> dict:
    out = {"fetched": 0, "new": 0, "duplicates": 0, "rejected": 0}
    for f in result["folders"]:
        for k in ("fetched", "new", "duplicates"):
            out[k] += f[k]
        out["rejected"] += len(f["rejected"])
    return out


# -- initial and incremental sync ---------------------------------------------------------

def test_initial_sync_of_ten_thousand_messages_then_incremental_then_nothing_new(ctx, dovecot):
    user = new_user(dovecot)
    c = dovecot.client(user)
    fill(c, "INBOX", [message(n, user) for n in range(7000)])
    fill(c, "Sent", [message(n, user, sent=True) for n in range(7000, 10000)])
    add_mailbox(ctx, dovecot, user, 11)

    first = sync.sync_mailbox(ctx, INSTALLATION, 11)
    assert first["state"] == "ok" and not first["more"]
    assert [f["folder"] for f in first["folders"]] == ["INBOX", "Sent"]  # the \Sent folder found by its flag
    assert totals(first) == {"fetched": 10000, "new": 10000, "duplicates": 0, "rejected": 0}
    assert_synced(ctx.engine, dovecot, user, 11, ["INBOX", "Sent"])
    inbox = folder_row(ctx.engine, 11, "INBOX")
    assert inbox.last_uid == 7000 and inbox.synced == 7000 and inbox.highestmodseq is not None

    fill(c, "INBOX", [message(n, user) for n in range(10000, 10025)])
    fill(c, "Sent", [message(n, user, sent=True) for n in range(10025, 10030)])
    second = sync.sync_mailbox(ctx, INSTALLATION, 11)
    assert totals(second) == {"fetched": 30, "new": 30, "duplicates": 0, "rejected": 0}
    assert_synced(ctx.engine, dovecot, user, 11, ["INBOX", "Sent"])

    idle = sync.sync_mailbox(ctx, INSTALLATION, 11)
    assert totals(idle)["fetched"] == 0
    assert idle["round_trips"] <= 2, "a mailbox with no new mail costs one STATUS per folder"
    c.logout()

    status = accounts.mailbox_status(ctx, INSTALLATION, 11)["mailboxes"][0]
    assert status["state"] == "ok" and status["last_error"] is None
    by_folder = {f["folder"]: f for f in status["folders"]}
    assert by_folder["INBOX"]["synced"] == 7025 and by_folder["Sent"]["synced"] == 3005
    assert by_folder["INBOX"]["checkpoint"]["last_uid"] == 7025 and by_folder["INBOX"]["backlog"] == 0


def test_messages_are_read_as_from_the_mailbox_with_internaldate_and_never_marked_read(ctx, dovecot):
    user = new_user(dovecot)
    c = dovecot.client(user)
    import datetime as dt
    when = dt.datetime(2025, 3, 4, 5, 6, 7, tzinfo=dt.timezone.utc)
    no_date = b"From: x@acme.example\r\nTo: alice@ours.example\r\nSubject: undated\r\nMessage-ID: <nodate@acme.example>\r\n\r\nhi\r\n"
    c.append("INBOX", no_date, msg_time=when)
    add_mailbox(ctx, dovecot, user, 12)
    assert totals(sync.sync_mailbox(ctx, INSTALLATION, 12))["new"] == 1
    with ctx.engine.connect() as conn:
        date_s = conn.execute(sa.select(emails.c.date_s).where(emails.c.message_key == "nodate@acme.example")).scalar()
    assert date_s == int(when.timestamp()), "a message without Date is dated by its INTERNALDATE"
    c.select_folder("INBOX", readonly=True)
    flags = c.get_flags(c.search("ALL"))
    assert all(b"\\Seen" not in f for f in flags.values()), "BODY.PEEK[] leaves mail unread"
    c.logout()


# -- the time budget, faults and resumption -----------------------------------------------

def test_a_run_stops_at_its_budget_and_the_next_runs_go_on_from_the_checkpoint(ctx, dovecot):
    user = new_user(dovecot)
    c = dovecot.client(user)
    fill(c, "INBOX", [message(n, user) for n in range(3000)])
    c.logout()
    add_mailbox(ctx, dovecot, user, 13)
    short = make_context(ctx.engine, ctx.redis, sync_budget=1)
    runs, new = [], 0
    while True:
        result = sync.sync_mailbox(short, INSTALLATION, 13)
        runs.append(result)
        new += totals(result)["new"]
        assert totals(result)["duplicates"] == 0
        if not result["more"]:
            break
        assert result["state"] == "syncing"
        status = accounts.mailbox_status(ctx, INSTALLATION, 13)["mailboxes"][0]
        assert status["state"] == "syncing" and status["folders"][0]["backlog"] > 0
        assert len(runs) < 60
    assert len(runs) >= 2, "3,000 messages take more than a one-second budget"
    assert new == 3000
    assert_synced(ctx.engine, dovecot, user, 13, ["INBOX", "Sent"])


def test_a_connection_dropped_mid_fetch_resumes_with_nothing_lost_or_twice(ctx, dovecot):
    user = new_user(dovecot)
    c = dovecot.client(user)
    fill(c, "INBOX", [message(n, user, pad=20_000) for n in range(400)])
    c.logout()
    proxy = imap_server.CuttingProxy(dovecot.port, cut_after=6_000_000)  # inside the second chunk of 200 bodies (4 MB each)
    try:
        add_mailbox(ctx, dovecot, user, 14, port=proxy.port)
        cut = sync.sync_mailbox(ctx, INSTALLATION, 14)
        assert cut["state"] == "unreachable" and proxy.cuts == 1
        assert "dropped the connection" in cut["error"]
        done_before = folder_row(ctx.engine, 14, "INBOX").last_uid
        assert 0 < done_before < 400, "some chunks were committed before the cut"
        assert len(stored(ctx.engine, 14)) == done_before, "the checkpoint is exactly what was stored"
        again = sync.sync_mailbox(ctx, INSTALLATION, 14)
        assert again.get("skipped") == "backing off after a failure"
        time_passes(ctx.engine, 14)
        proxy.cut_after = None
        resumed = sync.sync_mailbox(ctx, INSTALLATION, 14)
        assert resumed["state"] == "ok"
        assert totals(resumed)["duplicates"] == 0 and totals(resumed)["new"] == 400 - done_before
        assert_synced(ctx.engine, dovecot, user, 14, ["INBOX", "Sent"])
    finally:
        proxy.close()


def test_a_worker_killed_mid_sync_leaves_nothing_lost_or_twice(ctx, dovecot, webapp):
    user = new_user(dovecot)
    c = dovecot.client(user)
    fill(c, "INBOX", [message(n, user, pad=3_000) for n in range(4000)])
    c.logout()
    add_mailbox(ctx, dovecot, user, 15)
    env = {**os.environ, "CRM_SYNC_CLAIM": "3"}
    worker = subprocess.Popen([sys.executable, "-m", "celery", "-A", "worker", "worker", "-P", "solo", "-Q",
                               "sync-killed", "--loglevel", "WARNING", "-n", f"killed{os.getpid()}@%h"],
                              env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        webapp.send_task("crm.sync_mailbox", args=[INSTALLATION, 15], queue="sync-killed")
        deadline = time.time() + 120
        while time.time() < deadline:
            row = folder_row(ctx.engine, 15, "INBOX")
            if row is not None and row.last_uid >= 600:
                break
            time.sleep(0.02)
        os.killpg(worker.pid, signal.SIGKILL)
        worker.wait()
    finally:
        if worker.poll() is None:
            os.killpg(worker.pid, signal.SIGKILL)
    done_before = folder_row(ctx.engine, 15, "INBOX").last_uid
    assert 600 <= done_before < 4000, "killed mid-sync"
    assert len(stored(ctx.engine, 15)) == done_before
    busy = sync.sync_mailbox(ctx, INSTALLATION, 15)
    assert busy.get("skipped") == "another run is syncing this mailbox"  # the dead worker's claim
    time.sleep(3.5)  # CRM_SYNC_CLAIM of the killed worker
    resumed = sync.sync_mailbox(ctx, INSTALLATION, 15)
    assert resumed["state"] == "ok"
    assert totals(resumed)["duplicates"] == 0 and totals(resumed)["new"] == 4000 - done_before
    assert_synced(ctx.engine, dovecot, user, 15, ["INBOX", "Sent"])


def test_a_folder_recreated_with_a_new_uidvalidity_is_walked_again(ctx, dovecot):
    user = new_user(dovecot)
    c = dovecot.client(user)
    c.create_folder("Projects")
    fill(c, "Projects", [message(n, user) for n in range(30)])
    add_mailbox(ctx, dovecot, user, 16, folders=["Projects"])
    assert totals(sync.sync_mailbox(ctx, INSTALLATION, 16))["new"] == 30
    before = folder_row(ctx.engine, 16, "Projects").uidvalidity

    c.delete_folder("Projects")
    missing = sync.sync_mailbox(ctx, INSTALLATION, 16)
    assert missing["state"] == "ok" and missing["folders"][0]["state"] == "missing"
    status = accounts.mailbox_status(ctx, INSTALLATION, 16)["mailboxes"][0]["folders"][0]
    assert status["state"] == "missing" and "Projects" in status["error"]

    c.create_folder("Projects")
    fill(c, "Projects", [message(n, user) for n in range(10)] + [message(n, user) for n in range(30, 35)])
    c.logout()
    again = sync.sync_mailbox(ctx, INSTALLATION, 16)
    assert folder_row(ctx.engine, 16, "Projects").uidvalidity != before
    assert totals(again) == {"fetched": 15, "new": 5, "duplicates": 10, "rejected": 0}
    got = stored(ctx.engine, 16)
    assert len(got) == len(set(got)) == 35, "re-walked messages are duplicates, never second copies"


# -- credentials ----------------------------------------------------------------------------

def test_a_wrong_password_backs_off_until_new_credentials_arrive(ctx, dovecot):
    user = new_user(dovecot)
    dovecot.client(user).append("INBOX", message(1, user))
    add_mailbox(ctx, dovecot, user, 17, password="not-the-password")
    failed = sync.sync_mailbox(ctx, INSTALLATION, 17)
    assert failed["state"] == "auth_failed"
    assert "not-the-password" not in json.dumps(failed)
    status = accounts.mailbox_status(ctx, INSTALLATION, 17)["mailboxes"][0]
    assert status["state"] == "auth_failed" and "refused" in status["last_error"]
    assert status["next_attempt_at"] > failed["next_attempt_at"][:0] and failed["next_attempt_at"]
    log_before = dovecot.log().count("auth failed")
    assert sync.sync_mailbox(ctx, INSTALLATION, 17)["skipped"] == "backing off after a failure"
    assert dovecot.log().count("auth failed") == log_before, "no login while backing off"
    with ctx.engine.connect() as conn:
        assert accounts.due(conn, int(time.time())) == []

    assert accounts.upsert_mailboxes(ctx, INSTALLATION, [{
        "user_id": 17, "host": "127.0.0.1", "port": dovecot.port, "security": "none", "username": user,
        "password": dovecot.users[user]}])["updated"] == 1
    with ctx.engine.connect() as conn:
        assert accounts.due(conn, int(time.time())) == [(INSTALLATION, 17)], "new credentials end the backoff"
    fixed = sync.sync_mailbox(ctx, INSTALLATION, 17)
    assert fixed["state"] == "ok" and totals(fixed)["new"] == 1
    assert accounts.mailbox_status(ctx, INSTALLATION, 17)["mailboxes"][0]["last_error"] is None
    assert scrape(ctx)[("crm_mailbox_state", (("installation", "1"), ("state", "ok"), ("user", "17")))] == 1


def test_metrics_give_each_mailboxs_state_lag_and_backlog_and_the_messages_synced(ctx, dovecot):
    user = new_user(dovecot)
    fill(dovecot.client(user), "INBOX", [message(n, user) for n in range(5)])
    add_mailbox(ctx, dovecot, user, 21)
    add_mailbox(ctx, dovecot, user, 22, password="wrong")
    sync.sync_mailbox(ctx, INSTALLATION, 21)
    sync.sync_mailbox(ctx, INSTALLATION, 22)
    found = scrape(ctx)
    ids = (("installation", "1"), ("user", "21"))
    assert found[("crm_mailbox_state", (ids[0], ("state", "ok"), ids[1]))] == 1
    assert found[("crm_mailbox_state", (ids[0], ("state", "auth_failed"), ids[1]))] == 0
    assert found[("crm_mailbox_state", (ids[0], ("state", "auth_failed"), ("user", "22")))] == 1
    assert found[("crm_mailbox_backlog", ids)] == 0 and found[("crm_mailbox_lag_seconds", ids)] < 60
    assert found[("crm_sync_messages_total", (("outcome", "fetched"),))] == 5
    assert found[("crm_sync_runs_total", (("outcome", "auth_failed"),))] == 1


def test_xoauth2_against_dovecots_oauth2_passdb(ctx, dovecot):
    user = new_user(dovecot)
    dovecot.client(user).append("INBOX", message(1, user))
    dovecot.tokens["token-one"] = user
    assert accounts.upsert_mailboxes(ctx, INSTALLATION, [{
        "user_id": 18, "host": "127.0.0.1", "port": dovecot.port, "security": "none", "username": user,
        "oauth2_access_token": "token-one"}])["accepted"] == 1
    assert sync.sync_mailbox(ctx, INSTALLATION, 18)["state"] == "ok"
    del dovecot.tokens["token-one"]  # expired
    dovecot.client(user).append("INBOX", message(2, user))
    assert sync.sync_mailbox(ctx, INSTALLATION, 18)["state"] == "auth_failed"
    dovecot.tokens["token-two"] = user
    assert accounts.set_mailbox_token(ctx, INSTALLATION, 18, "token-two") == {"user_id": 18, "updated": True}
    refreshed = sync.sync_mailbox(ctx, INSTALLATION, 18)
    assert refreshed["state"] == "ok" and totals(refreshed)["new"] == 1
    assert_synced(ctx.engine, dovecot, user, 18, ["INBOX", "Sent"])


@pytest.mark.parametrize("security", ["tls", "starttls"])
def test_tls_is_verified_against_the_given_ca(ctx, dovecot, security):
    user = new_user(dovecot)
    dovecot.client(user).append("INBOX", message(1, user))
    port = dovecot.tls_port if security == "tls" else dovecot.port
    add_mailbox(ctx, dovecot, user, 19, security=security, port=port)
    untrusted = sync.sync_mailbox(ctx, INSTALLATION, 19)
    assert untrusted["state"] == "unreachable" and "CERTIFICATE_VERIFY_FAILED" in untrusted["error"]
    add_mailbox(ctx, dovecot, user, 19, security=security, port=port, ca_cert=dovecot.ca_cert)
    assert sync.sync_mailbox(ctx, INSTALLATION, 19)["state"] == "ok"
    assert_synced(ctx.engine, dovecot, user, 19, ["INBOX"])


# -- messages the service cannot take ---------------------------------------------------------

def _sized(n: int, user: str, size: int) -> bytes:
    head = message(n, user)
    return head + b"y" * (size - len(head) - 2) + b"\r\n"


def test_a_message_over_10_mib_is_rejected_without_download_and_a_bad_one_alone(ctx, dovecot):
    user = new_user(dovecot)
    c = dovecot.client(user)
    c.append("INBOX", message(1, user))
    c.append("INBOX", _sized(2, user, MAX_RAW + 1))
    c.append("INBOX", b"   \r\n")  # a message with nothing in it
    c.append("INBOX", message(4, user))
    c.logout()
    add_mailbox(ctx, dovecot, user, 20)
    result = sync.sync_mailbox(ctx, INSTALLATION, 20)
    inbox = result["folders"][0]
    assert result["state"] == "ok" and inbox["new"] == 2
    assert [r["uid"] for r in inbox["rejected"]] == [2, 3]
    assert inbox["rejected"][0]["error"].startswith("raw: ") and "not downloaded" in inbox["rejected"][0]["error"]
    assert inbox["rejected"][1]["error"].startswith("raw: ")
    row = folder_row(ctx.engine, 20, "INBOX")
    assert row.last_uid == 4 and row.rejected == 2 and row.synced == 2
    time.sleep(0.3)  # Dovecot writes the session's byte counts at logout
    sent = [int(line.split(" out=")[1].split()[0]) for line in dovecot.log().splitlines()
            if f"imap({user})" in line and " out=" in line]
    assert sent and max(sent) < MAX_RAW // 2, "the big message never crossed the wire"
    assert sync.sync_mailbox(ctx, INSTALLATION, 20)["folders"][0]["rejected"] == [], "rejected once, not again"


# -- the beat, one run per mailbox, secured status -------------------------------------------

def test_two_beats_and_concurrent_calls_sync_each_mailbox_once(worker_env, dovecot):
    engine, r, webapp = worker_env
    ctx = make_context(engine, r)
    users = [new_user(dovecot) for _ in range(2)]
    for k, user in enumerate(users):
        fill(dovecot.client(user), "INBOX", [message(n, user) for n in range(300)])
        add_mailbox(ctx, dovecot, user, 30 + k)
    beats = [webapp.send_task("crm.sync_mailboxes", kwargs={"once_per_tick": True}, queue="sync") for _ in range(2)]
    outcomes = [b.get(timeout=60) for b in beats]
    assert sorted(o.get("enqueued", 0) for o in outcomes) in ([0, 2], [2, 2])  # [2, 2]: a tick boundary between
    calls = [webapp.send_task("crm.sync_mailbox", args=[INSTALLATION, 30], queue="sync") for _ in range(3)]
    results = [c.get(timeout=120) for c in calls]
    assert sum(totals(x)["new"] for x in results) <= 300
    deadline = time.time() + 120
    while time.time() < deadline:
        status = accounts.mailbox_status(ctx, INSTALLATION)["mailboxes"]
        if all(s["state"] == "ok" for s in status):
            break
        time.sleep(0.2)
    for k, user in enumerate(users):
        assert_synced(engine, dovecot, user, 30 + k, ["INBOX", "Sent"])


def test_mailbox_status_shows_a_user_their_own_mailbox_and_never_a_secret(ctx, dovecot):
    users = [new_user(dovecot) for _ in range(2)]
    add_mailbox(ctx, dovecot, users[0], 40)
    add_mailbox(ctx, dovecot, users[1], 41, password=None, oauth2_access_token="tok-" + users[1])
    own = accounts.mailbox_status(ctx, INSTALLATION, 40)["mailboxes"]
    assert [m["user_id"] for m in own] == [40]
    every = accounts.mailbox_status(ctx, INSTALLATION)["mailboxes"]
    assert [m["user_id"] for m in every] == [40, 41] and every[1]["auth"] == "oauth2"
    assert accounts.mailbox_status(ctx, INSTALLATION + 1)["mailboxes"] == []
    text = json.dumps(every)
    assert dovecot.users[users[0]] not in text and "tok-" + users[1] not in text
    with ctx.engine.connect() as conn:
        kept = conn.execute(sa.select(mailboxes.c.secret)).scalars().all()
    assert all(dovecot.users[users[0]] not in s and "tok-" not in s for s in kept), "secrets are encrypted"


def _values(r) -> list[bytes]:
    out = []
    for key in r.scan_iter(count=1000):
        kind = r.type(key)
        out.append(key)
        if kind == b"string":
            out.append(r.get(key) or b"")
        elif kind == b"hash":
            out += [b for kv in r.hgetall(key).items() for b in kv]
        elif kind == b"list":
            out += r.lrange(key, 0, -1)
        elif kind == b"set":
            out += list(r.smembers(key))
        elif kind == b"zset":
            out += r.zrange(key, 0, -1)
        elif kind == b"stream":
            out += [repr(e).encode() for e in r.xrange(key)]
    return out


def test_secrets_never_reach_results_logs_events_or_redis(worker_env, dovecot, caplog):
    import redis as redis_py
    from tests.conftest import BACKEND_URL, BROKER_URL, REDIS_URL
    from worker.app import app
    engine, r, webapp = worker_env
    user = new_user(dovecot)
    password = dovecot.users[user]
    token = "tok-" + os.urandom(8).hex()
    dovecot.tokens[token] = user
    dovecot.client(user).append("INBOX", message(1, user))
    caplog.set_level(logging.DEBUG)
    events: list[dict] = []
    receivers = []

    def listen():
        with app.connection_for_read() as conn:
            receiver = app.events.Receiver(conn, handlers={"*": events.append})
            receivers.append(receiver)
            receiver.capture(limit=None, timeout=None, wakeup=False)
    listener = threading.Thread(target=listen, daemon=True)
    listener.start()
    time.sleep(1)  # the receiver's queue is bound before anything is sent
    try:
        # As a web app would: positional arguments, its own argsrepr.
        assert webapp.send_task("crm.upsert_mailboxes", args=[INSTALLATION, [{
            "user_id": 50, "host": "127.0.0.1", "port": dovecot.port, "security": "none", "username": user,
            "password": password}]], queue="ingest").get(timeout=60)["accepted"] == 1
        assert webapp.send_task("crm.sync_mailbox", args=[INSTALLATION, 50], queue="sync").get(timeout=60)["state"] == "ok"
        assert webapp.send_task("crm.set_mailbox_token", kwargs={
            "installation_id": INSTALLATION, "user_id": 50, "oauth2_access_token": token},
            queue="ingest").get(timeout=60)["updated"]
        assert webapp.send_task("crm.sync_mailbox", args=[INSTALLATION, 50], queue="sync").get(timeout=60)["state"] == "ok"
        failing = webapp.send_task("crm.set_mailbox_token", args=[INSTALLATION, 999, token], queue="ingest")
        with pytest.raises(ValueError, match="^user_id: has no mailbox"):
            failing.get(timeout=60)
        status = webapp.send_task("crm.mailbox_status", args=[INSTALLATION], queue="query").get(timeout=60)
        assert status["mailboxes"][0]["state"] == "ok"
        time.sleep(1)
    finally:
        for receiver in receivers:
            receiver.should_stop = True
        listener.join(5)
    received = [e for e in events if e.get("type") == "task-received"]
    assert len(received) >= 5 and any("***" in str(e.get("args")) + str(e.get("kwargs")) for e in received)
    for secret in (password, token):
        blob = secret.encode()
        for url in (REDIS_URL, BROKER_URL, BACKEND_URL):
            assert not [v for v in _values(redis_py.Redis.from_url(url)) if blob in v], f"a secret in {url}"
        assert secret not in caplog.text
        assert not [e for e in events if secret in json.dumps(e, default=str)], "a secret in a worker event"
        with engine.connect() as conn:
            for table in data_tables():
                for row in conn.execute(sa.select(table)):
                    assert secret not in str(tuple(row)), f"a secret in {table.name} in clear"


# -- arguments, keys, Gmail --------------------------------------------------------------------

@pytest.mark.parametrize("fields,error", [
    ({"security": "none", "host": "imap.example.com"}, "security: none is accepted only for a loopback host"),
    ({"port": 0}, "port: must be an integer from 1 to 65535"),
    ({"oauth2_access_token": "t"}, "password: give either password or oauth2_access_token"),
    ({"password": None}, "password: a new mailbox needs a password or an oauth2_access_token"),
    ({"ca_cert": "-----BEGIN CERTIFICATE-----\nnot one\n-----END CERTIFICATE-----\n"}, "ca_cert: is not a PEM"),
    ({"security": "ssl"}, "security: must be one of tls, starttls, none"),
    ({"folders": ["INBOX", "INBOX"]}, "folders: names a folder twice"),
    ({"imap_host": "x"}, "imap_host: is not a field of a mailbox"),
    ({"host": "imap.example.com/x"}, "host: must be a host name"),
    ({"username": "a\r\nb"}, "username: must not hold line breaks"),
])
def test_a_bad_mailbox_is_rejected_alone_field_first(ctx, fields, error):
    good = {"user_id": 60, "host": "127.0.0.1", "security": "none", "username": "u", "password": "p"}
    result = accounts.upsert_mailboxes(ctx, INSTALLATION, [{**good, "user_id": 61, **fields}, good])
    assert result["accepted"] == 1 and [r["index"] for r in result["rejected"]] == [0]
    assert result["rejected"][0]["error"].startswith(error)


def test_without_a_secret_key_a_secret_is_refused_with_a_clear_error(clean):
    keyless = make_context(clean.engine, clean.redis, secret_keys=())
    with pytest.raises(secrets.SecretKeyError, match="CRM_SECRET_KEY is not set"):
        accounts.upsert_mailboxes(keyless, INSTALLATION, [{
            "user_id": 1, "host": "127.0.0.1", "security": "none", "username": "u", "password": "p"}])


def test_a_key_rotation_keeps_every_secret_readable(clean):
    old, new = secrets.new_key(), secrets.new_key()
    before = make_context(clean.engine, clean.redis, secret_keys=(old,))
    accounts.upsert_mailboxes(before, INSTALLATION, [{
        "user_id": 1, "host": "127.0.0.1", "security": "none", "username": "u", "password": "p-1"}])
    assert accounts.rotate_key(clean.engine, (new, old)) == 1
    with clean.engine.connect() as conn:
        token = accounts.load(conn, INSTALLATION, 1).secret
    assert secrets.decrypt((new,), token) == "p-1"
    with pytest.raises(secrets.SecretKeyError):
        secrets.decrypt((old,), token)


def test_gmail_all_mail_and_its_ids_from_parsed_responses():
    """Gmail cannot be reached from the tests: its LIST and FETCH answers, in the form
    Google's documentation of its IMAP extensions gives (the ids are its examples), go
    through imapclient's parser and the service's mapping."""
    from imapclient.response_parser import parse_fetch_response
    listed = [((b"\\HasNoChildren",), b"/", "INBOX"),
              ((b"\\HasChildren", b"\\Noselect"), b"/", "[Gmail]"),
              ((b"\\All", b"\\HasNoChildren"), b"/", "[Gmail]/All Mail"),
              ((b"\\HasNoChildren", b"\\Sent"), b"/", "[Gmail]/Sent Mail")]
    assert imap.default_folders(listed, gmail=True) == ["[Gmail]/All Mail"]
    assert imap.default_folders(listed, gmail=False) == ["INBOX", "[Gmail]/Sent Mail"]
    assert imap.default_folders([((b"\\HasNoChildren",), b".", "INBOX")], gmail=False) == ["INBOX"]
    raw = [b'1 (X-GM-THRID 1266894439832287888 X-GM-MSGID 1278455344230334865 UID 4821 RFC822.SIZE 2841 '
           b'INTERNALDATE "17-Jul-2026 02:44:25 -0700")']
    parsed = parse_fetch_response(raw, normalise_times=False, uid_is_key=True)
    d = imap.described(4821, parsed[4821])
    assert d.gmail_msgid == format(1278455344230334865, "x") == "11bdfc5cae0c8191"
    assert d.gmail_thrid == format(1266894439832287888, "x")
    assert d.size == 2841 and d.internaldate.isoformat() == "2026-07-17T02:44:25-07:00"
    m = sync._message(d, b"From: a@b.c\r\n\r\nx")
    assert (m["provider_id"], m["provider_thread_id"], m["received_at"]) == (
        "11bdfc5cae0c8191", format(1266894439832287888, "x"), "2026-07-17T02:44:25-07:00")


def test_chunks_hold_at_most_200_messages_and_10_mib_and_a_big_message_alone():
    def d(uid, size):
        return imap.Described(uid, size, None)
    small = [d(u, 1000) for u in range(1, 451)]
    assert [len(c) for c in sync.chunks(small)] == [200, 200, 50]
    heavy = [d(u, 4 * 1024 * 1024) for u in range(1, 6)]
    assert [[x.uid for x in c] for c in sync.chunks(heavy)] == [[1, 2], [3, 4], [5]]
    mixed = [d(1, 10), d(2, MAX_RAW + 1), d(3, 10)]
    assert [[x.uid for x in c] for c in sync.chunks(mixed)] == [[1], [2], [3]]
