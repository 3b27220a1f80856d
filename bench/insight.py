"""The benchmark's email and report parts: email ingestion through a real worker against
the standard library's header parse and notmuch, bytes per stored email, and each report
from its rollup or SQL, against the same report as naive SQL, and from its cache."""
from __future__ import annotations

import base64
import collections
import email.parser
import email.policy
import os
import shutil
import subprocess
import tempfile
import time

import sqlalchemy as sa

from bench.measure import percentiles, say, timed


def corpus(count: int, clients: int, users: int) -> list[tuple[int, dict]]:
    """(mailbox user, message) deliveries of the synthetic corpus (crm seed --emails)."""
    from worker.email.synthetic import messages
    out = []
    for mailboxes, message in messages(1, count, min(clients, 1000), min(users, 1000)):
        out += [(u, message) for u in mailboxes]
    return out


def index_bytes(r) -> dict:
    from worker import keys
    prefix = keys.prefix(1)
    index = sum(r.memory_usage(k, samples=0) or 0 for pattern in ("z:*", "x:*", "mb:*", "sc:*")
                for k in r.scan_iter(match=prefix + pattern, count=1000))
    return {"index": index, "payload": r.memory_usage(keys.payloads(1), samples=0) or 0}


def measure_email(bench, count: int) -> None:
    """End to end through two worker processes, then the peers on the same messages."""
    from worker.email.synthetic import seed_directory
    from worker.tables import emails
    say(f"email: {count:,} messages through crm.ingest_emails (2 worker processes)")
    seed_directory(bench.ctx, 1, bench.shape.clients, bench.shape.users)
    deliveries = corpus(count, bench.shape.clients, bench.shape.users)
    raws = [base64.urlsafe_b64decode(m["raw"] + "=" * (-len(m["raw"]) % 4))
            for m in {id(m): m for _, m in deliveries}.values()]
    before = index_bytes(bench.r)
    batches, pending = [], collections.defaultdict(list)
    for user, message in deliveries:
        pending[user].append(message)
        if len(pending[user]) == 100:
            batches.append((user, pending.pop(user)))
    batches += sorted(pending.items())
    worker = bench.start_worker("ingest", "prefork", 2)
    app = bench.client()
    try:
        for _ in range(200):
            try:
                app.call("crm.noop", queue="ingest", timeout=1)
                break
            except Exception:
                time.sleep(0.2)
        start = time.perf_counter()
        results = [app.send("crm.ingest_emails", {"installation_id": 1, "mailbox_user_id": u, "messages": ms},
                            queue="ingest") for u, ms in batches]
        stored = sum(res.get(timeout=600)["new"] for res in results)
        took = time.perf_counter() - start
    finally:
        app.close()
        worker.terminate()
        worker.wait(30)
    after = index_bytes(bench.r)
    with bench.engine.connect() as conn:
        in_db = conn.execute(sa.select(sa.func.count()).select_from(emails)).scalar()
    # The floor: the standard library's header-only parse of the same bytes.
    parser = email.parser.BytesHeaderParser(policy=email.policy.compat32)
    start = time.perf_counter()
    for raw in raws:
        parser.parsebytes(raw)
    stdlib = len(raws) / (time.perf_counter() - start)
    out = {"messages": len(raws), "deliveries": len(deliveries), "stored": in_db, "new_reported": stored,
           "worker_messages_per_s": round(len(raws) / took), "worker_deliveries_per_s": round(len(deliveries) / took),
           "stdlib_header_parse_per_s": round(stdlib),
           "index_bytes_per_email": round((after["index"] - before["index"]) / max(in_db, 1), 1),
           "payload_bytes_per_email": round((after["payload"] - before["payload"]) / max(in_db, 1), 1)}
    out["ratio_to_stdlib"] = round(out["worker_messages_per_s"] / stdlib, 3)
    notmuch = measure_notmuch(raws[:min(len(raws), 1000)])
    if notmuch:
        out["notmuch_messages_per_s"] = notmuch
        out["ratio_to_notmuch"] = round(out["worker_messages_per_s"] / notmuch, 1)
    else:
        bench.result["notes"].append("notmuch is not installed (apt-get install notmuch): no notmuch figure.")
    bench.result["email"] = out
    say(f"  {out['worker_messages_per_s']}/s through the worker; stdlib header parse {out['stdlib_header_parse_per_s']}/s "
        f"(x{out['ratio_to_stdlib']}); notmuch {notmuch or 'n/a'}/s; index {out['index_bytes_per_email']} B "
        f"+ payload {out['payload_bytes_per_email']} B per email")


def measure_notmuch(raws: list[bytes]) -> float | None:
    """``notmuch new`` over the messages as a maildir: messages per second."""
    if not shutil.which("notmuch"):
        return None
    with tempfile.TemporaryDirectory() as home:
        maildir = os.path.join(home, "mail")
        for sub in ("cur", "new", "tmp"):
            os.makedirs(os.path.join(maildir, sub))
        for n, raw in enumerate(raws):
            with open(os.path.join(maildir, "new", f"{n}.bench:2,"), "wb") as f:
                f.write(raw)
        config = os.path.join(home, "notmuch-config")
        with open(config, "w") as f:
            f.write(f"[database]\npath={maildir}\n[user]\nname=bench\nprimary_email=bench@example.com\n"
                    "[new]\ntags=unread;inbox;\n")
        env = dict(os.environ, NOTMUCH_CONFIG=config, HOME=home)
        start = time.perf_counter()
        subprocess.run(["notmuch", "new", "--quiet"], env=env, check=True, capture_output=True)
        return round(len(raws) / (time.perf_counter() - start), 1)


def report_users(data) -> dict:
    """The report users: one with 2,000 clients (or the broadest) and one with about 50."""
    big = data.big[0]
    fifty = min(data.lists, key=lambda u: (abs(len(data.lists[u]) - 50), u))
    return {"2000_clients": big, "50_clients": fifty}


def naive_activity(conn, user: int, since: int = 0):
    """The activity report as one SQL statement over raw rows (MariaDB/MySQL dialect)."""
    return conn.execute(sa.text(
        "SELECT m.client_id, m.type, DATE_FORMAT(FROM_UNIXTIME(m.meeting_s), '%Y-%m') AS bucket, COUNT(*) "
        "FROM meetings m WHERE m.installation_id = 1 AND m.meeting_s >= :since AND (m.client_id IN "
        "(SELECT client_id FROM user_clients WHERE installation_id = 1 AND user_id = :u) OR m.id IN "
        "(SELECT meeting_id FROM meeting_reach WHERE installation_id = 1 AND (user_id = :u OR client_id IN "
        "(SELECT client_id FROM user_clients WHERE installation_id = 1 AND user_id = :u)))) "
        "GROUP BY m.client_id, m.type, bucket ORDER BY m.client_id, m.type, bucket"), {"u": user, "since": since}).all()


class CountingRedis:
    """Counts the round trips a client makes (commands, and pipelines as one)."""

    def __init__(self, r):
        self.n = 0
        original, make_pipeline = r.execute_command, r.pipeline

        def execute_command(*args, **kwargs):
            self.n += 1
            return original(*args, **kwargs)

        def pipeline(*args, **kwargs):
            p = make_pipeline(*args, **kwargs)
            run = p.execute

            def execute(*a, **k):
                self.n += 1
                return run(*a, **k)
            p.execute = execute
            return p
        r.execute_command, r.pipeline = execute_command, pipeline


def measure_reports(bench, data) -> None:
    from worker import reports
    from worker.context import Context
    from worker.redis_index import connect
    say("reports (rollup or SQL, naive SQL, cached)")
    seconds = max(2.0, bench.args.seconds / 4)
    samples = max(10, bench.args.samples // 10)
    now = int(time.time())
    params = reports.Params(client_ids=None, date_from=None, date_to=None, bucket="month")
    out = {}
    counting_r = connect(bench.urls["index"])
    counter = CountingRedis(counting_r)
    cached_ctx = Context(bench.ctx.settings, bench.engine, counting_r)
    for who, user in report_users(data).items():
        figures = {"clients": len(data.lists[user])}
        with bench.engine.connect() as conn:
            conn.exec_driver_sql("SET time_zone = '+00:00'")
            stamps = reports.client_stamps(bench.ctx, 1)

            def computed(name, user=user):
                """As the service computes a report: a connection (and snapshot) of its own,
                kept figures where they are current."""
                with bench.engine.connect() as own:
                    return reports.compute(own, 1, user, name, params, now, stamps=stamps)
            for name in reports.NAMES:
                ns = timed(lambda: computed(name), [()] * samples, seconds, f"{name} ({who})")
                figures[name] = {"p50_ms": percentiles(ns)["p50"], "rows": len(computed(name)[0])}
            ns = timed(lambda: naive_activity(conn, user), [()] * samples, seconds, f"activity naive SQL ({who})")
            figures["activity"]["naive_sql_p50_ms"] = percentiles(ns)["p50"]
            figures["activity"]["naive_over_rollup"] = round(percentiles(ns)["p50"] / figures["activity"]["p50_ms"], 2)
            # A dashboard's range: the last 90 days of the data, from a time that is not midnight.
            latest = conn.execute(sa.text("SELECT MAX(meeting_s) FROM meetings")).scalar() or now
            recent = reports.Params(client_ids=None, date_from=latest - 90 * 86_400 + 3_600, date_to=None,
                                    bucket="week")
            ns = timed(lambda: reports.compute(conn, 1, user, "activity", recent, now), [()] * samples, seconds,
                       f"activity, last 90 days ({who})")
            naive = timed(lambda: naive_activity(conn, user, recent.date_from), [()] * samples, seconds,
                          f"activity naive SQL, 90 days ({who})")
            figures["activity_90_days"] = {
                "p50_ms": percentiles(ns)["p50"], "naive_sql_p50_ms": percentiles(naive)["p50"],
                "naive_over_rollup": round(percentiles(naive)["p50"] / percentiles(ns)["p50"], 2),
                "rows": len(reports.compute(conn, 1, user, "activity", recent, now)[0])}
        for name in reports.NAMES:
            reports.report(cached_ctx, 1, user, name, None)  # computed and cached
            figures[name].setdefault("rows", None)
            before = counter.n
            ns = timed(lambda: reports.report(cached_ctx, 1, user, name, None), [()] * samples, seconds,
                       f"{name} cached ({who})")
            calls = counter.n - before
            figures[name]["cached_p50_ms"] = percentiles(ns)["p50"]
            figures[name]["cached_round_trips"] = round(calls / (len(ns) + 1), 2)  # + the untimed warm call
        out[who] = figures
    bench.result["reports"] = out
    with bench.engine.connect() as conn:
        bench.result["reports_data"] = {
            "meetings": conn.execute(sa.text("SELECT COUNT(*) FROM meetings")).scalar(),
            "rollup_rows": conn.execute(sa.text("SELECT COUNT(*) FROM meeting_days")).scalar()}
    say("  " + ", ".join(f"{who} activity {f['activity']['p50_ms']} ms vs naive {f['activity']['naive_sql_p50_ms']} ms"
                         for who, f in out.items()))



def measure_threads(bench, data) -> None:
    """crm.query_threads and crm.search_contacts (their plain functions, computed from the
    database: no cached page) for the 2,000-client and the 50-client user: page 1, p50
    and p99."""
    from worker.email import queries
    from worker.tables import contacts
    say("threads and contacts (page 1 of 20)")
    seconds = max(2.0, bench.args.seconds / 4)
    samples = max(20, bench.args.samples // 5)
    with bench.engine.connect() as conn:
        name = conn.execute(sa.select(contacts.c.name).where(contacts.c.installation_id == 1).limit(1)).scalar()
    prefix = (name or "a")[:3]
    calls = {
        "query_threads": lambda u: queries.query_threads(bench.ctx, 1, u, cache=False),
        "query_threads_awaiting": lambda u: queries.query_threads(bench.ctx, 1, u, awaiting_reply=True, cache=False),
        "search_contacts": lambda u: queries.search_contacts(bench.ctx, 1, u),
        "search_contacts_prefix": lambda u: queries.search_contacts(bench.ctx, 1, u, q=prefix),
    }
    out = {}
    for who, user in report_users(data).items():
        figures = {}
        for label, call in calls.items():
            ns = timed(lambda: call(user), [()] * samples, seconds, f"{label} ({who})")
            p = percentiles(ns)
            figures[label] = {"p50_ms": p["p50"], "p99_ms": p["p99"], "total": call(user)["total"]}
        out[who] = figures
    bench.result["threads"] = out
