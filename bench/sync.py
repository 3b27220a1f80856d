"""``crm bench sync``: mailbox sync from a local Dovecot against ``crm.ingest_emails`` on
the same messages, through the same worker process, in one run.

The messages are the synthetic corpus of ``crm seed --emails`` (threads, clients, Cc'd
colleagues, a few broken headers).  Each path stores them into an installation of its own
(the same directory of clients, users and contacts in each), so that both store every
message new:

1. ``crm.ingest_emails``: batches of 500, as a caller that read the mailbox would send
   them, all queued at once;
2. ``crm.sync_mailbox``: the same messages APPENDed to a Dovecot INBOX first, then one
   sync run (its budget raised to take them all);
3. a sync of the mailbox with nothing new, five times: IMAP round trips after login and
   the task's latency.

One worker process (``-c 1``) takes both queues, so neither path gains from parallelism
the other lacks.  The figures go to ``sync.json``.
"""
from __future__ import annotations

import base64
import json
import os
import subprocess
import sys
import time

from bench.measure import percentiles, redis_url_db, say

CLIENTS, USERS = 200, 50
BATCH = 500


def main(args) -> int:
    from bench.client import TaskClient
    from bench.dovecot import Dovecot, available
    from worker.context import Context
    from worker.db import make_engine
    from worker.email.synthetic import messages, seed_directory
    from worker.mailbox.secrets import new_key
    from worker.redis_index import connect
    from worker.schema import create_database, data_tables, upgrade
    from worker.settings import Settings

    if not available():
        say("crm bench sync needs Dovecot: apt-get install dovecot-imapd")
        return 2
    count = 2000 if args.quick else args.sync_messages
    index_db = int(args.redis_url.rsplit("/", 1)[1])
    urls = {"index": args.redis_url, "broker": redis_url_db(args.redis_url, index_db + 2),
            "backend": redis_url_db(args.redis_url, index_db + 3)}
    env = dict(os.environ, CRM_DATABASE_URL=args.database_url, CRM_REDIS_URL=urls["index"],
               CELERY_BROKER_URL=urls["broker"], CELERY_RESULT_BACKEND=urls["backend"],
               CRM_SECRET_KEY=new_key(), CRM_SYNC_BUDGET="3600")
    create_database(args.database_url)
    engine = make_engine(args.database_url)
    upgrade(engine)
    with engine.begin() as conn:
        for table in data_tables():
            conn.execute(table.delete())
    for url in urls.values():
        connect(url).flushdb()
    ctx = Context(Settings.from_env(env), engine, connect(urls["index"]))
    for installation in (1, 2):
        seed_directory(ctx, installation, CLIENTS, USERS)
    corpus = [m["raw"] for _, m in messages(1, count, CLIENTS, USERS)]
    raws = [base64.urlsafe_b64decode(r + "=" * (-len(r) % 4)) for r in corpus]

    server = Dovecot(users=1).start()
    os.makedirs(args.out, exist_ok=True)
    worker = subprocess.Popen([sys.executable, "-m", "celery", "-A", "worker", "--quiet", "worker", "-Q", "ingest,sync",
                               "-P", "prefork", "-c", "1", "-n", "bench-sync@%h", "-l", "warning",
                               "--without-gossip", "--without-mingle", "--without-heartbeat"], env=env,
                              stdout=open(os.path.join(args.out, "sync-worker.log"), "w"), stderr=subprocess.STDOUT)
    client = TaskClient(urls["broker"], urls["backend"], "bench-sync")
    try:
        imap = server.client("user1")
        for start in range(0, len(raws), BATCH):
            imap.multiappend("INBOX", raws[start:start + BATCH])
        imap.logout()
        _wait_for(client)
        say(f"sync: {count:,} messages through crm.ingest_emails, then through crm.sync_mailbox")
        t = time.perf_counter()
        sent = [client.send("crm.ingest_emails", {"installation_id": 1, "mailbox_user_id": 1,
                                                  "messages": [{"raw": r} for r in corpus[s:s + BATCH]]},
                            queue="ingest") for s in range(0, count, BATCH)]
        stored = sum(r.get(timeout=3600)["accepted"] for r in sent)
        ingest_s = time.perf_counter() - t

        added = client.call("crm.upsert_mailboxes", {"installation_id": 2, "mailboxes": [{
            "user_id": 1, "host": "127.0.0.1", "port": server.port, "security": "none", "username": "user1",
            "password": server.users["user1"]}]}, queue="ingest")
        assert added["accepted"] == 1, added
        t = time.perf_counter()
        run = client.call("crm.sync_mailbox", {"installation_id": 2, "user_id": 1}, queue="sync", timeout=3600)
        sync_s = time.perf_counter() - t
        fetched = sum(f["fetched"] for f in run["folders"])
        assert run["state"] == "ok" and fetched == count, {k: v for k, v in run.items() if k != "folders"}

        idle, trips = [], []
        for _ in range(5):
            t = time.perf_counter_ns()
            again = client.call("crm.sync_mailbox", {"installation_id": 2, "user_id": 1}, queue="sync")
            idle.append(time.perf_counter_ns() - t)
            trips.append(again["round_trips"])
    finally:
        client.close()
        worker.terminate()
        worker.wait(30)
        server.stop()
    result = {
        "messages": count, "ingest_accepted": stored, "sync_fetched": fetched,
        "ingest_emails_per_s": round(count / ingest_s, 1), "sync_per_s": round(count / sync_s, 1),
        "ratio": round(ingest_s / sync_s, 3),
        "idle_round_trips": max(trips), "idle_ms": percentiles(idle),
        "worker": "one prefork process taking queues ingest and sync",
    }
    path = os.path.join(args.out, "sync.json")
    with open(path, "w") as f:
        json.dump(result, f, indent=2)
    print(f"{'path':<26} {'messages/s':>12}\n{'crm.ingest_emails':<26} {result['ingest_emails_per_s']:>12,.0f}\n"
          f"{'crm.sync_mailbox (IMAP)':<26} {result['sync_per_s']:>12,.0f}\n"
          f"sync / ingest_emails: {result['ratio']:.2f}; a mailbox with nothing new: {result['idle_round_trips']} "
          f"IMAP round trips after login, {result['idle_ms']['p50']:.1f} ms per run (p50)")
    say(f"figures in {path}")
    if args.quick:
        print(json.dumps(result))
    return 0


def _wait_for(client, seconds: float = 60) -> None:
    """Until the worker takes tasks."""
    deadline = time.monotonic() + seconds
    while True:
        try:
            client.call("crm.ingest_emails", {"installation_id": 1, "mailbox_user_id": 1, "messages": []},
                        queue="ingest", timeout=2)
            return
        except Exception:
            if time.monotonic() > deadline:
                raise
