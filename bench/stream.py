"""Threads and reports measured while data streams in, then checked for exactness.

A stream thread sends, every second, a batch of new meetings and a batch of new emails
(together at least ``rate`` items a second, into random clients that the measured
50-client user does not hold) and an access change of another user, through real worker
processes.  Meanwhile the 2,000- and 50-client users' thread lists and every report
are measured (computed, not cached), and the users ask their reports again and again,
which counts how often the cache answers.  After the stream stops and its tasks have
all ended, each user's thread list and email reports are compared with a brute force
over their visible messages, and ``activity`` and ``going_cold`` with the same reports
computed from the rows alone.
"""
from __future__ import annotations

import base64
import calendar
import collections
import email.utils
import random
import threading
import time

import sqlalchemy as sa

from bench.measure import percentiles, say


class Stream(threading.Thread):
    """Sends the stream's tasks until stopped; keeps their results to check at the end."""

    def __init__(self, app, clients: list[int], others: list[int], rate: int, seed: int = 7):
        super().__init__(daemon=True)
        self.app, self.clients, self.others, self.rate = app, clients, others, rate
        # The synthetic directory gives domains to the first 1,000 clients.
        self.mail_clients = [c for c in clients if c <= 1000] or clients
        self.rng = random.Random(seed)
        self.stop = threading.Event()
        self.sent = collections.Counter()
        self.results = []
        self.seconds = 0.0

    def run(self) -> None:
        start = time.monotonic()
        tick = 0
        while not self.stop.is_set():
            tick += 1
            self._send_second(tick)
            delay = start + tick - time.monotonic()
            if delay > 0:
                self.stop.wait(delay)
        self.seconds = time.monotonic() - start

    def _send_second(self, tick: int) -> None:
        rng, meetings, mails = self.rng, self.rate * 3 // 5, self.rate - self.rate * 3 // 5
        now = int(time.time())
        records = [{"installation_id": 1, "source_id": f"stream-{tick}-{n}", "client_id": rng.choice(self.clients),
                    "type": rng.choice(["call", "sms", "email", "video"]), "status": rng.choice(["open", "closed"]),
                    "meeting_date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(now - rng.randrange(86_400)))}
                   for n in range(meetings)]
        self.results.append(self.app.send("crm.ingest_meetings", {"records": records}, queue="ingest"))
        by_user = collections.defaultdict(list)
        for n in range(mails):
            client = rng.choice(self.mail_clients)
            user = rng.choice(self.others)
            text = (f"Message-ID: <stream-{tick}-{n}@client{client}.example>\r\n"
                    f"From: Person <person{n % 5}@client{client}.example>\r\nTo: user{user}@crm.example\r\n"
                    f"Subject: stream {tick} {n}\r\nDate: {email.utils.formatdate(now - rng.randrange(3_600))}\r\n"
                    f"\r\nbody {tick} {n}\r\n")
            by_user[user].append({"raw": base64.urlsafe_b64encode(text.encode()).decode().rstrip("=")})
        for user, messages in by_user.items():
            self.results.append(self.app.send("crm.ingest_emails", {"installation_id": 1, "mailbox_user_id": user,
                                                                    "messages": messages}, queue="ingest"))
        other = rng.choice(self.others)
        self.results.append(self.app.send("crm.set_user_clients", {
            "installation_id": 1, "user_id": other, "client_ids": rng.sample(self.clients, min(20, len(self.clients)))},
            queue="ingest"))
        self.sent.update({"meetings": meetings, "emails": mails, "access_changes": 1})


def measure_streaming(bench, data, users: dict) -> None:
    """``users``: {label: user id} of the measured users (2,000 and 50 clients)."""
    from worker import reports
    from worker.email import queries
    rate = 100
    seconds = max(4.0, bench.args.seconds)
    say(f"threads and reports while a stream runs ({rate} new meetings and emails a second, and access changes)")
    fifty = users["50_clients"]
    held = set(data.lists[fifty])
    clients = [c for c in range(1, bench.shape.clients + 1) if c not in held]
    others = [u for u in range(1, bench.shape.users + 1) if u not in users.values()]
    worker = bench.start_worker("ingest", "prefork", 2)
    app = bench.client()
    out: dict = {"rate_asked": rate}
    try:
        for _ in range(200):
            try:
                app.call("crm.noop", queue="ingest", timeout=1)
                break
            except Exception:  # noqa: BLE001 (the worker is still starting)
                time.sleep(0.2)
        stream = Stream(app, clients, others, rate)
        stream.start()
        time.sleep(1.0)
        out.update(_measure_under_stream(bench, users, seconds, queries, reports))
        stream.stop.set()
        stream.join()
        failed = 0
        for res in stream.results:
            try:
                res.get(timeout=300)
            except Exception:  # noqa: BLE001 (counted and reported)
                failed += 1
        out["stream"] = {"seconds": round(stream.seconds, 1), **stream.sent, "tasks": len(stream.results),
                         "failed": failed,
                         "items_per_s": round((stream.sent["meetings"] + stream.sent["emails"]) / stream.seconds, 1)}
    finally:
        app.close()
        worker.terminate()
        worker.wait(30)
    out["exact"] = {who: check_exact(bench, user) for who, user in users.items()}
    bench.result["streaming"] = out
    say(f"  stream {out['stream']['items_per_s']} items/s; cache hit rate "
        + ", ".join(f"{who} {f['cache_hit_rate']}" for who, f in out["users"].items())
        + "; exact: " + ", ".join(f"{who} {not mismatches}" for who, mismatches in out["exact"].items()))


def _measure_under_stream(bench, users: dict, seconds: float, queries, reports) -> dict:
    """Per user, each in its own time box: the thread list again and again, computed, then
    as ``crm.query_threads`` serves it (its cached page while current); every report
    computed (at least 3 times each); the reports asked as a dashboard does, every 100 ms,
    counting the answers the cache gives."""
    figures: dict = {}
    for who, user in users.items():
        threads, served = [], []
        for cache, times, box in ((False, threads, seconds / 4), (True, served, seconds / 8)):
            stop = time.monotonic() + box
            while time.monotonic() < stop or len(times) < 20:
                t = time.perf_counter_ns()
                queries.query_threads(bench.ctx, 1, user, cache=cache)
                times.append(time.perf_counter_ns() - t)
        computed = collections.defaultdict(list)
        stop = time.monotonic() + seconds / 2
        while time.monotonic() < stop or min((len(v) for v in computed.values()), default=0) < 3:
            for name in reports.NAMES:
                with bench.engine.connect() as conn:
                    t = time.perf_counter_ns()
                    reports.compute(conn, 1, user, name, reports.ALL, int(time.time()),
                                    stamps=reports.client_stamps(bench.ctx, 1))
                    computed[name].append(time.perf_counter_ns() - t)
        asked = collections.Counter()
        stop = time.monotonic() + seconds / 4
        while time.monotonic() < stop:
            for name in reports.NAMES:
                asked[reports.report(bench.ctx, 1, user, name, None)["source"] == "cache"] += 1
            time.sleep(0.1)
        p, q = percentiles(threads), percentiles(served)
        figures[who] = {"query_threads": {"p50_ms": p["p50"], "p99_ms": p["p99"], "n": p["n"]},
                        "query_threads_served": {"p50_ms": q["p50"], "p99_ms": q["p99"], "n": q["n"]},
                        "reports_p50_ms": {name: percentiles(ns)["p50"] for name, ns in computed.items()},
                        "cache_hit_rate": round(asked[True] / max(1, sum(asked.values())), 3),
                        "reports_asked": sum(asked.values())}
        say(f"  {who}: query_threads computed p50 {p['p50']} / p99 {p['p99']} ms, served p50 {q['p50']} / p99 "
            f"{q['p99']} ms; reports p50 "
            + ", ".join(f"{n} {v} ms" for n, v in figures[who]["reports_p50_ms"].items())
            + f"; cache {figures[who]['cache_hit_rate']}")
    return {"users": figures}


def check_exact(bench, user: int) -> list[str]:
    """What differs between the service's answers and a brute force over the user's
    visible messages (threads, response_times, awaiting_reply, workload), or the reports
    computed from rows alone (activity, going_cold); [] when nothing does."""
    from worker import reports
    from worker.email import queries, thread_state
    from worker.tables import emails
    mismatches = []
    now = int(time.time())
    with bench.engine.connect() as conn:
        ids = conn.execute(sa.select(emails.c.thread_id).distinct().where(emails.c.installation_id == 1)).scalars()
        summaries = {tid: thread_state.summary(messages) for tid, messages in
                     thread_state.load(conn, 1, list(ids), viewer=user).items()}
    order = sorted(summaries, key=lambda t: (summaries[t]["last_s"], t), reverse=True)
    want = [(t, summaries[t]["messages"], _iso(summaries[t]["awaiting_s"])) for t in order[:200]]
    for how, cache in (("served", True), ("computed", False)):
        page = queries.query_threads(bench.ctx, 1, user, limit=200, cache=cache)
        if page["total"] != len(summaries):
            mismatches.append(f"query_threads ({how}) total {page['total']} != {len(summaries)}")
        got = [(i["thread_id"], i["messages"], i["awaiting_reply_since"]) for i in page["items"]]
        if got != want:
            mismatches.append(f"query_threads ({how}) page 1 differs")
    answered = {name: reports.report(bench.ctx, 1, user, name, None, now=now) for name in reports.NAMES}
    answers = {name: a["rows"] for name, a in answered.items()}
    if answers["response_times"] != _response_times(summaries, reports):
        mismatches.append("response_times differs")
    if answers["awaiting_reply"] != _awaiting(summaries):
        mismatches.append("awaiting_reply differs")
    if answers["workload"] != _workload(summaries, reports):
        mismatches.append("workload differs")
    rows_only = reports.Params(client_ids=None, date_from=0, date_to=None, bucket="month")
    with bench.engine.connect() as conn:
        for name in ("activity", "going_cold"):
            # A cached copy was computed at its generated_at (going_cold measures silence to it).
            at = calendar.timegm(time.strptime(answered[name]["generated_at"], "%Y-%m-%dT%H:%M:%SZ"))
            if answers[name] != reports.compute(conn, 1, user, name, rows_only, at)[0]:
                mismatches.append(f"{name} differs from the rows")
    return mismatches


def _iso(seconds):
    return None if seconds is None else time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(seconds))


def _response_times(summaries: dict, reports) -> list[dict]:
    asked = [s for s in summaries.values() if s["inbound"]]
    waits = sorted(w for s in asked for w, _ in s["pairs"])
    histogram = {label: sum(1 for w in waits if (lo is None or w >= lo) and (hi is None or w < hi))
                 for (label, hi), lo in zip(reports.HISTOGRAM, [None] + [h for _, h in reports.HISTOGRAM[:-1]])}
    return [{"threads": len(asked), "answered": len(waits), "median_s": reports.percentile(waits, 0.5),
             "p90_s": reports.percentile(waits, 0.9),
             "within_1h_share": (sum(1 for w in waits if w < 3_600) / len(waits)) if waits else None,
             "histogram": histogram}]


def _awaiting(summaries: dict) -> list[dict]:
    rows = sorted((s["awaiting_s"], t) for t, s in summaries.items() if s["awaiting_s"] is not None)
    return [{"thread_id": t, "subject": summaries[t]["subject"], "awaiting_reply_since": _iso(since),
             "client_ids": summaries[t]["clients"]} for since, t in rows]


def _workload(summaries: dict, reports) -> list[dict]:
    figures: dict = collections.defaultdict(lambda: {"received": 0, "sent": 0, "awaiting": 0, "waits": []})
    for s in summaries.values():
        for user, (received, sent) in s["mailboxes"].items():
            f = figures[int(user)]
            f["received"] += received
            f["sent"] += sent
            f["awaiting"] += s["awaiting_s"] is not None
        for wait, users in s["pairs"]:
            for user in users:
                figures[user]["waits"].append(wait)
    return [{"user_id": u, "received": f["received"], "sent": f["sent"], "awaiting": f["awaiting"],
             "median_reply_s": reports.percentile(sorted(f["waits"]), 0.5)}
            for u, f in sorted(figures.items()) if f["received"] or f["sent"]]
