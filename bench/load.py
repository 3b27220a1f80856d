"""``crm bench load``: the service under concurrent ingestion, access changes and queries,
through two real worker processes on loopback, for a configurable time.  At the end it
checks that nothing was lost (the database holds what was sent, the index mirrors the
database: reconcile finds nothing to repair) and that nothing leaked (every answer only
held meetings of clients the user was allowed while the query ran), and reports query
latency under load and the rates of ingestion and access changes.
"""
from __future__ import annotations

import dataclasses
import json
import os
import random
import subprocess
import sys
import threading
import time

import sqlalchemy as sa

from bench.measure import percentiles, redis_url_db, say

INSTALLATION = 1


@dataclasses.dataclass
class Shape:
    clients: int = 200
    users: int = 40
    batch: int = 200          # records per ingest task
    query_threads: int = 3


class AccessHistory:
    """The access lists over time, as the one changer thread applied them."""

    def __init__(self):
        self.lock = threading.Lock()
        self.lists: dict[int, set[int]] = {}
        self.changes: list[tuple[float, float, int, frozenset]] = []  # (sent, returned, user, list after)

    def set(self, user: int, clients: set[int], sent: float, returned: float) -> None:
        with self.lock:
            self.lists[user] = set(clients)
            self.changes.append((sent, returned, user, frozenset(clients)))

    def allowed(self, user: int, start: float, end: float) -> set[int]:
        """Every client the user may see in an answer to a query sent at ``start`` and
        answered at ``end``: the list of the last change that had returned by ``start``,
        and the list of every change under way at some moment in between (a change may
        take effect at any instant between its sending and its return)."""
        with self.lock:
            found, settled = set(), frozenset()
            for sent, returned, u, clients in self.changes:
                if u != user:
                    continue
                if returned <= start:
                    settled = clients
                elif sent <= end:
                    found |= clients
            return found | settled


class Load:
    def __init__(self, args):
        from bench.client import TaskClient
        from worker.context import Context
        from worker.db import make_engine
        from worker.redis_index import connect
        from worker.schema import create_database, upgrade
        from worker.settings import Settings
        self.args, self.shape = args, Shape()
        index_db = int(args.redis_url.rsplit("/", 1)[1])
        self.urls = {"index": args.redis_url, "broker": redis_url_db(args.redis_url, index_db + 2),
                     "backend": redis_url_db(args.redis_url, index_db + 3)}
        self.env = dict(os.environ, CRM_DATABASE_URL=args.database_url, CRM_REDIS_URL=self.urls["index"],
                        CELERY_BROKER_URL=self.urls["broker"], CELERY_RESULT_BACKEND=self.urls["backend"])
        create_database(args.database_url)
        engine = make_engine(args.database_url)
        upgrade(engine)
        self.ctx = Context(Settings.from_env(self.env), engine, connect(self.urls["index"]))
        self.client = TaskClient(self.urls["broker"], self.urls["backend"], "load-client")
        self.rng = random.Random(11)
        self.sent: dict[str, dict] = {}  # source_id -> the newest record sent
        self.access = AccessHistory()
        self.latencies: list[int] = []
        self.answers: list = []  # (user, sent, answered, source, [(source_id, client_id)])
        self.leaks: list = []
        self.errors: list = []
        self.ingested = self.access_changes = 0
        self.stop = threading.Event()

    def reset(self) -> None:
        from worker.redis_index import connect
        with self.ctx.engine.begin() as conn:
            for table in ("meetings", "user_clients", "users", "installations", "applied_writes"):
                conn.exec_driver_sql(f"DELETE FROM {table}")
        for url in self.urls.values():
            connect(url).flushdb()

    def workers(self) -> list[subprocess.Popen]:
        os.makedirs(self.args.out, exist_ok=True)
        common = [sys.executable, "-m", "celery", "-A", "worker", "--quiet", "worker", "-l", "warning",
                  "--without-gossip", "--without-mingle", "--without-heartbeat"]
        specs = (("query", ["-Q", "query", "-P", "threads", "-c", "8"]),
                 ("bulk", ["-Q", "ingest,precompute,maintenance", "-P", "prefork", "-c", "2"]))
        return [subprocess.Popen(common + opts + ["-n", f"load-{name}@%h"], env=self.env,
                                 stdout=open(os.path.join(self.args.out, f"load-{name}.log"), "w"),
                                 stderr=subprocess.STDOUT) for name, opts in specs]

    # -- the drivers ---------------------------------------------------------------------
    def _guard(self, fn):
        def run():
            try:
                fn()
            except Exception as exc:  # reported at the end: the run then fails
                self.errors.append(f"{fn.__name__}: {exc!r}")
                self.stop.set()
        return run

    def ingester(self) -> None:
        n = 0
        while not self.stop.is_set():
            batch = []
            for _ in range(self.shape.batch):
                # Mostly new meetings, some new versions that move a meeting to another client.
                if self.sent and self.rng.random() < 0.2:
                    source = self.rng.choice(list(self.sent))
                else:
                    n += 1
                    source = f"load-{n}"
                batch.append({"installation_id": INSTALLATION, "source_id": source,
                              "client_id": self.rng.randint(1, self.shape.clients),
                              "type": self.rng.choice(["email", "sms", "call"]),
                              "status": self.rng.choice(["open", "closed"]),
                              "meeting_date": f"2025-{self.rng.randint(1, 12):02d}-{self.rng.randint(1, 28):02d}"
                                              f"T{self.rng.randint(0, 23):02d}:00:00Z",
                              "updated_at": f"2026-01-01T00:00:{len(self.sent) % 60:02d}.{n % 1000000:06d}Z",
                              "subject": f"meeting {source}"})
            result = self.client.call("crm.ingest_meetings", {"records": batch}, queue="ingest", timeout=120)
            assert not result["rejected"], result["rejected"][:1]
            for record in batch:  # within a batch the later version wins; across batches the newest
                old = self.sent.get(record["source_id"])
                if old is None or record["updated_at"] >= old["updated_at"]:
                    self.sent[record["source_id"]] = record
            self.ingested += len(batch)

    def changer(self) -> None:
        while not self.stop.is_set():
            user = self.rng.randint(1, self.shape.users)
            clients = set(self.access.lists.get(user, set()))
            picked = self.rng.sample(range(1, self.shape.clients + 1), 5)
            mode = self.rng.choice(["grant", "revoke", "set"])
            sent = time.monotonic()
            self.client.call(f"crm.{'set_user_clients' if mode == 'set' else mode + '_clients'}",
                             {"installation_id": INSTALLATION, "user_id": user, "client_ids": picked},
                             queue="ingest", timeout=120)
            after = {"grant": clients | set(picked), "revoke": clients - set(picked), "set": set(picked)}[mode]
            self.access.set(user, after, sent, time.monotonic())
            self.access_changes += 1

    def querier(self) -> None:
        rng = random.Random(threading.get_ident())
        while not self.stop.is_set():
            user = rng.randint(1, self.shape.users)
            kwargs = {"installation_id": INSTALLATION, "user_id": user, "limit": 50}
            if rng.random() < 0.5:
                kwargs.update(types=["email"], statuses=["open"])
            start = time.monotonic()
            t = time.perf_counter_ns()
            page = self.client.call("crm.query_meetings", kwargs, timeout=60)
            self.latencies.append(time.perf_counter_ns() - t)
            # Checked once every change has returned: one may be under way right now.
            self.answers.append((user, start, time.monotonic(), page["source"],
                                 [(item["source_id"], item["client_id"]) for item in page["items"]]))

    # -- the run ---------------------------------------------------------------------------
    def run(self) -> dict:
        from worker.access import change
        self.reset()
        for user in range(1, self.shape.users + 1):  # every user starts with a few clients
            clients = set(self.rng.sample(range(1, self.shape.clients + 1), 20))
            change(self.ctx, INSTALLATION, user, sorted(clients), "set")
            self.access.set(user, clients, 0.0, 0.0)
        procs = self.workers()
        try:
            deadline = time.monotonic() + 60
            while True:
                try:
                    self.client.call("crm.noop", timeout=2)
                    self.client.call("crm.ingest_meetings", {"records": []}, queue="ingest", timeout=5)
                    break
                except Exception:
                    if time.monotonic() > deadline:
                        raise
            say(f"load for {self.args.seconds:.0f} s: ingestion, access changes and "
                f"{self.shape.query_threads} query threads, through two worker processes")
            threads = [threading.Thread(target=self._guard(fn)) for fn in
                       [self.ingester, self.changer] + [self.querier] * self.shape.query_threads]
            started = time.monotonic()
            for th in threads:
                th.start()
            self.stop.wait(self.args.seconds)
            self.stop.set()
            for th in threads:
                th.join()
            took = time.monotonic() - started
            return self.verify(took)
        finally:
            for p in procs:
                p.terminate()
            for p in procs:
                p.wait(30)
            self.client.close()

    def verify(self, took: float) -> dict:
        from worker.tables import meetings
        for user, start, end, source, items in self.answers:
            allowed = self.access.allowed(user, start, end)
            leaked = [item for item in items if item[1] not in allowed]
            if leaked:
                self.leaks.append({"user": user, "source": source, "leaked": leaked[:3]})
        from worker.maintenance import reconcile
        from worker.query import parse, run
        with self.ctx.engine.connect() as conn:
            stored = {row.source_id: row for row in conn.execute(
                sa.select(meetings.c.source_id, meetings.c.client_id, meetings.c.status)
                .where(meetings.c.installation_id == INSTALLATION))}
        lost = [s for s, rec in self.sent.items()
                if s not in stored or (stored[s].client_id, stored[s].status) != (rec["client_id"], rec["status"])]
        # The index mirrors the database when reconcile finds nothing to repair.
        report = reconcile(self.ctx, INSTALLATION)
        repaired = {k: v for k, v in report.items() if k.endswith(("repaired", "removed")) and v}
        wrong_totals = []
        for user in range(1, self.shape.users + 1):
            allowed = self.access.lists.get(user, set())
            want = sum(1 for rec in self.sent.values() if rec["client_id"] in allowed)
            query = parse({"installation_id": INSTALLATION, "user_id": user}, self.ctx.cursor_secret())
            got = run(self.ctx, query)[0]["total"]
            if got != want:
                wrong_totals.append((user, got, want))
        result = {
            "seconds": round(took, 1), "worker_processes": 2,
            "queries": len(self.latencies), "query_latency_ms": percentiles(self.latencies),
            "ingested_rows_per_s": round(self.ingested / took), "access_changes_per_s": round(self.access_changes / took, 1),
            "meetings_sent": len(self.sent), "lost": len(lost), "answers_checked": len(self.answers), "leaked_answers": len(self.leaks),
            "reconcile_repairs": repaired, "wrong_final_totals": len(wrong_totals), "errors": self.errors,
            "leaks": self.leaks[:5],
        }
        result["ok"] = not (lost or self.leaks or repaired or wrong_totals or self.errors)
        return result


def main(args) -> int:
    result = Load(args).run()
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "load.json"), "w") as f:
        json.dump(result, f, indent=2)
    lat = result["query_latency_ms"]
    print(f"{result['queries']:,} queries in {result['seconds']} s under load: p50 {lat.get('p50')} ms, "
          f"p99 {lat.get('p99')} ms")
    print(f"ingestion {result['ingested_rows_per_s']:,} rows/s and {result['access_changes_per_s']} access "
          f"changes/s, through {result['worker_processes']} worker processes")
    print(f"lost {result['lost']} of {result['meetings_sent']:,} meetings sent; {result['leaked_answers']} answers "
          f"leaked; reconcile repaired {result['reconcile_repairs'] or 'nothing'}; "
          f"{result['wrong_final_totals']} wrong final totals; errors: {result['errors'] or 'none'}")
    print(json.dumps(result))
    return 0 if result["ok"] else 1
